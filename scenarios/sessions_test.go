package scenarios

import (
	"encoding/json"
	"strings"
	"sync"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

var _ = Describe("Stale session", Label("backend:process", "attack"), func() {
	It("a KBS session the host kept from an earlier boot gets nothing, and spends nothing", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		tap, err := s.Host.TapKBS(ctx())
		Expect(err).NotTo(HaveOccurred())
		DeferCleanup(tap.Close)
		expectBooted(boot(vm))
		att, ok := tap.Last(protocol.KBSPathAttest)
		Expect(ok).To(BeTrue(), "the tap saw the attestation")
		Expect(att.Status).To(Equal(200))
		res, ok := tap.Last(protocol.KBSPathResource)
		Expect(ok).To(BeTrue())
		Expect(res.Status).To(Equal(200))
		var tok protocol.KBSAttestResponse
		Expect(json.Unmarshal(att.Response, &tok)).To(Succeed())

		By("the owner primes the next boot; the host replays what it kept")
		Expect(vm.Prime(ctx())).To(Succeed())
		n := len(audit(s, ""))
		code, body, err := s.Host.Replay(ctx(), res)
		Expect(err).NotTo(HaveOccurred())
		Expect(code).To(Equal(401), "old cookie: %s", body)
		withToken := res
		withToken.Cookie, withToken.Auth = "", "Bearer "+tok.Token
		code, body, err = s.Host.Replay(ctx(), withToken)
		Expect(err).NotTo(HaveOccurred())
		Expect(code).To(Equal(401), "old token: %s", body)
		code, body, err = s.Host.Replay(ctx(), att)
		Expect(err).NotTo(HaveOccurred())
		Expect(code).To(Equal(401), "re-attest with the same nonce: %s", body)
		Expect(string(body)).To(ContainSubstring("nonce:"))
		after := auditAfter(s, "", n)
		Expect(hasAudit(after, "release", verifier.Deny, "session:")).To(BeTrue())
		Expect(hasAudit(after, "attest", verifier.Deny, "nonce:")).To(BeTrue())
		v := view(vm)
		Expect(v.Primed).To(BeTrue(), "the boot request is still there for the honest guest")
		Expect(v.Releases).To(Equal(uint64(1)))

		By("the honest guest takes the boot request")
		expectBooted(bootWith(vm, harness.BootOptions{NoPrime: true}))
		Expect(view(vm).Releases).To(Equal(uint64(2)))
	})
})

var _ = Describe("Live clone, next boot request", Label("backend:process", "attack"), func() {
	// An instance keeps running from boot N while the VM's state is copied, primed and booted
	// for N+1 elsewhere (the host's second live instance).
	liveClone := func(writeThrough bool) (s *harness.Stack, old *harness.Running, vm, next *harness.VM) {
		GinkgoHelper()
		s = newStack()
		vm = newVM(s, harness.VMOptions{Name: "vm", WriteThrough: writeThrough})
		expectBooted(boot(vm, "nv-write=n-1"))
		r, err := vm.Start(ctx(), harness.BootOptions{Control: true})
		Expect(err).NotTo(HaveOccurred())
		_, err = r.Command(ctx(), "nv-read", time.Minute) // boot N is up and confirmed
		Expect(err).NotTo(HaveOccurred())
		next, err = s.Clone(vm, "vm-next")
		Expect(err).NotTo(HaveOccurred())
		run := boot(next, "nv-write=n+1")
		expectBooted(run)
		return s, r, vm, next
	}

	It("write-through: the boot-N instance cannot confirm a write and halts", func() {
		s, old, vm, _ := liveClone(true)
		counter := view(vm).Counter
		n := len(audit(s, vm.Registration))
		_, err := old.Command(ctx(), "nv-write=from-boot-n", 10*time.Second)
		Expect(err).To(HaveOccurred(), "the old instance got an answer to an unconfirmable write")
		run, err := old.Wait(ctx())
		Expect(err).NotTo(HaveOccurred())
		ev := expectFailed(run, protocol.LayerSVSM, "confirm-refused")
		Expect(ev.String("detail")).To(ContainSubstring("superseded"))
		Expect(hasAudit(auditAfter(s, vm.Registration, n), "confirm", verifier.Deny, "boot ")).To(BeTrue())
		Expect(view(vm).Counter).To(Equal(counter), "the old instance moved nothing")
	})

	It("default mode: the boot-N instance keeps running on its own disk (known limitation)", Label("known-limitation"), func() {
		s, old, vm, next := liveClone(false)
		counter := view(vm).Counter
		n := len(audit(s, vm.Registration))
		ev, err := old.Command(ctx(), "nv-write=from-boot-n", time.Minute)
		Expect(err).NotTo(HaveOccurred())
		Expect(ev.Fields["ok"]).To(BeTrue(),
			"a live boot-N instance can no longer write in default mode: update SCENARIOS.md and this spec")
		run, err := old.Stop(ctx())
		Expect(err).NotTo(HaveOccurred())
		expectBooted(run)
		By("it never talked to the verifier again, and its disk is stale for every later boot")
		for _, e := range auditAfter(s, vm.Registration, n) {
			Expect(e.Event).NotTo(BeElementOf("confirm", "release"), "audit %+v", e)
		}
		Expect(view(vm).Counter).To(Equal(counter))
		expectFailed(boot(vm), protocol.LayerSVSM, "stale-state")
		run = boot(next, "nv-read")
		expectBooted(run)
		Expect(action(run, "nv-read").String("nv_data")).To(Equal("n+1"))
	})
})

var _ = Describe("Re-primed while a boot is in flight", Label("backend:process", "attack"), func() {
	It("the later release wins: the earlier boot's confirmation is refused as superseded", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm))
		other, err := s.Clone(vm, "vm-other")
		Expect(err).NotTo(HaveOccurred())
		// Each instance's confirmation is held by the host until released.
		hold := func(v *harness.VM, name string) (held chan struct{}, release func()) {
			held, gate := make(chan struct{}), make(chan struct{})
			var once, opened sync.Once
			release = func() { opened.Do(func() { close(gate) }) }
			t := startConfirmMITM(s, v, name)
			DeferCleanup(release) // runs before the MITM's Close, so a failed spec never leaves a relay blocked
			t.set(func(f harness.Frame, _ bool) harness.Verdict {
				if f.Dir == harness.ToProxy {
					once.Do(func() {
						close(held)
						<-gate
					})
				}
				return harness.Verdict{}
			})
			return held, release
		}
		heldA, releaseA := hold(vm, "hold-a")
		heldB, releaseB := hold(other, "hold-b")
		opts := harness.BootOptions{NoPrime: true, AttestTimeout: time.Minute}

		Expect(vm.Prime(ctx())).To(Succeed())
		a, err := vm.Start(ctx(), opts)
		Expect(err).NotTo(HaveOccurred())
		Eventually(heldA).WithTimeout(time.Minute).Should(BeClosed())
		By("the owner primes again (the first boot looked hung); a second instance takes it")
		Expect(vm.Prime(ctx())).To(Succeed())
		b, err := other.Start(ctx(), opts)
		Expect(err).NotTo(HaveOccurred())
		Eventually(heldB).WithTimeout(time.Minute).Should(BeClosed())

		releaseA()
		runA, err := a.Wait(ctx())
		Expect(err).NotTo(HaveOccurred())
		ev := expectFailed(runA, protocol.LayerSVSM, "confirm-refused")
		Expect(ev.String("detail")).To(ContainSubstring("superseded"))
		noEvent(runA, "measured")
		releaseB()
		runB, err := b.Wait(ctx())
		Expect(err).NotTo(HaveOccurred())
		expectBooted(runB)
		Expect(view(vm).Counter).To(Equal(uint64(2)))
		Expect(view(vm).Releases).To(Equal(uint64(3)))
	})
})

var _ = Describe("Verifier restored from an old backup", Label("backend:process", "attack"), func() {
	It("the guest refuses state ahead of the verifier's record", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm))
		Expect(s.Host.BackupVerifier(ctx(), "old")).To(Succeed())
		expectBooted(boot(vm))
		expectBooted(boot(vm, "nv-write=latest"))
		Expect(s.Host.RestoreVerifier(ctx(), "old")).To(Succeed())
		Expect(view(vm).Counter).To(Equal(uint64(1)))
		run := boot(vm, "nv-read")
		ev := expectFailed(run, protocol.LayerSVSM, "state-ahead-of-verifier")
		Expect(ev.String("detail")).To(ContainSubstring("state holds counter 3"))
		noEvent(run, "measured")
		noEvent(run, "confirmed")
		Expect(view(vm).Counter).To(Equal(uint64(1)), "nothing was confirmed")
		Expect(strings.Contains(ev.String("detail"), "expects 1")).To(BeTrue())
	})
})
