package images

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Kernel is an extracted Debian kernel package.
type Kernel struct {
	Package    string // e.g. linux-image-6.1.0-56-amd64
	Release    string // e.g. 6.1.0-56-amd64
	Vmlinux    string // uncompressed ELF (PVH entry): TCG boots it ~5 s faster than vmlinuz
	ModulesDir string // .../lib/modules/RELEASE
}

func run(ctx context.Context, dir string, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}

// KernelPackage names the Debian kernel image package the metapackage linux-image-amd64
// points to (override with SVSM_E2E_KERNEL_PKG).
func KernelPackage(ctx context.Context) (string, error) {
	if p := os.Getenv("SVSM_E2E_KERNEL_PKG"); p != "" {
		return p, nil
	}
	out, err := run(ctx, "", "apt-cache", "depends", "linux-image-amd64")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(out), "\n") {
		if dep, ok := strings.CutPrefix(strings.TrimSpace(line), "Depends: "); ok && strings.HasPrefix(dep, "linux-image-") {
			return dep, nil
		}
	}
	return "", errors.New("apt-cache depends linux-image-amd64 names no linux-image package (run apt-get update)")
}

// FetchKernel downloads pkg with apt-get download into cache (once) and extracts it.
func FetchKernel(ctx context.Context, cache, pkg string) (*Kernel, error) {
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, err
	}
	release := strings.TrimPrefix(pkg, "linux-image-")
	k := &Kernel{Package: pkg, Release: release,
		Vmlinux:    filepath.Join(cache, "vmlinux-"+release),
		ModulesDir: filepath.Join(cache, pkg, "lib", "modules", release)}
	if _, err := os.Stat(k.Vmlinux); err == nil {
		if _, err := os.Stat(k.ModulesDir); err == nil {
			return k, nil
		}
	}
	debs, _ := filepath.Glob(filepath.Join(cache, pkg+"_*.deb"))
	if len(debs) == 0 {
		if _, err := run(ctx, cache, "apt-get", "download", pkg); err != nil {
			return nil, fmt.Errorf("fetch kernel: %w", err)
		}
		if debs, _ = filepath.Glob(filepath.Join(cache, pkg+"_*.deb")); len(debs) == 0 {
			return nil, fmt.Errorf("apt-get download %s left no .deb in %s", pkg, cache)
		}
	}
	tmp := filepath.Join(cache, pkg+".tmp")
	_ = os.RemoveAll(tmp)
	if _, err := run(ctx, "", "dpkg-deb", "-x", debs[0], tmp); err != nil {
		return nil, err
	}
	vmlinuz := filepath.Join(tmp, "boot", "vmlinuz-"+release)
	z, err := os.ReadFile(vmlinuz)
	if err != nil {
		return nil, fmt.Errorf("kernel package %s: %w", pkg, err)
	}
	elfBytes, err := ExtractVmlinux(ctx, z)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", vmlinuz, err)
	}
	if err := os.WriteFile(k.Vmlinux+".tmp", elfBytes, 0o644); err != nil {
		return nil, err
	}
	_ = os.RemoveAll(filepath.Join(cache, pkg))
	if err := os.Rename(tmp, filepath.Join(cache, pkg)); err != nil {
		return nil, err
	}
	return k, os.Rename(k.Vmlinux+".tmp", k.Vmlinux)
}

var xzMagic = []byte{0xFD, '7', 'z', 'X', 'Z', 0x00}

// ExtractVmlinux finds the xz stream inside a bzImage and returns the ELF kernel in it. It
// uses the xz tool (Debian's xz-utils is always installed): the kernel's stream uses the x86
// BCJ filter, which the pure-Go xz readers do not implement.
func ExtractVmlinux(ctx context.Context, bzImage []byte) ([]byte, error) {
	for off := 0; ; off += len(xzMagic) {
		i := bytes.Index(bzImage[off:], xzMagic)
		if i < 0 {
			return nil, errors.New("no xz-compressed ELF kernel found (is the kernel xz-compressed?)")
		}
		off += i
		cmd := exec.CommandContext(ctx, "xz", "-dc", "--single-stream")
		cmd.Stdin = bytes.NewReader(bzImage[off:])
		var out bytes.Buffer
		cmd.Stdout = &out
		_ = cmd.Run() // padding after the stream may be reported; the ELF check decides
		if bytes.HasPrefix(out.Bytes(), []byte("\x7fELF")) {
			if _, err := elf.NewFile(bytes.NewReader(out.Bytes())); err == nil {
				return out.Bytes(), nil
			}
		}
	}
}
