package main

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestTestSeedRefusedWithGenuineRoots: a predictable key stream is for fake AMD chains only;
// `serve --test-seed` without --trusted-roots (that is, trusting AMD's genuine roots) is a
// usage error (exit 2) before anything is opened or served.
func TestTestSeedRefusedWithGenuineRoots(t *testing.T) {
	bin, err := filepath.Abs(filepath.Join("..", "..", "bin", "svsm-verifier"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath(bin); err != nil {
		t.Skipf("needs the built binaries (make build): %v", err)
	}
	// Bounded: a verifier that accepted the flag would start serving and not return.
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "serve", "--data-dir", t.TempDir(), "--test-seed", "7",
		"--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0").CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "--test-seed is refused with AMD's genuine roots") {
		t.Fatalf("serve --test-seed without --trusted-roots: %v\n%s", err, out)
	}
}
