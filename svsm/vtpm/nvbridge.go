package vtpm

// The bridge into the TCG reference TPM that go-tpm-tools/simulator links in. The simulator
// keeps all non-volatile state in one C array, s_NV (Samples/Google/NVMem.c), and exposes no
// save/restore API, so we copy that array out and back in ourselves. These are internal
// names of a pinned version (go-tpm-tools v0.4.10): TestSimulatorInternals fails loudly if
// the symbol, its size or the restore sequence stop working.
//
// The references are weak so that cgo's own link check of this package succeeds; the final
// binary resolves them against the simulator's objects, and nvLinked reports whether it did.
// The C globals are process-wide, like the simulator itself (one instance per process).

/*
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

extern unsigned char s_NV[] __attribute__((weak));
extern void _plat__Reset(bool forceManufacture) __attribute__((weak));
extern unsigned int NvFindHandle(unsigned int handle) __attribute__((weak));
extern unsigned char NvCapGetIndex(unsigned int handle, unsigned int count, void *list) __attribute__((weak));

static int nv_linked(void) {
	return s_NV != NULL && _plat__Reset != NULL && NvFindHandle != NULL && NvCapGetIndex != NULL;
}

// nv_indices lists up to 64 defined NV index handles from start (what TPM2_GetCapability
// answers, without a command: a caller may be between a command and its response). The
// list buffer is larger than the simulator's MAX_CAP_HANDLES.
static int nv_indices(unsigned int start, unsigned int *out, int *more) {
	struct { unsigned int count; unsigned int h[1024]; } l;
	*more = NvCapGetIndex(start, 64, &l) != 0;
	unsigned int n = l.count > 64 ? 64 : l.count;
	memcpy(out, l.h, n * sizeof(unsigned int));
	return (int)n;
}
static unsigned int nv_find(unsigned int handle) { return NvFindHandle(handle); }
static void nv_zero(size_t off, size_t n) { memset(s_NV + off, 0, n); }
static void nv_peek(void *dst, size_t off, size_t n) { memcpy(dst, s_NV + off, n); }
static void nv_save(void *dst, size_t n) { memcpy(dst, s_NV, n); }
static void nv_load(const void *src, size_t n) { memcpy(s_NV, src, n); }
static void plat_reset(void) { _plat__Reset(false); }
*/
import "C"

import (
	"encoding/binary"
	"fmt"
	"unsafe"
)

// NVSize is NV_MEMORY_SIZE of the pinned simulator (TpmProfile.h): the size of s_NV.
const NVSize = 16384

func nvLinked() bool { return C.nv_linked() != 0 }

func nvSave() []byte {
	b := make([]byte, NVSize)
	C.nv_save(unsafe.Pointer(&b[0]), C.size_t(NVSize))
	return b
}

func nvLoad(b []byte) {
	C.nv_load(unsafe.Pointer(&b[0]), C.size_t(NVSize))
}

// platReset is a platform power cycle without manufacture: _TPM_Init re-reads NV.
func platReset() { C.plat_reset() }

// indexHandles lists the defined NV indices.
func indexHandles() []uint32 {
	var out []uint32
	start := uint32(0x01000000) // the first NV index handle
	for {
		var buf [64]C.uint
		var more C.int
		n := int(C.nv_indices(C.uint(start), &buf[0], &more))
		for _, h := range buf[:n] {
			out = append(out, uint32(h))
		}
		if more == 0 || n == 0 {
			return out
		}
		start = uint32(buf[n-1]) + 1
	}
}

// indexRef is where NV index h's NV_INDEX starts in s_NV (0: not defined).
func indexRef(h uint32) uint32 { return uint32(C.nv_find(C.uint(h))) }

// The NV_INDEX layout of the pinned simulator (Global.h: TPMS_NV_PUBLIC then TPM2B_AUTH, with
// SHA-512 the largest digest): the fields end at 146 and the struct is padded to 148.
// TestNVIndexLayout pins both against a live TPM.
const (
	nvIndexFieldsEnd = 146
	nvIndexSize      = 148
)

// scrubIndexPadding zeroes the trailing padding of each NV index entry in s_NV.
// NvDefineIndex (NvDynamic.c) writes a stack-built NV_INDEX whole, so those two bytes are
// whatever the thread's stack held: parts of addresses, which would carry ASLR noise into
// the stored state and make a seeded run's disk differ from its replay. The TPM never
// reads them. Each entry is checked (handle at its start, entry long enough) before writing.
func scrubIndexPadding(handles []uint32) error {
	for _, h := range handles {
		ref := indexRef(h)
		if ref < 4 || int(ref)+nvIndexSize > NVSize {
			return fmt.Errorf("vtpm: NV index %#x at %d: outside NV", h, ref)
		}
		var hdr [8]byte // the entry's size field, then the index's own handle
		C.nv_peek(unsafe.Pointer(&hdr[0]), C.size_t(ref-4), 8)
		size, got := binary.LittleEndian.Uint32(hdr[:4]), binary.LittleEndian.Uint32(hdr[4:])
		if got != h || size < 4+nvIndexSize {
			return fmt.Errorf("vtpm: NV index %#x: entry holds handle %#x, size %d: go-tpm-tools' NV layout changed", h, got, size)
		}
		C.nv_zero(C.size_t(ref+nvIndexFieldsEnd), nvIndexSize-nvIndexFieldsEnd)
	}
	return nil
}
