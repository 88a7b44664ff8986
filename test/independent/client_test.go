// Package independent holds a guest client written only from PROTOCOLS.md §1, §4 and §6,
// importing nothing from this repository, run against `svsm-e2e host up` as a user would.
// If our implementation and the written contract drift apart, this test notices.
package independent

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func frameWrite(w io.Writer, body []byte) error {
	hdr := make([]byte, 8)
	binary.LittleEndian.PutUint64(hdr, uint64(len(body)))
	_, err := w.Write(append(hdr, body...))
	return err
}

func frameRead(r io.Reader) ([]byte, error) {
	hdr := make([]byte, 8)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return nil, err
	}
	n := binary.LittleEndian.Uint64(hdr)
	if n > 1<<20 {
		return nil, fmt.Errorf("frame of %d bytes", n)
	}
	b := make([]byte, n)
	_, err := io.ReadFull(r, b)
	return b, err
}

// snpReport asks the §4 channel for a report: 96-byte MSG_REPORT_REQ, 1216-byte RSP.
func snpReport(path string, reportData []byte) ([]byte, error) {
	c, err := net.Dial("unix", path)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	req := make([]byte, 0x60)
	copy(req, reportData) // VMPL 0, key selector 0
	if err := frameWrite(c, req); err != nil {
		return nil, err
	}
	rsp, err := frameRead(c)
	if err != nil {
		return nil, err
	}
	if len(rsp) != 1216 {
		return nil, fmt.Errorf("MSG_REPORT_RSP is %d bytes", len(rsp))
	}
	if st := binary.LittleEndian.Uint32(rsp); st != 0 {
		return nil, fmt.Errorf("status %#x", st)
	}
	if sz := binary.LittleEndian.Uint32(rsp[4:]); sz != 1184 {
		return nil, fmt.Errorf("report size %d", sz)
	}
	return rsp[0x20:], nil
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func unb64(s string) []byte {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

var errRefused = errors.New("refused")

// attest runs §1 end to end and returns the decrypted secret.
func attest(host map[string]string) ([]byte, error) {
	c, err := net.Dial("unix", host["proxy_socket"])
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if err := frameWrite(c, []byte(`{"version":[0,1,0],"tee":"snp"}`)); err != nil {
		return nil, err
	}
	raw, err := frameRead(c)
	if err != nil {
		return nil, fmt.Errorf("negotiation response: %w", err)
	}
	var neg struct {
		Challenge string   `json:"challenge"`
		Params    []string `json:"params"`
	}
	if err := json.Unmarshal(raw, &neg); err != nil {
		return nil, err
	}
	priv, _ := ecdh.P521().GenerateKey(rand.Reader)
	pub := priv.PublicKey().Bytes()[1:] // x ‖ y, 132 bytes
	x, y := pub[:66], pub[66:]
	h := sha512.New()
	for _, p := range neg.Params {
		switch p {
		case "EcPublicKeyBytes":
			h.Write(pub)
		case "Challenge":
			h.Write(unb64(neg.Challenge))
		default:
			return nil, fmt.Errorf("param %q", p)
		}
	}
	report, err := snpReport(host["snp_socket"], h.Sum(nil))
	if err != nil {
		return nil, fmt.Errorf("report: %w", err)
	}
	req := fmt.Sprintf(`{"tee":"snp","evidence":{"Snp":{"report":%q}},"challenge":%q,"key":{"x":%q,"y":%q}}`, b64(report), neg.Challenge, b64(x), b64(y))
	if err := frameWrite(c, []byte(req)); err != nil {
		return nil, err
	}
	raw, err = frameRead(c)
	if err != nil {
		return nil, fmt.Errorf("attestation response: %w", err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return nil, err
	}
	if string(fields["success"]) != "true" {
		if _, ok := fields["secret"]; ok {
			return nil, fmt.Errorf("failure response carries a secret field: %s", raw)
		}
		if string(fields["decryption"]) != "null" || string(fields["token"]) != "null" {
			return nil, fmt.Errorf("failure response shape: %s", raw)
		}
		return nil, errRefused
	}
	var resp struct {
		Secret     string `json:"secret"`
		Decryption struct {
			EPK        struct{ X, Y string } `json:"epk"`
			WrappedCEK string                `json:"wrapped_cek"`
			AAD        string                `json:"aad"`
			IV         string                `json:"iv"`
			Tag        string                `json:"tag"`
		} `json:"decryption"`
	}
	if err := json.Unmarshal(raw, &resp); err != nil {
		return nil, err
	}
	d := resp.Decryption
	epk, err := ecdh.P521().NewPublicKey(append(append([]byte{4}, unb64(d.EPK.X)...), unb64(d.EPK.Y)...))
	if err != nil {
		return nil, err
	}
	z, err := priv.ECDH(epk)
	if err != nil {
		return nil, err
	}
	// Concat KDF, RFC 7518 §4.6.2, one SHA-256 round gives the 256-bit KEK.
	alg := "ECDH-ES+A256KW"
	kh := sha256.New()
	kh.Write([]byte{0, 0, 0, 1})
	kh.Write(z)
	kh.Write(binary.BigEndian.AppendUint32(nil, uint32(len(alg))))
	kh.Write([]byte(alg))
	kh.Write([]byte{0, 0, 0, 0, 0, 0, 0, 0}) // empty PartyUInfo, PartyVInfo
	kh.Write([]byte{0, 0, 1, 0})             // keydatalen 256
	cek, err := aesUnwrap(kh.Sum(nil), unb64(d.WrappedCEK))
	if err != nil {
		return nil, err
	}
	blk, _ := aes.NewCipher(cek)
	gcm, _ := cipher.NewGCM(blk)
	return gcm.Open(nil, unb64(d.IV), append(unb64(resp.Secret), unb64(d.Tag)...), unb64(d.AAD))
}

// aesUnwrap is RFC 3394 AES key unwrap.
func aesUnwrap(kek, wrapped []byte) ([]byte, error) {
	if len(wrapped)%8 != 0 || len(wrapped) < 24 {
		return nil, errors.New("wrapped key size")
	}
	blk, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	n := len(wrapped)/8 - 1
	a := append([]byte(nil), wrapped[:8]...)
	r := make([][]byte, n)
	for i := range r {
		r[i] = append([]byte(nil), wrapped[8*(i+1):8*(i+2)]...)
	}
	buf := make([]byte, 16)
	for j := 5; j >= 0; j-- {
		for i := n; i >= 1; i-- {
			t := uint64(n*j + i)
			binary.BigEndian.PutUint64(buf, binary.BigEndian.Uint64(a)^t)
			copy(buf[8:], r[i-1])
			blk.Decrypt(buf, buf)
			a = append(a[:0], buf[:8]...)
			r[i-1] = append(r[i-1][:0], buf[8:]...)
		}
	}
	if !bytes.Equal(a, bytes.Repeat([]byte{0xa6}, 8)) {
		return nil, errors.New("key unwrap integrity check failed")
	}
	return bytes.Join(r, nil), nil
}

func TestIndependentClientAgainstHostUp(t *testing.T) {
	bin := t.TempDir()
	out, err := exec.Command("go", "build", "-o", bin+"/", "../../cmd/...").CombinedOutput()
	if err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	work := t.TempDir()
	up := exec.Command(filepath.Join(bin, "svsm-e2e"), "host", "up", "--workdir", work, "--vm", "indep", "--secret-mode", "raw")
	var stdout bytes.Buffer
	up.Stdout, up.Stderr = &stdout, &stdout
	if err := up.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		up.Process.Signal(os.Interrupt)
		done := make(chan error, 1)
		go func() { done <- up.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("host up exit after SIGINT: %v\n%s", err, stdout.String())
			}
		case <-time.After(20 * time.Second):
			up.Process.Kill()
			t.Error("host up did not stop on SIGINT")
		}
	}()
	hostJSON := filepath.Join(work, "host.json")
	deadline := time.Now().Add(60 * time.Second)
	var host map[string]string
	for {
		if b, err := os.ReadFile(hostJSON); err == nil && json.Unmarshal(b, &host) == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no host.json after 60 s; output:\n%s", stdout.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, k := range []string{"proxy_socket", "snp_socket", "verifier_url", "admin_url", "admin_token_file", "vm", "measurement", "host_data", "secret_mode"} {
		if host[k] == "" {
			t.Errorf("host.json lacks %q", k)
		}
	}
	if host["secret_mode"] != "raw" || host["vm"] != "indep" {
		t.Fatalf("host.json = %v", host)
	}

	secret, err := attest(host)
	if err != nil {
		t.Fatalf("first attestation: %v", err)
	}
	if len(secret) != 32 {
		t.Fatalf("raw secret is %d bytes, want 32", len(secret))
	}
	if _, err := attest(host); !errors.Is(err, errRefused) {
		t.Fatalf("second attestation without prime = %v, want refusal", err)
	}
	// Garbage frames, then the proxy must still serve.
	for _, junk := range [][]byte{
		[]byte("\x1b[2J not a frame at all"),
		{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f},
		append(binary.LittleEndian.AppendUint64(nil, 5), []byte("{{{{{")...),
	} {
		c, err := net.Dial("unix", host["proxy_socket"])
		if err != nil {
			t.Fatal(err)
		}
		c.Write(junk)
		c.Close()
	}
	prime := exec.Command(filepath.Join(bin, "svsm-e2e"), "host", "prime", "--workdir", work)
	if out, err := prime.CombinedOutput(); err != nil || !strings.Contains(string(out), "primed") {
		t.Fatalf("host prime: %v\n%s", err, out)
	}
	again, err := attest(host)
	if err != nil {
		t.Fatalf("attestation after prime: %v", err)
	}
	if !bytes.Equal(again, secret) {
		t.Fatal("raw mode must release the same 32-byte state key every boot")
	}
}
