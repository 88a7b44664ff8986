package scenarios

import (
	"os"
	"path/filepath"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/qemu"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// Environment for the hardware leg: a user's COCONUT-SVSM IGVM (built with persistence and
// attestation, taking its report from the real AMD-SP) and the COCONUT QEMU that can launch
// it on this SEV-SNP host.
const (
	envHardwareIGVM = "SVSM_E2E_HARDWARE_IGVM"
	envHardwareQEMU = "SVSM_E2E_HARDWARE_QEMU"
)

// hardwareOptions skips the spec with the probe's reason unless this is an SEV-SNP host with
// the pieces given.
func hardwareOptions() harness.CoconutOptions {
	GinkgoHelper()
	o := harness.CoconutOptions{IGVM: os.Getenv(envHardwareIGVM), QEMU: os.Getenv(envHardwareQEMU), Profile: qemu.Coconut}
	if o.IGVM == "" {
		Skip("hardware: no SVSM IGVM given (" + envHardwareIGVM + ")")
	}
	if o.QEMU == "" {
		o.QEMU = qemu.DefaultBinary
	}
	o, reason := harness.CheckCoconut(o)
	if reason != "" {
		Skip("hardware: " + reason)
	}
	return o
}

// newHardwareStack is a stack whose verifier trusts AMD's genuine roots and KDS.
func newHardwareStack() *harness.Stack {
	GinkgoHelper()
	return newStackWithOptions(func(o *harness.StackOptions) { o.GenuineAMD = true })
}

// The scenarios a host can see on real hardware: verifier decisions and audit, proxy trace,
// the SVSM's console markers (UPSTREAM.md §4).
var _ = Describe("Real SVSM on an SEV-SNP host", Label("hardware", "slow"), func() {
	var s *harness.Stack
	var v *harness.CoconutVM
	BeforeEach(func() {
		o := hardwareOptions()
		s = newHardwareStack()
		var err error
		v, err = s.NewCoconutVM(ctx(), "svsm", o)
		Expect(err).NotTo(HaveOccurred())
		state := filepath.Join(v.Dir, "state.img")
		Expect(os.WriteFile(state, make([]byte, 64<<20), 0o600)).To(Succeed())
		v.SetStateDisk(state)
	})

	It("first boot, reboot: attested each time, state created then reopened", func() {
		run := coconutBoot(v, harness.CoconutBootOptions{})
		expectAttested(run)
		run = coconutBoot(v, harness.CoconutBootOptions{})
		expectAttested(run)
		Expect(run.Has(harness.MarkerStorageOpen)).To(BeTrue(), "console:\n%s", run.Console)
		Expect(run.Has(harness.MarkerVTPMLoaded)).To(BeTrue())
		Expect(view(v).Releases).To(Equal(uint64(2)))
	})

	It("a clone without a boot request is refused", Label("attack"), func() {
		expectAttested(coconutBoot(v, harness.CoconutBootOptions{}))
		expectStopped(coconutBoot(v, harness.CoconutBootOptions{NoPrime: true}), "")
		Expect(hasAudit(audit(s, v.Registration), "release", verifier.Deny, "boot_request:")).To(BeTrue())
	})

	It("a rolled-back state disk boots: upstream cannot see it (known limitation, raw secrets)", Label("attack", "known-limitation"), func() {
		expectAttested(coconutBoot(v, harness.CoconutBootOptions{}))
		state := filepath.Join(v.Dir, "state.img")
		old, err := os.ReadFile(state)
		Expect(err).NotTo(HaveOccurred())
		expectAttested(coconutBoot(v, harness.CoconutBootOptions{}))
		Expect(os.WriteFile(state, old, 0o600)).To(Succeed())
		run := coconutBoot(v, harness.CoconutBootOptions{})
		expectAttested(run)
		Expect(run.Has(harness.MarkerStorageOpen)).To(BeTrue(),
			"upstream now refuses a rolled-back state disk: update SCENARIOS.md and this spec")
	})
})
