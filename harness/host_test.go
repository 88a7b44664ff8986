package harness_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm/attest"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

var bins harness.Binaries

// TestMain builds the real binaries once; every test then runs them as child processes.
func TestMain(m *testing.M) {
	if os.Getenv(envStandIn) != "" { // this test binary is playing QEMU for the hardware-leg wiring test
		os.Exit(standInQEMU(os.Args[1:]))
	}
	dir, err := os.MkdirTemp("", "svsm-e2e-bin-")
	if err != nil {
		panic(err)
	}
	bins, err = harness.BuildBinaries(context.Background(), "..", dir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "build binaries: %v\n", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// caTemplate holds one fake AMD chain generated per test binary run and copied into each
// host's fakesnp state: RSA-4096 generation is the slowest part of a start.
var caOnce sync.Once
var caDir string

// sharedCA returns the fake AMD chain generated once for this test binary.
func sharedCA(t testing.TB) string {
	t.Helper()
	caOnce.Do(func() {
		caDir, _ = os.MkdirTemp("", "svsm-e2e-ca-")
		if _, err := fakesnp.LoadOrCreateCA(fakesnp.CAOptions{Dir: caDir}); err != nil {
			panic(err)
		}
	})
	return caDir
}

func startHost(t testing.TB) *harness.Host {
	t.Helper()
	work := t.TempDir()
	if err := os.CopyFS(filepath.Join(work, "fakesnp", "ca"), os.DirFS(sharedCA(t))); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h, err := harness.StartHost(ctx, harness.HostOptions{WorkDir: work, Binaries: bins})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := h.Stop(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			for _, p := range []*harness.Proc{h.FakeSNP, h.Verifier, h.Proxy} {
				b, _ := os.ReadFile(p.LogPath)
				t.Logf("--- %s log ---\n%s", p.Name, b)
			}
		}
	})
	return h
}

func guest(ctx context.Context, hj *protocol.HostJSON) (*attest.Result, error) {
	return harness.Attest(ctx, hj)
}

func lastAudit(t testing.TB, h *harness.Host, vm string) verifier.AuditEvent {
	t.Helper()
	return lastAudits(t, h, vm, 1)[0]
}

// lastAudits returns a VM's last n audit rows.
func lastAudits(t testing.TB, h *harness.Host, vm string, n int) []verifier.AuditEvent {
	t.Helper()
	evs, err := h.Admin.Audit(context.Background(), vm, 0)
	if err != nil || len(evs) < n {
		t.Fatalf("audit: %v (%d events, want %d)", err, len(evs), n)
	}
	return evs[len(evs)-n:]
}

func TestAttestReleaseOncePerBootRequest(t *testing.T) {
	h := startHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "vm1", SecretMode: protocol.SecretModeV1, Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	res, err := guest(ctx, hj)
	if err != nil {
		t.Fatalf("first attestation: %v", err)
	}
	var p protocol.SecretPayloadV1
	if err := p.UnmarshalBinary(res.Secret); err != nil {
		t.Fatal(err)
	}
	if p.ExpectedCounter != 0 || p.NextCounter != 1 {
		t.Fatalf("payload counters %d→%d, want 0→1", p.ExpectedCounter, p.NextCounter)
	}
	// The attestation's row comes with the release's (one commit), same session.
	if evs := lastAudits(t, h, "vm1", 2); evs[0].Event != "attest" || evs[0].Outcome != verifier.Allow ||
		evs[1].Event != "release" || evs[1].Outcome != verifier.Allow || evs[0].Session == "" || evs[0].Session != evs[1].Session {
		t.Fatalf("audit after release = %+v, want the attestation then the release of one session", evs)
	}
	// A clone attests again without a new boot request: refused, audited.
	_, err = guest(ctx, hj)
	if !errors.Is(err, attest.ErrRefused) {
		t.Fatalf("second attestation = %v, want refusal", err)
	}
	if evs := lastAudits(t, h, "vm1", 2); evs[0].Event != "attest" || evs[0].Outcome != verifier.Allow ||
		evs[1].Event != "release" || evs[1].Outcome != verifier.Deny || !strings.Contains(evs[1].Reason, "boot_request") || evs[0].Session != evs[1].Session {
		t.Fatalf("audit after clone = %+v, want the clone's attestation then its refusal", evs)
	}
	// Confirm the advance through the proxy (0.3.0).
	resp, err := harness.Confirm(ctx, hj, p.ConfirmKey[:], p.BootID[:], p.NextCounter)
	if err != nil || resp.Confirmed != 1 {
		t.Fatalf("confirm = %+v, %v", resp, err)
	}
	// Prime again: released, with the counter advanced.
	if _, err := h.Admin.Prime(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	res, err = guest(ctx, hj)
	if err != nil {
		t.Fatalf("attestation after prime: %v", err)
	}
	var p2 protocol.SecretPayloadV1
	if err := p2.UnmarshalBinary(res.Secret); err != nil {
		t.Fatal(err)
	}
	if p2.ExpectedCounter != 1 || p2.StateKey != p.StateKey || p2.BootID == p.BootID {
		t.Fatalf("second boot payload = %+v", p2)
	}
	// The first boot's confirmation key can no longer move the counter.
	_, err = harness.Confirm(ctx, hj, p.ConfirmKey[:], p.BootID[:], 2)
	if err == nil || !strings.Contains(err.Error(), "superseded") {
		t.Fatalf("stale boot confirm = %v", err)
	}
}

func TestAttestRefusals(t *testing.T) {
	h := startHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	tests := []struct {
		name   string
		setup  harness.VMSetup
		field  string
		mutate func(h *harness.Host, hj *protocol.HostJSON)
	}{
		{name: "wrong measurement", setup: harness.VMSetup{Spec: verifier.VMSpec{}}, field: "measurement",
			mutate: func(h *harness.Host, hj *protocol.HostJSON) {
				// Launch a different image under the same HOST_DATA: re-add with another digest.
				name := hj.VM + "-other"
				hd, _ := hex.DecodeString(hj.HostData)
				info, err := h.SNP.AddLaunch(ctx, fakesnp.LaunchSpec{Name: name, Measurement: bytes.Repeat([]byte{7}, 48), HostData: hd})
				if err != nil {
					t.Fatal(err)
				}
				hj.SNPSocket = info.Socket
			}},
		{name: "debug policy", setup: harness.VMSetup{Policy: fakesnp.DefaultPolicy | fakesnp.PolicyDebug}, field: "policy.debug"},
		{name: "TCB below minimum", setup: harness.VMSetup{Faults: fakesnp.Faults{StaleTCB: true}, Spec: verifier.VMSpec{MinTCB: &fakesnp.DefaultTCB}}, field: "reported_tcb"},
		{name: "flipped report byte", setup: harness.VMSetup{Faults: fakesnp.Faults{BadSignature: true}}, field: "signature"},
		{name: "other chip signs", setup: harness.VMSetup{Faults: fakesnp.Faults{SignWithChip: "chip9"}}, field: "signature"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.setup.Name = fmt.Sprintf("neg%d", i)
			tc.setup.Prime = true
			hj, err := h.AddVM(ctx, tc.setup)
			if err != nil {
				t.Fatal(err)
			}
			if tc.mutate != nil {
				tc.mutate(h, hj)
			}
			_, err = guest(ctx, hj)
			if !errors.Is(err, attest.ErrRefused) {
				t.Fatalf("attestation = %v, want refusal", err)
			}
			evs, err := h.Admin.Audit(ctx, "", 0)
			if err != nil {
				t.Fatal(err)
			}
			ev := evs[len(evs)-1]
			if ev.Event != "attest" || ev.Outcome != verifier.Deny || !strings.HasPrefix(ev.Reason, tc.field+":") {
				t.Fatalf("audit = %+v, want attest deny naming %q", ev, tc.field)
			}
			view, _ := h.Admin.Show(ctx, tc.setup.Name)
			if view.Releases != 0 || !view.Primed {
				t.Fatalf("vm after refusal = %+v: nothing may be released or consumed", view)
			}
		})
	}
}

type cookieJar struct {
	mu      sync.Mutex
	cookies []*http.Cookie
}

func (j *cookieJar) SetCookies(_ *url.URL, cs []*http.Cookie) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.cookies = append(j.cookies, cs...)
}

func (j *cookieJar) Cookies(_ *url.URL) []*http.Cookie {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.cookies
}

// TestVerifiedChainIsRememberedNotTheReport: a report signed wrong is refused whether its
// VCEK chain is being verified for the first time (the full check) or was verified before
// and remembered (then each report's own signature is still checked): a flipped byte, or a
// report another chip signed, before and after a good report of chip0.
func TestVerifiedChainIsRememberedNotTheReport(t *testing.T) {
	h := startHost(t)
	ctx := context.Background()
	n := 0
	refused := func(stage string) {
		t.Helper()
		for _, f := range []fakesnp.Faults{{BadSignature: true}, {SignWithChip: "chip9"}} {
			n++
			hj, err := h.AddVM(ctx, harness.VMSetup{Name: fmt.Sprintf("bad%d", n), Prime: true, Faults: f})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := guest(ctx, hj); !errors.Is(err, attest.ErrRefused) {
				t.Fatalf("%s, faults %+v: attestation = %v, want refusal", stage, f, err)
			}
			if ev := lastAudit(t, h, ""); ev.Event != "attest" || ev.Outcome != verifier.Deny || !strings.HasPrefix(ev.Reason, "signature:") {
				t.Fatalf("%s, faults %+v: audit = %+v, want a signature refusal", stage, f, ev)
			}
		}
	}
	refused("no chain verified yet")
	good, err := h.AddVM(ctx, harness.VMSetup{Name: "good", Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := guest(ctx, good); err != nil {
		t.Fatalf("a good report, verified in full: %v", err)
	}
	refused("chip0's chain remembered")
	if _, err := h.Admin.Prime(ctx, "good"); err != nil {
		t.Fatal(err)
	}
	if _, err := guest(ctx, good); err != nil {
		t.Fatalf("a good report through the remembered chain: %v", err)
	}
}

// TestMetricsEndpoints (and logs): after one boot's attestation and confirmation, each service's
// Prometheus endpoint counts what it did: fakesnp signed a report and served the VCEK, the
// proxy answered an attestation and forwarded a confirmation, the verifier released and
// confirmed once and fetched the VCEK once.
func TestMetricsEndpoints(t *testing.T) {
	h := startHost(t)
	ctx := context.Background()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "m", Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	res, err := guest(ctx, hj)
	if err != nil {
		t.Fatal(err)
	}
	var p protocol.SecretPayloadV1
	if err := p.UnmarshalBinary(res.Secret); err != nil {
		t.Fatal(err)
	}
	if _, err := harness.Confirm(ctx, hj, p.ConfirmKey[:], p.BootID[:], p.NextCounter); err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"fakesnp": {"svsm_fakesnp_reports_total 1", `svsm_fakesnp_kds_requests_total{kind="vcek",status="OK"} 1`, "svsm_fakesnp_launches 1"},
		"svsm-proxy": {"svsm_proxy_attestations_total 1", "svsm_proxy_confirmations_total 1", `svsm_proxy_verifier_seconds_count{path="resource"} 1`,
			`svsm_proxy_verifier_seconds_count{path="confirm"} 1`},
		"svsm-verifier": {`svsm_verifier_decisions_total{event="release",outcome="allow",reason=""} 1`,
			`svsm_verifier_decisions_total{event="confirm",outcome="allow",reason=""} 1`, "svsm_verifier_kds_fetches_total 1",
			"svsm_verifier_chain_verifications_total 1", `svsm_verifier_request_seconds_count{route="attest"} 1`},
	}
	// The proxy logs and counts a session after answering the guest, so what follows is
	// awaited (bounded), not read once.
	eventually := func(what string, ok func() (bool, string)) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			good, state := ok()
			if good {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s, after 10 s:\n%s", what, state)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// The logs tie the layers: the boot id the guest holds is on the verifier's release line
	// with its KBS session, which is on the proxy's line; the confirmation's boot id is on both.
	boot := hex.EncodeToString(p.BootID[:])
	var session string
	eventually("the verifier's log names the boot and its session", func() (bool, string) {
		vlog, _ := os.ReadFile(h.Verifier.LogPath)
		m := regexp.MustCompile(`event=release outcome=allow vm=m session=(\S+) boot=` + boot).FindSubmatch(vlog)
		if m != nil {
			session = string(m[1])
		}
		return m != nil && strings.Contains(string(vlog), "event=confirm success=true boot="+boot), string(vlog)
	})
	eventually("the proxy's log names the session and the confirmed boot", func() (bool, string) {
		plog, _ := os.ReadFile(h.Proxy.LogPath)
		return strings.Contains(string(plog), "attestation succeeded, secret forwarded wrapped\" component=svsm-proxy session="+session) &&
			strings.Contains(string(plog), "confirmation forwarded\" component=svsm-proxy boot="+boot), string(plog)
	})
	for name, url := range h.MetricsURLs() {
		eventually(name+" "+url+" counts the boot", func() (bool, string) {
			resp, err := http.Get(url)
			if err != nil {
				return false, err.Error()
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			for _, w := range want[name] {
				if !strings.Contains(string(body), w) {
					return false, "lacks " + w
				}
			}
			return true, ""
		})
	}
}
