package guest

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestMapExecutable: the mapping holds the file's bytes; empty files are refused (there is
// nothing to map, and a kernel of no bytes is no kernel).
func TestMapExecutable(t *testing.T) {
	dir := t.TempDir()
	want := bytes.Repeat([]byte("kernel image "), 100000)
	p := filepath.Join(dir, "init")
	if err := os.WriteFile(p, want, 0o755); err != nil {
		t.Fatal(err)
	}
	got, err := mapExecutable(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("mapped bytes differ from the file")
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	// Refused by the size check, with the size named (mmap would also refuse, less clearly).
	if _, err := mapExecutable(empty); err == nil || !strings.Contains(err.Error(), "is 0 bytes") {
		t.Fatalf("an empty file as a kernel: %v", err)
	}
	if _, err := mapExecutable(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("a missing file was mapped")
	}
}
