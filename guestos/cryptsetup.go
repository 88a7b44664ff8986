package guestos

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"time"
)

// Cryptsetup runs the cryptsetup binary (Debian cryptsetup-bin). Passphrases go through
// pipes, never files or arguments.
type Cryptsetup struct {
	Path    string        // "cryptsetup" from PATH when empty
	Timeout time.Duration // per invocation; 60 s when zero
}

// ErrNoCryptsetup is returned when the binary is missing.
type ErrNoCryptsetup struct{ Err error }

func (e *ErrNoCryptsetup) Error() string {
	return "cryptsetup not found (install Debian package cryptsetup-bin): " + e.Err.Error()
}

func (c Cryptsetup) run(ctx context.Context, stdin []byte, extra []byte, args ...string) ([]byte, error) {
	path := c.Path
	if path == "" {
		p, err := exec.LookPath("cryptsetup")
		if err != nil {
			return nil, &ErrNoCryptsetup{err}
		}
		path = p
	}
	to := c.Timeout
	if to == 0 {
		to = 60 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, to)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Stdin = bytes.NewReader(stdin)
	if extra != nil {
		// A second secret goes in on fd 3, named /proc/self/fd/3 (no /dev/fd without udev).
		r, w, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		defer r.Close()
		cmd.ExtraFiles = []*os.File{r}
		go func() {
			_, _ = w.Write(extra)
			w.Close()
		}()
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("cryptsetup %s: %w: %s", args[0], err, bytes.TrimSpace(errb.Bytes()))
	}
	return out.Bytes(), nil
}

// AnySlot lets cryptsetup try every keyslot.
const AnySlot = -1

// TestPassphrase checks a passphrase without device-mapper, in keyslot slot or (AnySlot)
// every one.
func (c Cryptsetup) TestPassphrase(ctx context.Context, dev string, slot int, pass []byte) error {
	_, err := c.run(ctx, pass, nil, slotArgs(slot, "open", "--test-passphrase", "--key-file=-", dev)...)
	return err
}

// Open unlocks dev as /dev/mapper/name (needs device-mapper: the QEMU guest) with the
// passphrase of keyslot slot or (AnySlot) any.
func (c Cryptsetup) Open(ctx context.Context, dev, name string, slot int, pass []byte) error {
	_, err := c.run(ctx, pass, nil, slotArgs(slot, "open", "--key-file=-", dev, name)...)
	return err
}

// slotArgs adds --key-slot after the command when a keyslot is named: cryptsetup then
// derives that keyslot's key only, instead of trying each keyslot's KDF in turn (about 0.1 s
// each in an emulated guest).
func slotArgs(slot int, cmd string, args ...string) []string {
	out := []string{cmd}
	if slot != AnySlot {
		out = append(out, "--key-slot", strconv.Itoa(slot))
	}
	return append(out, args...)
}

// AddKey adds newPass in a new keyslot, authorised by an existing passphrase, and returns
// the keyslot number. The new passphrase is 256 random bits (a TPM-sealed key), so its
// keyslot gets systemd-cryptenroll's minimal KDF (systemd/systemd src/shared/cryptsetup-util.c,
// cryptsetup_set_minimal_pbkdf: PBKDF2, SHA-512, 1000 iterations). cryptsetup uses the
// keyslot's hash for its anti-forensic splitter too, where SHA-512 needs half the digests of
// SHA-256 for a 512-bit key: a quarter less CPU per unlock (78 vs 105 million instructions
// under valgrind).
func (c Cryptsetup) AddKey(ctx context.Context, dev string, existing, newPass []byte) (int, error) {
	before, err := c.Metadata(ctx, dev)
	if err != nil {
		return 0, err
	}
	if _, err := c.run(ctx, existing, newPass, "luksAddKey", "--batch-mode", "--key-file=-",
		"--pbkdf", "pbkdf2", "--hash", "sha512", "--pbkdf-force-iterations", "1000", dev, "/proc/self/fd/3"); err != nil {
		return 0, err
	}
	after, err := c.Metadata(ctx, dev)
	if err != nil {
		return 0, err
	}
	for k := range after.Keyslots {
		if _, ok := before.Keyslots[k]; !ok {
			return strconv.Atoi(k)
		}
	}
	return 0, fmt.Errorf("luksAddKey on %s: no new keyslot appeared", dev)
}

// KillSlot removes a keyslot, authorised by a passphrase of another slot.
func (c Cryptsetup) KillSlot(ctx context.Context, dev string, slot int, auth []byte) error {
	_, err := c.run(ctx, auth, nil, "luksKillSlot", "--batch-mode", "--key-file=-", dev, strconv.Itoa(slot))
	return err
}

// Metadata is the part of the LUKS2 JSON metadata we read.
type Metadata struct {
	Keyslots map[string]json.RawMessage `json:"keyslots"`
	Tokens   map[string]json.RawMessage `json:"tokens"`
}

// Metadata reads the LUKS2 JSON metadata in Go (ReadMetadata: no cryptsetup process, a tenth
// of a second in an emulated guest), and through cryptsetup luksDump when that fails
// (cryptsetup also repairs a damaged copy). A read after a cryptsetup command sees that
// command's header: its writes, buffered or direct, and this read meet in the page cache.
func (c Cryptsetup) Metadata(ctx context.Context, dev string) (*Metadata, error) {
	if f, err := os.Open(dev); err == nil {
		md, rerr := ReadMetadata(f)
		f.Close()
		if rerr == nil {
			return md, nil
		}
	}
	return c.Dump(ctx, dev)
}

// Dump reads the LUKS2 JSON metadata with cryptsetup luksDump.
func (c Cryptsetup) Dump(ctx context.Context, dev string) (*Metadata, error) {
	out, err := c.run(ctx, nil, nil, "luksDump", "--dump-json-metadata", dev)
	if err != nil {
		return nil, err
	}
	var m Metadata
	if err := json.Unmarshal(out, &m); err != nil {
		return nil, fmt.Errorf("luksDump %s: %w", dev, err)
	}
	return &m, nil
}

// ImportToken stores a JSON token in the LUKS2 header (at tokenID, replacing it).
func (c Cryptsetup) ImportToken(ctx context.Context, dev string, tokenID int, token []byte) error {
	_, err := c.run(ctx, token, nil, "token", "import", "--token-replace", "--token-id", strconv.Itoa(tokenID), dev)
	return err
}
