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
