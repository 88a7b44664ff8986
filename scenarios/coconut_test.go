package scenarios

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/json"
	"path/filepath"
	"sync"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// coconutOptions finds upstream's SVSM and an IGVM-capable QEMU, or skips the spec with the
// reason.
func coconutOptions() harness.CoconutOptions {
	GinkgoHelper()
	o, reason := harness.FindCoconut("..")
	if reason != "" {
		Skip("backend:coconut: " + reason)
	}
	return o
}

func newCoconut(s *harness.Stack, name string) *harness.CoconutVM {
	GinkgoHelper()
	return newCoconutWith(s, name, func(*harness.CoconutOptions) {})
}

func newCoconutWith(s *harness.Stack, name string, change func(*harness.CoconutOptions)) *harness.CoconutVM {
	GinkgoHelper()
	o := coconutOptions()
	change(&o)
	v, err := s.NewCoconutVM(ctx(), name, o)
	Expect(err).NotTo(HaveOccurred())
	return v
}

func coconutBoot(v *harness.CoconutVM, o harness.CoconutBootOptions) *harness.CoconutRun {
	GinkgoHelper()
	run, err := v.Boot(ctx(), o)
	Expect(err).NotTo(HaveOccurred())
	AddReportEntry("console "+v.Name, run.Console)
	return run
}

// expectAttested: the real SVSM got its report from fakesnp, decrypted the secret our
// verifier released, and finished its init.
func expectAttested(run *harness.CoconutRun) {
	GinkgoHelper()
	Expect(run.Outcome).To(Equal("init-done"), "console:\n%s", run.Console)
	Expect(run.Reached()).To(Equal([]string{"boot", "report", "attested", "vtpm", "init"}))
	Expect(run.Has(harness.MarkerReport)).To(BeTrue())
	Expect(run.Has(harness.MarkerAttested)).To(BeTrue(), "console:\n%s", run.Console)
	Expect(run.Has(harness.MarkerPanic)).To(BeFalse())
}

// expectStopped: upstream's SVSM panics on any attestation failure (attest.rs unwraps); it
// never reports success and never reaches its init.
func expectStopped(run *harness.CoconutRun, panicText string) {
	GinkgoHelper()
	Expect(run.Has(harness.MarkerAttested)).To(BeFalse(), "console:\n%s", run.Console)
	Expect(run.Has(harness.MarkerInitDone)).To(BeFalse())
	Expect(run.Outcome).To(Equal("panic"), "console:\n%s", run.Console)
	if panicText != "" {
		Expect(run.Console).To(ContainSubstring(panicText))
	}
}

// The real COCONUT-SVSM (upstream's build, report from fakesnp over COM4) against our proxy,
// verifier and fakesnp. Each spec asserts what the SVSM printed and what the host recorded.
var _ = Describe("Real COCONUT-SVSM", Label("backend:coconut"), func() {
	It("first attestation: our verifier releases, the real SVSM decrypts and boots", func() {
		s := newStack()
		v := newCoconut(s, "svsm")
		By("the launch digest fakesnp reports is the one our measure code computed from the IGVM")
		Expect(v.Measurement).To(HaveLen(48))
		run := coconutBoot(v, harness.CoconutBootOptions{})
		expectAttested(run)
		Expect(run.Has(harness.MarkerSerialAproxy)).To(BeTrue(), "the SVSM used its COM3 serial transport")
		Expect(run.Has(harness.MarkerVTPM)).To(BeTrue())
		evs := audit(s, v.Registration)
		Expect(hasAudit(evs, "attest", verifier.Allow, "")).To(BeTrue())
		Expect(hasAudit(evs, "release", verifier.Allow, "")).To(BeTrue())
		vw := view(v)
		Expect(vw.Releases).To(Equal(uint64(1)))
		Expect(vw.Primed).To(BeFalse())
		AddReportEntry("qemu", run.QEMUArgs)
	})

	It("no boot request: release denied and audited; the real SVSM stops (upstream panics)", Label("attack"), func() {
		s := newStack()
		v := newCoconut(s, "svsm")
		run := coconutBoot(v, harness.CoconutBootOptions{NoPrime: true})
		expectStopped(run, "TeeAttestation(Failed)")
		evs := audit(s, v.Registration)
		Expect(hasAudit(evs, "attest", verifier.Allow, "")).To(BeTrue(), "the evidence itself was good")
		Expect(hasAudit(evs, "release", verifier.Deny, "boot_request:")).To(BeTrue())
		Expect(view(v).Releases).To(BeZero())
	})

	It("wrong launch: another measurement registered is refused naming the field", Label("attack"), func() {
		s := newStack()
		v := newCoconut(s, "svsm")
		other := bytes.Repeat([]byte{0x5a}, 48)
		_, err := s.Host.Admin.SetMeasurements(ctx(), v.Registration, []protocol.HexBytes{other})
		Expect(err).NotTo(HaveOccurred())
		run := coconutBoot(v, harness.CoconutBootOptions{})
		expectStopped(run, "TeeAttestation(Failed)")
		Expect(hasAudit(audit(s, ""), "attest", verifier.Deny, "measurement:")).To(BeTrue())
		Expect(view(v).Primed).To(BeTrue(), "nothing was released: the boot request is still there")
	})

	It("wrong launch: a policy the launch does not meet is refused naming the field", Label("attack"), func() {
		s := newStack()
		v := newCoconutWith(s, "svsm", func(o *harness.CoconutOptions) {
			o.Policy = fakesnp.DefaultPolicy | fakesnp.PolicyDebug // the host launches with debugging allowed
		})
		run := coconutBoot(v, harness.CoconutBootOptions{})
		expectStopped(run, "TeeAttestation(Failed)")
		Expect(hasAudit(audit(s, ""), "attest", verifier.Deny, "policy.debug:")).To(BeTrue())
	})

	It("a clone: two real SVSMs on one boot request, at most one gets the key", Label("attack"), func() {
		s := newStack()
		v := newCoconut(s, "svsm")
		Expect(v.Prime(ctx())).To(Succeed())
		runs := make([]*harness.CoconutRun, 2)
		var wg sync.WaitGroup
		for i := range runs {
			wg.Add(1)
			go func() {
				defer GinkgoRecover()
				defer wg.Done()
				runs[i] = coconutBoot(v, harness.CoconutBootOptions{NoPrime: true})
			}()
		}
		wg.Wait()
		ok := 0
		for _, r := range runs {
			if r.Has(harness.MarkerAttested) {
				expectAttested(r)
				ok++
			} else {
				expectStopped(r, "TeeAttestation(Failed)")
			}
		}
		Expect(ok).To(Equal(1), "exactly one instance may get the key")
		Expect(hasAudit(audit(s, v.Registration), "release", verifier.Deny, "boot_request:")).To(BeTrue())
		Expect(view(v).Releases).To(Equal(uint64(1)))
	})

	It("upstream's SVSM never confirms its state: the verifier's counter does not move (known limitation)", Label("known-limitation"), func() {
		s := newStack()
		v := newCoconut(s, "svsm")
		expectAttested(coconutBoot(v, harness.CoconutBootOptions{}))
		expectAttested(coconutBoot(v, harness.CoconutBootOptions{}))
		vw := view(v)
		Expect(vw.Releases).To(Equal(uint64(2)))
		Expect(vw.Counter).To(BeZero(),
			"the real SVSM now confirms a freshness counter: update SCENARIOS.md and this spec")
		for _, e := range audit(s, v.Registration) {
			Expect(e.Event).NotTo(Equal("confirm"))
		}
		Expect(vw.SecretMode).To(Equal(protocol.SecretModeRaw), "upstream takes the 32-byte secret as its key, the same every boot")
	})

	It("this build keeps no state: every boot manufactures a new vTPM (known limitation)", Label("known-limitation"), func() {
		s := newStack()
		v := newCoconut(s, "svsm")
		for range 2 {
			run := coconutBoot(v, harness.CoconutBootOptions{})
			expectAttested(run)
			Expect(run.Has(harness.MarkerVTPMNew)).To(BeTrue())
			Expect(run.Has(harness.MarkerVTPMLoaded)).To(BeFalse(),
				"the SVSM now restores its vTPM: persistence reached this build (its persistence feature and COCONUT's virtio-mmio QEMU); add the state disk and update this spec")
		}
	})
})

var _ = Describe("Real COCONUT-SVSM behind a MITM", Label("backend:coconut", "attack"), func() {
	var s *harness.Stack
	var v *harness.CoconutVM
	var mitm *harness.MITM
	BeforeEach(func() {
		s = newStack()
		v = newCoconut(s, "svsm")
		var err error
		mitm, err = harness.StartMITM(filepath.Join(filepath.Dir(s.ProxySocket()), "com3-mitm.sock"), s.ProxySocket(), nil)
		Expect(err).NotTo(HaveOccurred())
		DeferCleanup(mitm.Close)
		v.SetProxySocket(mitm.Path())
	})
	set := func(m func(harness.Frame) harness.Verdict) { mitm.Set(m) }
	// The attestation response is the second frame to the SVSM on its COM3 stream.
	isResponse := func(f harness.Frame) bool { return f.Dir == harness.ToGuest && f.Index == 1 }
	rewrite := func(body []byte, change func(m map[string]any)) []byte {
		var m map[string]any
		Expect(json.Unmarshal(body, &m)).To(Succeed())
		change(m)
		b, err := json.Marshal(m)
		Expect(err).NotTo(HaveOccurred())
		return b
	}

	It("a flipped bit in the wrapped secret: the real SVSM's AES-GCM check fails and it stops", func() {
		set(func(f harness.Frame) harness.Verdict {
			if !isResponse(f) {
				return harness.Verdict{}
			}
			return harness.Verdict{Body: rewrite(f.Body, func(m map[string]any) {
				sec := []byte(m["secret"].(string))
				sec[2] ^= 'A' ^ 'B'
				m["secret"] = string(sec)
			})}
		})
		run := coconutBoot(v, harness.CoconutBootOptions{})
		expectStopped(run, "")
		Expect(hasAudit(audit(s, v.Registration), "release", verifier.Allow, "")).To(BeTrue(), "the verifier released; only the transit was attacked")
	})

	It("a swapped public key: our verifier refuses (REPORT_DATA binds the SVSM's key), nothing released", func() {
		attacker, _ := ecdh.P521().GenerateKey(rand.Reader)
		set(func(f harness.Frame) harness.Verdict {
			if f.Dir != harness.ToProxy || f.Index != 1 {
				return harness.Verdict{}
			}
			return harness.Verdict{Body: rewrite(f.Body, func(m map[string]any) {
				kb, _ := json.Marshal(protocol.ECPublicKeyFromECDH(attacker.PublicKey()))
				var km any
				_ = json.Unmarshal(kb, &km)
				m["key"] = km
			})}
		})
		run := coconutBoot(v, harness.CoconutBootOptions{})
		expectStopped(run, "TeeAttestation(Failed)")
		Expect(hasAudit(audit(s, ""), "attest", verifier.Deny, "report_data:")).To(BeTrue())
		Expect(view(v).Primed).To(BeTrue())
	})

	It("an answer replayed from an earlier boot: not wrapped to this boot's key; the real SVSM stops", func() {
		expectAttested(coconutBoot(v, harness.CoconutBootOptions{}))
		var old []byte
		for _, f := range mitm.Frames() {
			if isResponse(f) && bytes.Contains(f.Body, []byte(`"success":true`)) {
				old = f.Body
			}
		}
		Expect(old).NotTo(BeEmpty())
		set(func(f harness.Frame) harness.Verdict {
			if isResponse(f) {
				return harness.Verdict{Body: old}
			}
			return harness.Verdict{}
		})
		run := coconutBoot(v, harness.CoconutBootOptions{})
		expectStopped(run, "")
	})

	It("a dropped answer: the real SVSM never gets a key and does not boot on (it waits; the host stops it)", func() {
		set(func(f harness.Frame) harness.Verdict { return harness.Verdict{Drop: isResponse(f)} })
		run := coconutBoot(v, harness.CoconutBootOptions{Timeout: 20 * time.Second})
		Expect(run.Has(harness.MarkerAttested)).To(BeFalse())
		Expect(run.Has(harness.MarkerInitDone)).To(BeFalse())
		Expect(run.Outcome).To(Equal("timeout"), "upstream waits on COM3 for the answer; console:\n%s", run.Console)
		AddReportEntry("upstream behaviour on a dropped answer", run.Outcome)
	})
})
