package fakesnp

import (
	"bytes"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/go-sev-guest/verify"
	"github.com/google/go-sev-guest/verify/trust"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

func newServer(t *testing.T, dir string) *Server {
	t.Helper()
	s, err := New(Options{StateDir: dir, RSABits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func getReport(t *testing.T, socket string, rd [64]byte) []byte {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	req := protocol.ReportRequest{ReportData: rd}
	b, _ := req.MarshalBinary()
	if err := protocol.WriteFrame(c, b); err != nil {
		t.Fatal(err)
	}
	body, err := protocol.ReadFrame(c, protocol.ReportRspSize)
	if err != nil {
		t.Fatal(err)
	}
	var rsp protocol.ReportResponse
	if err := rsp.UnmarshalBinary(body); err != nil || rsp.Status != 0 {
		t.Fatalf("response %+v %v", rsp, err)
	}
	return rsp.Report
}

// verifyWith checks a report with go-sev-guest against s's chain only (never AMD's roots).
func verifyWith(s *Server, chip *Chip, report []byte) error {
	root := trust.AMDRootCertsProduct(ProductLine)
	if err := root.FromKDSCertBytes(s.CA().CertChainPEM()); err != nil {
		return err
	}
	pr, err := abi.ReportToProto(report)
	if err != nil {
		return err
	}
	tcb := pr.GetReportedTcb()
	_, cert, err := s.CA().VCEK(chip, kds.TCBVersion(tcb))
	if err != nil {
		return err
	}
	att := &spb.Attestation{Report: pr, CertificateChain: &spb.CertificateChain{VcekCert: cert.Raw, AskCert: s.CA().Ask.Raw, ArkCert: s.CA().Ark.Raw}}
	return verify.SnpAttestation(att, &verify.Options{DisableCertFetching: true, TrustedRoots: map[string][]*trust.AMDRootCerts{ProductLine: {root}}, Now: time.Now()})
}

func TestReportVerifiesAndChainPersists(t *testing.T) {
	dir := t.TempDir()
	s := newServer(t, dir)
	meas := bytes.Repeat([]byte{0xab}, 48)
	info, err := s.AddLaunch(LaunchSpec{Name: "vm", Measurement: meas})
	if err != nil {
		t.Fatal(err)
	}
	rd := [64]byte{1, 2, 3}
	r := getReport(t, info.Socket, rd)
	if !bytes.Equal(r[0x90:0xC0], meas) || !bytes.Equal(r[0x50:0x90], rd[:]) {
		t.Fatal("report fields not at their ABI offsets")
	}
	chip, _ := s.chip("chip0")
	if err := verifyWith(s, chip, r); err != nil {
		t.Fatalf("go-sev-guest rejects our report: %v", err)
	}
	r[0x90] ^= 1
	if err := verifyWith(s, chip, r); err == nil {
		t.Fatal("flipped measurement byte still verifies")
	}
	// Genuine AMD roots must reject the fake chain.
	pr, _ := abi.ReportToProto(getReport(t, info.Socket, rd))
	_, cert, _ := s.CA().VCEK(chip, kds.TCBVersion(pr.GetReportedTcb()))
	att := &spb.Attestation{Report: pr, CertificateChain: &spb.CertificateChain{VcekCert: cert.Raw, AskCert: s.CA().Ask.Raw, ArkCert: s.CA().Ark.Raw}}
	if err := verify.SnpAttestation(att, &verify.Options{DisableCertFetching: true, Now: time.Now()}); err == nil {
		t.Fatal("genuine AMD roots accepted the fake chain")
	}

	ark := s.CA().Ark.Raw
	chipID := chip.ID
	s.Close()
	s2 := newServer(t, dir)
	if !bytes.Equal(s2.CA().Ark.Raw, ark) {
		t.Fatal("restart changed the ARK")
	}
	info2, err := s2.Launch("vm")
	if err != nil {
		t.Fatalf("launch not re-opened after restart: %v", err)
	}
	chip2, _ := s2.chip("chip0")
	if chip2.ID != chipID {
		t.Fatal("restart changed the chip id")
	}
	if err := verifyWith(s2, chip2, getReport(t, info2.Socket, rd)); err != nil {
		t.Fatalf("report after restart: %v", err)
	}
	if filepath.Dir(info2.Socket) != filepath.Join(dir, "launches") {
		t.Fatalf("socket %s", info2.Socket)
	}
}

func TestLaunchSpecValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		spec LaunchSpec
	}{
		{"bad name", LaunchSpec{Name: "../x", Measurement: make([]byte, 48)}},
		{"short measurement", LaunchSpec{Name: "a", Measurement: make([]byte, 47)}},
		{"long host data", LaunchSpec{Name: "a", Measurement: make([]byte, 48), HostData: make([]byte, 33)}},
		{"policy without reserved bit", LaunchSpec{Name: "a", Measurement: make([]byte, 48), Policy: 1 << 16}},
	} {
		if err := tc.spec.Validate(); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
}
