package igvm

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"testing"
)

// tinyKernel is a minimal x86-64 ELF with one loadable segment at 16 MiB (a stand-in vmlinux).
func tinyKernel(t *testing.T) []byte {
	t.Helper()
	var b bytes.Buffer
	le := binary.LittleEndian
	hdr := elf.Header64{Type: uint16(elf.ET_EXEC), Machine: uint16(elf.EM_X86_64), Version: 1, Entry: 0x1000000,
		Phoff: 64, Ehsize: 64, Phentsize: 56, Phnum: 1}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS], hdr.Ident[elf.EI_DATA], hdr.Ident[elf.EI_VERSION] = byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), 1
	_ = binary.Write(&b, le, hdr)
	body := bytes.Repeat([]byte{0x90}, 5000) // nops
	_ = binary.Write(&b, le, elf.Prog64{Type: uint32(elf.PT_LOAD), Flags: uint32(elf.PF_R | elf.PF_X), Off: 4096,
		Vaddr: 0xffffffff81000000, Paddr: 0x1000000, Filesz: uint64(len(body)), Memsz: 3 * PageSize4K, Align: 4096})
	out := make([]byte, 4096+len(body))
	copy(out, b.Bytes())
	copy(out[4096:], body)
	return out
}

// TestNativeLaunch: a launch image with a native platform passes igvmmeasure's KVM rules,
// shares its boot pages with the SNP platform, keeps the kernel file extractable, and starts
// the native platform at the kernel entry (or at the entry stub).
func TestNativeLaunch(t *testing.T) {
	k := tinyKernel(t)
	l := &Launch{Kernel: k, Initrd: []byte("initrd"), Cmdline: "console=ttyS0", Native: true}
	f, err := BuildLaunch(l)
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckKVM(f); err != nil {
		t.Fatalf("native launch image: %v", err)
	}
	raw, err := f.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	g, err := Parse(raw)
	if err != nil || g.Version != FormatVersion2 {
		t.Fatalf("parse: %v, version %d", err, g.Version)
	}
	back, err := ExtractLaunch(g)
	if err != nil || !bytes.Equal(back.Kernel, k) || string(back.Initrd) != "initrd" || back.Cmdline != "console=ttyS0" {
		t.Fatalf("extract: %v", err)
	}
	var shared, nativeCtx int
	for _, h := range g.Headers {
		switch h := h.(type) {
		case PageData:
			if h.CompatMask == snpCompat|nativeCompat {
				shared++
			}
			if h.GPA == 0x1000000 && h.CompatMask&nativeCompat != 0 && !bytes.HasPrefix(h.Data, []byte{0x90, 0x90}) {
				t.Error("the kernel segment is not loaded at its physical address")
			}
		case VPContext:
			if h.CompatMask == nativeCompat {
				nativeCtx++
				if rip := binary.LittleEndian.Uint64(h.Data[0x80:]); rip != 0x1000000 {
					t.Errorf("native entry %#x", rip)
				}
				if rsi := binary.LittleEndian.Uint64(h.Data[0x30:]); rsi != BootParamsGPA {
					t.Errorf("native RSI %#x", rsi)
				}
			}
		}
	}
	if shared < 10 || nativeCtx != 1 {
		t.Fatalf("%d shared pages, %d native contexts", shared, nativeCtx)
	}
	l.NativeEntry32 = true
	f32, _ := BuildLaunch(l)
	for _, h := range f32.Headers {
		if v, ok := h.(VPContext); ok && v.CompatMask == nativeCompat {
			if rip := binary.LittleEndian.Uint64(v.Data[0x80:]); rip != EntryStubGPA {
				t.Fatalf("32-bit native entry %#x, want the stub", rip)
			}
		}
	}
	// The stub jumps to the kernel entry with boot_params in RSI.
	stub := entryStub(0x1234567)
	if binary.LittleEndian.Uint32(stub[0x40+6:]) != 0x1234567 || binary.LittleEndian.Uint32(stub[0x40+1:]) != BootParamsGPA {
		t.Fatal("entry stub operands")
	}
}

// TestStandInLaunchFollowsKVMRules: the process backend's images (a stand-in kernel file, no
// native platform) also carry a VMSA KVM accepts, so their digest is one a KVM launch computes.
func TestStandInLaunchFollowsKVMRules(t *testing.T) {
	f, err := BuildLaunch(&Launch{Kernel: []byte("stand-in kernel"), Initrd: []byte("initrd"), Cmdline: "x"})
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckKVM(f); err != nil {
		t.Fatalf("stand-in launch image: %v", err)
	}
	last := f.Headers[len(f.Headers)-1].(VPContext)
	if rip := binary.LittleEndian.Uint64(last.Data[0x178:]); rip != KernelGPA {
		t.Errorf("VMSA RIP %#x, want the kernel file at %#x", rip, KernelGPA)
	}
}

// TestNativeContextLayout pins the native VP context to the byte layout QEMU reads: struct
// IgvmNativeVpContextX64 in QEMU's target/i386/igvm.c (QEMU 10.2, from igvm_defs): rax..r15 at
// 0x00, rip 0x80, rflags 0x88, idtr_base 0x90, idtr_limit 0x98, reserved[2], gdtr_limit 0x9e,
// gdtr_base 0xa0, code selector/attributes/base/limit 0xa8/0xaa/0xac/0xb0, data the same at
// 0xb4/0xb6/0xb8/0xbc, gs_base 0xc0, cr0 0xc8, cr3 0xd0, cr4 0xd8, efer 0xe0; 232 bytes.
func TestNativeContextLayout(t *testing.T) {
	le := binary.LittleEndian
	c := nativeContext(0x1234567, false)
	for _, f := range []struct {
		name string
		off  int
		size int
		want uint64
	}{
		{"rsp", 0x20, 8, nativeStackTop},
		{"rsi (boot_params)", 0x30, 8, BootParamsGPA},
		{"rip", 0x80, 8, 0x1234567},
		{"rflags", 0x88, 8, 2},
		{"gdtr_limit", 0x9e, 2, 31},
		{"gdtr_base", 0xa0, 8, nativeGDTGPA},
		{"code_selector", 0xa8, 2, 0x10},
		{"code_attributes", 0xaa, 2, 0xa09b},
		{"code_limit", 0xb0, 4, 0xffffffff},
		{"data_selector", 0xb4, 2, 0x18},
		{"data_attributes", 0xb6, 2, 0xc093},
		{"data_limit", 0xbc, 4, 0xffffffff},
		{"cr0", 0xc8, 8, 0x80050033},
		{"cr3", 0xd0, 8, nativePML4GPA},
		{"cr4", 0xd8, 8, 0x20},
		{"efer", 0xe0, 8, 0x500},
	} {
		var got uint64
		switch f.size {
		case 2:
			got = uint64(le.Uint16(c[f.off:]))
		case 4:
			got = uint64(le.Uint32(c[f.off:]))
		default:
			got = le.Uint64(c[f.off:])
		}
		if got != f.want {
			t.Errorf("%s at %#x = %#x, want %#x", f.name, f.off, got, f.want)
		}
	}
	if len(c) != 0xe8 {
		t.Errorf("context is %d bytes, QEMU's struct 232", len(c))
	}
}
