package scenarios

import (
	"sync"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

var _ = Describe("Rollback across boots", Label("backend:process", "attack"), func() {
	DescribeTable("the guest refuses a state disk restored from k boots ago",
		func(k int) {
			s := newStack()
			vm := newVM(s, harness.VMOptions{Name: "vm"})
			expectBooted(boot(vm, "nv-increment"))
			Expect(vm.Snapshot("old")).To(Succeed())
			for range k {
				expectBooted(boot(vm, "nv-increment"))
			}
			want := view(vm).Counter
			Expect(vm.Snapshot("current")).To(Succeed())
			n := len(audit(s, vm.Registration))

			By("the host restores the old disk and boots it with a valid boot request")
			Expect(vm.Restore("old")).To(Succeed())
			run := boot(vm, "nv-read")
			ev := expectFailed(run, protocol.LayerSVSM, "stale-state")
			Expect(ev.String("detail")).To(ContainSubstring("the verifier expects %d", want))
			By("firmware never ran; the verifier released (it cannot see the disk) but nothing was confirmed")
			noEvent(run, "measured")
			noEvent(run, "confirmed")
			after := auditAfter(s, vm.Registration, n)
			Expect(hasAudit(after, "release", verifier.Allow, "")).To(BeTrue())
			Expect(hasAudit(after, "confirm", verifier.Allow, "")).To(BeFalse())
			Expect(view(vm).Counter).To(Equal(want))
			By("the old image stays unusable; the current one boots and keeps its data")
			run = boot(vm)
			expectFailed(run, protocol.LayerSVSM, "stale-state")
			Expect(vm.Restore("current")).To(Succeed())
			run = boot(vm, "nv-read")
			expectBooted(run)
			Expect(num(action(run, "nv-read"), "nv_counter")).To(Equal(uint64(k + 1)))
		},
		Entry("k = 1", 1),
		Entry("k = 3", 3),
	)

	It("refuses a wiped state disk once the VM has state", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm))
		Expect(vm.Truncate(0)).To(Succeed())
		run := boot(vm)
		expectFailed(run, protocol.LayerSVSM, "state-missing")
		noEvent(run, "tpm-manufactured")
	})
})

var _ = Describe("Rollback within a boot", Label("backend:process", "attack"), func() {
	// The host snapshots the state disk between two runtime writes of one boot, driving the
	// guest's workload through its control channel, then restores the snapshot.
	restoreMidBoot := func(vm *harness.VM) *harness.GuestRun {
		GinkgoHelper()
		expectBooted(boot(vm))
		r, err := vm.Start(ctx(), harness.BootOptions{Control: true})
		Expect(err).NotTo(HaveOccurred())
		ev, err := r.Command(ctx(), "nv-write=old", time.Minute)
		Expect(err).NotTo(HaveOccurred())
		Expect(ev.Fields["ok"]).To(BeTrue())
		Expect(vm.Snapshot("mid-boot")).To(Succeed())
		ev, err = r.Command(ctx(), "nv-write=new", time.Minute)
		Expect(err).NotTo(HaveOccurred())
		Expect(ev.Fields["ok"]).To(BeTrue())
		_, err = r.Command(ctx(), "poweroff", time.Minute)
		Expect(err).NotTo(HaveOccurred())
		run, err := r.Wait(ctx())
		Expect(err).NotTo(HaveOccurred())
		expectBooted(run)
		Expect(vm.Restore("mid-boot")).To(Succeed())
		return boot(vm, "nv-read")
	}

	It("succeeds in the default mode (known limitation)", Label("known-limitation"), func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		run := restoreMidBoot(vm)
		expectBooted(run)
		Expect(action(run, "nv-read").String("nv_data")).To(Equal("old"),
			"the intra-boot rollback is no longer possible: update SCENARIOS.md and this spec")
	})

	It("is refused in write-through mode", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm", WriteThrough: true})
		run := restoreMidBoot(vm)
		expectFailed(run, protocol.LayerSVSM, "stale-state")
	})
})

var _ = Describe("Clone", Label("backend:process", "attack"), func() {
	It("releases the key to at most one instance per boot request", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm))
		clone, err := s.Clone(vm, "vm-clone")
		Expect(err).NotTo(HaveOccurred())
		n := len(audit(s, vm.Registration))

		By("one boot request, two instances started at the same time")
		Expect(vm.Prime(ctx())).To(Succeed())
		var wg sync.WaitGroup
		runs := make([]*harness.GuestRun, 2)
		for i, v := range []*harness.VM{vm, clone} {
			wg.Add(1)
			go func() {
				defer GinkgoRecover()
				defer wg.Done()
				runs[i] = bootWith(v, harness.BootOptions{NoPrime: true, Actions: []string{"wait=300ms"}})
			}()
		}
		wg.Wait()
		ok := 0
		for _, r := range runs {
			if r.ExitCode == 0 {
				ok++
				continue
			}
			expectFailed(r, protocol.LayerSVSM, "attestation-failed")
			noEvent(r, "state-opened")
		}
		Expect(ok).To(Equal(1), "exactly one instance may boot")
		after := auditAfter(s, vm.Registration, n)
		Expect(hasAudit(after, "release", verifier.Deny, "boot_request")).To(BeTrue())
		Expect(view(vm).Releases).To(Equal(uint64(2)))
	})

	It("after a rollback: a clone on an old disk never runs on stale state", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm, "nv-write=v1"))
		Expect(vm.Snapshot("v1")).To(Succeed())
		expectBooted(boot(vm, "nv-write=v2"))
		clone, err := s.Clone(vm, "vm-clone")
		Expect(err).NotTo(HaveOccurred())
		Expect(clone.LoadState(vm.SnapshotPath("v1"))).To(Succeed())

		By("the clone, on the old disk, takes the next boot request: refused as stale")
		run := boot(clone)
		expectFailed(run, protocol.LayerSVSM, "stale-state")
		By("without a new request the original cannot boot either; with one it boots current state")
		expectFailed(bootWith(vm, harness.BootOptions{NoPrime: true}), protocol.LayerSVSM, "attestation-failed")
		run = boot(vm, "nv-read")
		expectBooted(run)
		Expect(action(run, "nv-read").String("nv_data")).To(Equal("v2"))
	})
})

var _ = Describe("Raw secret mode (upstream-compatible)", Label("backend:process", "attack", "known-limitation"), func() {
	It("boots and persists, but cannot see a rollback: the old disk boots", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm", SecretMode: protocol.SecretModeRaw})
		run := boot(vm, "nv-increment")
		expectBooted(run)
		Expect(event(run, "attested").String("secret_mode")).To(Equal("raw"))
		noEvent(run, "confirmed")
		for _, h := range headers(vm) {
			Expect(h.Counter).To(BeZero(), "raw mode keeps no counter")
		}
		Expect(vm.Snapshot("old")).To(Succeed())
		expectBooted(boot(vm, "nv-increment"))
		Expect(vm.Restore("old")).To(Succeed())
		run = boot(vm, "nv-read")
		expectBooted(run)
		Expect(num(action(run, "nv-read"), "nv_counter")).To(Equal(uint64(1)),
			"raw mode now detects rollback: update SCENARIOS.md and this spec")
	})
})
