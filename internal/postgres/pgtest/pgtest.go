// Package pgtest starts a PostgreSQL server for one test.
package pgtest

import (
	"errors"
	"os"
	"testing"

	"github.com/svsm-e2e/svsm-e2e/internal/postgres"
)

// EnvRequire makes a missing PostgreSQL a failure instead of a skip (make test sets it, so CI
// cannot pass without the PostgreSQL tests having run).
const EnvRequire = "SVSM_E2E_REQUIRE_POSTGRES"

// Start starts a server for t and stops it when t ends, keeping its log in the test's
// output on failure. Without PostgreSQL installed it skips t, or fails it when EnvRequire is
// set.
func Start(t testing.TB) *postgres.Server {
	t.Helper()
	s, ok := Available(t)
	if !ok {
		t.Skipf("%v (set %s=1 to make this a failure)", postgres.ErrNotInstalled, EnvRequire)
	}
	return s
}

// Available is Start for a test that also runs without PostgreSQL: it returns false (and
// logs why) instead of skipping.
func Available(t testing.TB) (*postgres.Server, bool) {
	t.Helper()
	s, err := postgres.Start(t.Context(), postgres.Options{})
	if errors.Is(err, postgres.ErrNotInstalled) && os.Getenv(EnvRequire) == "" {
		t.Logf("%v: PostgreSQL variants not run (set %s=1 to make this a failure)", err, EnvRequire)
		return nil, false
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			if b, err := os.ReadFile(s.Log()); err == nil {
				t.Logf("postgres log:\n%s", b)
			}
		}
		if err := s.Stop(); err != nil {
			t.Error(err)
		}
	})
	return s, true
}
