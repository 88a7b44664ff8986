package vtpm

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/svsm-e2e/svsm-e2e/internal/detrand"
)

// TestSeededTPMReplays: after SetSeed, a TPM manufactured, used (a primary key, a sealed
// object, a PCR extend, time passing between commands), restored from its NV and shut down
// leaves the same NV image byte for byte in two processes (seeds, proofs, DRBG state,
// clock) and reads the same TPM clock, and another seed leaves another. Child processes, because SetSeed lasts for the
// rest of a process's life.
func TestSeededTPMReplays(t *testing.T) {
	if os.Getenv("VTPM_SEED_CHILD") != "" {
		return
	}
	a1, a2, b := seededChild(t, 1), seededChild(t, 1), seededChild(t, 2)
	if a1 != a2 {
		t.Fatalf("one seed gave two NV images: %s vs %s", a1, a2)
	}
	if a1 == b {
		t.Fatal("two seeds gave one NV image")
	}
}

func seededChild(t *testing.T, seed int) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestSeededTPMChild$")
	cmd.Env = append(os.Environ(), "VTPM_SEED_CHILD="+strconv.Itoa(seed))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	var sum string
	if _, err := fmt.Sscanf(lastLine(string(out), "nv "), "nv %s", &sum); err != nil {
		t.Fatalf("child printed no NV digest:\n%s", out)
	}
	return sum
}

func lastLine(out, prefix string) string {
	var l string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, prefix) {
			l = line
		}
	}
	return l
}

func TestSeededTPMChild(t *testing.T) {
	s := os.Getenv("VTPM_SEED_CHILD")
	if s == "" {
		t.Skip("child half of TestSeededTPMReplays")
	}
	seed, _ := strconv.Atoi(s)
	var key [32]byte
	key[0] = byte(seed)
	if err := SetSeed(key); err != nil {
		t.Fatal(err)
	}
	// The TPM's client draws session nonces from crypto/rand, seeded as svsm-guest does.
	if err := detrand.Install(uint64(seed), "vtpm-test"); err != nil {
		t.Fatal(err)
	}
	tpm, err := Manufacture()
	if err != nil {
		t.Fatal(err)
	}
	rw := tpm.Transport()
	srk, err := client.StorageRootKeyECC(rw)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(30 * time.Millisecond) // a clock that ran would now differ
	if _, err := srk.Seal([]byte("secret"), client.SealOpts{}); err != nil {
		t.Fatal(err)
	}
	srk.Close()
	if err := tpm2.PCRExtend(rw, 7, tpm2.AlgSHA256, make([]byte, 32), ""); err != nil {
		t.Fatal(err)
	}
	const idx = 0x01500021
	if err := tpm2.NVDefineSpace(rw, tpm2.HandleOwner, idx, "", "", nil, tpm2.AttrOwnerWrite|tpm2.AttrOwnerRead|tpm2.AttrNoDA, 64); err != nil {
		t.Fatal(err)
	}
	if err := tpm2.NVWrite(rw, tpm2.HandleOwner, idx, "", make([]byte, 64), 0); err != nil {
		t.Fatal(err)
	}
	mid, err := tpm.Checkpoint()
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("checkpoint %x\n", sha256.Sum256(mid))
	nv, err := tpm.Shutdown()
	if err != nil {
		t.Fatal(err)
	}
	tpm2nd, err := Restore(nv)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(30 * time.Millisecond)
	rw = tpm2nd.Transport()
	// TPM2_ReadClock: the TPM's time and clock, which quotes and NV carry.
	if _, err := rw.Write([]byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x81}); err != nil {
		t.Fatal(err)
	}
	clock := make([]byte, 64)
	n, err := tpm2nd.Transport().Read(clock)
	if err != nil {
		t.Fatal(err)
	}
	// TPMS_TIME_INFO.time (ms since the TPM started) follows the 10-byte header: frozen, it
	// stays 0 however long the commands took.
	if n < 18 || binary.BigEndian.Uint64(clock[10:18]) != 0 {
		t.Fatalf("the TPM's time ran on a frozen clock: %x", clock[:n])
	}
	nv, err = tpm2nd.Shutdown()
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("nv %x-%x\n", sha256.Sum256(nv), clock[:n])
}
