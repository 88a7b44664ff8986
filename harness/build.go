package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// BuildBinaries builds the host binaries and a statically linked svsm-guest (so that it can
// be a QEMU guest's /init) from the module at root into dir, as `make build` does.
func BuildBinaries(ctx context.Context, root, dir string) (Binaries, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	build := func(env []string, args ...string) error {
		cmd := exec.CommandContext(ctx, "go", append([]string{"build"}, args...)...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), env...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %v: %w\n%s", args, err, out)
		}
		return nil
	}
	if err := build(nil, "-o", dir+"/", "./cmd/fakesnp", "./cmd/svsm-verifier", "./cmd/svsm-proxy", "./cmd/svsm-e2e"); err != nil {
		return Binaries{}, err
	}
	if err := build([]string{"CGO_ENABLED=1"}, "-tags", "netgo,osusergo",
		"-ldflags", "-w -linkmode external -extldflags '-static -Wl,--no-warnings'", // as the Makefile's GUEST_LDFLAGS
		"-o", filepath.Join(dir, "svsm-guest"), "./cmd/svsm-guest"); err != nil {
		return Binaries{}, err
	}
	return FindBinaries(dir)
}
