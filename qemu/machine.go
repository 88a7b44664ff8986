// Package qemu turns typed machine profiles into QEMU command lines, probes what the local
// QEMU and KVM can do, and runs QEMU with a QMP monitor and bounded waits.
package qemu

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Profile is a machine shape.
type Profile string

// Profiles (ARCHITECTURE.md "Backends").
const (
	// Microvm: virtio-mmio transport, as the SVSM state device uses. The default on stock QEMU.
	Microvm Profile = "microvm"
	// Q35: virtio-pci, for QEMUs or kernels without virtio-mmio.
	Q35 Profile = "q35"
	// Coconut runs a user's COCONUT-SVSM IGVM on an SEV-SNP host (QEMU with igvm-cfg,
	// sev-snp-guest and the COCONUT fork's x-svsm-virtio-mmio), argv as upstream's
	// launch_guest.sh: see SVSMLaunch. svsm-guest images do not run on it.
	Coconut Profile = "coconut"
	// CoconutNoCC runs a COCONUT-SVSM IGVM without SEV (launch_guest.sh --nocc --tcg): any QEMU
	// with igvm-cfg.
	CoconutNoCC Profile = "coconut-nocc"
)

// Accel is the accelerator.
type Accel string

// Accelerators.
const (
	TCG Accel = "tcg"
	KVM Accel = "kvm"
)

// Disk is a raw image on virtio-blk; the guest finds it by Serial.
type Disk struct {
	ID, Path, Serial string
	ReadOnly         bool
	// SVSM marks the disk as the SVSM state disk (a virtio-mmio slot on microvm).
	SVSM bool
}

// Port is a virtio-serial port named Name whose other end is the unix socket Socket, which
// the host already listens on (QEMU connects as the client: no race, no lost bytes).
type Port struct {
	Name, Socket string
}

// Machine describes one QEMU run.
type Machine struct {
	Profile   Profile
	Accel     Accel
	MemoryMiB int // default 512
	CPUs      int // default 1
	Kernel    string
	Initrd    string
	Cmdline   string
	// IGVM, on q35, boots the VM from this IGVM launch image's NATIVE platform (igvm-cfg)
	// instead of -kernel/-initrd/-append: QEMU loads exactly the file's pages.
	IGVM    string
	Console string // unix socket for ttyS0 (the host listens)
	QMP     string // unix socket QEMU listens on for QMP
	Disks   []Disk
	Ports   []Port
	RNG     bool
}

var idRE = strings.NewReplacer(",", "", "=", "")

// Args returns QEMU's arguments (without the binary). The guest resets instead of halting
// (-no-reboot ends QEMU then), so every boot is one QEMU process.
func (m *Machine) Args() ([]string, error) {
	if m.Profile == Coconut || m.Profile == CoconutNoCC {
		return nil, fmt.Errorf("qemu: profile %s runs a COCONUT-SVSM IGVM (SVSMLaunch), not a kernel", m.Profile)
	}
	if m.IGVM != "" && m.Profile != Q35 {
		return nil, fmt.Errorf("qemu: booting from an IGVM file needs the q35 profile, not %q", m.Profile)
	}
	if m.Kernel == "" && m.IGVM == "" {
		return nil, errors.New("qemu: Kernel (or IGVM) is required")
	}
	for _, s := range []string{m.Kernel, m.Initrd, m.IGVM, m.Console, m.QMP} {
		if strings.ContainsAny(s, ",\n") {
			return nil, fmt.Errorf("qemu: path %q contains a comma or newline", s)
		}
	}
	mem, cpus := m.MemoryMiB, m.CPUs
	if mem == 0 {
		mem = 512
	}
	if cpus == 0 {
		cpus = 1
	}
	args := []string{"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-m", strconv.Itoa(mem), "-smp", strconv.Itoa(cpus)}
	switch m.Accel {
	case TCG, "":
		// Without ERMS ("enhanced rep movsb/stosb"): TCG runs a rep string instruction one
		// element per iteration, and with ERMS the guest's memcpy and page clearing (Linux,
		// glibc, Go) pick byte-wide rep movsb/stosb over 8-byte rep movsq/stosq or plain
		// loops. Measured on a microvm boot: the kernel reaches init 5-10 % sooner, the
		// guest's own work after init takes 10 % less (docs/qemu.md). FSRM ("fast short rep
		// movsb") goes too: no real CPU has it without ERMS, and Linux 6.1 on QEMU 10.2's max
		// CPU with FSRM but not ERMS hangs early in boot (QEMU 7.2's max has no FSRM).
		args = append(args, "-accel", "tcg", "-cpu", "max,erms=off,fsrm=off")
	case KVM:
		args = append(args, "-accel", "kvm", "-cpu", "host")
	default:
		return nil, fmt.Errorf("qemu: unknown accelerator %q", m.Accel)
	}
	bus := "pci"
	switch m.Profile {
	case Microvm, "":
		// ACPI describes the virtio-mmio devices to the guest's virtio_mmio module.
		args = append(args, "-machine", "microvm,acpi=on")
		bus = "device"
	case Q35:
		if m.IGVM != "" {
			args = append(args, "-machine", "q35,memory-backend=mem0,igvm-cfg=igvm0",
				"-object", fmt.Sprintf("memory-backend-ram,size=%dM,id=mem0", mem),
				"-object", "igvm-cfg,id=igvm0,file="+m.IGVM)
		} else {
			args = append(args, "-machine", "q35")
		}
	default:
		return nil, fmt.Errorf("qemu: unknown profile %q", m.Profile)
	}
	if m.Kernel != "" && m.IGVM == "" {
		args = append(args, "-kernel", m.Kernel)
		if m.Initrd != "" {
			args = append(args, "-initrd", m.Initrd)
		}
		args = append(args, "-append", m.Cmdline)
	}
	if m.QMP != "" {
		args = append(args, "-qmp", "unix:"+m.QMP+",server=on,wait=off")
	}
	if m.Console != "" {
		args = append(args, "-chardev", "socket,id=console,path="+m.Console, "-serial", "chardev:console")
	}
	if len(m.Ports) > 0 {
		args = append(args, "-device", "virtio-serial-"+bus+",id=vser0")
		for i, p := range m.Ports {
			if strings.ContainsAny(p.Socket+p.Name, ",\n") {
				return nil, fmt.Errorf("qemu: port %q: comma or newline", p.Name)
			}
			id := fmt.Sprintf("port%d", i)
			args = append(args, "-chardev", "socket,id="+id+",path="+p.Socket,
				"-device", "virtserialport,bus=vser0.0,chardev="+id+",name="+p.Name)
		}
	}
	for _, d := range m.Disks {
		if strings.ContainsAny(d.Path+d.Serial+d.ID, ",\n") {
			return nil, fmt.Errorf("qemu: disk %q: comma or newline", d.ID)
		}
		drive := "file=" + d.Path + ",format=raw,if=none,id=" + idRE.Replace(d.ID)
		if d.ReadOnly {
			drive += ",readonly=on"
		} else {
			drive += ",cache=directsync" // a completed guest write is on the host's disk
		}
		dev := "virtio-blk-" + bus
		args = append(args, "-drive", drive, "-device", dev+",drive="+idRE.Replace(d.ID)+",serial="+d.Serial)
	}
	if m.RNG {
		args = append(args, "-device", "virtio-rng-"+bus)
	}
	return args, nil
}
