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

// The same svsm-guest as a QEMU VM's /init: virtio-blk disks, virtio-serial channels, real
// dm-crypt. Every boot is one QEMU process (-no-reboot); a QMP reset ends it like a power
// cycle and the next boot is a new process.
var _ = Describe("QEMU", Label("backend:qemu", "slow"), func() {
	var s *harness.Stack
	var vm *harness.VM
	BeforeEach(func() {
		s = newQEMUStack()
		vm = newVM(s, harness.VMOptions{Name: "vm"})
	})

	It("first boot and reboots: vTPM restored, LUKS opened with dm-crypt, data kept", func() {
		run := boot(vm, "nv-increment", "data-write=written in boot 1")
		expectBooted(run)
		Expect(event(run, "boot-start").String("state_disk")).To(HavePrefix("/dev/vd"))
		ek := event(run, "tpm-manufactured").String("ek_hash")
		event(run, "fde-enrolled")
		Expect(event(run, "fde-unlocked").String("method")).To(Equal("tpm"))
		Expect(action(run, "data-write").Fields["ok"]).To(BeTrue())

		By("guest-initiated reboot")
		run = boot(vm, "nv-increment", "data-read", "reboot")
		expectBooted(run)
		Expect(run.Last().Event).To(Equal("reboot"))
		Expect(event(run, "tpm-restored").String("ek_hash")).To(Equal(ek))
		Expect(event(run, "fde-unlocked").String("method")).To(Equal("tpm"))
		Expect(num(action(run, "nv-increment"), "nv_counter")).To(Equal(uint64(2)))
		Expect(action(run, "data-read").String("data")).To(Equal("written in boot 1"))
		Expect(view(vm).Counter).To(Equal(uint64(2)))
	})

	It("QMP status and reset mid-run, QMP quit, stop + start: nothing lost, counter consistent", func() {
		expectBooted(boot(vm, "data-write=before reset"))
		inst, err := vm.Start(ctx(), harness.BootOptions{Control: true})
		Expect(err).NotTo(HaveOccurred())
		_, err = inst.WaitForEvent(ctx(), 2*time.Minute, func(e protocol.Event) bool { return e.Event == "control-ready" })
		Expect(err).NotTo(HaveOccurred())
		By("the control channel (a virtio-serial port) drives the workload")
		ev, err := inst.Command(ctx(), "nv-increment", time.Minute)
		Expect(err).NotTo(HaveOccurred())
		Expect(num(ev, "nv_counter")).To(Equal(uint64(1)))
		q, ok := inst.Instance.(*harness.QEMUInstance)
		Expect(ok).To(BeTrue())
		Expect(q.Proc.Status(ctx())).To(Equal("running"))
		Expect(q.Reset(ctx())).To(Succeed())
		run, err := inst.Wait(ctx())
		Expect(err).NotTo(HaveOccurred())
		Expect(run.Last().Event).NotTo(BeElementOf("poweroff", "failed"), "the reset cut the boot short")
		// Under -no-reboot QEMU turns the reset into a shutdown (reason host-qmp-system-reset).
		Expect(q.Proc.QMPEvents()).To(ContainElement("SHUTDOWN"))
		By("the next boot (a new QEMU process) finds the state the reset left")
		run = boot(vm, "data-read", "poweroff")
		expectBooted(run)
		Expect(action(run, "data-read").String("data")).To(Equal("before reset"))
		Expect(num(event(run, "confirmed"), "counter")).To(Equal(view(vm).Counter))
		By("a hard stop over QMP (quit), then start again later")
		r2, err := vm.Start(ctx(), harness.BootOptions{Control: true})
		Expect(err).NotTo(HaveOccurred())
		_, err = r2.WaitForEvent(ctx(), 2*time.Minute, func(e protocol.Event) bool { return e.Event == "control-ready" })
		Expect(err).NotTo(HaveOccurred())
		Expect(r2.Instance.(*harness.QEMUInstance).Proc.Quit(ctx())).To(Succeed())
		_, err = r2.Wait(ctx())
		Expect(err).NotTo(HaveOccurred())
		run = boot(vm, "data-read")
		expectBooted(run)
		Expect(action(run, "data-read").String("data")).To(Equal("before reset"))
	})

	It("a power cut right after the advanced counter is written: the next boot accepts it and confirms", func() {
		expectBooted(boot(vm, "data-write=before"))
		run := bootWith(vm, harness.BootOptions{CrashAfter: "state-written=advance"})
		Expect(run.ExitCode).NotTo(Equal(0))
		Expect(run.Last().Event).To(Equal("state-written"), "the VM went down at the crash point")
		noEvent(run, "confirmed")
		run = boot(vm, "data-read")
		expectBooted(run)
		Expect(action(run, "data-read").String("data")).To(Equal("before"))
		Expect(num(event(run, "confirmed"), "counter")).To(Equal(view(vm).Counter))
	})

	It("refuses a rolled-back state disk", Label("attack"), func() {
		expectBooted(boot(vm))
		Expect(vm.Snapshot("old")).To(Succeed())
		expectBooted(boot(vm))
		Expect(vm.Snapshot("current")).To(Succeed())
		Expect(vm.Restore("old")).To(Succeed())
		run := boot(vm)
		expectFailed(run, protocol.LayerSVSM, "stale-state")
		noEvent(run, "fde-unlocked")
		Expect(vm.Restore("current")).To(Succeed())
		expectBooted(boot(vm))
	})

	It("two QEMU processes of one VM on one boot request: exactly one boots", Label("attack"), func() {
		expectBooted(boot(vm))
		clone, err := s.Clone(vm, "vm-clone")
		Expect(err).NotTo(HaveOccurred())
		n := len(audit(s, vm.Registration))
		Expect(vm.Prime(ctx())).To(Succeed())
		var wg sync.WaitGroup
		runs := make([]*harness.GuestRun, 2)
		for i, v := range []*harness.VM{vm, clone} {
			wg.Add(1)
			go func() {
				defer GinkgoRecover()
				defer wg.Done()
				runs[i] = bootWith(v, harness.BootOptions{NoPrime: true})
			}()
		}
		wg.Wait()
		booted := 0
		for _, r := range runs {
			if r.ExitCode == 0 {
				booted++
			} else {
				expectFailed(r, protocol.LayerSVSM, "attestation-failed")
			}
		}
		Expect(booted).To(Equal(1))
		Expect(hasAudit(auditAfter(s, vm.Registration, n), "release", verifier.Deny, "boot_request")).To(BeTrue())
	})

	It("OS self-update of the command line: re-sealed to the predicted PCR 8, unlocked by the TPM after it", func() {
		expectBooted(boot(vm, "data-write=kept"))
		newCmdline := vm.Cmdline + " audit=1"
		full := qemuBackend.Cmdline(newCmdline)
		run := boot(vm, "fde-prepare-update=cmdline:"+full)
		expectBooted(run)
		Expect(action(run, "fde-prepare-update").Fields["ok"]).To(BeTrue())
		vm.Cmdline = newCmdline
		Expect(vm.UpdateLaunch(ctx(), true)).To(Succeed())
		run = boot(vm, "data-read")
		expectBooted(run)
		noEvent(run, "fde-policy-failed")
		Expect(event(run, "fde-unlocked").String("method")).To(Equal("tpm"))
		Expect(action(run, "data-read").String("data")).To(Equal("kept"))
	})

	It("FDE negative: a changed command line fails the PCR policy; recovery opens the disk with dm-crypt", func() {
		expectBooted(boot(vm, "data-write=kept"))
		vm.Cmdline += " init=/bin/sh"
		Expect(vm.UpdateLaunch(ctx(), true)).To(Succeed())
		run := boot(vm, "data-read")
		expectBooted(run)
		Expect(event(run, "fde-policy-failed").Reason).To(ContainSubstring("policy"))
		Expect(event(run, "fde-unlocked").String("method")).To(Equal("recovery"))
		Expect(action(run, "data-read").String("data")).To(Equal("kept"))
		run = bootWith(vm, harness.BootOptions{NoRecovery: true})
		expectFailed(run, protocol.LayerOS, "fde-locked")
	})

	It("a forged confirmation answer: the VM fails closed before firmware; the next boot works", Label("attack"), func() {
		expectBooted(boot(vm, "data-write=kept"))
		tap := startConfirmMITM(s, vm, "mitm")
		tap.set(func(f harness.Frame, _ bool) harness.Verdict {
			if f.Dir != harness.ToProxy {
				return harness.Verdict{}
			}
			return harness.Verdict{Reply: []byte(`{"success":true,"counter":2}`)}
		})
		n := len(audit(s, vm.Registration))
		run := boot(vm)
		expectFailed(run, protocol.LayerSVSM, "confirm-unauthenticated")
		noEvent(run, "measured")
		for _, e := range auditAfter(s, vm.Registration, n) {
			Expect(e.Event).NotTo(Equal("confirm"), "the verifier saw no confirmation: %+v", e)
		}
		Expect(view(vm).Counter).To(Equal(uint64(1)))
		tap.set(nil)
		run = boot(vm, "data-read")
		expectBooted(run)
		Expect(action(run, "data-read").String("data")).To(Equal("kept"))
		Expect(view(vm).Counter).To(Equal(uint64(2)))
	})
})
