package qemu

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// SVSMLaunch runs a user's COCONUT-SVSM IGVM file the way upstream's scripts/launch_guest.sh
// does (coconut-svsm/svsm f4bc4bcd), with the attestation path wired to the host side:
//
//	sev (CC):  -cpu EPYC-v4 -machine q35,memory-backend=mem0,igvm-cfg=igvm0,accel=kvm,
//	           confidential-guest-support=cgs0[,x-svsm-virtio-mmio=on]
//	           -object memory-backend-memfd,size=…,id=mem0,share=true,prealloc=false,reserve=false
//	           -object sev-snp-guest,id=cgs0,cbitpos=<CPUID 0x8000001F>,reduced-phys-bits=1
//	--nocc:    -cpu max,smep=on, memory-backend-ram,…,prealloc=false, no sev-snp-guest
//	--tcg:     accel=tcg
//	--aproxy:  COM3 = -serial unix:<proxy socket> (QEMU is the client)
//	--state:   -global virtio-mmio.force-legacy=false, the disk as svsm_storage on
//	           virtio-blk-device (the SVSM's own virtio-mmio slot)
//
// COM1 is the console (a file the host reads), COM2 debug (null), COM4 the in-SVSM test pipe,
// which a fakesnp build uses as its report channel.
type SVSMLaunch struct {
	IGVM string
	// CC runs the SEV-SNP guest (upstream's default); false is --nocc.
	CC    bool
	Accel Accel // KVM (upstream's default) or TCG (--tcg)
	// CBitPos for sev-snp-guest; 0 means read it from CPUID (an error where the CPU has no SEV).
	CBitPos   int
	MemoryMiB int // default 8192, as upstream
	CPUs      int // default 4, as upstream
	Console   string
	Proxy     string // unix socket for COM3; "" = null
	Report    string // unix socket for COM4; "" = null
	StateDisk string // raw file for the SVSM's persistent state; "" = none
	QMP       string // unix socket QEMU listens on for QMP; "" = none
}

// Args returns QEMU's arguments (without the binary).
func (l *SVSMLaunch) Args() ([]string, error) {
	if l.IGVM == "" {
		return nil, errors.New("qemu: an SVSM launch needs the IGVM file")
	}
	for _, s := range []string{l.IGVM, l.Console, l.Proxy, l.Report, l.StateDisk, l.QMP} {
		if strings.ContainsAny(s, ",\n") {
			return nil, fmt.Errorf("qemu: path %q contains a comma or newline", s)
		}
	}
	accel := l.Accel
	if accel == "" {
		accel = KVM
	}
	mem, cpus := l.MemoryMiB, l.CPUs
	if mem == 0 {
		mem = 8192
	}
	if cpus == 0 {
		cpus = 4
	}
	machine := "q35,memory-backend=mem0,igvm-cfg=igvm0,accel=" + string(accel)
	cpu := "max,smep=on"
	memory := fmt.Sprintf("memory-backend-ram,size=%dM,id=mem0,prealloc=false", mem)
	var cgs []string
	if l.CC {
		pos := l.CBitPos
		if pos == 0 {
			p, ok := CBitPos()
			if !ok {
				return nil, errors.New("qemu: no SEV on this CPU (CPUID 0x8000001F): cannot find the C-bit position for sev-snp-guest")
			}
			pos = p
		}
		cpu = "EPYC-v4"
		memory = fmt.Sprintf("memory-backend-memfd,size=%dM,id=mem0,share=true,prealloc=false,reserve=false", mem)
		cgs = []string{"-object", "sev-snp-guest,id=cgs0,cbitpos=" + strconv.Itoa(pos) + ",reduced-phys-bits=1"}
		machine += ",confidential-guest-support=cgs0"
	}
	if l.StateDisk != "" {
		machine += ",x-svsm-virtio-mmio=on"
	}
	serial := func(s string) string {
		if s == "" {
			return "null"
		}
		return "unix:" + s
	}
	console := "null"
	if l.Console != "" {
		console = "file:" + l.Console
	}
	args := []string{"-cpu", cpu, "-machine", machine, "-object", memory,
		"-object", "igvm-cfg,id=igvm0,file=" + l.IGVM}
	args = append(args, cgs...)
	args = append(args, "-smp", strconv.Itoa(cpus), "-no-reboot", "-nic", "none", "-nographic", "-vga", "none", "-monitor", "none",
		"-serial", console, "-serial", "null", "-serial", serial(l.Proxy), "-serial", serial(l.Report))
	if l.StateDisk != "" {
		args = append(args, "-global", "virtio-mmio.force-legacy=false",
			"-drive", "file="+l.StateDisk+",format=raw,if=none,id=svsm_storage,cache=none",
			"-device", "virtio-blk-device,drive=svsm_storage")
	}
	if l.QMP != "" {
		args = append(args, "-qmp", "unix:"+l.QMP+",server=on,wait=off")
	}
	return args, nil
}
