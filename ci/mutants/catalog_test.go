package main

import (
	"os"
	"strings"
	"testing"
)

// TestCatalogApplies: every mutant still applies to the tree (a stale catalog proves nothing).
func TestCatalogApplies(t *testing.T) {
	for _, m := range catalog {
		b, err := os.ReadFile("../../" + m.File)
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(b), m.Old); n != 1 {
			t.Errorf("%s: %d matches in %s", m.ID, n, m.File)
		}
	}
}

// TestFailedOutsideTests: a package that failed without a failing test is named; one whose
// test failed, or that passed, is not.
func TestFailedOutsideTests(t *testing.T) {
	out := "ok  \tm/a\t0.1s\n--- FAIL: TestX (0.1s)\nFAIL\nFAIL\tm/b\t0.2s\nbuild binaries: exit status 1\nFAIL\tm/c\t0.3s\n?   \tm/d\t[no test files]\nFAIL\tm/e [build failed]\n"
	got := strings.Join(failedOutsideTests(out), ",")
	if got != "m/c,m/e" {
		t.Fatalf("failedOutsideTests = %q, want m/c,m/e", got)
	}
}
