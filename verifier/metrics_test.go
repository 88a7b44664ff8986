package verifier

import (
	"crypto/ecdh"
	"crypto/rand"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// TestMetrics: /metrics answers without the admin token (the admin API still wants it),
// counts committed decisions by event, outcome and refusal field, and names no VM.
func TestMetrics(t *testing.T) {
	v := newPrimedVerifier(t, "secret-vm-name")
	priv, _ := ecdh.P521().GenerateKey(rand.Reader)
	key := protocol.ECPublicKeyFromECDH(priv.PublicKey())
	if _, ref, err := v.release(t.Context(), "secret-vm-name", "s1", key, noGate); err != nil || ref != nil {
		t.Fatal(ref, err)
	}
	if _, ref, _ := v.release(t.Context(), "secret-vm-name", "s2", key, noGate); ref == nil {
		t.Fatal("a second release on one boot request")
	}
	srv := httptest.NewServer(v.AdminHandler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	text := string(body)
	for _, want := range []string{
		`svsm_verifier_decisions_total{event="release",outcome="allow",reason=""} 1`,
		`svsm_verifier_decisions_total{event="release",outcome="deny",reason="boot_request"} 1`,
		`svsm_verifier_decisions_total{event="prime",outcome="allow",reason=""} 1`,
		`svsm_verifier_sessions 0`,
		`svsm_verifier_kds_fetches_total 0`,
		"svsm_verifier_request_seconds_bucket",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(text, "secret-vm-name") {
		t.Error("/metrics names a VM")
	}
	resp, err = http.Get(srv.URL + "/admin/v1/vms")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("the admin API without a token: %s", resp.Status)
	}
}
