package harness_test

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm/attest"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// kbsSession is a direct KBS client (what the proxy does), for cases the proxy cannot express.
type kbsSession struct {
	t     *testing.T
	url   string
	http  *http.Client
	nonce string
}

func newKBSSession(t *testing.T, url string) *kbsSession {
	jar := &cookieJar{}
	s := &kbsSession{t: t, url: url, http: &http.Client{Jar: jar, Timeout: 10 * time.Second}}
	var ch protocol.KBSChallenge
	if code := s.post(protocol.KBSPathAuth, protocol.KBSRequest{Version: "0.4.0", Tee: "snp"}, &ch); code != 200 {
		t.Fatalf("auth: HTTP %d", code)
	}
	s.nonce = ch.Nonce
	return s
}

func (s *kbsSession) post(path string, in, out any) int {
	b, _ := json.Marshal(in)
	resp, err := s.http.Post(s.url+path, "application/json", bytes.NewReader(b))
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	if out != nil {
		_ = json.NewDecoder(resp.Body).Decode(out)
	}
	return resp.StatusCode
}

// report gets a real signed report from the VM's launch channel.
func report(t *testing.T, hj *protocol.HostJSON, rd [64]byte, vmpl uint) []byte {
	c, err := net.Dial("unix", hj.SNPSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r, err := attest.NewChannelQuoteProvider(c, 10*time.Second).GetRawQuoteAtLevel(rd, vmpl)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestVerifierBindingRefusals(t *testing.T) {
	h := startHost(t)
	ctx := context.Background()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "bind", Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	newKey := func() protocol.ECPublicKey {
		k, _ := ecdh.P521().GenerateKey(rand.Reader)
		return protocol.ECPublicKeyFromECDH(k.PublicKey())
	}
	tests := []struct {
		name  string
		field string
		run   func(s *kbsSession) protocol.KBSAttestation
	}{
		{"wrong nonce in runtime data", "nonce", func(s *kbsSession) protocol.KBSAttestation {
			_, k, rep := s.evidence(hj, 0)
			return attestBody("AAAA"+s.nonce[4:], k, rep)
		}},
		{"report binds an old nonce", "report_data", func(s *kbsSession) protocol.KBSAttestation {
			k := newKey()
			rd, _ := protocol.ReportData(protocol.DefaultParams(), k, []byte("an older nonce"))
			return attestBody(s.nonce, k, report(t, hj, rd, 0))
		}},
		{"presented key not bound in REPORT_DATA", "report_data", func(s *kbsSession) protocol.KBSAttestation {
			bound, presented := newKey(), newKey()
			n, _ := base64.StdEncoding.DecodeString(s.nonce)
			rd, _ := protocol.ReportData(protocol.DefaultParams(), bound, n)
			return attestBody(s.nonce, presented, report(t, hj, rd, 0))
		}},
		{"report byte flipped in transit", "signature", func(s *kbsSession) protocol.KBSAttestation {
			_, k, r := s.evidence(hj, 0)
			r[0xC0] ^= 0x01 // HOST_DATA
			return attestBody(s.nonce, k, r)
		}},
		{"VMPL 1 report", "vmpl", func(s *kbsSession) protocol.KBSAttestation {
			_, k, rep := s.evidence(hj, 1)
			return attestBody(s.nonce, k, rep)
		}},
		{"truncated report", "snp-report", func(s *kbsSession) protocol.KBSAttestation {
			k := newKey()
			return attestBody(s.nonce, k, make([]byte, 1000))
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newKBSSession(t, h.VerifierURL)
			var pd protocol.ProblemDetails
			code := s.post(protocol.KBSPathAttest, tc.run(s), &pd)
			if code == 200 || !strings.HasPrefix(pd.Detail, tc.field+":") || !strings.HasPrefix(pd.Type, protocol.ProblemTypeBase) {
				t.Fatalf("attest = HTTP %d %+v, want refusal naming %q", code, pd, tc.field)
			}
			if ev := lastAudit(t, h, ""); ev.Outcome != verifier.Deny || !strings.HasPrefix(ev.Reason, tc.field+":") {
				t.Fatalf("audit = %+v", ev)
			}
			// No session attested, so no resource.
			resp, err := s.http.Get(h.VerifierURL + protocol.KBSPathResource + protocol.DefaultResourcePath)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("resource after refused attest = HTTP %d, want 401", resp.StatusCode)
			}
			if ev := lastAudit(t, h, ""); ev.Event != "release" || ev.Outcome != verifier.Deny || !strings.HasPrefix(ev.Reason, "session:") {
				t.Fatalf("audit of unauthenticated resource = %+v", ev)
			}
		})
	}
	if v, _ := h.Admin.Show(ctx, "bind"); v.Releases != 0 || !v.Primed {
		t.Fatalf("vm = %+v: nothing may have been released", v)
	}
}

// evidence makes a fresh P-521 key and a signed report from hj's launch whose REPORT_DATA
// binds that key to the session's nonce, at the given VMPL: what an honest guest presents.
func (s *kbsSession) evidence(hj *protocol.HostJSON, vmpl uint) (*ecdh.PrivateKey, protocol.ECPublicKey, []byte) {
	s.t.Helper()
	priv, err := ecdh.P521().GenerateKey(rand.Reader)
	if err != nil {
		s.t.Fatal(err)
	}
	k := protocol.ECPublicKeyFromECDH(priv.PublicKey())
	n, err := base64.StdEncoding.DecodeString(s.nonce)
	if err != nil {
		s.t.Fatalf("session nonce %q: %v", s.nonce, err)
	}
	rd, err := protocol.ReportData(protocol.DefaultParams(), k, n)
	if err != nil {
		s.t.Fatal(err)
	}
	return priv, k, report(s.t, hj, rd, vmpl)
}

func attestBody(nonce string, k protocol.ECPublicKey, report []byte) protocol.KBSAttestation {
	return protocol.KBSAttestation{
		RuntimeData: protocol.RuntimeData{Nonce: nonce, TeePubKey: protocol.TeePubKeyFrom(k)},
		TeeEvidence: protocol.TeeEvidence{PrimaryEvidence: protocol.PrimaryEvidence{SnpReport: base64.StdEncoding.EncodeToString(report)}},
	}
}

// TestProxyBadInput sends hostile bytes to the proxy and checks it refuses each connection
// cleanly and keeps serving a well-behaved guest afterwards.
func TestProxyBadInput(t *testing.T) {
	h := startHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "bad", Prime: true})
	if err != nil {
		t.Fatal(err)
	}
	frame := func(body string) []byte {
		b := make([]byte, 8+len(body))
		binary.LittleEndian.PutUint64(b, uint64(len(body)))
		copy(b[8:], body)
		return b
	}
	negotiate := frame(`{"version":[0,1,0],"tee":"snp"}`)
	tests := []struct {
		name string
		send [][]byte
		// wantResponse: the proxy answers message 4 with success=false before closing.
		wantFailure bool
	}{
		{"oversized length", [][]byte{{0, 0, 0, 0, 0, 0, 0, 0x40}}, false},
		{"invalid JSON", [][]byte{frame(`{"version":[0,1,0],`)}, false},
		{"garbage bytes", [][]byte{[]byte("\x1b[2J\x1b[H garbage from a serial console\r\n")}, false},
		{"downgraded version", [][]byte{frame(`{"version":[0,0,9],"tee":"snp"}`)}, false},
		{"null evidence", [][]byte{negotiate, frame(`{"tee":"snp","evidence":null,"challenge":"AA==","key":{"x":"","y":""}}`)}, true},
		{"truncated report", [][]byte{negotiate, frame(`{"tee":"snp","evidence":{"Snp":{"report":"AAAA"}},"challenge":"AA==","key":{"x":"AA==","y":"AA=="}}`)}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("unix", hj.ProxySocket)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(20 * time.Second))
			for i, b := range tc.send {
				if _, err := c.Write(b); err != nil {
					t.Fatal(err)
				}
				if i == 0 && len(tc.send) > 1 {
					if _, err := protocol.ReadFrame(c, 0); err != nil { // negotiation response
						t.Fatalf("negotiation response: %v", err)
					}
				}
			}
			if tc.wantFailure {
				f, err := protocol.ReadFrame(c, 0)
				if err != nil {
					t.Fatalf("want failure response: %v", err)
				}
				if string(f) != `{"success":false,"decryption":null,"token":null}` {
					t.Fatalf("response = %s", f)
				}
			}
			// Then the proxy closes the connection (or has already).
			if tc.wantFailure {
				c.(*net.UnixConn).CloseWrite()
			}
			if _, err := protocol.ReadFrame(c, 0); err == nil {
				t.Fatal("proxy kept talking after bad input")
			}
		})
	}
	// The proxy still serves a good guest.
	if _, err := guest(ctx, hj); err != nil {
		t.Fatalf("good guest after bad input: %v", err)
	}
	if v, _ := h.Admin.Show(ctx, "bad"); v.Releases != 1 {
		t.Fatalf("releases = %d, want 1", v.Releases)
	}
}

// TestFakeSNPBadInput: wrong-size requests get STATUS 0x16 and the channel keeps working;
// an oversized length closes the connection; firmware errors are reported as such.
func TestFakeSNPBadInput(t *testing.T) {
	h := startHost(t)
	ctx := context.Background()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "snpbad"})
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", hj.SNPSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := protocol.WriteFrame(c, make([]byte, 50)); err != nil {
		t.Fatal(err)
	}
	b, err := protocol.ReadFrame(c, protocol.ReportRspSize)
	if err != nil {
		t.Fatal(err)
	}
	var rsp protocol.ReportResponse
	if err := rsp.UnmarshalBinary(b); err != nil || rsp.Status != protocol.StatusInvalidParams {
		t.Fatalf("short request: %+v %v", rsp, err)
	}
	// Same connection still answers a good request.
	qp := attest.NewChannelQuoteProvider(c, 10*time.Second)
	if r, err := qp.GetRawQuote([64]byte{1}); err != nil || len(r) != protocol.ReportSize {
		t.Fatalf("good request after bad: %v", err)
	}
	if _, err := c.Write([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}); err != nil {
		t.Fatal(err)
	}
	if _, err := protocol.ReadFrame(c, 0); err == nil {
		t.Fatal("oversized length: connection not closed")
	}
	// Firmware error status.
	if err := h.SNP.SetFaults(ctx, "snpbad", fakesnp.Faults{FirmwareStatus: 0x27}); err != nil {
		t.Fatal(err)
	}
	c2, _ := net.Dial("unix", hj.SNPSocket)
	defer c2.Close()
	_, err = attest.NewChannelQuoteProvider(c2, 10*time.Second).GetRawQuote([64]byte{})
	var fe *attest.FirmwareError
	if !errors.As(err, &fe) || fe.Status != 0x27 {
		t.Fatalf("firmware fault = %v", err)
	}
}
