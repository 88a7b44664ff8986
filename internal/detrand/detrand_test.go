package detrand

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

func draw(r io.Reader, n int) []byte {
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		panic(err)
	}
	return b
}

func TestStreams(t *testing.T) {
	if !bytes.Equal(draw(New(1, "a"), 64), draw(New(1, "a"), 64)) {
		t.Fatal("one seed and label gave two streams")
	}
	for _, other := range []*Reader{New(2, "a"), New(1, "b")} {
		if bytes.Equal(draw(New(1, "a"), 32), draw(other, 32)) {
			t.Fatal("another seed or label gave the same stream")
		}
	}
	if Derive(1, "guest/vm#1") == Derive(1, "guest/vm#2") {
		t.Fatal("two children got one seed")
	}
	// Pinned: a replay command printed by an older build must replay the same draws.
	if got := hex.EncodeToString(draw(New(42, "guest"), 8)); got != pinnedGuest42 {
		t.Fatalf("stream 42/guest begins %s, pinned %s: seeds printed by older builds no longer replay", got, pinnedGuest42)
	}
}

const pinnedGuest42 = "cbce88a62a56e3e7"

func TestOneByteReadsDoNotShiftTheStream(t *testing.T) {
	r := New(3, "x")
	one := make([]byte, 1)
	_, _ = r.Read(one)
	if !bytes.Equal(draw(r, 32), draw(New(3, "x"), 32)) {
		t.Fatal("a one-byte read (randutil.MaybeReadByte) advanced the stream")
	}
}

// The child half of TestInstall: a process with the seed installed prints what its
// crypto draws.
func TestMain(m *testing.M) {
	if s := os.Getenv("DETRAND_CHILD_SEED"); s != "" {
		seed, _ := strconv.ParseUint(s, 10, 64)
		if err := Install(seed, "child"); err != nil {
			fmt.Println("install:", err)
			os.Exit(2)
		}
		ec, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
		if err != nil {
			panic(err)
		}
		digest := sha256.Sum256([]byte("m"))
		sig, err := ecdsa.SignASN1(rand.Reader, ec, digest[:])
		if err != nil {
			panic(err)
		}
		rk, err := rsa.GenerateKey(rand.Reader, 1024)
		if err != nil {
			panic(err)
		}
		der, _ := x509.MarshalECPrivateKey(ec)
		buf := make([]byte, 16)
		_, _ = rand.Read(buf)
		fmt.Printf("%x %x %x %x\n", der, sig, rk.N.Bytes(), buf)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func child(t *testing.T, seed uint64) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "DETRAND_CHILD_SEED="+strconv.FormatUint(seed, 10))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	return string(out)
}

// TestInstall: with a seed installed, key generation, signatures and crypto/rand repeat
// across processes (two runs of each seed), and another seed changes them.
func TestInstall(t *testing.T) {
	a1, a2, b := child(t, 7), child(t, 7), child(t, 8)
	if a1 != a2 {
		t.Fatalf("seed 7 drew differently in two processes:\n%s\n%s", a1, a2)
	}
	if a1 == b {
		t.Fatal("seeds 7 and 8 drew the same")
	}
}
