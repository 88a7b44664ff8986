package scenarios

import (
	"fmt"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm/statestore"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

const (
	slotA = int64(0)
	slotB = int64(statestore.SlotSize)
)

var _ = Describe("Tamper", Label("backend:process", "attack"), func() {
	var s *harness.Stack
	var vm *harness.VM
	BeforeEach(func() {
		s = newStack()
		vm = newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm, "nv-write=kept"))
	})

	// After a clean boot both slots hold the confirmed counter: one damaged slot is survivable.
	DescribeTable("one damaged slot: the other is used and the damage is named",
		func(damage func(), slot, check string) {
			damage()
			run := boot(vm, "nv-read")
			expectBooted(run)
			ev := event(run, "state-slot-invalid")
			Expect(ev.String("slot")).To(Equal(slot))
			Expect(ev.String("check")).To(Equal(check))
			Expect(action(run, "nv-read").String("nv_data")).To(Equal("kept"))
			By("the next write repairs the damaged slot")
			run = boot(vm)
			expectBooted(run)
			noEvent(run, "state-slot-invalid")
		},
		Entry("slot A header (counter byte)", func() { Expect(vm.Corrupt(slotA+0x30, 0x01)).To(Succeed()) }, "A", "header-checksum"),
		Entry("slot B header (magic)", func() { Expect(vm.Corrupt(slotB, 0xff)).To(Succeed()) }, "B", "magic"),
		Entry("slot A body", func() { Expect(vm.Corrupt(slotA+statestore.HeaderSize+1000, 0x10)).To(Succeed()) }, "A", "authentication"),
		Entry("slot B body", func() { Expect(vm.Corrupt(slotB+statestore.HeaderSize+5, 0x80)).To(Succeed()) }, "B", "authentication"),
		Entry("slot B truncated", func() { Expect(vm.Truncate(slotB + statestore.HeaderSize + 64)).To(Succeed()) }, "B", "truncated"),
		Entry("slot A header zeroed", func() { Expect(vm.ZeroRange(slotA, statestore.HeaderSize)).To(Succeed()) }, "A", "magic"),
	)

	DescribeTable("no usable slot: fail closed naming each damaged slot, disk untouched",
		func(damage func(), named int) {
			damage()
			before, err := vm.StateDiskSize()
			Expect(err).NotTo(HaveOccurred())
			run := boot(vm)
			expectFailed(run, protocol.LayerSVSM, "state-corrupt")
			Expect(run.All("state-slot-invalid")).To(HaveLen(named))
			noEvent(run, "tpm-restored")
			noEvent(run, "tpm-manufactured")
			after, _ := vm.StateDiskSize()
			Expect(after).To(Equal(before))
			By("the failure repeats the same way (no panic loop, no silent re-manufacture)")
			expectFailed(boot(vm), protocol.LayerSVSM, "state-corrupt")
		},
		Entry("both bodies", func() {
			Expect(vm.Corrupt(slotA+statestore.HeaderSize+7, 1)).To(Succeed())
			Expect(vm.Corrupt(slotB+statestore.HeaderSize+7, 1)).To(Succeed())
		}, 2),
		Entry("both headers", func() {
			Expect(vm.Corrupt(slotA+0x40, 1)).To(Succeed())
			Expect(vm.Corrupt(slotB+0x40, 1)).To(Succeed())
		}, 2),
		// Slot B is gone entirely (an absent slot is empty, not damaged); slot A is named.
		Entry("truncated inside slot A", func() { Expect(vm.Truncate(slotA + 200)).To(Succeed()) }, 1),
	)
})

var _ = Describe("Random tampering (seeded)", Label("backend:process", "attack"), func() {
	It("random byte flips never crash the guest and never yield modified state", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm, "nv-write=kept"))
		Expect(vm.Snapshot("good")).To(Succeed())
		size, err := vm.StateDiskSize()
		Expect(err).NotTo(HaveOccurred())
		r := s.Rand() // the spec's seed (report entry "seed") decides every offset
		for i := range 6 {
			Expect(vm.Restore("good")).To(Succeed())
			var offsets []int64
			for range 1 + r.IntN(3) {
				slot := int64(r.IntN(2)) * statestore.SlotSize
				limit := min(size-slot, int64(statestore.HeaderSize+20000))
				off := slot + r.Int64N(limit)
				offsets = append(offsets, off)
				Expect(vm.Corrupt(off, byte(1+r.IntN(255)))).To(Succeed())
			}
			run := boot(vm, "nv-read")
			By(fmt.Sprintf("round %d: flipped %#x → exit %d", i, offsets, run.ExitCode))
			Expect(run.ExitCode).To(BeElementOf(0, 1), "the guest must boot or fail closed, never crash:\n%s", run.Stdout)
			if run.ExitCode == 0 {
				Expect(action(run, "nv-read").String("nv_data")).To(Equal("kept"))
				// The boot advanced the counter: its disk is the new good state.
				Expect(vm.Snapshot("good")).To(Succeed())
			} else {
				Expect(run.Last().Reason).To(Equal("state-corrupt"))
			}
		}
	})
})

var _ = Describe("Swap", Label("backend:process", "attack"), func() {
	It("refuses state disks exchanged between two VMs, and both boot once swapped back", func() {
		s := newStack()
		a := newVM(s, harness.VMOptions{Name: "vm-a"})
		b := newVM(s, harness.VMOptions{Name: "vm-b"})
		expectBooted(boot(a))
		expectBooted(boot(b))
		Expect(s.SwapStateDisks(a, b)).To(Succeed())
		for _, v := range []*harness.VM{a, b} {
			run := boot(v)
			expectFailed(run, protocol.LayerSVSM, "state-corrupt")
			for _, ev := range run.All("state-slot-invalid") {
				Expect(ev.String("check")).To(Equal("vm-id"))
			}
		}
		Expect(s.SwapStateDisks(a, b)).To(Succeed())
		expectBooted(boot(a))
		expectBooted(boot(b))
	})
})

var _ = Describe("Wrong launch", Label("backend:process", "attack"), func() {
	It("one changed byte of the launched IGVM image: refused on the measurement", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm))
		registered := view(vm).Measurements[0]
		Expect([]byte(registered)).To(Equal(vm.Measurement), "the verifier holds the digest of the IGVM image")
		Expect(vm.TamperLaunch(ctx(), 5)).To(Succeed())
		Expect(vm.Measurement).NotTo(Equal([]byte(registered)))
		n := len(audit(s, ""))
		run := boot(vm)
		expectFailed(run, protocol.LayerSVSM, "attestation-failed")
		Expect(hasAudit(auditAfter(s, "", n), "attest", verifier.Deny, "measurement:")).To(BeTrue())
		Expect(view(vm).Primed).To(BeTrue())
	})

	DescribeTable("the verifier refuses, naming the field; nothing is released or consumed",
		func(change func(*fakesnp.LaunchSpec), spec verifier.VMSpec, field string) {
			s := newStack()
			vm := newVM(s, harness.VMOptions{Name: "vm", Spec: spec})
			expectBooted(boot(vm))
			Expect(vm.Relaunch(ctx(), change)).To(Succeed())
			n := len(audit(s, ""))
			run := boot(vm)
			expectFailed(run, protocol.LayerSVSM, "attestation-failed")
			noEvent(run, "state-opened")
			Expect(hasAudit(auditAfter(s, "", n), "attest", verifier.Deny, field+":")).To(BeTrue(), "audit: %+v", auditAfter(s, "", n))
			v := view(vm)
			Expect(v.Primed).To(BeTrue(), "a refused attestation must not consume the boot request")
			Expect(v.Releases).To(Equal(uint64(1)))
		},
		Entry("different image (measurement)", func(l *fakesnp.LaunchSpec) { l.Measurement[0] ^= 1 }, verifier.VMSpec{}, "measurement"),
		Entry("debug policy", func(l *fakesnp.LaunchSpec) { l.Policy = fakesnp.DefaultPolicy | fakesnp.PolicyDebug }, verifier.VMSpec{}, "policy.debug"),
		Entry("TCB below minimum", func(l *fakesnp.LaunchSpec) { l.Faults.StaleTCB = true }, verifier.VMSpec{MinTCB: &fakesnp.DefaultTCB}, "reported_tcb"),
		Entry("other chip", func(l *fakesnp.LaunchSpec) { l.Faults.SignWithChip = "chip-other" }, verifier.VMSpec{}, "signature"),
	)
})
