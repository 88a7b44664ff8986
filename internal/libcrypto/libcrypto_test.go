package libcrypto

import (
	"bytes"
	"crypto"
	_ "crypto/sha256"
	_ "crypto/sha512"
	"encoding/hex"
	"math/rand/v2"
	"testing"
)

// TestDigestAgreesWithGo: OpenSSL's digests equal Go's, at sizes around the block boundaries
// (64 and 128 bytes) and large ones, including no data at all.
func TestDigestAgreesWithGo(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, h := range []crypto.Hash{crypto.SHA256, crypto.SHA384, crypto.SHA512} {
		for _, n := range []int{0, 1, 55, 56, 63, 64, 65, 111, 112, 127, 128, 129, 4096, 1<<20 + 3} {
			data := make([]byte, n)
			for i := range data {
				data[i] = byte(r.Uint32())
			}
			got, err := Digest(h, data)
			if err != nil {
				t.Fatal(err)
			}
			d := h.New()
			d.Write(data)
			if want := d.Sum(nil); !bytes.Equal(got, want) {
				t.Errorf("%v of %d bytes: libcrypto %x, Go %x", h, n, got, want)
			}
		}
	}
}

// TestDigestKnownAnswer: FIPS 180-2's "abc" vectors, so that agreement with Go is not the only
// check.
func TestDigestKnownAnswer(t *testing.T) {
	for h, want := range map[crypto.Hash]string{
		crypto.SHA256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
		crypto.SHA384: "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7",
	} {
		got, err := Digest(h, []byte("abc"))
		if err != nil {
			t.Fatal(err)
		}
		if hex.EncodeToString(got) != want {
			t.Errorf("%v(abc) = %x, want %s", h, got, want)
		}
	}
}

// TestDigestRefusesOthers: a digest it does not offer is an error, not a wrong answer.
func TestDigestRefusesOthers(t *testing.T) {
	for _, h := range []crypto.Hash{crypto.SHA1, crypto.MD5, crypto.SHA3_256, 0} {
		if Supports(h) {
			t.Errorf("Supports(%v)", h)
		}
		if _, err := Digest(h, []byte("x")); err == nil {
			t.Errorf("Digest(%v) succeeded", h)
		}
	}
}

// BenchmarkDigest compares OpenSSL's and Go's digests of a 14 MB input (a guest's /init).
// Natively both use the CPU's SHA extensions where present; the difference that matters is
// under TCG (package comment).
func BenchmarkDigest(b *testing.B) {
	data := bytes.Repeat([]byte("kernel image bytes "), 14<<20/19)
	for _, h := range []crypto.Hash{crypto.SHA256, crypto.SHA384} {
		b.Run("libcrypto-"+h.String(), func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			for range b.N {
				if _, err := Digest(h, data); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("go-"+h.String(), func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			for range b.N {
				d := h.New()
				d.Write(data)
				d.Sum(nil)
			}
		})
	}
}
