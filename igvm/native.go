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

// nativeHeaders returns the NATIVE platform's directives for l: kernel segments, zero page,
// page tables, GDT and the VP context. shared maps GPAs of SNP page data whose bytes the native
// platform loads unchanged (their mask becomes SNP|NATIVE).
func nativeHeaders(l *Launch, initrdGPA uint64, memBytes uint64) ([]Header, error) {
	ef, err := elf.NewFile(bytes.NewReader(l.Kernel))
	if err != nil {
		return nil, fmt.Errorf("igvm native: the kernel is not an ELF file: %w", err)
	}
	if ef.Class != elf.ELFCLASS64 || ef.Machine != elf.EM_X86_64 {
		return nil, errors.New("igvm native: the kernel is not an x86-64 ELF (vmlinux)")
	}
	var hs []Header
	page := func(gpa uint64, data []byte) {
		for off := 0; off < len(data); off += PageSize4K {
			chunk := data[off:min(len(data), off+PageSize4K)]
			if isZero(chunk) {
				chunk = nil // a zero page (BSS): no file data
			}
			hs = append(hs, PageData{GPA: gpa + uint64(off), CompatMask: nativeCompat, Data: chunk})
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
			return nil, fmt.Errorf("igvm native: kernel segment at %#x: %w", p.Paddr, err)
		}
		if start < 16<<20 {
			return nil, fmt.Errorf("igvm native: kernel segment at %#x overlaps the boot structures", p.Paddr)
		}
		page(start, seg)
		kernelEnd = max(kernelEnd, p.Paddr+p.Memsz)
	}
	if kernelEnd == 0 {
		return nil, errors.New("igvm native: the kernel has no loadable segment")
	}
	if len(l.Initrd) > 0 && initrdGPA < alignUp(kernelEnd) {
		return nil, fmt.Errorf("igvm native: initrd at %#x overlaps the kernel (to %#x)", initrdGPA, kernelEnd)
	}
	if memBytes > 4<<30 || kernelEnd > memBytes {
		return nil, fmt.Errorf("igvm native: %d MiB of memory do not hold the kernel (to %#x) or exceed the 4 GiB mapping", memBytes>>20, kernelEnd)
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
	hs = append(hs, PageData{GPA: BootParamsGPA, CompatMask: nativeCompat, Data: bp})

	// GDT: null, null, __BOOT_CS (64-bit code), __BOOT_DS.
	gdt := make([]byte, 32)
	le.PutUint64(gdt[16:], 0x00af9b000000ffff)
	le.PutUint64(gdt[24:], 0x00cf93000000ffff)
	hs = append(hs, PageData{GPA: nativeGDTGPA, CompatMask: nativeCompat, Data: gdt})

	// Identity map of the first 4 GiB with 2 MiB pages.
	pml4 := make([]byte, PageSize4K)
	le.PutUint64(pml4, nativePDPTGPA|3)
	pdpt := make([]byte, PageSize4K)
	for i := range nativeMapGiB {
		le.PutUint64(pdpt[8*i:], uint64(nativePDGPA+i*PageSize4K)|3)
	}
	hs = append(hs, PageData{GPA: nativePML4GPA, CompatMask: nativeCompat, Data: pml4},
		PageData{GPA: nativePDPTGPA, CompatMask: nativeCompat, Data: pdpt})
	for g := range nativeMapGiB {
		pd := make([]byte, PageSize4K)
		for i := range 512 {
			le.PutUint64(pd[8*i:], uint64(g)<<30|uint64(i)<<21|0x83) // present, writable, 2 MiB
		}
		hs = append(hs, PageData{GPA: uint64(nativePDGPA + g*PageSize4K), CompatMask: nativeCompat, Data: pd})
	}

	// IgvmNativeVpContextX64: 64-bit mode with paging, RSI = boot_params, RIP = the ELF entry.
	ctx := make([]byte, nativeVPContextSize)
	le.PutUint64(ctx[4*8:], nativeStackTop) // rsp
	le.PutUint64(ctx[6*8:], BootParamsGPA)  // rsi
	le.PutUint64(ctx[16*8:], ef.Entry)      // rip
	le.PutUint64(ctx[17*8:], 2)             // rflags: reserved bit 1, interrupts off
	le.PutUint16(ctx[0x9e:], 31)            // gdtr_limit
	le.PutUint64(ctx[0xa0:], nativeGDTGPA)  // gdtr_base
	le.PutUint16(ctx[0xa8:], 0x10)          // code selector __BOOT_CS
	le.PutUint16(ctx[0xaa:], 0xa09b)        // 64-bit code: P, S, type 0xb, L, G
	le.PutUint32(ctx[0xb0:], 0xffffffff)    // code limit
	le.PutUint16(ctx[0xb4:], 0x18)          // data selector __BOOT_DS
	le.PutUint16(ctx[0xb6:], 0xc093)        // data: P, S, type 3, D/B, G
	le.PutUint32(ctx[0xbc:], 0xffffffff)    // data limit
	le.PutUint64(ctx[0xc8:], 0x80050033)    // cr0: PG, AM, WP, NE, ET, MP, PE
	le.PutUint64(ctx[0xd0:], nativePML4GPA) // cr3
	le.PutUint64(ctx[0xd8:], 0x20)          // cr4: PAE
	le.PutUint64(ctx[0xe0:], 0x500)         // efer: LME | LMA
	hs = append(hs, VPContext{GPA: 0, CompatMask: nativeCompat, Data: ctx})
	return hs, nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
