package scenarios

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// confirmTap wraps a MITM's view of the confirmation channel: which connections carry a
// confirmation, the requests it saw and the answers the verifier gave.
type confirmTap struct {
	mu      sync.Mutex
	conns   map[int]bool
	answers [][]byte
	mutate  func(f harness.Frame, confirmConn bool) harness.Verdict
}

func (t *confirmTap) set(m func(f harness.Frame, confirmConn bool) harness.Verdict) {
	t.mu.Lock()
	t.mutate = m
	t.mu.Unlock()
}

// frame is the MITM callback. A confirmation request is the guest's first frame of a
// connection carrying "confirm" (on the QEMU backend's single serial stream, any frame that
// does); the answer is the next frame to the guest on that connection.
func (t *confirmTap) frame(f harness.Frame) harness.Verdict {
	t.mu.Lock()
	isReq := f.Dir == harness.ToProxy && bytes.Contains(f.Body, []byte(`"confirm":{`))
	if isReq {
		t.conns[f.Conn] = true
	}
	confirmConn := t.conns[f.Conn]
	if f.Dir == harness.ToGuest && confirmConn {
		t.answers = append(t.answers, f.Body)
		delete(t.conns, f.Conn) // one answer per confirmation
	}
	m := t.mutate
	t.mu.Unlock()
	if m == nil || !(isReq || (f.Dir == harness.ToGuest && confirmConn)) {
		return harness.Verdict{}
	}
	return m(f, confirmConn)
}

func (t *confirmTap) lastAnswer() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.answers) == 0 {
		return nil
	}
	return t.answers[len(t.answers)-1]
}

// confirmRequest decodes the guest's confirmation from its negotiation frame.
func confirmRequest(body []byte) *protocol.ConfirmRequest {
	GinkgoHelper()
	var neg protocol.NegotiationRequest
	Expect(json.Unmarshal(body, &neg)).To(Succeed())
	Expect(neg.Confirm).NotTo(BeNil())
	return neg.Confirm
}

func mustJSON(v any) []byte {
	GinkgoHelper()
	b, err := json.Marshal(v)
	Expect(err).NotTo(HaveOccurred())
	return b
}

// startConfirmMITM puts a MITM between vm and the proxy and returns its confirmation view.
func startConfirmMITM(s *harness.Stack, vm *harness.VM, name string) *confirmTap {
	GinkgoHelper()
	t := &confirmTap{conns: map[int]bool{}}
	m, err := harness.StartMITM(filepath.Join(filepath.Dir(s.ProxySocket()), name+".sock"), s.ProxySocket(), t.frame)
	Expect(err).NotTo(HaveOccurred())
	DeferCleanup(m.Close)
	Expect(vm.SetProxySocket(m.Path())).To(Succeed())
	return t
}

// The host's attacks on the guest's freshness confirmation (SCENARIOS.md "MITM on the
// confirmation"). Each attack must leave the guest failed closed before firmware with a
// reason, the verifier's record as the attack left it, and the next honest boot working.
var _ = Describe("MITM on the confirmation", Label("backend:process", "attack"), func() {
	var s *harness.Stack
	var vm *harness.VM
	var tap *confirmTap
	BeforeEach(func() {
		s = newStack()
		vm = newVM(s, harness.VMOptions{Name: "vm"})
		tap = startConfirmMITM(s, vm, "mitm")
		expectBooted(boot(vm, "nv-write=kept")) // through the transparent relay
		Expect(tap.lastAnswer()).NotTo(BeEmpty(), "the relay saw the first boot's confirmation answer")
	})

	// attacked boots once under the attack and checks what every layer shows.
	attacked := func(reason string, forwarded bool, o harness.BootOptions) *harness.GuestRun {
		GinkgoHelper()
		before := view(vm)
		n := len(audit(s, vm.Registration))
		run := bootWith(vm, o)
		ev := expectFailed(run, protocol.LayerSVSM, reason)
		By("the guest stopped before firmware: " + ev.String("detail"))
		noEvent(run, "confirmed")
		noEvent(run, "measured")
		after := auditAfter(s, vm.Registration, n)
		Expect(hasAudit(after, "release", verifier.Allow, "")).To(BeTrue())
		v := view(vm)
		if forwarded {
			By("the request reached the verifier, which confirmed: only the answer was attacked")
			Expect(hasAudit(after, "confirm", verifier.Allow, "")).To(BeTrue())
			Expect(v.Counter).To(Equal(before.Counter + 1))
		} else {
			By("the verifier never saw a confirmation: its counter did not move")
			for _, e := range after {
				Expect(e.Event).NotTo(Equal("confirm"), "audit %+v", e)
			}
			Expect(v.Counter).To(Equal(before.Counter))
		}
		return run
	}
	honestBootWorks := func() {
		GinkgoHelper()
		tap.set(nil)
		By("the next honest boot comes up with the data and confirms the verifier's next counter")
		run := boot(vm, "nv-read")
		expectBooted(run)
		Expect(action(run, "nv-read").String("nv_data")).To(Equal("kept"))
		Expect(num(event(run, "confirmed"), "counter")).To(Equal(view(vm).Counter))
	}

	DescribeTable("a forged success answered by the host is not taken",
		func(forge func(req *protocol.ConfirmRequest) []byte) {
			tap.set(func(f harness.Frame, _ bool) harness.Verdict {
				if f.Dir != harness.ToProxy {
					return harness.Verdict{}
				}
				return harness.Verdict{Reply: forge(confirmRequest(f.Body))}
			})
			Expect(vm.Snapshot("before-attack")).To(Succeed())
			attacked("confirm-unauthenticated", false, harness.BootOptions{})
			honestBootWorks()
			By("and the disk from before the attacked boot is now stale")
			Expect(vm.Snapshot("current")).To(Succeed())
			Expect(vm.Restore("before-attack")).To(Succeed())
			expectFailed(boot(vm), protocol.LayerSVSM, "stale-state")
			Expect(vm.Restore("current")).To(Succeed())
			expectBooted(boot(vm))
		},
		Entry("in the old 0.2.0 form", func(req *protocol.ConfirmRequest) []byte {
			return []byte(fmt.Sprintf(`{"success":true,"counter":%d}`, req.Counter))
		}),
		Entry("in the 0.3.0 form with a made-up MAC", func(req *protocol.ConfirmRequest) []byte {
			a := protocol.NewConfirmAnswer(protocol.ConfirmKeys{}, req, true, req.Counter, "")
			return mustJSON(a)
		}),
	)

	It("a replayed answer from an earlier boot is not taken", func() {
		old := tap.lastAnswer()
		tap.set(func(f harness.Frame, _ bool) harness.Verdict {
			if f.Dir != harness.ToProxy {
				return harness.Verdict{}
			}
			return harness.Verdict{Reply: old}
		})
		attacked("confirm-unauthenticated", false, harness.BootOptions{})
		honestBootWorks()
	})

	It("an answer replaced by an earlier one after the verifier confirmed is not taken", func() {
		old := tap.lastAnswer()
		tap.set(func(f harness.Frame, _ bool) harness.Verdict {
			if f.Dir == harness.ToGuest {
				return harness.Verdict{Body: old}
			}
			return harness.Verdict{}
		})
		attacked("confirm-unauthenticated", true, harness.BootOptions{})
		honestBootWorks()
	})

	It("the guest's own request reflected back as the answer is not taken", func() {
		tap.set(func(f harness.Frame, _ bool) harness.Verdict {
			if f.Dir != harness.ToProxy {
				return harness.Verdict{}
			}
			req := confirmRequest(f.Body)
			return harness.Verdict{Reply: mustJSON(map[string]any{
				"version": protocol.VersionConfirm, "success": true, "boot_id": req.BootID, "counter": req.Counter,
				"nonce": req.Nonce, "confirmed": req.Counter, "mac": req.MAC,
			})}
		})
		attacked("confirm-unauthenticated", false, harness.BootOptions{})
		honestBootWorks()
	})

	It("a confirmation request forged by the host is refused by the verifier", func() {
		tap.set(func(f harness.Frame, _ bool) harness.Verdict {
			if f.Dir != harness.ToProxy {
				return harness.Verdict{}
			}
			// The host keeps the boot id and nonce but cannot make the MAC: it claims a
			// counter of its choice with a MAC of its own.
			req := confirmRequest(f.Body)
			forged := *req
			forged.Counter += 5
			forged.MAC = bytes.Repeat([]byte{0xAA}, len(req.MAC))
			return harness.Verdict{Body: mustJSON(protocol.NegotiationRequest{Version: protocol.VersionConfirm, Tee: protocol.TeeSNP, Confirm: &forged})}
		})
		before := view(vm)
		n := len(audit(s, vm.Registration))
		run := boot(vm)
		expectFailed(run, protocol.LayerSVSM, "confirm-unauthenticated")
		noEvent(run, "measured")
		Expect(hasAudit(auditAfter(s, vm.Registration, n), "confirm", verifier.Deny, "mac does not verify")).To(BeTrue())
		Expect(view(vm).Counter).To(Equal(before.Counter), "a forged confirmation moved the verifier's counter")
		honestBootWorks()
	})

	It("a dropped request fails closed", func() {
		tap.set(func(f harness.Frame, _ bool) harness.Verdict { return harness.Verdict{Drop: f.Dir == harness.ToProxy} })
		attacked("confirm-no-answer", false, harness.BootOptions{})
		honestBootWorks()
	})

	It("a dropped answer fails closed; the verifier's advance is what the next boot expects", func() {
		tap.set(func(f harness.Frame, _ bool) harness.Verdict { return harness.Verdict{Drop: f.Dir == harness.ToGuest} })
		attacked("confirm-no-answer", true, harness.BootOptions{})
		honestBootWorks()
	})

	It("an answer delayed past the bound fails closed", func() {
		tap.set(func(f harness.Frame, _ bool) harness.Verdict {
			if f.Dir == harness.ToGuest {
				return harness.Verdict{Delay: 6 * time.Second}
			}
			return harness.Verdict{}
		})
		attacked("confirm-timeout", true, harness.BootOptions{AttestTimeout: 3 * time.Second})
		honestBootWorks()
	})

	It("a request downgraded to 0.2.0 is refused by the proxy", func() {
		tap.set(func(f harness.Frame, _ bool) harness.Verdict {
			if f.Dir == harness.ToProxy {
				return harness.Verdict{Body: bytes.Replace(f.Body, []byte(`"version":[0,3,0]`), []byte(`"version":[0,2,0]`), 1)}
			}
			return harness.Verdict{}
		})
		attacked("confirm-no-answer", false, harness.BootOptions{})
		honestBootWorks()
	})
})

var _ = Describe("Write-through: a runtime write that cannot be confirmed", Label("backend:process", "attack"), func() {
	It("halts the VM before the TPM answers; the next boot comes up with the last confirmed state", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm", WriteThrough: true})
		tap := startConfirmMITM(s, vm, "mitm")
		expectBooted(boot(vm, "nv-write=confirmed"))

		r, err := vm.Start(ctx(), harness.BootOptions{Control: true})
		Expect(err).NotTo(HaveOccurred())
		ev, err := r.Command(ctx(), "nv-read", time.Minute)
		Expect(err).NotTo(HaveOccurred())
		Expect(ev.String("nv_data")).To(Equal("confirmed"))
		confirmedCounter := view(vm).Counter

		By("the host answers the next write's confirmation itself")
		tap.set(func(f harness.Frame, _ bool) harness.Verdict {
			if f.Dir != harness.ToProxy {
				return harness.Verdict{}
			}
			return harness.Verdict{Reply: []byte(`{"success":true}`)}
		})
		_, err = r.Command(ctx(), "nv-write=unconfirmed", 10*time.Second)
		Expect(err).To(HaveOccurred(), "the workload must get no answer to a write that was not confirmed")
		run, err := r.Wait(ctx())
		Expect(err).NotTo(HaveOccurred())
		expectFailed(run, protocol.LayerSVSM, "confirm-unauthenticated")
		halted := event(run, "halted")
		Expect(halted.String("write")).To(Equal("tpm-nv"))
		Expect(halted.String("cause")).To(Equal("confirm-unauthenticated"))
		_, ok := run.Action("nv-write", 0)
		Expect(ok).To(BeFalse(), "no result of the unconfirmed write reached the OS:\n%s", run.Stdout)
		Expect(view(vm).Counter).To(Equal(confirmedCounter))

		By("the next honest boot skips the unconfirmed slot and reads the confirmed data")
		tap.set(nil)
		run = boot(vm, "nv-read")
		expectBooted(run)
		skipped := event(run, "state-unconfirmed-skipped")
		Expect(num(skipped, "using_counter")).To(Equal(confirmedCounter))
		Expect(action(run, "nv-read").String("nv_data")).To(Equal("confirmed"))
		Expect(view(vm).Counter).To(BeNumerically(">", confirmedCounter))
	})
})
