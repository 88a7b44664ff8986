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

static int nv_linked(void) { return s_NV != NULL && _plat__Reset != NULL; }
static void nv_save(void *dst, size_t n) { memcpy(dst, s_NV, n); }
static void nv_load(const void *src, size_t n) { memcpy(s_NV, src, n); }
static void plat_reset(void) { _plat__Reset(false); }
*/
import "C"

import "unsafe"

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
