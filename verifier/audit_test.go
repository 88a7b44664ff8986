package verifier

import (
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// storedAudit reads the audit straight from the store: what a crash would leave, without
// the sync that AuditEvents does first.
func storedAudit(t *testing.T, s Store) []AuditEvent {
	t.Helper()
	evs, err := s.AuditEvents(t.Context(), "", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	return evs
}

func attestRow(session string) AuditEvent {
	return AuditEvent{Event: "attest", Outcome: Allow, VM: "vm", Session: session}
}

// An allowed attestation costs no commit of its own: its row is written in the release's
// transaction, before the release's row, with the time it was decided.
func TestHeldAttestationCommitsWithTheRelease(t *testing.T) {
	v := newPrimedVerifier(t, "vm")
	before := len(storedAudit(t, v.Store()))
	v.auditLog.hold(attestRow("s"))
	decided := time.Now()
	if got := storedAudit(t, v.Store()); len(got) != before {
		t.Fatalf("the attestation was committed on its own: %+v", got[len(got)-1])
	}
	time.Sleep(5 * time.Millisecond) // so that the two rows' times differ
	priv, _ := ecdh.P521().GenerateKey(rand.Reader)
	if _, ref, err := v.release(t.Context(), "vm", "s", protocol.ECPublicKeyFromECDH(priv.PublicKey()), noGate); err != nil || ref != nil {
		t.Fatalf("release: %v %v", err, ref)
	}
	evs := storedAudit(t, v.Store())
	if len(evs) != before+2 {
		t.Fatalf("audit after the release has %d new rows, want 2: %+v", len(evs)-before, evs[before:])
	}
	a, r := evs[before], evs[before+1]
	if a.Event != "attest" || a.Outcome != Allow || a.Session != "s" || r.Event != "release" || r.Outcome != Allow || r.Session != "s" {
		t.Fatalf("rows = %+v, %+v; want the attestation, then its release", a, r)
	}
	if a.Time.After(decided) || !a.Time.Before(r.Time) {
		t.Fatalf("attestation row time %v, decided by %v, release %v: it must keep its own time", a.Time, decided, r.Time)
	}
	v.auditLog.sync() // nothing is left held to write twice
	if n := len(storedAudit(t, v.Store())); n != before+2 {
		t.Fatalf("sync wrote %d more rows", n-before-2)
	}
}

// A refusal of the session's release also carries the attestation, in the same commit.
func TestHeldAttestationCommitsWithARefusal(t *testing.T) {
	v := newTestVerifier(t)
	before := len(storedAudit(t, v.Store()))
	v.auditLog.hold(attestRow("s"))
	v.audit(AuditEvent{Event: "release", Outcome: Deny, VM: "vm", Session: "s", Reason: "boot_request: none"})
	evs := storedAudit(t, v.Store())
	if len(evs) != before+2 || evs[before].Event != "attest" || evs[before+1].Outcome != Deny {
		t.Fatalf("audit = %+v; want the attestation, then the refusal", evs[before:])
	}
	// A second identical refusal is only counted, and a held row of its session still goes
	// out at once.
	v.auditLog.hold(attestRow("s2"))
	v.audit(AuditEvent{Event: "release", Outcome: Deny, VM: "vm", Session: "s2", Reason: "boot_request: none"})
	if evs := storedAudit(t, v.Store()); len(evs) != before+3 || evs[before+2].Session != "s2" || evs[before+2].Event != "attest" {
		t.Fatalf("audit = %+v; want the second attestation written beside the counted refusal", evs[before:])
	}
}

// A session that decides nothing more has its attestation written when the window ends,
// and when the audit is read.
func TestHeldAttestationWrittenAlone(t *testing.T) {
	v, err := New(Options{DataDir: t.TempDir(), AuditWindow: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	v.auditLog.hold(attestRow("s"))
	deadline := time.Now().Add(10 * time.Second)
	for {
		evs := storedAudit(t, v.Store())
		if len(evs) > 0 && evs[len(evs)-1].Session == "s" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a held attestation was never written")
		}
		time.Sleep(10 * time.Millisecond)
	}

	v2 := newTestVerifier(t) // 10 s window: only the read writes it
	v2.auditLog.hold(attestRow("t"))
	evs, err := v2.AuditEvents(t.Context(), "", 0, 0)
	if err != nil || len(evs) == 0 || evs[len(evs)-1].Session != "t" {
		t.Fatalf("AuditEvents = %+v, %v; want the held attestation", evs, err)
	}
}

// failingStore fails the next Update when fail is set.
type failingStore struct {
	Store
	fail atomic.Bool
}

func (s *failingStore) Update(ctx context.Context, fn func(Tx) error) error {
	if s.fail.Swap(false) {
		return errors.New("disk full")
	}
	return s.Store.Update(ctx, fn)
}

// A held row whose commit fails is kept and written by the next one.
func TestHeldAttestationSurvivesAFailedCommit(t *testing.T) {
	v := newTestVerifier(t)
	fs := &failingStore{Store: v.Store()}
	var reported atomic.Int32
	a := newAuditLog(fs, time.Hour, func(error) { reported.Add(1) })
	defer a.close()
	a.hold(attestRow("s"))
	fs.fail.Store(true)
	a.record(AuditEvent{Event: "release", Outcome: Deny, VM: "vm", Session: "s", Reason: "x"})
	if reported.Load() != 1 {
		t.Fatalf("failed write reported %d times", reported.Load())
	}
	a.sync()
	evs := storedAudit(t, v.Store())
	if len(evs) == 0 || evs[len(evs)-1].Event != "attest" || evs[len(evs)-1].Session != "s" {
		t.Fatalf("audit = %+v; the held attestation was lost with the failed commit", evs)
	}
}

// A release whose commit fails gives the attestation back, for the next commit.
func TestHeldAttestationSurvivesAFailedRelease(t *testing.T) {
	v := newPrimedVerifier(t, "vm")
	fs := &failingStore{Store: v.store}
	v.store = fs // the audit log keeps the working one
	v.auditLog.hold(attestRow("s"))
	fs.fail.Store(true)
	priv, _ := ecdh.P521().GenerateKey(rand.Reader)
	if _, _, err := v.release(t.Context(), "vm", "s", protocol.ECPublicKeyFromECDH(priv.PublicKey()), noGate); err == nil {
		t.Fatal("release committed on a failing store")
	}
	v.auditLog.sync()
	evs := storedAudit(t, fs.Store)
	if last := evs[len(evs)-1]; last.Event != "attest" || last.Session != "s" {
		t.Fatalf("last audit row = %+v; the attestation was lost with the failed release", last)
	}
}
