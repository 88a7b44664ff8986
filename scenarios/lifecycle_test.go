package scenarios

import (
	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

var _ = Describe("Lifecycle", Label("backend:process"), func() {
	var s *harness.Stack
	var vm *harness.VM
	BeforeEach(func() {
		s = newStack()
		vm = newVM(s, harness.VMOptions{Name: "vm"})
	})

	It("first boot manufactures the vTPM, enrolls Secure Boot, writes state and seals the LUKS key", func() {
		run := boot(vm, "nv-increment")
		expectBooted(run)

		By("svsm layer: attested at counter 0, manufactured, advanced to 1 and confirmed")
		Expect(num(event(run, "attested"), "expected_counter")).To(BeZero())
		Expect(event(run, "state-opened").Fields["first_boot"]).To(BeTrue())
		Expect(event(run, "tpm-manufactured").String("ek_hash")).To(HaveLen(64))
		Expect(num(event(run, "confirmed"), "counter")).To(Equal(uint64(1)))
		noEvent(run, "tpm-restored")

		By("firmware layer: Secure Boot keys enrolled from the template and measured")
		Expect(event(run, "measured").Fields["secure_boot"]).To(BeTrue())
		Expect(event(run, "pcr-values").Fields["pcrs"]).To(HaveKey("7"))

		By("os layer: a new keyslot sealed to the PCR policy, unlocked by the TPM")
		Expect(event(run, "fde-enrolled").Fields["pcrs"]).To(HaveLen(4))
		Expect(event(run, "fde-unlocked").String("method")).To(Equal("tpm"))
		Expect(num(action(run, "nv-increment"), "nv_counter")).To(Equal(uint64(1)))

		By("verifier: one release, one confirmation, counter 1, no pending boot request")
		v := view(vm)
		Expect(v.Counter).To(Equal(uint64(1)))
		Expect(v.Releases).To(Equal(uint64(1)))
		Expect(v.Primed).To(BeFalse())
		evs := audit(s, vm.Registration)
		Expect(hasAudit(evs, "release", verifier.Allow, "")).To(BeTrue())
		Expect(hasAudit(evs, "confirm", verifier.Allow, "")).To(BeTrue())

		By("state disk, as the host sees it: both slots valid at counter 1")
		for _, h := range headers(vm) {
			Expect(h.Valid).To(BeTrue())
			Expect(h.Counter).To(Equal(uint64(1)))
		}
	})

	It("keeps identity, NV counter, variables and the LUKS key across N reboots", func() {
		const n = 5
		first := boot(vm, "nv-increment")
		expectBooted(first)
		ek := event(first, "tpm-manufactured").String("ek_hash")
		for i := 2; i <= n; i++ {
			By("reboot")
			run := boot(vm, "nv-increment")
			expectBooted(run)
			Expect(event(run, "tpm-restored").String("ek_hash")).To(Equal(ek), "boot %d", i)
			Expect(num(event(run, "attested"), "expected_counter")).To(Equal(uint64(i - 1)))
			Expect(num(event(run, "confirmed"), "counter")).To(Equal(uint64(i)))
			Expect(num(action(run, "nv-increment"), "nv_counter")).To(Equal(uint64(i)))
			Expect(event(run, "fde-unlocked").String("method")).To(Equal("tpm"))
			noEvent(run, "fde-enrolled")
			Expect(view(vm).Counter).To(Equal(uint64(i)))
		}
		Expect(view(vm).Releases).To(Equal(uint64(n)))
	})

	It("reboots on the guest's request and after stop + start", func() {
		run := boot(vm, "nv-write=before", "reboot")
		expectBooted(run)
		Expect(run.Last().Event).To(Equal("reboot"))
		By("the harness answers a guest reboot with a new boot")
		run = boot(vm, "nv-read", "poweroff")
		expectBooted(run)
		Expect(run.Last().Event).To(Equal("poweroff"))
		Expect(action(run, "nv-read").String("nv_data")).To(Equal("before"))
		By("a later start, as a fresh process")
		run = boot(vm, "nv-read")
		expectBooted(run)
		Expect(action(run, "nv-read").String("nv_data")).To(Equal("before"))
		Expect(view(vm).Counter).To(Equal(uint64(3)))
	})
})
