package qemu

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultBinary is the QEMU the harness runs unless told otherwise.
const DefaultBinary = "qemu-system-x86_64"

// Capabilities is what a probe found.
type Capabilities struct {
	Binary   string
	Version  string
	Machines map[string]bool
	Objects  map[string]bool
	Devices  map[string]bool
	// KVM tells whether KVM can run our guests, and why not.
	KVM       bool
	KVMReason string
}

func output(ctx context.Context, bin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

var firstWord = regexp.MustCompile(`(?m)^\s*([A-Za-z0-9_.-]+)`)
var quotedName = regexp.MustCompile(`name "([^"]+)"`)

// Probe asks the QEMU binary what it supports and checks whether KVM is usable.
func Probe(ctx context.Context, bin string) (*Capabilities, error) {
	if bin == "" {
		bin = DefaultBinary
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, fmt.Errorf("%s not found (install Debian package qemu-system-x86): %w", bin, err)
	}
	c := &Capabilities{Binary: path, Machines: map[string]bool{}, Objects: map[string]bool{}, Devices: map[string]bool{}}
	v, err := output(ctx, path, "--version")
	if err != nil {
		return nil, fmt.Errorf("%s --version: %w", path, err)
	}
	c.Version = strings.TrimSpace(strings.SplitN(v, "\n", 2)[0])
	m, err := output(ctx, path, "-machine", "help")
	if err != nil {
		return nil, fmt.Errorf("%s -machine help: %w", path, err)
	}
	for _, l := range strings.Split(m, "\n")[1:] {
		if f := firstWord.FindStringSubmatch(l); f != nil {
			c.Machines[f[1]] = true
		}
	}
	o, _ := output(ctx, path, "-object", "help")
	for _, l := range strings.Split(o, "\n")[1:] {
		if f := firstWord.FindStringSubmatch(l); f != nil {
			c.Objects[f[1]] = true
		}
	}
	d, _ := output(ctx, path, "-device", "help")
	for _, f := range quotedName.FindAllStringSubmatch(d, -1) {
		c.Devices[f[1]] = true
	}
	c.KVM, c.KVMReason = kvmUsable()
	return c, nil
}

// kvmUsable checks /dev/kvm, and refuses the paravirtual nested hypervisor (kvm_pvm) that
// our machines have: it aborts -cpu host and stalls stock kernels (ENVIRONMENT.md).
func kvmUsable() (bool, string) {
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return false, "/dev/kvm is the paravirtual nested hypervisor kvm_pvm, which does not run stock kernels"
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false, "no usable /dev/kvm: " + err.Error()
	}
	defer f.Close()
	const kvmGetAPIVersion = 0xAE00
	v, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion)
	if err != nil || v != 12 {
		return false, fmt.Sprintf("/dev/kvm API version %d (%v), want 12", v, err)
	}
	return true, "/dev/kvm answers with API version 12"
}

// Choice is the profile and accelerator to use, and why.
type Choice struct {
	Profile Profile
	Accel   Accel
	Reason  string
}

// Choose picks a profile and accelerator. want forces a profile ("" = best available);
// forcing one the QEMU cannot run is an error.
func (c *Capabilities) Choose(want Profile) (Choice, error) {
	accel, why := TCG, "TCG because "+c.KVMReason
	if c.KVM {
		accel, why = KVM, "KVM because "+c.KVMReason
	}
	coconut := c.Objects["igvm-cfg"] && c.Objects["sev-snp-guest"] && c.KVM
	switch want {
	case Coconut:
		if !coconut {
			return Choice{}, fmt.Errorf("profile coconut needs igvm-cfg, sev-snp-guest and KVM; %s has igvm-cfg=%v sev-snp-guest=%v, %s",
				c.Version, c.Objects["igvm-cfg"], c.Objects["sev-snp-guest"], why)
		}
		return Choice{Coconut, KVM, fmt.Sprintf("coconut (requested) on %s with KVM", c.Version)}, nil
	case Microvm, "":
		if c.Machines["microvm"] && c.Devices["virtio-blk-device"] {
			return Choice{Microvm, accel, fmt.Sprintf("microvm (virtio-mmio) on %s, %s; no IGVM support (igvm-cfg=%v)", c.Version, why, c.Objects["igvm-cfg"])}, nil
		}
		if want == Microvm {
			return Choice{}, fmt.Errorf("%s has no microvm machine or virtio-mmio devices", c.Version)
		}
		fallthrough
	case Q35:
		if !c.Machines["q35"] {
			return Choice{}, fmt.Errorf("%s has no q35 machine", c.Version)
		}
		return Choice{Q35, accel, fmt.Sprintf("q35 (virtio-pci) on %s, %s", c.Version, why)}, nil
	}
	return Choice{}, fmt.Errorf("unknown profile %q", want)
}

// TSCKHz is the host TSC frequency in kHz from /proc/cpuinfo, for microvm under TCG
// (tsc_early_khz= keeps the guest from hanging while it calibrates). 0 if unknown.
func TSCKHz() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			var mhz float64
			if _, err := fmt.Sscanf(strings.TrimSpace(v), "%f", &mhz); err == nil {
				return int(mhz * 1000)
			}
		}
	}
	return 0
}
