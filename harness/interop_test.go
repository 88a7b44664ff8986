package harness_test

import (
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/base64"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	"github.com/google/uuid"

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
	priv, _ := ecdh.P521().GenerateKey(rand.Reader)
	k := protocol.ECPublicKeyFromECDH(priv.PublicKey())
	n, _ := base64.StdEncoding.DecodeString(s.nonce)
	rd, _ := protocol.ReportData(protocol.DefaultParams(), k, n)
	body := attestBody(s.nonce, k, report(t, hj, rd, 0))
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
	priv, _ := ecdh.P521().GenerateKey(rand.Reader)
	k := protocol.ECPublicKeyFromECDH(priv.PublicKey())
	n, _ := base64.StdEncoding.DecodeString(s.nonce)
	rd, _ := protocol.ReportData(protocol.DefaultParams(), k, n)
	rep := report(t, hj, rd, 0)
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
