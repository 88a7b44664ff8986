package qemu

func cpuid(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)

// CBitPos is the memory-encryption C-bit position from CPUID 0x8000001F EBX[5:0], as
// upstream's `cargo run --package cbit` reads it for launch_guest.sh. ok is false when the
// CPU does not report SEV (leaf absent or SEV bit clear).
func CBitPos() (pos int, ok bool) {
	if max, _, _, _ := cpuid(0x80000000, 0); max < 0x8000001f {
		return 0, false
	}
	eax, ebx, _, _ := cpuid(0x8000001f, 0)
	if eax&2 == 0 { // SEV
		return int(ebx & 0x3f), false
	}
	return int(ebx & 0x3f), true
}
