package igvm

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
)

// The NATIVE platform of a launch image: what an IGVM-capable QEMU starts without SEV. The
// Linux kernel (an x86-64 vmlinux ELF) is loaded from page data at its physical addresses and
// entered through the x86 64-bit boot protocol: a zero page (boot_params) with the command line
// and initrd location and an e820 map, identity-mapped page tables, a GDT with __BOOT_CS 0x10
// and __BOOT_DS 0x18, RSI = boot_params, from a native VP context (format version 2).
const (
	nativeCompat   = 2
	EntryStubGPA   = 0x6000 // 32-bit entry stub: protected mode → long mode → the kernel
	BootParamsGPA  = 0x7000
	nativeGDTGPA   = 0x8000
	nativeStackTop = 0x8ff0
	nativePML4GPA  = 0x9000
	nativePDPTGPA  = 0xa000
	nativePDGPA    = 0xb000 // four pages: 4 GiB of 2 MiB pages
	nativeMapGiB   = 4
)

// nativeVPContextSize is size_of IgvmNativeVpContextX64 (igvm_defs), as QEMU reads it.
const nativeVPContextSize = 232

// kernelEnd is the end of the ELF kernel's loaded image (the highest paddr + memsz).
func kernelEnd(kernel []byte) (uint64, error) {
	ef, err := elf.NewFile(bytes.NewReader(kernel))
	if err != nil {
		return 0, fmt.Errorf("igvm native: the kernel is not an ELF file: %w", err)
	}
	var end uint64
	for _, p := range ef.Progs {
		if p.Type == elf.PT_LOAD {
			end = max(end, p.Paddr+p.Memsz)
		}
	}
	return end, nil
}

// bootHeaders returns the pages that start the kernel, for the platforms in mask: the kernel
// segments at their physical addresses, the zero page, page tables, GDT and the 32-bit entry
// stub; and the ELF entry point.
func bootHeaders(l *Launch, initrdGPA uint64, memBytes uint64, mask uint32) ([]Header, uint64, error) {
	ef, err := elf.NewFile(bytes.NewReader(l.Kernel))
	if err != nil {
		return nil, 0, fmt.Errorf("igvm native: the kernel is not an ELF file: %w", err)
	}
	if ef.Class != elf.ELFCLASS64 || ef.Machine != elf.EM_X86_64 {
		return nil, 0, errors.New("igvm native: the kernel is not an x86-64 ELF (vmlinux)")
	}
	if ef.Entry >= 1<<32 {
		return nil, 0, fmt.Errorf("igvm native: kernel entry %#x is above 4 GiB", ef.Entry)
	}
	var hs []Header
	page := func(gpa uint64, data []byte) {
		for off := 0; off < len(data); off += PageSize4K {
			chunk := data[off:min(len(data), off+PageSize4K)]
			if isZero(chunk) {
				chunk = nil // a zero page (BSS): no file data
			}
			hs = append(hs, PageData{GPA: gpa + uint64(off), CompatMask: mask, Data: chunk})
		}
	}
	var kernelEnd uint64
	for _, p := range ef.Progs {
		if p.Type != elf.PT_LOAD || p.Memsz == 0 {
			continue
		}
		start := p.Paddr &^ (PageSize4K - 1)
		seg := make([]byte, p.Paddr-start+p.Memsz)
		if _, err := p.ReadAt(seg[p.Paddr-start:p.Paddr-start+p.Filesz], 0); err != nil {
			return nil, 0, fmt.Errorf("igvm native: kernel segment at %#x: %w", p.Paddr, err)
		}
		if start < 16<<20 {
			return nil, 0, fmt.Errorf("igvm native: kernel segment at %#x overlaps the boot structures", p.Paddr)
		}
		page(start, seg)
		kernelEnd = max(kernelEnd, p.Paddr+p.Memsz)
	}
	if kernelEnd == 0 {
		return nil, 0, errors.New("igvm native: the kernel has no loadable segment")
	}
	if len(l.Initrd) > 0 && initrdGPA < alignUp(kernelEnd) {
		return nil, 0, fmt.Errorf("igvm native: initrd at %#x overlaps the kernel (to %#x)", initrdGPA, kernelEnd)
	}
	if memBytes > 4<<30 || kernelEnd > memBytes {
		return nil, 0, fmt.Errorf("igvm native: %d MiB of memory do not hold the kernel (to %#x) or exceed the 4 GiB mapping", memBytes>>20, kernelEnd)
	}

	// Zero page: the setup header fields a 64-bit boot loader fills (Documentation/arch/x86/boot.rst).
	bp := make([]byte, PageSize4K)
	le := binary.LittleEndian
	bp[0x1e8] = 4 // e820_entries
	for i, e := range []struct {
		addr, size uint64
		typ        uint32
	}{{0, 0x9fc00, 1}, {0x9fc00, 0x400, 2}, {0xf0000, 0x10000, 2}, {0x100000, memBytes - 0x100000, 1}} {
		le.PutUint64(bp[0x2d0+20*i:], e.addr)
		le.PutUint64(bp[0x2d0+20*i+8:], e.size)
		le.PutUint32(bp[0x2d0+20*i+16:], e.typ)
	}
	le.PutUint16(bp[0x1fe:], 0xAA55)     // boot_flag
	le.PutUint32(bp[0x202:], 0x53726448) // "HdrS"
	le.PutUint16(bp[0x206:], 0x020f)     // boot protocol 2.15
	bp[0x210] = 0xff                     // type_of_loader: undefined
	bp[0x211] = 0x01                     // loadflags: LOADED_HIGH
	if len(l.Initrd) > 0 {
		le.PutUint32(bp[0x218:], uint32(initrdGPA))
		le.PutUint32(bp[0x21c:], uint32(len(l.Initrd)))
	}
	le.PutUint32(bp[0x228:], CmdlineGPA)         // cmd_line_ptr
	le.PutUint32(bp[0x238:], uint32(MaxCmdline)) // cmdline_size
	hs = append(hs, PageData{GPA: BootParamsGPA, CompatMask: mask, Data: bp})

	// GDT: null, 0x08 32-bit code (the entry stub), __BOOT_CS 0x10 (64-bit code), __BOOT_DS 0x18.
	gdt := make([]byte, 32)
	le.PutUint64(gdt[8:], 0x00cf9b000000ffff)
	le.PutUint64(gdt[16:], 0x00af9b000000ffff)
	le.PutUint64(gdt[24:], 0x00cf93000000ffff)
	hs = append(hs, PageData{GPA: nativeGDTGPA, CompatMask: mask, Data: gdt})
	hs = append(hs, PageData{GPA: EntryStubGPA, CompatMask: mask, Data: entryStub(uint32(ef.Entry))})

	// Identity map of the first 4 GiB with 2 MiB pages.
	pml4 := make([]byte, PageSize4K)
	le.PutUint64(pml4, nativePDPTGPA|3)
	pdpt := make([]byte, PageSize4K)
	for i := range nativeMapGiB {
		le.PutUint64(pdpt[8*i:], uint64(nativePDGPA+i*PageSize4K)|3)
	}
	hs = append(hs, PageData{GPA: nativePML4GPA, CompatMask: mask, Data: pml4},
		PageData{GPA: nativePDPTGPA, CompatMask: mask, Data: pdpt})
	for g := range nativeMapGiB {
		pd := make([]byte, PageSize4K)
		for i := range 512 {
			le.PutUint64(pd[8*i:], uint64(g)<<30|uint64(i)<<21|0x83) // present, writable, 2 MiB
		}
		hs = append(hs, PageData{GPA: uint64(nativePDGPA + g*PageSize4K), CompatMask: mask, Data: pd})
	}
	return hs, ef.Entry, nil
}

// entryStub is 32-bit code at EntryStubGPA, entered in flat protected mode without paging (as
// an SNP VMSA that KVM accepts must start: CR0 0x31): it enables PAE, loads CR3 with the
// identity map, sets EFER.LME, turns paging on, loads the GDT, far-jumps to 64-bit code that
// puts boot_params in RSI and jumps to the kernel's 64-bit entry.
func entryStub(entry uint32) []byte {
	le := binary.LittleEndian
	code := []byte{
		0x0f, 0x20, 0xe0, // mov eax, cr4
		0x83, 0xc8, 0x20, // or eax, 0x20 (PAE)
		0x0f, 0x22, 0xe0, // mov cr4, eax
		0xb8, 0, 0, 0, 0, // mov eax, PML4
		0x0f, 0x22, 0xd8, // mov cr3, eax
		0xb9, 0x80, 0x00, 0x00, 0xc0, // mov ecx, 0xC0000080 (EFER)
		0x0f, 0x32, // rdmsr
		0x0d, 0x00, 0x01, 0x00, 0x00, // or eax, 0x100 (LME)
		0x0f, 0x30, // wrmsr
		0x0f, 0x20, 0xc0, // mov eax, cr0
		0x0d, 0x00, 0x00, 0x00, 0x80, // or eax, 0x80000000 (PG)
		0x0f, 0x22, 0xc0, // mov cr0, eax
		0x0f, 0x01, 0x15, 0, 0, 0, 0, // lgdt [GDTR]
		0xea, 0, 0, 0, 0, 0x10, 0x00, // jmp far 0x10:long
	}
	const long, gdtr = 0x40, 0x80
	stub := make([]byte, PageSize4K)
	copy(stub, code)
	le.PutUint32(stub[10:], nativePML4GPA)
	le.PutUint32(stub[45:], EntryStubGPA+gdtr)
	le.PutUint32(stub[50:], EntryStubGPA+long)
	copy(stub[long:], []byte{
		0xbe, 0, 0, 0, 0, // mov esi, boot_params (zero-extends into RSI)
		0xb8, 0, 0, 0, 0, // mov eax, entry
		0xff, 0xe0, // jmp rax
	})
	le.PutUint32(stub[long+1:], BootParamsGPA)
	le.PutUint32(stub[long+6:], entry)
	le.PutUint16(stub[gdtr:], 31)
	le.PutUint32(stub[gdtr+2:], nativeGDTGPA)
	return stub
}

// nativeContext is the NATIVE platform's IgvmNativeVpContextX64: straight into 64-bit mode at
// the kernel entry (RSI = boot_params), or, with via32, in flat 32-bit protected mode at the
// entry stub — the state the SNP VMSA starts from.
func nativeContext(entry uint64, via32 bool) []byte {
	le := binary.LittleEndian
	ctx := make([]byte, nativeVPContextSize)
	le.PutUint64(ctx[4*8:], nativeStackTop) // rsp
	le.PutUint64(ctx[17*8:], 2)             // rflags: reserved bit 1, interrupts off
	le.PutUint16(ctx[0x9e:], 31)            // gdtr_limit
	le.PutUint64(ctx[0xa0:], nativeGDTGPA)  // gdtr_base
	le.PutUint32(ctx[0xb0:], 0xffffffff)    // code limit
	le.PutUint16(ctx[0xb4:], 0x18)          // data selector __BOOT_DS
	le.PutUint16(ctx[0xb6:], 0xc093)        // data: P, S, type 3, D/B, G
	le.PutUint32(ctx[0xbc:], 0xffffffff)    // data limit
	if via32 {
		le.PutUint64(ctx[16*8:], EntryStubGPA) // rip
		le.PutUint16(ctx[0xa8:], 0x08)         // 32-bit code
		le.PutUint16(ctx[0xaa:], 0xc09b)       // P, S, type 0xb, D/B, G
		le.PutUint64(ctx[0xc8:], 0x31)         // cr0: NE, ET, PE
		return ctx
	}
	le.PutUint64(ctx[6*8:], BootParamsGPA)  // rsi
	le.PutUint64(ctx[16*8:], entry)         // rip
	le.PutUint16(ctx[0xa8:], 0x10)          // code selector __BOOT_CS
	le.PutUint16(ctx[0xaa:], 0xa09b)        // 64-bit code: P, S, type 0xb, L, G
	le.PutUint64(ctx[0xc8:], 0x80050033)    // cr0: PG, AM, WP, NE, ET, MP, PE
	le.PutUint64(ctx[0xd0:], nativePML4GPA) // cr3
	le.PutUint64(ctx[0xd8:], 0x20)          // cr4: PAE
	le.PutUint64(ctx[0xe0:], 0x500)         // efer: LME | LMA
	return ctx
}

// snpVMSA is the SNP boot processor's state, as KVM accepts it (igvmmeasure --check-kvm): flat
// 32-bit protected mode (CR0 0x31) at the entry stub, EFER.SVME, the GDT loaded, XCR0 x87,
// SEV_FEATURES.SNPActive. (An SEV-ES save area; segment attributes in its 12-bit form.)
func snpVMSA() []byte {
	v := make([]byte, PageSize4K)
	le := binary.LittleEndian
	seg := func(off int, sel, attr uint16) {
		le.PutUint16(v[off:], sel)
		le.PutUint16(v[off+2:], attr)
		le.PutUint32(v[off+4:], 0xffffffff)
	}
	for _, off := range []int{0x00, 0x20, 0x30, 0x40, 0x50} { // ES, SS, DS, FS, GS
		seg(off, 0x18, 0x0c93)
	}
	seg(0x10, 0x08, 0x0c9b)                     // CS: 32-bit code
	le.PutUint32(v[0x64:], 31)                  // GDTR limit
	le.PutUint64(v[0x68:], nativeGDTGPA)        // GDTR base
	le.PutUint64(v[0xd0:], 0x1000)              // EFER: SVME
	le.PutUint64(v[0x158:], 0x31)               // CR0: NE, ET, PE
	le.PutUint64(v[0x160:], 0x400)              // DR7
	le.PutUint64(v[0x168:], 0xffff0ff0)         // DR6
	le.PutUint64(v[0x170:], 2)                  // RFLAGS
	le.PutUint64(v[0x178:], EntryStubGPA)       // RIP
	le.PutUint64(v[0x1d8:], nativeStackTop)     // RSP
	le.PutUint64(v[0x268:], 0x0007040600070406) // G_PAT
	le.PutUint64(v[0x3b0:], 1)                  // SEV_FEATURES: SNPActive
	le.PutUint64(v[0x3e8:], 1)                  // XCR0: x87
	return v
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
