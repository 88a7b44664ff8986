package vtpm

import (
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
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
