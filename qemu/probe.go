package qemu

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultBinary is the QEMU the harness runs unless told otherwise.
const DefaultBinary = "qemu-system-x86_64"

// Capabilities is what a probe found.
type Capabilities struct {
	Binary   string
	Version  string
	Machines map[string]bool // machine names (q35, microvm, …) and their QOM type names
	Objects  map[string]bool // QOM types (igvm-cfg, sev-snp-guest, …)
	Devices  map[string]bool // QOM types, for devices (virtio-blk-device, …)
	// SVSMVirtioMMIO: the q35 machine has the COCONUT fork's x-svsm-virtio-mmio property.
	SVSMVirtioMMIO bool
	// KVM tells whether KVM can run our guests, and why not.
	KVM       bool
	KVMReason string
	// SNPHost tells whether this host's KVM offers SEV-SNP, and why not.
	SNPHost       bool
	SNPHostReason string
}

// Probe asks the QEMU binary over QMP what it is and supports (query-version,
// qom-list-types, query-machines, qom-list-properties, query-qmp-schema: no help text), and
// checks whether KVM and SEV-SNP are usable on this host.
func Probe(ctx context.Context, bin string) (*Capabilities, error) {
	if bin == "" {
		bin = DefaultBinary
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, fmt.Errorf("%s not found (install Debian package qemu-system-x86): %w", bin, err)
	}
	f, err := ProbeQMP(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("probe %s: %w", path, err)
	}
	c := &Capabilities{Binary: path, Version: "QEMU " + f.Version, Machines: map[string]bool{}, Objects: f.Types, Devices: f.Types,
		SVSMVirtioMMIO: f.Q35Props["x-svsm-virtio-mmio"]}
	for t := range f.Types {
		if name, ok := strings.CutSuffix(t, "-machine"); ok {
			c.Machines[name] = true
		}
	}
	if f.Q35Type != "" {
		c.Machines["q35"] = true
	}
	if !f.SchemaIGVM {
		delete(c.Objects, "igvm-cfg") // a type QMP cannot create is no use
	}
	c.KVM, c.KVMReason = kvmUsable()
	c.SNPHost, c.SNPHostReason = SNPHost()
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
	switch want {
	case Coconut:
		var missing []string
		if !c.Objects["igvm-cfg"] {
			missing = append(missing, "igvm-cfg")
		}
		if !c.Objects["sev-snp-guest"] {
			missing = append(missing, "sev-snp-guest")
		}
		if !c.SVSMVirtioMMIO {
			missing = append(missing, "x-svsm-virtio-mmio (the COCONUT fork)")
		}
		if !c.KVM {
			missing = append(missing, "KVM ("+c.KVMReason+")")
		}
		if !c.SNPHost {
			missing = append(missing, "an SEV-SNP host ("+c.SNPHostReason+")")
		}
		if len(missing) > 0 {
			return Choice{}, fmt.Errorf("profile coconut on %s lacks %s", c.Version, strings.Join(missing, ", "))
		}
		return Choice{Coconut, KVM, fmt.Sprintf("coconut (requested) on %s with KVM on an SEV-SNP host", c.Version)}, nil
	case CoconutNoCC:
		if !c.Objects["igvm-cfg"] {
			return Choice{}, fmt.Errorf("profile coconut-nocc on %s lacks igvm-cfg (QEMU built without IGVM)", c.Version)
		}
		return Choice{CoconutNoCC, accel, fmt.Sprintf("coconut-nocc on %s (igvm-cfg), %s", c.Version, why)}, nil
	case "":
		if c.Machines["q35"] && c.Objects["igvm-cfg"] {
			// A QEMU that loads IGVM files boots each VM from the very launch image the
			// verifier measures: q35 is the machine that takes igvm-cfg.
			return Choice{Q35, accel, fmt.Sprintf("q35 (virtio-pci) booted from the IGVM launch image (igvm-cfg) on %s, %s", c.Version, why)}, nil
		}
		fallthrough
	case Microvm:
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
		how := "-kernel/-initrd/-append (no igvm-cfg)"
		if c.Objects["igvm-cfg"] {
			how = "booted from the IGVM launch image (igvm-cfg)"
		}
		return Choice{Q35, accel, fmt.Sprintf("q35 (virtio-pci) %s on %s, %s", how, c.Version, why)}, nil
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
