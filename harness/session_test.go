package harness_test

import (
	"context"
	"crypto/ecdh"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// attested is a KBS session that attested with a real report bound to its nonce and key:
// what a host holds after relaying one guest's attestation.
type attested struct {
	*kbsSession
	token string
	priv  *ecdh.PrivateKey
}

func attestSession(t *testing.T, h *harness.Host, hj *protocol.HostJSON) *attested {
	t.Helper()
	s := newKBSSession(t, h.VerifierURL)
	priv, k, rep := s.evidence(hj, 0)
	var tok protocol.KBSAttestResponse
	if code := s.post(protocol.KBSPathAttest, attestBody(s.nonce, k, rep), &tok); code != 200 {
		t.Fatalf("attest: HTTP %d", code)
	}
	return &attested{kbsSession: s, token: tok.Token, priv: priv}
}

// resource fetches the default resource with the session's cookie, or with a bearer token
// when bearer is set (and no cookie), and returns the status and problem detail.
func (a *attested) resource(t *testing.T, bearer string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, a.url+protocol.KBSPathResource+protocol.DefaultResourcePath, nil)
	client := a.http
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
		client = &http.Client{Timeout: 10 * time.Second}
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == 200 {
		return 200, ""
	}
	var pd protocol.ProblemDetails
	_ = jsonDecode(resp, &pd)
	return resp.StatusCode, pd.Detail
}

func expectRefused(t *testing.T, code int, detail string, wantCode int, prefix string) {
	t.Helper()
	if code != wantCode || !strings.HasPrefix(detail, prefix) {
		t.Fatalf("got HTTP %d %q, want %d starting %q", code, detail, wantCode, prefix)
	}
}

// TestSessionIsOneShot: one attestation per nonce, one release per session; the token is
// bound to its session and worthless after the release; a kept session cannot spend the next
// boot request, which stays for the honest guest.
func TestSessionIsOneShot(t *testing.T) {
	h := startHost(t)
	ctx := context.Background()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "once", Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	a := attestSession(t, h, hj)

	// Re-attest with the same nonce (a fresh report bound to it): refused.
	k := protocol.ECPublicKeyFromECDH(a.priv.PublicKey())
	n, _ := base64.StdEncoding.DecodeString(a.nonce)
	rd, _ := protocol.ReportData(protocol.DefaultParams(), k, n)
	var pd protocol.ProblemDetails
	if code := a.post(protocol.KBSPathAttest, attestBody(a.nonce, k, report(t, hj, rd, 0)), &pd); code != 401 || !strings.HasPrefix(pd.Detail, "nonce:") {
		t.Fatalf("second attest on one nonce = HTTP %d %q, want 401 nonce", code, pd.Detail)
	}

	if code, d := a.resource(t, ""); code != 200 {
		t.Fatalf("first release: HTTP %d %s", code, d)
	}
	code, d := a.resource(t, "")
	expectRefused(t, code, d, 401, "session:")
	code, d = a.resource(t, a.token)
	expectRefused(t, code, d, 401, "session:")

	// The owner primes the next boot: the kept cookie and token get nothing, and do not
	// spend the request.
	if _, err := h.Admin.Prime(ctx, "once"); err != nil {
		t.Fatal(err)
	}
	code, d = a.resource(t, "")
	expectRefused(t, code, d, 401, "session:")
	code, d = a.resource(t, a.token)
	expectRefused(t, code, d, 401, "session:")
	if v, _ := h.Admin.Show(ctx, "once"); !v.Primed || v.Releases != 1 {
		t.Fatalf("vm after stale-session attempts = %+v: the request must still be there", v)
	}
	if _, err := guest(ctx, hj); err != nil {
		t.Fatalf("honest guest after the stale session: %v", err)
	}
}

// TestTokenReleasesOnceAndOnlyForItsKey: a bearer token works once, in place of its session.
func TestTokenReleasesOnce(t *testing.T) {
	h := startHost(t)
	ctx := context.Background()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "tok", Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	a := attestSession(t, h, hj)
	if code, d := a.resource(t, a.token); code != 200 {
		t.Fatalf("release with token: HTTP %d %s", code, d)
	}
	code, d := a.resource(t, "") // the cookie of the same session
	expectRefused(t, code, d, 401, "session:")
}

// TestReleaseNeedsEvidenceFromThisBootRequest: evidence verified before the boot request was
// primed cannot spend it, and a measurement withdrawn after attestation is refused at once.
func TestReleaseNeedsEvidenceFromThisBootRequest(t *testing.T) {
	h := startHost(t)
	ctx := context.Background()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "gate"})
	if err != nil {
		t.Fatal(err)
	}
	early := attestSession(t, h, hj) // no boot request pending yet
	if _, err := h.Admin.Prime(ctx, "gate"); err != nil {
		t.Fatal(err)
	}
	code, d := early.resource(t, "")
	expectRefused(t, code, d, 403, "boot_request:")
	if ev := lastAudit(t, h, "gate"); ev.Event != "release" || ev.Outcome != verifier.Deny || !strings.HasPrefix(ev.Reason, "boot_request:") {
		t.Fatalf("audit = %+v", ev)
	}

	// Primed; the guest attests; the owner withdraws the measurement before the release.
	a := attestSession(t, h, hj)
	other := make(protocol.HexBytes, 48)
	other[0] = 1
	if _, err := h.Admin.SetMeasurements(ctx, "gate", []protocol.HexBytes{other}); err != nil {
		t.Fatal(err)
	}
	code, d = a.resource(t, "")
	expectRefused(t, code, d, 403, "measurement:")
	if v, _ := h.Admin.Show(ctx, "gate"); !v.Primed || v.Releases != 0 {
		t.Fatalf("vm = %+v: refusals must not consume the boot request", v)
	}
}

// TestSessionFloodCannotStarveGuests: a host filling the session table with /auth calls
// neither evicts an attested session nor keeps an honest guest from attesting.
func TestSessionFloodCannotStarveGuests(t *testing.T) {
	work := t.TempDir()
	if err := os.CopyFS(filepath.Join(work, "fakesnp", "ca"), os.DirFS(sharedCA(t))); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h, err := harness.StartHost(ctx, harness.HostOptions{WorkDir: work, Binaries: bins, VerifierArgs: []string{"--max-sessions", "8"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Stop() })
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "flood", Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	a := attestSession(t, h, hj)
	for range 100 {
		newKBSSession(t, h.VerifierURL) // each /auth succeeds: it evicts an unattested one
	}
	if code, d := a.resource(t, ""); code != 200 {
		t.Fatalf("attested session after the flood: HTTP %d %s", code, d)
	}
	if _, err := h.Admin.Prime(ctx, "flood"); err != nil {
		t.Fatal(err)
	}
	for range 100 {
		newKBSSession(t, h.VerifierURL)
	}
	if _, err := guest(ctx, hj); err != nil {
		t.Fatalf("honest guest after the flood: %v", err)
	}
}

// TestRepeatedRefusalsAreCoalesced: a flood of identical refusals costs a few audit rows
// whose counts add up to every refusal.
func TestRepeatedRefusalsAreCoalesced(t *testing.T) {
	h := startHost(t)
	before, err := h.Admin.Audit(context.Background(), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	const n = 300
	client := &http.Client{Timeout: 10 * time.Second}
	for range n {
		resp, err := client.Get(h.VerifierURL + protocol.KBSPathResource + protocol.DefaultResourcePath)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 {
			t.Fatalf("unauthenticated resource: HTTP %d", resp.StatusCode)
		}
	}
	evs, err := h.Admin.Audit(context.Background(), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	rows, total := 0, uint64(0)
	for _, e := range evs[len(before):] {
		if e.Event == "release" && e.Outcome == verifier.Deny && strings.HasPrefix(e.Reason, "session:") {
			rows++
			total++
			if e.Repeats > 0 {
				total += e.Repeats - 1 // a count row stands for Repeats decisions
			}
		}
	}
	if total != n || rows > 4 {
		t.Fatalf("%d refusals audited as %d rows counting %d; want every one counted in a few rows", n, rows, total)
	}
}

// TestKDSOutageIsNotASignatureFailure: with the KDS down, a good report is refused as
// kds-unavailable (503), and works once the KDS is back.
func TestKDSOutageIsNotASignatureFailure(t *testing.T) {
	h := startHost(t)
	ctx := context.Background()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "kds", Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	s := newKBSSession(t, h.VerifierURL)
	_, k, rep := s.evidence(hj, 0)
	h.FakeSNP.Kill() // fakesnp is also the KDS
	var pd protocol.ProblemDetails
	code := s.post(protocol.KBSPathAttest, attestBody(s.nonce, k, rep), &pd)
	if code != http.StatusServiceUnavailable || !strings.HasPrefix(pd.Detail, verifier.FieldKDSUnavailable+":") {
		t.Fatalf("attest with the KDS down = HTTP %d %q, want 503 kds-unavailable", code, pd.Detail)
	}
	if ev := lastAudit(t, h, ""); !strings.HasPrefix(ev.Reason, verifier.FieldKDSUnavailable+":") {
		t.Fatalf("audit = %+v", ev)
	}
}

func jsonDecode(resp *http.Response, v any) error {
	return json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(v)
}
