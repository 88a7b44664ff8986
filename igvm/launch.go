package igvm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// The launch image of svsm-guest: kernel, initrd and command line as measured page data,
// described by a measured "launch table" page, plus a parameter area (the loader's memory
// map), an SNP VMSA and the memory the guest needs.
const (
	LaunchTableGPA = 0x10000
	CmdlineGPA     = 0x20000
	ParamGPA       = 0x7000
	KernelGPA      = 0x1000000      // 16 MiB
	VMSAGPA        = 0xFFFFFFFFF000 // where SNP firmware measures VMSA pages
	snpCompat      = 1
	MaxCmdline     = PageSize4K - 1
)

var launchMagic = []byte("SVSME2EL")

// Launch is what the image carries.
type Launch struct {
	Kernel  []byte
	Initrd  []byte
	Cmdline string
	Policy  uint64 // SNP guest policy
	// MemoryMiB the guest needs (RequiredMemory from GPA 0).
	MemoryMiB uint32
	// Native adds a NATIVE platform (format version 2) that an IGVM-capable QEMU starts without
	// SEV, and makes the SNP VMSA one KVM accepts: Kernel must then be an x86-64 vmlinux ELF
	// (see bootHeaders). The boot pages are shared by both platforms.
	Native bool
	// NativeEntry32 starts the native platform the way the SNP VMSA starts, in 32-bit protected
	// mode through the entry stub (the path an SNP launch takes, runnable without SEV).
	NativeEntry32 bool
}

func alignUp(v uint64) uint64 { return (v + PageSize4K - 1) &^ (PageSize4K - 1) }

// BuildLaunch makes the IGVM file for l. Without Native, the kernel file is measured at
// KernelGPA and the initrd follows it. With Native, the kernel's segments, the zero page,
// page tables, GDT and entry stub are pages of both platforms (what QEMU boots natively is
// what the SNP digest covers), the initrd follows the kernel's image, and the kernel file
// itself (for loaders that take -kernel) follows the initrd, SNP only. The file's page data
// refers to l's slices (no copy of a large kernel); do not change them.
func BuildLaunch(l *Launch) (*File, error) {
	if len(l.Kernel) == 0 {
		return nil, errors.New("igvm launch: no kernel")
	}
	if len(l.Cmdline) > MaxCmdline {
		return nil, fmt.Errorf("igvm launch: command line of %d bytes exceeds %d", len(l.Cmdline), MaxCmdline)
	}
	mem := l.MemoryMiB
	if mem == 0 {
		mem = 512
	}
	kernelGPA := uint64(KernelGPA)
	initrdGPA := alignUp(KernelGPA + uint64(len(l.Kernel)))
	end := initrdGPA + uint64(len(l.Initrd))
	if l.Native {
		kend, err := kernelEnd(l.Kernel)
		if err != nil {
			return nil, err
		}
		initrdGPA = alignUp(max(kend, KernelGPA))
		kernelGPA = alignUp(initrdGPA + uint64(len(l.Initrd)))
		end = kernelGPA + uint64(len(l.Kernel))
	}
	if end > uint64(mem)<<20 {
		return nil, fmt.Errorf("igvm launch: kernel and initrd end at %#x, beyond %d MiB of memory", end, mem)
	}
	table := make([]byte, 64)
	copy(table, launchMagic)
	le := binary.LittleEndian
	le.PutUint64(table[8:], kernelGPA)
	le.PutUint64(table[16:], uint64(len(l.Kernel)))
	le.PutUint64(table[24:], initrdGPA)
	le.PutUint64(table[32:], uint64(len(l.Initrd)))
	le.PutUint64(table[40:], CmdlineGPA)
	le.PutUint64(table[48:], uint64(len(l.Cmdline)))
	// shared marks the pages both platforms load byte for byte.
	shared := uint32(snpCompat)
	f := &File{Headers: []Header{
		SupportedPlatform{CompatMask: snpCompat, PlatformType: PlatformSEVSNP, PlatformVersion: 1},
	}}
	var boot []Header
	var entry uint64
	if l.Native {
		f.Version, shared = FormatVersion2, snpCompat|nativeCompat
		f.Headers = append(f.Headers, SupportedPlatform{CompatMask: nativeCompat, PlatformType: PlatformNative, PlatformVersion: 1})
		var err error
		if boot, entry, err = bootHeaders(l, initrdGPA, uint64(mem)<<20, shared); err != nil {
			return nil, err
		}
	}
	f.Headers = append(f.Headers,
		GuestPolicy{Policy: l.Policy, CompatMask: snpCompat},
		RequiredMemory{GPA: 0, CompatMask: snpCompat, Bytes: mem << 20},
		ParameterArea{Bytes: PageSize4K, Index: 0},
		PageData{GPA: LaunchTableGPA, CompatMask: snpCompat, Data: table},
		PageData{GPA: CmdlineGPA, CompatMask: shared, Data: []byte(l.Cmdline)},
	)
	pages := func(gpa uint64, b []byte, mask uint32) {
		for off := 0; off < len(b); off += PageSize4K {
			f.Headers = append(f.Headers, PageData{GPA: gpa + uint64(off), CompatMask: mask, Data: b[off:min(len(b), off+PageSize4K)]})
		}
	}
	f.Headers = append(f.Headers, boot...)
	pages(initrdGPA, l.Initrd, shared)
	pages(kernelGPA, l.Kernel, snpCompat)
	if l.Native {
		f.Headers = append(f.Headers, VPContext{GPA: 0, CompatMask: nativeCompat, Data: nativeContext(entry, l.NativeEntry32)})
	}
	f.Headers = append(f.Headers, ParameterInsert{GPA: ParamGPA, CompatMask: snpCompat, Index: 0})
	// KVM's rules: one VMSA, last, at 0xFFFFFFFFF000, in protected mode (CR0 0x31).
	if l.Native {
		f.Headers = append(f.Headers, VPContext{GPA: VMSAGPA, CompatMask: snpCompat, Data: snpVMSA()})
	} else {
		f.Headers = append(f.Headers, VPContext{GPA: VMSAGPA, CompatMask: snpCompat, Data: vmsa(KernelGPA)})
	}
	return f, nil
}

// vmsa is the boot processor's initial state of a launch image without a native platform (the
// process backend's stand-in kernel, which no processor runs). It follows KVM's rules
// (igvmmeasure --check-kvm: flat protected mode, CR0 0x31) so that the image's digest is one a
// KVM launch reproduces; RIP points at the kernel file, which for a stand-in is not code.
func vmsa(rip uint64) []byte {
	v := snpVMSA()
	le := binary.LittleEndian
	le.PutUint16(v[0x64:], 0) // no GDT page in such an image
	le.PutUint64(v[0x68:], 0)
	le.PutUint64(v[0x178:], rip)
	return v
}

// ExtractLaunch reads kernel, initrd and command line back out of a launch image, so that
// what a VM runs is what was measured.
func ExtractLaunch(f *File) (*Launch, error) {
	pages := map[uint64][]byte{}
	l := &Launch{}
	for _, h := range f.Headers {
		switch h := h.(type) {
		case PageData:
			if h.CompatMask&snpCompat == 0 {
				continue // the native platform's own pages (kernel segments, boot structures)
			}
			if h.Flags&Flag2MB != 0 {
				return nil, errors.New("igvm launch: 2 MiB pages are not used by launch images")
			}
			pages[h.GPA] = h.Data
		case GuestPolicy:
			l.Policy = h.Policy
		case RequiredMemory:
			l.MemoryMiB = h.Bytes >> 20
		}
	}
	table, ok := pages[LaunchTableGPA]
	if !ok || len(table) < 56 || !bytes.Equal(table[:8], launchMagic) {
		return nil, errors.New("igvm launch: no launch table")
	}
	le := binary.LittleEndian
	gather := func(gpa, n uint64, what string) ([]byte, error) {
		if n > 1<<30 || gpa%PageSize4K != 0 {
			return nil, fmt.Errorf("igvm launch: %s at %#x of %d bytes", what, gpa, n)
		}
		out := make([]byte, 0, n)
		for off := uint64(0); off < n; off += PageSize4K {
			p, ok := pages[gpa+off]
			if !ok {
				return nil, fmt.Errorf("igvm launch: %s page at %#x missing", what, gpa+off)
			}
			page := make([]byte, PageSize4K)
			copy(page, p)
			out = append(out, page[:min(PageSize4K, int(n-off))]...)
		}
		return out, nil
	}
	var err error
	if l.Kernel, err = gather(le.Uint64(table[8:]), le.Uint64(table[16:]), "kernel"); err != nil {
		return nil, err
	}
	if l.Initrd, err = gather(le.Uint64(table[24:]), le.Uint64(table[32:]), "initrd"); err != nil {
		return nil, err
	}
	cl, err := gather(le.Uint64(table[40:]), le.Uint64(table[48:]), "command line")
	if err != nil {
		return nil, err
	}
	l.Cmdline = string(cl)
	return l, nil
}
