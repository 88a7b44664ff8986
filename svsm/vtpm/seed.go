package vtpm

// Test mode's seeded vTPM. Three things make the reference TPM's NV image differ between two
// runs of the same commands, and each is closed here when SetSeed is called:
//   - entropy: it comes from OpenSSL's RAND_bytes (Samples/Google/Entropy.c) and becomes
//     seeds, proofs and DRBG state; OpenSSL's RAND method is replaced by a counter-mode
//     SHA-256 stream of the seed;
//   - the clock: clock_gettime (Samples/Google/Clock.c) becomes the TPM clock stored in NV;
//     the link wraps clock_gettime for C callers and freezes it (Go's clock is untouched);
//   - stack garbage: NvDefineIndex (NvDynamic.c) stores an NV_INDEX built on its stack,
//     trailing padding and all, so two bytes of whatever the thread's stack held (parts of
//     addresses, which ASLR moves) reach NV; the link wraps NvDefineIndex and zeroes the
//     stack its frame will occupy first.
// All of it is C globals of the process, like the simulator itself, set until it ends.

/*
#cgo CFLAGS: -Wno-deprecated-declarations
#cgo LDFLAGS: -Wl,--wrap=clock_gettime -Wl,--wrap=NvDefineIndex
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

static unsigned char det_key[32];
static uint64_t det_ctr;
static unsigned char det_buf[32];
static size_t det_left;
static int det_on;

static int det_bytes(unsigned char *out, int num) {
	while (num > 0) {
		if (det_left == 0) {
			unsigned char in[40];
			memcpy(in, det_key, 32);
			memcpy(in + 32, &det_ctr, 8);
			det_ctr++;
			if (EVP_Digest(in, sizeof in, det_buf, NULL, EVP_sha256(), NULL) != 1) return 0;
			det_left = 32;
		}
		size_t n = det_left < (size_t)num ? det_left : (size_t)num;
		memcpy(out, det_buf + 32 - det_left, n);
		det_left -= n;
		out += n;
		num -= (int)n;
	}
	return 1;
}
static int det_seed(const void *buf, int num) { (void)buf; (void)num; return 1; }
static int det_add(const void *buf, int num, double e) { (void)buf; (void)num; (void)e; return 1; }
static int det_status(void) { return 1; }

static RAND_METHOD det_method = { det_seed, det_bytes, NULL, det_add, det_bytes, det_status };

// The frozen clock: every wrapped clock_gettime reads one second.
extern int __real_clock_gettime(clockid_t id, struct timespec *ts);
int __wrap_clock_gettime(clockid_t id, struct timespec *ts) {
	if (det_on) {
		ts->tv_sec = 1;
		ts->tv_nsec = 0;
		return 0;
	}
	return __real_clock_gettime(id, ts);
}

// det_scrub zeroes the stack below its caller, so that what the next callee stores without
// initialising (struct padding) is zero rather than another call's leftovers.
__attribute__((noinline)) static void det_scrub(void) {
	unsigned char pad[256 << 10];
	memset(pad, 0, sizeof pad);
	__asm__ __volatile__("" : : "r"(pad) : "memory");
}

// NvDefineIndex(TPMS_NV_PUBLIC *, TPM2B_AUTH *) returns TPM_RC (UINT32); the pointer types
// do not matter to a pass-through.
extern uint32_t __real_NvDefineIndex(void *publicArea, void *authValue);
uint32_t __wrap_NvDefineIndex(void *publicArea, void *authValue) {
	if (det_on) det_scrub();
	return __real_NvDefineIndex(publicArea, authValue);
}

static int det_install(const unsigned char *key) {
	memcpy(det_key, key, 32);
	det_ctr = 0;
	det_left = 0;
	det_on = 1;
	return RAND_set_rand_method(&det_method);
}

static int det_check(void) {
	unsigned char b[16];
	return RAND_bytes(b, sizeof b) == 1 && det_ctr > 0;
}
*/
import "C"

import (
	"errors"
	"unsafe"
)

// SetSeed makes every TPM this process manufactures or restores from now on draw from key
// and see a frozen clock. Call it once, before the first TPM, in test mode only.
func SetSeed(key [32]byte) error {
	if C.det_install((*C.uchar)(unsafe.Pointer(&key[0]))) != 1 {
		return errors.New("vtpm: OpenSSL refused the seeded RAND method")
	}
	if C.det_check() != 1 {
		return errors.New("vtpm: OpenSSL's RAND_bytes does not use the seeded method; the vTPM would not replay")
	}
	return nil
}
