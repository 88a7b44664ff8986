// Package detrand is test mode's seeded randomness: one seed, given with --test-seed to a
// binary, fixes every key, nonce, boot id and TPM seed the process draws, so that a run of
// the explorer replays bit for bit.
//
// It is never for deployment: every key becomes a function of a 64-bit number printed in
// the logs. The binaries take --test-seed only in their simulated modes and refuse it next
// to flags that mean production (see each command's help).
package detrand

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
)

// Reader is a seeded stream, safe for concurrent use (draws are then ordered by the lock,
// so only a single-threaded caller gets a reproducible sequence).
type Reader struct {
	mu sync.Mutex
	c  *mrand.ChaCha8
}

// New returns the stream named label of seed. Streams with different labels are
// independent, so one component drawing more never shifts another's draws.
func New(seed uint64, label string) *Reader {
	return &Reader{c: mrand.NewChaCha8(Key(seed, label))}
}

// Key is the 32-byte key of the stream named label of seed (also what seeds the vTPM).
func Key(seed uint64, label string) [32]byte {
	h := sha256.New()
	h.Write([]byte("svsm-e2e detrand v1\x00"))
	h.Write([]byte(label))
	h.Write([]byte{0})
	_ = binary.Write(h, binary.LittleEndian, seed)
	var k [32]byte
	h.Sum(k[:0])
	return k
}

// Derive is the seed of a child process (label names it: "verifier#2", "guest/vm#3").
func Derive(seed uint64, label string) uint64 {
	k := Key(seed, "derive/"+label)
	return binary.LittleEndian.Uint64(k[:8])
}

// Read fills b from the stream. A one-byte read returns 0 and does not advance the stream:
// with GODEBUG=cryptocustomrand=1, the standard library reads one byte or none from a
// caller's reader at random before each key generation or signature
// (crypto/internal/randutil.MaybeReadByte) so that callers cannot depend on its output; a
// reproducible run must not let that coin shift the stream. No algorithm this project
// runs draws a single byte.
func (r *Reader) Read(b []byte) (int, error) {
	if len(b) == 1 {
		b[0] = 0
		return 1, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.c.Read(b)
}

// installMu makes Install idempotent per process.
var installMu sync.Mutex

// Install makes the stream named label of seed this process's crypto/rand. It changes
// process-wide state, as only a process-wide switch can: crypto/rand.Reader (read by
// crypto/rand.Read, this project and every library) and GODEBUG=cryptocustomrand=1 (without
// which Go 1.26's key generation and signing ignore the reader they are given and draw from
// the system). It then checks that key generation really follows the stream and fails
// otherwise, rather than run a replay that silently is not one.
func Install(seed uint64, label string) error {
	installMu.Lock()
	defer installMu.Unlock()
	gd := os.Getenv("GODEBUG")
	if !strings.Contains(gd, "cryptocustomrand=1") {
		if gd != "" {
			gd += ","
		}
		if err := os.Setenv("GODEBUG", gd+"cryptocustomrand=1"); err != nil {
			return fmt.Errorf("detrand: set GODEBUG: %w", err)
		}
	}
	if err := selfCheck(); err != nil {
		return err
	}
	rand.Reader = New(seed, label)
	return nil
}

// selfCheck generates a key twice from two copies of one stream.
func selfCheck() error {
	k1, err := ecdh.P256().GenerateKey(New(0, "self-check"))
	if err != nil {
		return fmt.Errorf("detrand: self-check: %w", err)
	}
	k2, err := ecdh.P256().GenerateKey(New(0, "self-check"))
	if err != nil {
		return fmt.Errorf("detrand: self-check: %w", err)
	}
	if !bytes.Equal(k1.Bytes(), k2.Bytes()) {
		return errors.New("detrand: key generation ignores the seeded reader (GODEBUG=cryptocustomrand=1 did not take effect); a seeded run would not replay")
	}
	return nil
}

// FlagHelp is --test-seed's help text, shared by the binaries.
const FlagHelp = "test mode: draw every key, nonce and id from this seed so a run replays bit for bit (never in deployment)"

// ParseSeed parses a --test-seed value; "" means none.
func ParseSeed(s string) (seed uint64, ok bool, err error) {
	if s == "" {
		return 0, false, nil
	}
	seed, err = strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, false, fmt.Errorf("--test-seed %q: want a decimal 64-bit number", s)
	}
	return seed, true, nil
}
