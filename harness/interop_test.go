package harness_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	"github.com/google/uuid"

	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// TestKBSTypesRequestSchema: the verifier takes what kbs-types 0.14 takes: extra-params of any
// JSON type and an init-data object.
func TestKBSTypesRequestSchema(t *testing.T) {
	h := startHost(t)
	hj, err := h.AddVM(context.Background(), harness.VMSetup{Name: "schema", Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	s := &kbsSession{t: t, url: h.VerifierURL, http: &http.Client{Jar: &cookieJar{}, Timeout: 10 * time.Second}}
	var ch protocol.KBSChallenge
	if code := s.post(protocol.KBSPathAuth, map[string]any{"version": "0.4.0", "tee": "snp", "extra-params": map[string]any{"any": []int{1, 2}}}, &ch); code != 200 {
		t.Fatalf("auth with object extra-params: HTTP %d", code)
	}
	s.nonce = ch.Nonce
	_, k, rep := s.evidence(hj, 0)
	body := attestBody(s.nonce, k, rep)
	body.InitData = &protocol.InitData{Format: "toml", Body: "algorithm = \"sha384\""}
	if code := s.post(protocol.KBSPathAttest, body, nil); code != 200 {
		t.Fatalf("attest with an init-data object: HTTP %d", code)
	}
}

// TestCertsBufNeedsNoKDS: with the extended report's certificate table in certs-buf (what a
// guest's GET_EXT_REPORT gives and aproxy forwards), the verifier verifies with the KDS down.
func TestCertsBufNeedsNoKDS(t *testing.T) {
	h := startHost(t)
	ctx := context.Background()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "certs", Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	s := newKBSSession(t, h.VerifierURL)
	_, k, rep := s.evidence(hj, 0)
	// The host's platform firmware holds the VCEK for this chip and TCB (here: from fakesnp).
	pr, err := abi.ReportToProto(rep)
	if err != nil {
		t.Fatal(err)
	}
	url := strings.Replace(kds.VCEKCertURL("Milan", pr.GetChipId(), kds.TCBVersion(pr.GetReportedTcb())), "https://kdsintf.amd.com", h.FakeSNPURL, 1)
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	vcek, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("VCEK from %s: HTTP %d %v", url, resp.StatusCode, err)
	}
	table := &abi.CertTable{Entries: []abi.CertTableEntry{{GUID: uuid.MustParse(abi.VcekGUID), RawCert: vcek}}}
	certs := table.Marshal()
	h.FakeSNP.Kill() // no KDS from here on
	body := attestBody(s.nonce, k, rep)
	cb := base64.StdEncoding.EncodeToString(certs)
	body.TeeEvidence.PrimaryEvidence.CertsBuf = &cb
	var pd protocol.ProblemDetails
	if code := s.post(protocol.KBSPathAttest, body, &pd); code != 200 {
		t.Fatalf("attest with certs-buf and no KDS: HTTP %d %s", code, pd.Detail)
	}
}

// TestVerifyReportCommand runs `svsm-verifier verify-report` on report files: one line per
// check, exit 0 when all pass, 1 when one fails, 2 on a usage error; offline with the
// extended report's certificates; and the CRL check against fakesnp's CRL.
func TestVerifyReportCommand(t *testing.T) {
	h := startHost(t)
	ctx := context.Background()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "file"})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var rd [64]byte
	rep := report(t, hj, rd, 0)
	pr, _ := abi.ReportToProto(rep)
	url := strings.Replace(kds.VCEKCertURL("Milan", pr.GetChipId(), kds.TCBVersion(pr.GetReportedTcb())), "https://kdsintf.amd.com", h.FakeSNPURL, 1)
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	vcek, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	certs := (&abi.CertTable{Entries: []abi.CertTableEntry{{GUID: uuid.MustParse(abi.VcekGUID), RawCert: vcek}}}).Marshal()
	bad := bytes.Clone(rep)
	bad[0x90] ^= 1 // MEASUREMENT
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good, flipped, table := write("report.bin", rep), write("flipped.bin", bad), write("certs.bin", certs)
	roots := h.Path("fakesnp-roots.pem")
	run := func(args ...string) (string, int) {
		cmd := exec.Command(bins.Verifier, append([]string{"verify-report"}, args...)...)
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	for _, tc := range []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"VCEK from the KDS", []string{"--report", good, "--roots", roots, "--kds-url", h.FakeSNPURL}, 0,
			[]string{"ok   signature", "ok   chain", "info measurement"}},
		{"offline with the certificate table", []string{"--report", good, "--certs", table, "--roots", roots, "--offline"}, 0,
			[]string{"ok   endorsement-key from the certificate table", "ok   signature"}},
		{"offline without certificates", []string{"--report", good, "--roots", roots, "--offline"}, 1,
			[]string{"FAIL endorsement-key"}},
		{"a flipped measurement byte", []string{"--report", flipped, "--certs", table, "--roots", roots, "--offline"}, 1,
			[]string{"FAIL signature", "FAIL chain"}},
		{"genuine AMD roots refuse the fake chain", []string{"--report", good, "--certs", table, "--offline"}, 1,
			[]string{"ok   roots           AMD's genuine Milan roots", "FAIL chain"}},
		{"CRL fetched and clean", []string{"--report", good, "--certs", table, "--roots", roots, "--kds-url", h.FakeSNPURL, "--check-crl"}, 0,
			[]string{"ok   chain", ", CRL"}},
		{"usage error", []string{"--report", filepath.Join(dir, "missing")}, 2, nil},
	} {
		out, code := run(tc.args...)
		if code != tc.code {
			t.Errorf("%s: exit %d, want %d\n%s", tc.name, code, tc.code, out)
		}
		for _, w := range tc.want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: output lacks %q:\n%s", tc.name, w, out)
			}
		}
	}
	// A revoked ASK on the served CRL fails the chain.
	if err := h.SNP.SetCRL(ctx, fakesnp.CRLSettings{RevokeASK: true}); err != nil {
		t.Fatal(err)
	}
	out, code := run("--report", good, "--certs", table, "--roots", roots, "--kds-url", h.FakeSNPURL, "--check-crl")
	if code != 1 || !strings.Contains(out, "FAIL chain") || !strings.Contains(out, "revoked") {
		t.Fatalf("revoked ASK: exit %d\n%s", code, out)
	}
}

// TestVLEKSignedReportVerifies: a platform with a cloud provider's VLEK loaded signs with it
// (SIGNER_INFO.SIGNING_KEY = VLEK); the VLEK comes to the verifier in certs-buf (the KDS never
// serves VLEKs), chains to the ASVK among the trusted roots, and the report verifies — with
// the verifier and with verify-report offline. Without certs-buf it is refused.
func TestVLEKSignedReportVerifies(t *testing.T) {
	h := startHost(t)
	ctx := context.Background()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "vlek", Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	// Relaunch the same VM on a platform with a VLEK loaded.
	hd, _ := hex.DecodeString(hj.HostData)
	meas, _ := hex.DecodeString(hj.Measurement)
	if err := h.SNP.RemoveLaunch(ctx, hj.Launch); err != nil {
		t.Fatal(err)
	}
	info, err := h.SNP.AddLaunch(ctx, fakesnp.LaunchSpec{Name: hj.Launch, Measurement: meas, HostData: hd, VLEK: true, Socket: filepath.Base(hj.SNPSocket)})
	if err != nil {
		t.Fatal(err)
	}
	hj.SNPSocket = info.Socket
	certs, err := h.SNP.LaunchCerts(ctx, hj.Launch)
	if err != nil {
		t.Fatal(err)
	}
	attestWith := func(withCerts bool) (int, string) {
		s := newKBSSession(t, h.VerifierURL)
		_, k, rep := s.evidence(hj, 0)
		if pr, _ := abi.ReportToProto(rep); pr.GetSignerInfo()&(7<<2) != uint32(abi.VlekReportSigner)<<2 {
			t.Fatalf("report signer info %#x: not VLEK-signed", pr.GetSignerInfo())
		}
		body := attestBody(s.nonce, k, rep)
		if withCerts {
			cb := base64.StdEncoding.EncodeToString(certs)
			body.TeeEvidence.PrimaryEvidence.CertsBuf = &cb
		}
		var pd protocol.ProblemDetails
		code := s.post(protocol.KBSPathAttest, body, &pd)
		return code, pd.Detail
	}
	if code, d := attestWith(true); code != 200 {
		t.Fatalf("VLEK-signed report with certs-buf: HTTP %d %s", code, d)
	}
	if code, d := attestWith(false); code == 200 || !strings.Contains(d, "VLEK") {
		t.Fatalf("VLEK-signed report without certs: HTTP %d %q, want a refusal naming the missing VLEK", code, d)
	}
	// Offline, from files.
	dir := t.TempDir()
	var rd [64]byte
	rf, cf := filepath.Join(dir, "r.bin"), filepath.Join(dir, "c.bin")
	_ = os.WriteFile(rf, report(t, hj, rd, 0), 0o600)
	_ = os.WriteFile(cf, certs, 0o600)
	out, err := exec.Command(bins.Verifier, "verify-report", "--report", rf, "--certs", cf, "--roots", h.Path("fakesnp-roots.pem"), "--offline").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "ok   signer          VLEK") || !strings.Contains(string(out), "ok   chain") {
		t.Fatalf("verify-report of a VLEK-signed report: %v\n%s", err, out)
	}
}
