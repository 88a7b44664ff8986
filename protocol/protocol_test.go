package protocol

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestFrameRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	for _, body := range [][]byte{{}, []byte("{}"), bytes.Repeat([]byte("x"), 4096)} {
		if err := WriteFrame(&buf, body); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []int{0, 2, 4096} {
		got, err := ReadFrame(&buf, 0)
		if err != nil || len(got) != want {
			t.Fatalf("ReadFrame = %d bytes, %v; want %d", len(got), err, want)
		}
	}
	if _, err := ReadFrame(&buf, 0); !errors.Is(err, io.EOF) {
		t.Fatalf("ReadFrame at end = %v, want EOF", err)
	}
}

func TestFrameBounds(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want string
	}{
		{"oversized", []byte{0, 0, 0, 0, 0, 0, 0, 0x80}, "exceeds limit"},
		{"just over limit", []byte{1, 0, 0x10, 0, 0, 0, 0, 0}, "exceeds limit"},
		{"truncated header", []byte{1, 2, 3}, "truncated"},
		{"truncated body", []byte{10, 0, 0, 0, 0, 0, 0, 0, 'a'}, "read frame body"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadFrame(bytes.NewReader(tc.in), 0)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ReadFrame = %v, want error containing %q", err, tc.want)
			}
		})
	}
	if err := WriteFrame(io.Discard, make([]byte, MaxFrameSize+1)); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("WriteFrame oversized = %v", err)
	}
}

// Golden shapes copied from PROTOCOLS.md §1.
func TestNegotiationGolden(t *testing.T) {
	m, err := DecodeNegotiationRequest([]byte(`{"version":[0,1,0],"tee":"snp"}`))
	if err != nil || m.Version != VersionAttest {
		t.Fatalf("decode = %+v, %v", m, err)
	}
	out, _ := json.Marshal(NegotiationRequest{Version: VersionAttest, Tee: TeeSNP})
	if string(out) != `{"version":[0,1,0],"tee":"snp"}` {
		t.Fatalf("encode = %s", out)
	}
	resp, _ := json.Marshal(NegotiationResponse{Challenge: []byte{0xfb, 0xff}, Params: DefaultParams()})
	if string(resp) != `{"challenge":"+/8=","params":["EcPublicKeyBytes","Challenge"]}` {
		t.Fatalf("encode response = %s (must be standard base64 with padding)", resp)
	}
}

func TestNegotiationRequestRejects(t *testing.T) {
	for _, in := range []string{
		`{"version":[0,1],"tee":"snp"}`,
		`{"version":[0,1,0,0],"tee":"snp"}`,
		`{"version":[1,0,0],"tee":"snp"}`,
		`{"version":[0,1,0],"tee":"tdx"}`,
		`{"version":null,"tee":"snp"}`,
		`{"tee":"snp"}`,
		`[]`, `null`, `{`, ``,
		`{"version":[0,2,0],"tee":"snp"}`,
	} {
		if _, err := DecodeNegotiationRequest([]byte(in)); err == nil {
			t.Errorf("DecodeNegotiationRequest(%s) accepted", in)
		}
	}
}

func TestAttestationResponseAbsentVsNull(t *testing.T) {
	fail, err := json.Marshal(FailureResponse())
	if err != nil {
		t.Fatal(err)
	}
	if string(fail) != `{"success":false,"decryption":null,"token":null}` {
		t.Fatalf("failure = %s", fail)
	}
	if _, err := DecodeAttestationResponse(fail); err != nil {
		t.Fatalf("decode failure: %v", err)
	}
	if _, err := DecodeAttestationResponse([]byte(`{"success":false,"secret":null,"decryption":null,"token":null}`)); err == nil ||
		!strings.Contains(err.Error(), "secret is null") {
		t.Fatalf("secret:null accepted: %v", err)
	}
	if _, err := DecodeAttestationResponse([]byte(`{"success":true,"decryption":null,"token":null}`)); err == nil {
		t.Fatal("success without secret accepted")
	}
}

func TestAttestationRequestGolden(t *testing.T) {
	report := make([]byte, ReportSize)
	x, y := bytes.Repeat([]byte{1}, 66), bytes.Repeat([]byte{2}, 66)
	req := AttestationRequest{Tee: TeeSNP, Evidence: Evidence{Snp: &SnpEvidence{Report: report}}, Challenge: []byte("n"), Key: ECPublicKey{X: x, Y: y}}
	out, _ := json.Marshal(req)
	if !strings.HasPrefix(string(out), `{"tee":"snp","evidence":{"Snp":{"report":"AAAA`) || strings.Contains(string(out), "certs_buf") {
		t.Fatalf("encode = %.120s", out)
	}
	got, err := DecodeAttestationRequest(out)
	if err != nil || !bytes.Equal(got.Key.X, x) {
		t.Fatalf("decode = %v", err)
	}
	// certs_buf null is accepted leniently.
	lenient := strings.Replace(string(out), `"report"`, `"certs_buf":null,"report"`, 1)
	if _, err := DecodeAttestationRequest([]byte(lenient)); err != nil {
		t.Fatalf("certs_buf null: %v", err)
	}
	short := strings.Replace(string(out), `"report":"AAAA`, `"report":"`, 1)
	if _, err := DecodeAttestationRequest([]byte(short)); err == nil {
		t.Fatal("truncated report accepted")
	}
	urlsafe := strings.Replace(string(out), `"challenge":"bg=="`, `"challenge":"-_-_"`, 1)
	if _, err := DecodeAttestationRequest([]byte(urlsafe)); err == nil {
		t.Fatal("url-safe base64 accepted")
	}
}

func TestJWERoundTripThroughProxyMapping(t *testing.T) {
	priv, err := ecdh.P521().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub := ECPublicKeyFromECDH(priv.PublicKey())
	secret := bytes.Repeat([]byte{0x5a}, 32)
	jwe, err := EncryptSecret(pub, secret)
	if err != nil {
		t.Fatal(err)
	}
	dec, ct, err := DecryptionFromJWE(jwe)
	if err != nil {
		t.Fatal(err)
	}
	if string(dec.AAD) != jwe.Protected {
		t.Fatal("AAD is not the protected header as received")
	}
	// Through the wire encoding of message 4 and back.
	tok := "jwt"
	wire, err := json.Marshal(AttestationResponse{Success: true, Secret: ct, Decryption: dec, Token: &Token{Jwt: &tok}})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := DecodeAttestationResponse(wire)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecryptSecret(priv, resp.Decryption, resp.Secret)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("DecryptSecret = %x, %v", got, err)
	}
	// Any flipped byte fails closed.
	for _, mutate := range []func(d *Decryption, ct []byte){
		func(d *Decryption, ct []byte) { ct[0] ^= 1 },
		func(d *Decryption, ct []byte) { d.AAD[3] ^= 1 },
		func(d *Decryption, ct []byte) { d.Tag[0] ^= 1 },
		func(d *Decryption, ct []byte) { d.WrappedCEK[5] ^= 1 },
		func(d *Decryption, ct []byte) { d.IV[0] ^= 1 },
	} {
		d2 := *resp.Decryption
		d2.AAD, d2.Tag, d2.WrappedCEK, d2.IV = bytes.Clone(d2.AAD), bytes.Clone(d2.Tag), bytes.Clone(d2.WrappedCEK), bytes.Clone(d2.IV)
		ct2 := bytes.Clone(resp.Secret)
		mutate(&d2, ct2)
		if _, err := DecryptSecret(priv, &d2, ct2); err == nil {
			t.Fatal("mutated JWE decrypted")
		}
	}
	// Another key cannot decrypt.
	other, _ := ecdh.P521().GenerateKey(rand.Reader)
	if _, err := DecryptSecret(other, resp.Decryption, resp.Secret); err == nil {
		t.Fatal("wrong key decrypted")
	}
}

func TestReportDataBinding(t *testing.T) {
	k := ECPublicKey{X: bytes.Repeat([]byte{1}, 66), Y: bytes.Repeat([]byte{2}, 66)}
	a, _ := ReportData(DefaultParams(), k, []byte("nonce"))
	b, _ := ReportData([]string{ParamChallenge, ParamEcPublicKeyBytes}, k, []byte("nonce"))
	c, _ := ReportData(DefaultParams(), k, []byte("nonce2"))
	if a == b || a == c {
		t.Fatal("report data does not depend on order and nonce")
	}
}

func TestSecretPayloadV1(t *testing.T) {
	p := SecretPayloadV1{WriteThrough: true, ExpectedCounter: 7, NextCounter: 8}
	p.StateKey[0], p.BootID[1], p.ConfirmKey[2], p.VMID[3] = 1, 2, 3, 4
	b, _ := p.MarshalBinary()
	if len(b) != SecretPayloadV1Size || string(b[:7]) != "SVSME2E" {
		t.Fatalf("layout: %x", b[:16])
	}
	var q SecretPayloadV1
	if err := q.UnmarshalBinary(b); err != nil || q != p {
		t.Fatalf("round trip: %+v %v", q, err)
	}
	b[0x0C] = 1
	if err := q.UnmarshalBinary(b); err == nil {
		t.Fatal("reserved byte accepted")
	}
}

func TestConfirmMAC(t *testing.T) {
	key := bytes.Repeat([]byte{9}, 32)
	c := NewConfirmRequest(key, make([]byte, BootIDSize), 5)
	if err := c.Verify(key); err != nil {
		t.Fatal(err)
	}
	c.Counter = 6
	if err := c.Verify(key); err == nil {
		t.Fatal("changed counter verified")
	}
}

func TestReportMessages(t *testing.T) {
	req := ReportRequest{VMPL: 0}
	req.ReportData[0] = 0xaa
	b, _ := req.MarshalBinary()
	var r2 ReportRequest
	if err := r2.UnmarshalBinary(b); err != nil || r2 != req {
		t.Fatal(err)
	}
	if err := r2.UnmarshalBinary(b[:95]); err == nil {
		t.Fatal("short request accepted")
	}
	rsp := ReportResponse{Status: StatusInvalidParams}
	rb, _ := rsp.MarshalBinary()
	var r3 ReportResponse
	if err := r3.UnmarshalBinary(rb); err != nil || r3.Status != StatusInvalidParams || r3.Report != nil {
		t.Fatalf("%+v %v", r3, err)
	}
}
