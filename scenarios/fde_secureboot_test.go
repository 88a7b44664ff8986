package scenarios

import (
	"crypto/sha256"
	"os"
	"path/filepath"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm/uefivars"
)

var _ = Describe("FDE unlock", Label("backend:process"), func() {
	var s *harness.Stack
	var vm *harness.VM
	var pcrs map[string]any
	BeforeEach(func() {
		s = newStack()
		vm = newVM(s, harness.VMOptions{Name: "vm"})
		run := boot(vm)
		expectBooted(run)
		Expect(event(run, "fde-unlocked").String("method")).To(Equal("tpm"))
		pcrs = event(run, "pcr-values").Fields["pcrs"].(map[string]any)
	})

	It("unseals on the same boot chain, with the same PCR values", func() {
		run := boot(vm)
		expectBooted(run)
		Expect(event(run, "pcr-values").Fields["pcrs"]).To(Equal(pcrs))
		Expect(event(run, "fde-unlocked").String("method")).To(Equal("tpm"))
		noEvent(run, "fde-policy-failed")
	})

	DescribeTable("a changed boot chain fails the PCR policy; recovery still unlocks; nothing is lost",
		func(change func(), pcr string) {
			change()
			run := boot(vm)
			expectBooted(run)
			Expect(event(run, "pcr-values").Fields["pcrs"].(map[string]any)[pcr]).NotTo(Equal(pcrs[pcr]), "PCR %s must move", pcr)
			Expect(event(run, "fde-policy-failed").Reason).To(ContainSubstring("policy"))
			Expect(event(run, "fde-unlocked").String("method")).To(Equal("recovery"))
			By("without anyone to type the recovery passphrase the disk stays locked")
			run = bootWith(vm, harness.BootOptions{NoRecovery: true})
			expectFailed(run, protocol.LayerOS, "fde-locked")
		},
		// The owner approves the new launch image at the verifier (an OS update); the PCR
		// policy still tells the difference.
		Entry("kernel command line", func() {
			vm.Cmdline += " init=/bin/sh"
			Expect(vm.UpdateLaunch(ctx(), true)).To(Succeed())
		}, "8"),
		Entry("kernel image", func() {
			Expect(vm.SetKernel([]byte("an updated kernel"))).To(Succeed())
			Expect(vm.UpdateLaunch(ctx(), true)).To(Succeed())
		}, "4"),
		Entry("Secure Boot db", func() {
			act, err := vm.WriteSignedUpdate("db.json", "db", []uefivars.Signature{harness.HashSignature(sha256.Sum256([]byte("tool")))},
				harness.EnrollmentEpoch.Add(time.Hour), true, vm.Keys.KEK)
			Expect(err).NotTo(HaveOccurred())
			expectBooted(boot(vm, act)) // the db change takes effect at the next boot's measurement
		}, "7"),
	)

	It("OS self-update: re-sealed to the predicted PCRs, the TPM unlocks after the update; without, recovery and re-seal", func() {
		staged := filepath.Join(vm.Dir, "staged-kernel")
		Expect(os.WriteFile(staged, []byte("kernel 2"), 0o644)).To(Succeed())
		By("the OS stages kernel 2 and re-seals to the PCR values it will produce")
		run := boot(vm, "fde-prepare-update=kernel:"+staged)
		expectBooted(run)
		Expect(action(run, "fde-prepare-update").Fields["ok"]).To(BeTrue())
		event(run, "fde-prepared")
		By("the update is installed and approved; the next boot unseals by itself")
		Expect(vm.SetKernel([]byte("kernel 2"))).To(Succeed())
		Expect(vm.UpdateLaunch(ctx(), true)).To(Succeed())
		run = boot(vm)
		expectBooted(run)
		noEvent(run, "fde-policy-failed")
		Expect(event(run, "fde-unlocked").String("method")).To(Equal("tpm"))
		By("an update without re-seal falls back to recovery; re-sealing then restores the TPM path")
		Expect(vm.SetKernel([]byte("kernel 3"))).To(Succeed())
		Expect(vm.UpdateLaunch(ctx(), true)).To(Succeed())
		run = boot(vm, "fde-reseal")
		expectBooted(run)
		Expect(event(run, "fde-unlocked").String("method")).To(Equal("recovery"))
		run = boot(vm)
		expectBooted(run)
		Expect(event(run, "fde-unlocked").String("method")).To(Equal("tpm"))
	})

	It("opens a volume formatted with cryptsetup's default argon2id settings", Label("slow"), func() {
		other := newVM(s, harness.VMOptions{Name: "argon", DefaultKDF: true})
		run := boot(other)
		expectBooted(run)
		Expect(event(run, "fde-unlocked").String("method")).To(Equal("tpm"))
	})
})

var _ = Describe("Secure Boot configuration", Label("backend:process"), func() {
	It("persists db/dbx updates, refuses a signed dbx rollback and a restored pre-update disk", Label("attack"), func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm))
		revoked := harness.HashSignature(sha256.Sum256([]byte("a vulnerable bootloader")))
		dbx1, err := vm.WriteSignedUpdate("dbx1.json", "dbx", []uefivars.Signature{revoked}, harness.EnrollmentEpoch.Add(2*time.Hour), false, vm.Keys.KEK)
		Expect(err).NotTo(HaveOccurred())
		dbxOld, err := vm.WriteSignedUpdate("dbx0.json", "dbx", nil, harness.EnrollmentEpoch.Add(time.Hour), false, vm.Keys.KEK)
		Expect(err).NotTo(HaveOccurred())
		forged, err := vm.WriteSignedUpdate("dbx-forged.json", "dbx", nil, harness.EnrollmentEpoch.Add(5*time.Hour), false, vm.Keys.DB)
		Expect(err).NotTo(HaveOccurred())
		Expect(vm.Snapshot("before-dbx")).To(Succeed())

		run := boot(vm, dbx1, "uefi-get=dbx")
		expectBooted(run)
		Expect(action(run, "uefi-set").String("status")).To(Equal("EFI_SUCCESS"))
		Expect(num(action(run, "uefi-get"), "entries")).To(Equal(uint64(1)))

		By("the update persists; an older signed value and a value signed by a non-KEK key are refused")
		run = boot(vm, dbxOld, forged, "uefi-get=dbx")
		expectBooted(run)
		sets := run.All("action")
		Expect(sets[0].String("status")).To(Equal("EFI_SECURITY_VIOLATION"))
		Expect(sets[0].Reason).To(ContainSubstring("not later"))
		Expect(sets[1].String("status")).To(Equal("EFI_SECURITY_VIOLATION"))
		Expect(sets[1].Reason).To(ContainSubstring("not trusted"))
		Expect(num(sets[2], "entries")).To(Equal(uint64(1)))

		By("the host restores the disk from before the update: refused by freshness")
		Expect(vm.Snapshot("current")).To(Succeed())
		Expect(vm.Restore("before-dbx")).To(Succeed())
		expectFailed(boot(vm), protocol.LayerSVSM, "stale-state")
		Expect(vm.Restore("current")).To(Succeed())

		By("revoking the kernel's own hash stops the next boot in the firmware")
		h, err := vm.KernelHash()
		Expect(err).NotTo(HaveOccurred())
		dbx2, err := vm.WriteSignedUpdate("dbx2.json", "dbx", []uefivars.Signature{harness.HashSignature(h)}, harness.EnrollmentEpoch.Add(3*time.Hour), true, vm.Keys.KEK)
		Expect(err).NotTo(HaveOccurred())
		expectBooted(boot(vm, dbx2))
		run = boot(vm)
		expectFailed(run, protocol.LayerFirmware, "secure-boot-violation")
		noEvent(run, "fde-unlocked")
	})

	It("leaves Secure Boot off without a key template, and measures that", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm", NoSecureBoot: true})
		run := boot(vm)
		expectBooted(run)
		Expect(event(run, "measured").Fields["secure_boot"]).To(BeFalse())
		Expect(num(event(run, "uefi-vars-loaded"), "count")).To(BeZero())
	})
})
