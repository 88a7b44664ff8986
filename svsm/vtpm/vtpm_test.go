package vtpm

import (
	"debug/elf"
	"errors"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

const testCounter = tpmutil.Handle(0x01500010)

// TestSimulatorInternals guards the NV bridge against changes in go-tpm-tools: the symbol
// must exist with the size we copy, and a restored image must bring the TPM's identity,
// NV counters and sealed blobs back. If this fails after a dependency bump, the bridge in
// nvbridge.go must be revisited before anything else.
func TestSimulatorInternals(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	err = CheckBinary(exe)
	if errors.Is(err, elf.ErrNoSymbols) {
		// go test links with -s; build the same test binary with its symbol table.
		exe = filepath.Join(t.TempDir(), "vtpm.test")
		out, berr := exec.Command("go", "test", "-c", "-o", exe, ".").CombinedOutput()
		if berr != nil {
			t.Fatalf("build test binary with symbols: %v\n%s", berr, out)
		}
		err = CheckBinary(exe)
	}
	if err != nil {
		t.Fatal(err)
	}
}

func manufactureWithState(t *testing.T) (ek string, sealed *pb.SealedBytes, nv []byte) {
	t.Helper()
	tpm, err := Manufacture()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tpm.Close) // a failed step must not leave the simulator locked for the next test
	rw := tpm.Transport()
	if ek, err = EKHash(rw); err != nil {
		t.Fatal(err)
	}
	if err := tpm2.NVDefineSpace(rw, tpm2.HandleOwner, testCounter, "", "", nil,
		tpm2.AttrOwnerWrite|tpm2.AttrOwnerRead|tpm2.AttrAuthRead|tpm2.AttrAuthWrite|tpm2.AttrNoDA|0x10, 8); err != nil {
		t.Fatalf("define counter: %v", err)
	}
	for range 3 {
		if err := tpm2.NVIncrement(rw, testCounter, ""); err != nil {
			t.Fatalf("increment: %v", err)
		}
	}
	srk, err := client.StorageRootKeyECC(rw)
	if err != nil {
		t.Fatal(err)
	}
	sealed, err = srk.Seal([]byte("luks passphrase"), client.SealOpts{})
	srk.Close()
	if err != nil {
		t.Fatal(err)
	}
	if nv, err = tpm.Shutdown(); err != nil {
		t.Fatal(err)
	}
	return ek, sealed, nv
}

func readCounter(t *testing.T, tpm *TPM) uint64 {
	t.Helper()
	b, err := tpm2.NVReadEx(tpm.Transport(), testCounter, tpm2.HandleOwner, "", 0)
	if err != nil {
		t.Fatalf("read counter: %v", err)
	}
	var v uint64
	for _, c := range b {
		v = v<<8 | uint64(c)
	}
	return v
}

func TestRestoreKeepsIdentityCountersAndSealedBlobs(t *testing.T) {
	ek1, sealed, nv := manufactureWithState(t)

	for _, orderly := range []bool{true, false} {
		tpm, err := Restore(nv)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(tpm.Close)
		rw := tpm.Transport()
		ek2, err := EKHash(rw)
		if err != nil {
			t.Fatal(err)
		}
		if ek2 != ek1 {
			t.Fatalf("EK changed across restore: %s -> %s", ek1, ek2)
		}
		if got := readCounter(t, tpm); got != 3 && orderly || got != 4 && !orderly {
			t.Fatalf("NV counter after restore = %d", got)
		}
		srk, err := client.StorageRootKeyECC(rw)
		if err != nil {
			t.Fatal(err)
		}
		secret, err := srk.Unseal(sealed, client.UnsealOpts{})
		srk.Close()
		if err != nil || string(secret) != "luks passphrase" {
			t.Fatalf("unseal after restore: %q, %v", secret, err)
		}
		if err := tpm2.NVIncrement(rw, testCounter, ""); err != nil {
			t.Fatal(err)
		}
		if orderly {
			if nv, err = tpm.Shutdown(); err != nil {
				t.Fatal(err)
			}
		} else {
			// A checkpoint taken while running, then a power loss.
			if nv, err = tpm.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			tpm.Close()
		}
	}
	tpm, err := Restore(nv)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	if got := readCounter(t, tpm); got != 5 {
		t.Fatalf("counter after two more boots = %d, want 5", got)
	}
}

func TestFreshManufactureDiffers(t *testing.T) {
	ek1, _, _ := manufactureWithState(t)
	ek2, _, _ := manufactureWithState(t)
	if ek1 == ek2 {
		t.Fatal("two manufactured TPMs share an EK: restore tests would prove nothing")
	}
}

func TestRestoreRejectsBadImageSize(t *testing.T) {
	for _, n := range []int{0, NVSize - 1, NVSize + 1} {
		if _, err := Restore(make([]byte, n)); err == nil {
			t.Fatalf("%d-byte NV image accepted", n)
		}
	}
}

// TestNVIndexLayout pins what scrubIndexPadding assumes of NV_INDEX in s_NV (go-tpm-tools
// v0.4.10, Global.h): the handle at the start, dataSize at 78, the TPM2B_AUTH at 80, the
// struct 148 bytes (so the fields end at 146), the entry's size field just before it; and
// that a saved image carries zeros in the padding.
func TestNVIndexLayout(t *testing.T) {
	tpm, err := Manufacture()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tpm.Close)
	rw := tpm.Transport()
	const h, dataSize = 0x01500077, 40
	auth := strings.Repeat("A", 20) // SHA-1 name algorithm: at most 20 bytes
	if err := tpm2.NVDefineSpace(rw, tpm2.HandleOwner, h, "", auth, nil, tpm2.AttrOwnerWrite|tpm2.AttrOwnerRead|tpm2.AttrNoDA, dataSize); err != nil {
		t.Fatal(err)
	}
	img, err := tpm.Checkpoint()
	if err != nil {
		t.Fatal(err)
	}
	ref := int(indexRef(h))
	if ref < 4 {
		t.Fatalf("NvFindHandle(%#x) = %d", h, ref)
	}
	le16 := func(o int) int { return int(img[o]) | int(img[o+1])<<8 }
	le32 := func(o int) uint32 {
		return uint32(img[o]) | uint32(img[o+1])<<8 | uint32(img[o+2])<<16 | uint32(img[o+3])<<24
	}
	if got := le32(ref); got != h {
		t.Fatalf("handle at the entry's start is %#x", got)
	}
	if got := le16(ref + 78); got != dataSize {
		t.Fatalf("dataSize at 78 is %d, want %d", got, dataSize)
	}
	if got := le16(ref + 80); got != len(auth) || string(img[ref+82:ref+82+len(auth)]) != auth {
		t.Fatalf("TPM2B_AUTH not at 80: size %d", got)
	}
	if got := int(le32(ref-4)) - 4 - dataSize; got != nvIndexSize {
		t.Fatalf("sizeof(NV_INDEX) = %d, the scrub assumes %d", got, nvIndexSize)
	}
	if img[ref+nvIndexFieldsEnd] != 0 || img[ref+nvIndexFieldsEnd+1] != 0 {
		t.Fatal("the saved image carries stack garbage in NV_INDEX's padding")
	}
}

// TestPCRBanksAsUpstream pins the PCR allocation of a new vTPM to upstream COCONUT-SVSM's:
// SHA-256 and SHA-384 active, SHA-1 (implemented there, inactive) and SHA-512 (not
// implemented there) without PCRs; sources in ActiveBanks. The allocation is in NV, so a
// restored TPM has it too.
func TestPCRBanksAsUpstream(t *testing.T) {
	active := func(rw io.ReadWriter) map[tpm2.Algorithm]int {
		t.Helper()
		caps, _, err := tpm2.GetCapability(rw, tpm2.CapabilityPCRs, 16, 0)
		if err != nil {
			t.Fatal(err)
		}
		out := map[tpm2.Algorithm]int{}
		for _, c := range caps {
			sel := c.(tpm2.PCRSelection)
			out[sel.Hash] = len(sel.PCRs)
		}
		return out
	}
	want := map[tpm2.Algorithm]int{tpm2.AlgSHA1: 0, tpm2.AlgSHA256: 24, tpm2.AlgSHA384: 24, tpm2.AlgSHA512: 0}
	tpm, err := Manufacture()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tpm.Close)
	if got := active(tpm.Transport()); !maps.Equal(got, want) {
		t.Fatalf("manufactured vTPM banks (alg → PCRs) = %v, want %v", got, want)
	}
	nv, err := tpm.Shutdown()
	if err != nil {
		t.Fatal(err)
	}
	restored, err := Restore(nv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(restored.Close)
	if got := active(restored.Transport()); !maps.Equal(got, want) {
		t.Fatalf("restored vTPM banks = %v, want %v", got, want)
	}
}
