package harness_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/igvm"
	"github.com/svsm-e2e/svsm-e2e/qemu"
)

// TestEntryStubBootsLinux runs the path a real SNP launch of our launch image takes — flat
// 32-bit protected mode at the entry stub, into long mode, into the kernel — on the native
// platform of an IGVM-capable QEMU (no SEV here), with the Debian kernel the QEMU backend uses.
// It passes when the kernel prints its banner and gets as far as looking for a root device.
func TestEntryStubBootsLinux(t *testing.T) {
	bin := os.Getenv(harness.EnvQEMU)
	if bin == "" {
		bin = "../../shared/tools/qemu-igvm/bin/qemu-system-x86_64"
	}
	caps, err := qemu.Probe(t.Context(), bin)
	if err != nil || !caps.Objects["igvm-cfg"] {
		t.Skipf("no IGVM-capable QEMU (%s): %v", bin, err)
	}
	kernels, _ := filepath.Glob(filepath.Join(harness.DefaultImageCache(), "vmlinux-*"))
	if len(kernels) == 0 {
		t.Skip("no vmlinux in the image cache yet (make images)")
	}
	k, err := os.ReadFile(kernels[0])
	if err != nil {
		t.Fatal(err)
	}
	f, err := igvm.BuildLaunch(&igvm.Launch{Kernel: k, Cmdline: "console=ttyS0", Native: true, NativeEntry32: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := igvm.CheckKVM(f); err != nil {
		t.Fatal(err)
	}
	raw, err := f.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	img, con := filepath.Join(dir, "stub.igvm"), filepath.Join(dir, "console.log")
	if err := os.WriteFile(img, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := qemu.StartArgs(caps.Binary, []string{"-nodefaults", "-nographic", "-no-reboot", "-m", "512", "-accel", "tcg", "-cpu", "max",
		"-machine", "q35,memory-backend=mem0,igvm-cfg=igvm0", "-object", "memory-backend-ram,size=512M,id=mem0",
		"-object", "igvm-cfg,id=igvm0,file=" + img, "-serial", "file:" + con})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	booted := func() bool {
		b, _ := os.ReadFile(con)
		return strings.Contains(string(b), "Linux version") && strings.Contains(string(b), "Unable to mount root")
	}
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		if booted() {
			return // through the stub, long mode, the kernel's own boot
		}
		select {
		case <-p.Done():
			if booted() {
				return
			}
			b, _ := os.ReadFile(con)
			t.Fatalf("QEMU exited (a triple fault resets, and -no-reboot ends QEMU): %s\n%s", p.Stderr(), b)
		case <-time.After(200 * time.Millisecond):
		}
	}
	b, _ := os.ReadFile(con)
	t.Fatalf("the kernel did not boot through the entry stub within 90 s:\n%s", b)
}
