package scenarios

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"net"
	"path/filepath"
	"sync"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// rawReply is what a server sent back to raw bytes: the whole frames it wrote before it
// closed the connection (or went quiet for a bound).
type rawReply struct {
	Frames [][]byte
	Closed bool
}

// sendRaw writes raw bytes on a unix socket, ends its side of the connection, and collects
// the server's answer frames until it closes (or is quiet for 10 s).
func sendRaw(path string, b []byte) rawReply {
	GinkgoHelper()
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	Expect(err).NotTo(HaveOccurred())
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = c.Write(b)
	if uc, ok := c.(*net.UnixConn); ok {
		_ = uc.CloseWrite()
	}
	var r rawReply
	for len(r.Frames) < 8 {
		f, err := protocol.ReadFrame(c, protocol.MaxFrameSize)
		if err != nil {
			r.Closed = !isTimeout(err)
			return r
		}
		r.Frames = append(r.Frames, f)
	}
	return r
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

func frame(body []byte, claimed uint64) []byte {
	b := make([]byte, 8, 8+len(body))
	binary.LittleEndian.PutUint64(b, claimed)
	return append(b, body...)
}

// proxyVerdict tells how svsm-proxy took raw input: "accepted" when it went on with the
// protocol (a negotiation response), "refused: ..." when it closed without one, saying
// whether it answered with the protocol's failure message first.
func proxyVerdict(r rawReply) string {
	for _, f := range r.Frames {
		if bytes.Contains(f, []byte(`"challenge"`)) {
			return "accepted"
		}
	}
	if !r.Closed {
		return "kept open"
	}
	for _, f := range r.Frames {
		if bytes.Contains(f, []byte(`"success":false`)) {
			return "refused: failure answer"
		}
		return "refused: unexpected answer " + string(f)
	}
	return "refused: closed"
}

// snpVerdict tells how fakesnp took raw input: "accepted" when it signed a report, "refused:
// invalid parameters" for STATUS 0x16, "refused: closed" when it dropped the connection.
func snpVerdict(r rawReply) string {
	for _, f := range r.Frames {
		var rsp protocol.ReportResponse
		if err := rsp.UnmarshalBinary(f); err != nil {
			return "refused: malformed answer"
		}
		if rsp.Status == 0 && len(rsp.Report) == protocol.ReportSize {
			return "accepted"
		}
		if rsp.Status == protocol.StatusInvalidParams {
			return "refused: invalid parameters"
		}
	}
	if !r.Closed {
		return "kept open"
	}
	return "refused: closed"
}

var _ = Describe("Bad input", Label("backend:process", "attack"), func() {
	It("proxy and fakesnp tell hostile input from valid input, refuse it clearly and keep serving", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm))
		badConfirm := `{"version":[0,3,0],"tee":"snp","confirm":{"boot_id":"AAAA","counter":1,"nonce":"AAAA","mac":"AAAA"}}`
		unknownBoot := `{"version":[0,3,0],"tee":"snp","confirm":{"boot_id":"AAAAAAAAAAAAAAAAAAAAAA==","counter":1,` +
			`"nonce":"AAAAAAAAAAAAAAAAAAAAAA==","mac":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}`
		for _, tc := range []struct {
			name, want string
			b          []byte
		}{
			{"a valid negotiation request (control)", "accepted", frame([]byte(`{"version":[0,1,0],"tee":"snp"}`), 31)},
			{"oversized length", "refused: closed", frame(nil, 1<<40)},
			{"invalid JSON", "refused: closed", frame([]byte("{not json"), 9)},
			{"wrong version", "refused: closed", frame([]byte(`{"version":[9,9,9],"tee":"snp"}`), 31)},
			{"confirmation 0.2.0", "refused: closed", frame([]byte(`{"version":[0,2,0],"tee":"snp","confirm":{}}`), 45)},
			{"confirmation with short fields", "refused: closed", frame([]byte(badConfirm), uint64(len(badConfirm)))},
			{"truncated frame", "refused: closed", frame([]byte(`{"version":`), 100)},
			{"garbage, no frame", "refused: closed", []byte("\x1b[2J\x1b[H garbage on the serial line")},
			{"empty frame", "refused: closed", frame(nil, 0)},
			{"null-secret answer", "refused: closed", frame([]byte(`{"success":true,"secret":null}`), 30)},
		} {
			By("proxy: " + tc.name)
			Expect(proxyVerdict(sendRaw(s.ProxySocket(), tc.b))).To(Equal(tc.want), tc.name)
		}
		By("proxy: a well-formed confirmation for an unknown boot is forwarded; the verifier's refusal cannot be authenticated")
		r := sendRaw(s.ProxySocket(), frame([]byte(unknownBoot), uint64(len(unknownBoot))))
		Expect(r.Frames).To(HaveLen(1))
		answer, err := protocol.DecodeConfirmResponse(r.Frames[0])
		Expect(err).NotTo(HaveOccurred())
		Expect(answer.Success).To(BeFalse())
		Expect(answer.MAC).To(BeEmpty())
		Expect(answer.Reason).To(ContainSubstring("unknown boot id"))

		valid := make([]byte, 96)
		for _, tc := range []struct {
			name, want string
			b          []byte
		}{
			{"a valid report request (control)", "accepted", frame(valid, 96)},
			{"oversized length", "refused: closed", frame(nil, 1<<40)},
			{"short request", "refused: invalid parameters", frame(make([]byte, 95), 95)},
			{"long request (beyond the frame bound)", "refused: closed", frame(make([]byte, 97), 97)},
			{"truncated frame", "refused: closed", frame(make([]byte, 10), 96)},
		} {
			By("fakesnp: " + tc.name)
			Expect(snpVerdict(sendRaw(vm.SNPSocket(), tc.b))).To(Equal(tc.want), tc.name)
		}
		By("the servers still serve a real boot")
		expectBooted(boot(vm))
		Expect(view(vm).Counter).To(Equal(uint64(2)))
	})
})

var _ = Describe("MITM on the proxy channel", Label("backend:process", "attack"), func() {
	var s *harness.Stack
	var vm *harness.VM
	var mitm *harness.MITM
	BeforeEach(func() {
		s = newStack()
		vm = newVM(s, harness.VMOptions{Name: "vm"})
		var err error
		mitm, err = harness.StartMITM(filepath.Join(filepath.Dir(s.ProxySocket()), "mitm.sock"), s.ProxySocket(), nil)
		Expect(err).NotTo(HaveOccurred())
		DeferCleanup(mitm.Close)
		Expect(vm.SetProxySocket(mitm.Path())).To(Succeed())
		expectBooted(boot(vm)) // through the transparent relay
	})
	setMutate := func(m func(harness.Frame) harness.Verdict) { mitm.Set(m) }
	// attestation response: the second frame to the guest on an attestation connection.
	isResponse := func(f harness.Frame) bool {
		return f.Dir == harness.ToGuest && f.Index == 1
	}

	It("a flipped bit in the wrapped secret: the guest refuses to decrypt, state untouched", func() {
		setMutate(func(f harness.Frame) harness.Verdict {
			if !isResponse(f) {
				return harness.Verdict{}
			}
			var m map[string]any
			Expect(json.Unmarshal(f.Body, &m)).To(Succeed())
			sec := []byte(m["secret"].(string))
			sec[2] ^= 'A' ^ 'B'
			m["secret"] = string(sec)
			b, _ := json.Marshal(m)
			return harness.Verdict{Body: b}
		})
		before := headers(vm)
		run := boot(vm)
		ev := expectFailed(run, protocol.LayerSVSM, "attestation-failed")
		Expect(ev.String("detail")).To(Or(ContainSubstring("decrypt"), ContainSubstring("base64")))
		noEvent(run, "state-opened")
		Expect(headers(vm)).To(Equal(before))
	})

	It("a swapped public key: the verifier refuses (REPORT_DATA binds the guest's key), nothing released", func() {
		attacker, _ := ecdh.P521().GenerateKey(rand.Reader)
		setMutate(func(f harness.Frame) harness.Verdict {
			if f.Dir != harness.ToProxy || f.Index != 1 {
				return harness.Verdict{}
			}
			var m map[string]any
			Expect(json.Unmarshal(f.Body, &m)).To(Succeed())
			k := protocol.ECPublicKeyFromECDH(attacker.PublicKey())
			kb, _ := json.Marshal(k)
			var km any
			_ = json.Unmarshal(kb, &km)
			m["key"] = km
			b, _ := json.Marshal(m)
			return harness.Verdict{Body: b}
		})
		n := len(audit(s, ""))
		run := boot(vm)
		expectFailed(run, protocol.LayerSVSM, "attestation-failed")
		Expect(hasAudit(auditAfter(s, "", n), "attest", verifier.Deny, "report_data:")).To(BeTrue())
		Expect(view(vm).Primed).To(BeTrue(), "no release, the boot request is still there")
		Expect(view(vm).Releases).To(Equal(uint64(1)))
	})

	It("a replayed response from an earlier boot: not wrapped to this boot's key, refused", func() {
		var old []byte
		for _, f := range mitm.Frames() {
			if isResponse(f) && bytes.Contains(f.Body, []byte(`"success":true`)) {
				old = f.Body
			}
		}
		Expect(old).NotTo(BeEmpty())
		setMutate(func(f harness.Frame) harness.Verdict {
			if isResponse(f) {
				return harness.Verdict{Body: old}
			}
			return harness.Verdict{}
		})
		run := boot(vm)
		ev := expectFailed(run, protocol.LayerSVSM, "attestation-failed")
		Expect(ev.String("detail")).To(ContainSubstring("decrypt"))
	})

	It("a version downgrade is refused by the proxy", func() {
		setMutate(func(f harness.Frame) harness.Verdict {
			if f.Dir == harness.ToProxy && f.Index == 0 {
				return harness.Verdict{Body: bytes.Replace(f.Body, []byte("[0,1,0]"), []byte("[0,0,1]"), 1)}
			}
			return harness.Verdict{}
		})
		expectFailed(boot(vm), protocol.LayerSVSM, "attestation-failed")
		Expect(view(vm).Primed).To(BeTrue())
	})

	It("a dropped response fails closed within the bound; a delayed one still works", func() {
		setMutate(func(f harness.Frame) harness.Verdict {
			return harness.Verdict{Drop: isResponse(f)}
		})
		expectFailed(bootWith(vm, harness.BootOptions{AttestTimeout: 5 * time.Second}), protocol.LayerSVSM, "attestation-failed")
		setMutate(func(f harness.Frame) harness.Verdict {
			if isResponse(f) {
				return harness.Verdict{Delay: 500 * time.Millisecond}
			}
			return harness.Verdict{}
		})
		expectBooted(boot(vm))
	})
})

var _ = Describe("Crash windows", Label("backend:process"), func() {
	DescribeTable("a power cut at a write point never bricks the VM nor raises a false rollback alarm",
		func(point string, actions []string) {
			s := newStack()
			vm := newVM(s, harness.VMOptions{Name: "vm"})
			expectBooted(boot(vm, "nv-write=before"))
			run := bootWith(vm, harness.BootOptions{CrashAfter: point, Actions: actions})
			Expect(run.ExitCode).To(Equal(-1), "the guest must have been killed at %s:\n%s", point, run.Stdout)
			By("the next boot accepts the state (confirmed counter or one ahead) and keeps the data")
			run = boot(vm, "nv-read")
			expectBooted(run)
			Expect(action(run, "nv-read").String("nv_data")).To(BeElementOf("before", "after"))
			noEvent(run, "state-slot-invalid")
			v := view(vm)
			Expect(num(event(run, "confirmed"), "counter")).To(Equal(v.Counter))
			By("and the one after that too")
			expectBooted(boot(vm))
		},
		Entry("after writing the advanced counter, before confirming", "state-written=advance", nil),
		Entry("after the confirmation, before the mirror write", "confirmed", nil),
		Entry("after the mirror write, before firmware", "state-written=mirror", nil),
		Entry("after a runtime NV write", "state-written=tpm-nv", []string{"nv-write=after"}),
		Entry("after the workload, before power-off", "action=nv-write", []string{"nv-write=after"}),
	)

	It("a proxy killed mid-message: the guest fails closed, the boot request survives, a restarted proxy serves", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm))
		// Hold the attestation response in a MITM, kill the proxy while it is in flight.
		inFlight := make(chan struct{}, 1)
		mitm, err := harness.StartMITM(filepath.Join(filepath.Dir(s.ProxySocket()), "hold.sock"), s.ProxySocket(), func(f harness.Frame) harness.Verdict {
			if f.Dir == harness.ToProxy && f.Index == 1 {
				select {
				case inFlight <- struct{}{}:
				default:
				}
				return harness.Verdict{Delay: 500 * time.Millisecond}
			}
			return harness.Verdict{}
		})
		Expect(err).NotTo(HaveOccurred())
		DeferCleanup(mitm.Close)
		Expect(vm.SetProxySocket(mitm.Path())).To(Succeed())
		r, err := vm.Start(ctx(), harness.BootOptions{AttestTimeout: 10 * time.Second})
		Expect(err).NotTo(HaveOccurred())
		Eventually(inFlight).WithTimeout(30 * time.Second).Should(Receive())
		s.Host.KillProxy()
		run, err := r.Wait(ctx())
		Expect(err).NotTo(HaveOccurred())
		expectFailed(run, protocol.LayerSVSM, "attestation-failed")
		Expect(view(vm).Primed).To(BeTrue(), "nothing was released: the request is still there")
		Expect(s.Host.RestartProxy(ctx())).To(Succeed())
		expectBooted(bootWith(vm, harness.BootOptions{NoPrime: true}))
		Expect(view(vm).Counter).To(Equal(uint64(2)))
	})

	It("a verifier killed mid-boot: the guest fails closed; after a restart the VM boots", func() {
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm"})
		expectBooted(boot(vm))
		Expect(vm.Prime(ctx())).To(Succeed())
		s.Host.KillVerifier()
		run := bootWith(vm, harness.BootOptions{NoPrime: true, AttestTimeout: 10 * time.Second})
		expectFailed(run, protocol.LayerSVSM, "attestation-failed")
		Expect(s.RestartVerifier(ctx())).To(Succeed())
		By("the pending boot request survived the restart")
		Expect(view(vm).Primed).To(BeTrue())
		expectBooted(bootWith(vm, harness.BootOptions{NoPrime: true}))
		Expect(view(vm).Counter).To(Equal(uint64(2)))
	})
})

var _ = Describe("Verifier restart and concurrency", Label("backend:process"), func() {
	It("many VMs boot at once, twice, with a verifier restart in between: one release per request, no cross-talk", func() {
		s := newStack()
		const n = 6
		vms := make([]*harness.VM, n)
		for i := range vms {
			vms[i] = newVM(s, harness.VMOptions{Name: "vm" + string(rune('a'+i)), DataDiskMiB: -1, NoSecureBoot: true})
		}
		round := func(r int) {
			var wg sync.WaitGroup
			runs := make([]*harness.GuestRun, n)
			for i, vm := range vms {
				wg.Add(1)
				go func() {
					defer GinkgoRecover()
					defer wg.Done()
					runs[i] = boot(vm, "nv-write="+vm.Name)
				}()
			}
			wg.Wait()
			for i, run := range runs {
				expectBooted(run)
				Expect(num(event(run, "confirmed"), "counter")).To(Equal(uint64(r)))
				Expect(action(run, "nv-write").String("nv_data")).To(Equal(vms[i].Name))
				v := view(vms[i])
				Expect(v.Counter).To(Equal(uint64(r)))
				Expect(v.Releases).To(Equal(uint64(r)))
			}
		}
		round(1)
		Expect(s.RestartVerifier(ctx())).To(Succeed())
		round(2)
		for _, vm := range vms {
			run := boot(vm, "nv-read")
			expectBooted(run)
			Expect(action(run, "nv-read").String("nv_data")).To(Equal(vm.Name), "each VM sees only its own state")
		}
	})
})
