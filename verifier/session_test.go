package verifier

import (
	"fmt"
	"testing"
	"time"
)

func newSessionVerifier(t testing.TB, ttl time.Duration, max int) *Verifier {
	t.Helper()
	v, err := New(Options{DataDir: t.TempDir(), SessionTTL: ttl, MaxSessions: max})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v
}

// TestSessionsExpire: sessions older than the TTL are dropped when a new one is made, and
// the creation-order list holds only the live ones.
func TestSessionsExpire(t *testing.T) {
	v := newSessionVerifier(t, 50*time.Millisecond, 100)
	for range 10 {
		if _, err := v.newSession(); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(60 * time.Millisecond)
	young, err := v.newSession()
	if err != nil {
		t.Fatal(err)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.sessions) != 1 || v.sessions[young.id] != young || len(v.byAge) != 1 {
		t.Fatalf("after the TTL: %d sessions, %d in byAge; want only the new one", len(v.sessions), len(v.byAge))
	}
}

// TestSessionListBounded: a flood of /auth on a full table evicts (never an attested
// session) and the creation-order list stays within twice the table's bound.
func TestSessionListBounded(t *testing.T) {
	const max = 4
	v := newSessionVerifier(t, time.Hour, max)
	attested, err := v.newSession()
	if err != nil {
		t.Fatal(err)
	}
	v.mu.Lock()
	attested.state = sessionAttested
	v.mu.Unlock()
	for i := range 100 {
		if _, err := v.newSession(); err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		v.mu.Lock()
		n, m := len(v.sessions), len(v.byAge)
		v.mu.Unlock()
		if n > max || m > 2*max+1 {
			t.Fatalf("after %d sessions: %d in the table, %d in byAge (bound %d)", i+1, n, m, max)
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.sessions[attested.id] != attested {
		t.Fatal("the attested session was evicted")
	}
}

// BenchmarkNewSession: one /auth's session bookkeeping with many live sessions (before the
// creation-order list, each /auth scanned the whole table).
func BenchmarkNewSession(b *testing.B) {
	for _, live := range []int{10, 1000, 10000} {
		b.Run(fmt.Sprintf("live=%d", live), func(b *testing.B) {
			v := newSessionVerifier(b, time.Hour, 2*live+b.N+1)
			for range live {
				if _, err := v.newSession(); err != nil {
					b.Fatal(err)
				}
			}
			b.ResetTimer()
			for range b.N {
				if _, err := v.newSession(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
