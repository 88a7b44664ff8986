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
