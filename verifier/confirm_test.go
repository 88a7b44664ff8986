package verifier

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"errors"
	"strings"
	"testing"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

func newTestVerifier(t *testing.T) *Verifier {
	t.Helper()
	v, err := New(Options{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v
}

// newPrimedVerifier is a verifier with one VM registered (secret mode v1) and primed.
func newPrimedVerifier(t *testing.T, name string) *Verifier {
	t.Helper()
	v := newTestVerifier(t)
	if _, err := v.Register(t.Context(), VMSpec{Name: name, Measurements: []protocol.HexBytes{make([]byte, 48)}, SecretMode: "v1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Prime(t.Context(), name); err != nil {
		t.Fatal(err)
	}
	return v
}

// releaseV1 registers/primes and releases directly (the evidence path is covered by the
// harness integration tests), returning the decrypted payload.
// noGate stands for a session whose evidence passes the gate (the gate itself is covered by
// the session tests and the harness integration tests).
func noGate(*VM) *Refusal { return nil }

func releaseV1(t *testing.T, v *Verifier, name string) protocol.SecretPayloadV1 {
	t.Helper()
	if _, err := v.Prime(t.Context(), name); err != nil {
		t.Fatal(err)
	}
	priv, _ := ecdh.P521().GenerateKey(rand.Reader)
	jwe, ref, err := v.release(t.Context(), name, "s", protocol.ECPublicKeyFromECDH(priv.PublicKey()), noGate)
	if err != nil || ref != nil {
		t.Fatalf("release: %v %v", err, ref)
	}
	d, ct, err := protocol.DecryptionFromJWE(jwe)
	if err != nil {
		t.Fatal(err)
	}
	pt, err := protocol.DecryptSecret(priv, d, ct)
	if err != nil {
		t.Fatal(err)
	}
	var p protocol.SecretPayloadV1
	if err := p.UnmarshalBinary(pt); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfirmRules(t *testing.T) {
	for _, wt := range []bool{false, true} {
		v := newTestVerifier(t)
		if _, err := v.Register(t.Context(), VMSpec{Name: "vm", Measurements: []protocol.HexBytes{make([]byte, 48)}, SecretMode: "v1", WriteThrough: wt}); err != nil {
			t.Fatal(err)
		}
		p := releaseV1(t, v, "vm")
		if p.ExpectedCounter != 0 || p.NextCounter != 1 || p.WriteThrough != wt {
			t.Fatalf("payload %+v", p)
		}
		confirm := func(key []byte, boot []byte, c uint64) *protocol.ConfirmResponse {
			keys, err := protocol.DeriveConfirmKeys(key)
			if err != nil {
				t.Fatal(err)
			}
			req := protocol.NewConfirmRequest(keys, boot, c, bytes.Repeat([]byte{byte(c)}, protocol.ConfirmNonceSize))
			r, err := v.Confirm(t.Context(), req)
			if err != nil {
				t.Fatal(err)
			}
			// Every answer to a known boot is authenticated for the guest that holds the key.
			if verr := r.VerifyAnswer(keys, req); verr != nil && !strings.Contains(r.Reason, "unknown boot") && !strings.Contains(r.Reason, "mac") {
				t.Fatalf("answer not authenticated: %v (%+v)", verr, r)
			}
			return r
		}
		steps := []struct {
			name    string
			key     []byte
			counter uint64
			ok      bool
			reason  string
		}{
			{"wrong mac", bytes.Repeat([]byte{1}, 32), 1, false, "mac"},
			{"skip ahead", p.ConfirmKey[:], 2, false, "neither"},
			{"current counter before advance", p.ConfirmKey[:], 0, false, "neither"},
			{"advance", p.ConfirmKey[:], 1, true, ""},
			{"idempotent repeat", p.ConfirmKey[:], 1, true, ""},
			{"runtime write", p.ConfirmKey[:], 2, wt, "neither"},
		}
		for _, s := range steps {
			r := confirm(s.key, p.BootID[:], s.counter)
			if r.Success != s.ok || (!s.ok && !strings.Contains(r.Reason, s.reason)) {
				t.Errorf("write-through=%v %s: %+v", wt, s.name, r)
			}
		}
		if r := confirm(p.ConfirmKey[:], make([]byte, 16), 1); r.Success || !strings.Contains(r.Reason, "unknown boot") {
			t.Errorf("unknown boot: %+v", r)
		}
		// A new release supersedes the old boot.
		p2 := releaseV1(t, v, "vm")
		want := uint64(1)
		if wt {
			want = 2
		}
		if p2.ExpectedCounter != want {
			t.Errorf("write-through=%v: next boot expects %d, want %d", wt, p2.ExpectedCounter, want)
		}
		if r := confirm(p.ConfirmKey[:], p.BootID[:], want+1); r.Success || !strings.Contains(r.Reason, "superseded") {
			t.Errorf("superseded boot: %+v", r)
		}
		evs, _ := v.Store().AuditEvents(t.Context(), "vm", 0, 0)
		var denies int
		for _, e := range evs {
			if e.Event == "confirm" && e.Outcome == Deny {
				denies++
			}
		}
		if denies < 4 {
			t.Errorf("write-through=%v: %d confirm denials audited", wt, denies)
		}
	}
}

func TestReleaseOnceAndRawMode(t *testing.T) {
	v := newTestVerifier(t)
	view, err := v.Register(t.Context(), VMSpec{Name: "raw", Measurements: []protocol.HexBytes{make([]byte, 48)}, SecretMode: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := ecdh.P521().GenerateKey(rand.Reader)
	key := protocol.ECPublicKeyFromECDH(priv.PublicKey())
	if _, ref, _ := v.release(t.Context(), "raw", "s", key, noGate); ref == nil || ref.Field != "boot_request" {
		t.Fatalf("release without prime: %v", ref)
	}
	if _, err := v.Prime(t.Context(), "raw"); err != nil {
		t.Fatal(err)
	}
	jwe, ref, err := v.release(t.Context(), "raw", "s", key, noGate)
	if err != nil || ref != nil {
		t.Fatal(err, ref)
	}
	d, ct, _ := protocol.DecryptionFromJWE(jwe)
	pt, err := protocol.DecryptSecret(priv, d, ct)
	if err != nil || len(pt) != 32 {
		t.Fatalf("raw secret %d bytes, %v", len(pt), err)
	}
	if _, ref, _ := v.release(t.Context(), "raw", "s", key, noGate); ref == nil {
		t.Fatal("second release without prime")
	}
	if len(view.ID) != 32 {
		t.Fatalf("vm id is %d bytes, want 32", len(view.ID))
	}
}

func TestVMSpecValidate(t *testing.T) {
	m := []protocol.HexBytes{make([]byte, 48)}
	for _, tc := range []VMSpec{
		{Name: "", Measurements: m},
		{Name: "a/b", Measurements: m},
		{Name: "a"},
		{Name: "a", Measurements: []protocol.HexBytes{make([]byte, 47)}},
		{Name: "a", Measurements: m, HostData: make([]byte, 31)},
		{Name: "a", Measurements: m, SecretMode: "aes"},
		{Name: "a", Measurements: m, SecretMode: "raw", WriteThrough: true},
	} {
		if err := tc.Validate(); err == nil {
			t.Errorf("%+v accepted", tc)
		}
	}
}

func TestSetMeasurements(t *testing.T) {
	v := newTestVerifier(t)
	m1, m2 := bytes.Repeat([]byte{1}, 48), bytes.Repeat([]byte{2}, 48)
	if _, err := v.Register(t.Context(), VMSpec{Name: "vm", Measurements: []protocol.HexBytes{m1}, SecretMode: "v1"}); err != nil {
		t.Fatal(err)
	}
	view, err := v.SetMeasurements(t.Context(), "vm", []protocol.HexBytes{m1, m2})
	if err != nil || len(view.Measurements) != 2 {
		t.Fatalf("set: %+v %v", view, err)
	}
	if _, err := v.SetMeasurements(t.Context(), "vm", nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("empty allow-list: %v, want ErrInvalid", err)
	}
	if _, err := v.SetMeasurements(t.Context(), "vm", []protocol.HexBytes{{1, 2}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("short digest: %v, want ErrInvalid", err)
	}
	if _, err := v.SetMeasurements(t.Context(), "nope", []protocol.HexBytes{m1}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown vm: %v", err)
	}
	if got, _ := v.Show(t.Context(), "vm"); len(got.Measurements) != 2 {
		t.Fatalf("a refused update changed the record: %+v", got.Measurements)
	}
	evs, err := v.store.AuditEvents(t.Context(), "vm", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if last := evs[len(evs)-1]; last.Event != "policy" {
		t.Fatalf("last audit %+v", last)
	}
}

// TestReleaseChecksTheKeyBeforeSpendingTheRequest: a key that is no P-521 point is refused
// (and audited) before the transaction, so the boot request survives for the real guest.
func TestReleaseChecksTheKeyBeforeSpendingTheRequest(t *testing.T) {
	v := newPrimedVerifier(t, "vm")
	bad := protocol.ECPublicKey{X: make([]byte, protocol.P521CoordSize), Y: make([]byte, protocol.P521CoordSize)}
	bad.X[65], bad.Y[65] = 1, 1 // (1, 1) is not on the curve
	_, ref, err := v.release(t.Context(), "vm", "s", bad, noGate)
	if err != nil || ref == nil || ref.Field != "tee-pubkey" {
		t.Fatalf("release to (1, 1) = %v, %v; want a tee-pubkey refusal", ref, err)
	}
	view, _ := v.Show(t.Context(), "vm")
	if !view.Primed || view.Releases != 0 {
		t.Fatalf("the boot request was spent on a key that cannot be used: %+v", view)
	}
	v.auditLog.sync()
	evs, _ := v.Store().AuditEvents(t.Context(), "vm", 0, 0)
	if last := evs[len(evs)-1]; last.Event != "release" || last.Outcome != Deny || !strings.HasPrefix(last.Reason, "tee-pubkey") {
		t.Fatalf("audit = %+v", last)
	}
}
