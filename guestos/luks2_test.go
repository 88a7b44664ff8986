package guestos

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"testing"
)

// luksImage formats a small LUKS2 image with cryptsetup (as the harness formats data disks),
// adds a second keyslot and a token; it skips without cryptsetup.
func luksImage(t *testing.T) (string, Cryptsetup) {
	t.Helper()
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Skip("cryptsetup not installed (Debian package cryptsetup-bin; make test installs it)")
	}
	path := filepath.Join(t.TempDir(), "luks.img")
	if err := os.WriteFile(path, make([]byte, 20<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file=-", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", path)
	cmd.Stdin = bytes.NewReader([]byte("recovery"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("luksFormat: %v\n%s", err, out)
	}
	var c Cryptsetup
	ctx := context.Background()
	// AddKey finds the new keyslot by reading the header before and after (Metadata).
	if slot, err := c.AddKey(ctx, path, []byte("recovery"), []byte("tpm")); err != nil || slot != 1 {
		t.Fatalf("AddKey = slot %d, %v; want the new keyslot 1", slot, err)
	}
	if err := c.ImportToken(ctx, path, tokenID, []byte(`{"type":"svsm-e2e-tpm2","keyslots":["1"],"svsm-e2e-pcrs":[4,7],"svsm-e2e-pcr-bank":"sha256","svsm-e2e-sealed":"AAEC"}`)); err != nil {
		t.Fatal(err)
	}
	return path, c
}

// TestTPMKeyslotAsSystemdCryptenroll: the keyslot AddKey creates has systemd-cryptenroll's
// minimal KDF (systemd/systemd 00923bf3 src/shared/cryptsetup-util.c, cryptsetup_set_minimal_pbkdf:
// PBKDF2, SHA-512, 1000 iterations), and cryptsetup's splitter uses the same hash.
func TestTPMKeyslotAsSystemdCryptenroll(t *testing.T) {
	path, c := luksImage(t)
	md, err := c.Metadata(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	var slot struct {
		KDF struct {
			Type       string `json:"type"`
			Hash       string `json:"hash"`
			Iterations int    `json:"iterations"`
		} `json:"kdf"`
		AF struct {
			Hash    string `json:"hash"`
			Stripes int    `json:"stripes"`
		} `json:"af"`
	}
	if err := json.Unmarshal(md.Keyslots["1"], &slot); err != nil {
		t.Fatal(err)
	}
	if slot.KDF.Type != "pbkdf2" || slot.KDF.Hash != "sha512" || slot.KDF.Iterations != 1000 || slot.AF.Hash != "sha512" {
		t.Fatalf("TPM keyslot kdf %+v af %+v; want pbkdf2/sha512/1000 with a sha512 splitter", slot.KDF, slot.AF)
	}
}

// sameMetadata compares two readings by meaning (cryptsetup pretty-prints).
func sameMetadata(t *testing.T, got, want *Metadata) {
	t.Helper()
	norm := func(m *Metadata) map[string]any {
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var v map[string]any
		if err := json.Unmarshal(b, &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	if g, w := norm(got), norm(want); !reflect.DeepEqual(g, w) {
		t.Fatalf("ReadMetadata = %v\ncryptsetup luksDump = %v", g, w)
	}
}

func readMetadataFile(t *testing.T, path string) (*Metadata, error) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return ReadMetadata(f)
}

// TestReadMetadataAgreesWithCryptsetup: the Go reader picks the header copy cryptsetup's
// luksDump picks: both current; the primary damaged; a stale but valid copy on either side
// (the higher sequence number wins); both damaged (an error, as cryptsetup).
func TestReadMetadataAgreesWithCryptsetup(t *testing.T) {
	path, c := luksImage(t)
	ctx := context.Background()
	const hdr = 16 << 10 // cryptsetup's default LUKS2 header size
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// A copy of both headers before a change: valid, one sequence number lower.
	stale := bytes.Clone(orig[:2*hdr])
	if err := c.ImportToken(ctx, path, tokenID, []byte(`{"type":"svsm-e2e-tpm2","keyslots":["1"],"svsm-e2e-pcrs":[4,7,8,9],"svsm-e2e-pcr-bank":"sha256","svsm-e2e-sealed":"AwQF"}`)); err != nil {
		t.Fatal(err)
	}
	current, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		mutate func(img []byte)
		fails  bool
	}{
		{"both-current", func([]byte) {}, false},
		{"primary-json-damaged", func(img []byte) { img[4096+10] ^= 1 }, false},
		{"primary-magic-damaged", func(img []byte) { img[0] = 'X' }, false},
		{"stale-secondary", func(img []byte) { copy(img[hdr:2*hdr], stale[hdr:]) }, false},
		{"stale-primary", func(img []byte) { copy(img[:hdr], stale[:hdr]) }, false},
		{"primary-json-unparsable-checksum-valid", func(img []byte) {
			copy(img[4096:], "{\"keyslots\":[") // an array where an object was: not LUKS2 JSON
			clear(img[luks2CsumOffset : luks2CsumOffset+luks2CsumSize])
			sum := sha256.Sum256(img[:hdr])
			copy(img[luks2CsumOffset:], sum[:])
		}, false},
		{"both-damaged", func(img []byte) { img[4096+10] ^= 1; img[hdr+4096+10] ^= 1 }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := bytes.Clone(current)
			tc.mutate(img)
			if err := os.WriteFile(path, img, 0o600); err != nil {
				t.Fatal(err)
			}
			// The Go reader first: cryptsetup repairs a damaged or stale copy it loads.
			got, err := readMetadataFile(t, path)
			want, derr := c.Dump(ctx, path)
			switch {
			case tc.fails && (err == nil || derr == nil):
				t.Fatalf("damaged headers read: ReadMetadata err %v, luksDump err %v", err, derr)
			case tc.fails:
				return
			case derr != nil:
				t.Fatalf("luksDump: %v", derr)
			case err != nil:
				t.Fatalf("ReadMetadata: %v", err)
			}
			sameMetadata(t, got, want)
			var tok Token
			if err := json.Unmarshal(got.Tokens["0"], &tok); err != nil || len(tok.PCRs) != 4 {
				t.Fatalf("token read = %+v (%v), want the current one (4 PCRs)", tok, err)
			}
		})
	}
}

// FuzzReadMetadata: any bytes give a metadata or an error, never a panic or a read beyond
// the bounds.
func FuzzReadMetadata(f *testing.F) {
	hdr := make([]byte, 16<<10)
	copy(hdr, luks2MagicPrimary)
	hdr[7] = 2
	hdr[8+6] = 0x40 // hdr_size 16384
	copy(hdr[72:], "sha256")
	copy(hdr[4096:], `{"keyslots":{},"tokens":{}}`)
	f.Add(hdr)
	f.Add([]byte("LUKS\xba\xbe\x00\x02"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ReadMetadata(bytes.NewReader(b))
		if err == nil && m == nil {
			t.Fatal("nil metadata without an error")
		}
	})
}

// luks2Header builds one header copy of size 16 KiB at off with a valid checksum.
func luks2Header(magic []byte, off, seqid uint64, js []byte) []byte {
	const size = 16 << 10
	h := make([]byte, size)
	copy(h, magic)
	binary.BigEndian.PutUint16(h[6:8], 2)
	binary.BigEndian.PutUint64(h[8:16], size)
	binary.BigEndian.PutUint64(h[16:24], seqid)
	copy(h[72:], "sha256")
	binary.BigEndian.PutUint64(h[256:264], off)
	copy(h[luks2BinHeaderSize:], js)
	sum := sha256.Sum256(h)
	copy(h[luks2CsumOffset:], sum[:])
	return h
}

// FuzzReadMetadataJSON: headers with valid checksums around arbitrary JSON areas and sequence
// numbers reach the JSON parser and the choice between copies: a metadata or an error, and
// with two valid copies the one with the higher sequence number (the primary on a tie).
func FuzzReadMetadataJSON(f *testing.F) {
	f.Add([]byte(`{"keyslots":{"0":{}},"tokens":{"0":{"type":"a"}}}`), []byte(`{"keyslots":{},"tokens":{}}`), uint64(3), uint64(2))
	f.Add([]byte(`{"tokens":{"0":{"keyslots":["1"]}}}`), []byte(`{"tokens":{"1":{}}}`), uint64(1), uint64(9))
	f.Add([]byte("\x00"), []byte(`{`), uint64(0), uint64(0))
	f.Fuzz(func(t *testing.T, js1, js2 []byte, seq1, seq2 uint64) {
		const size = 16 << 10
		if len(js1) > size-luks2BinHeaderSize || len(js2) > size-luks2BinHeaderSize {
			return
		}
		img := append(luks2Header(luks2MagicPrimary, 0, seq1, js1), luks2Header(luks2MagicSecondary, size, seq2, js2)...)
		m, err := ReadMetadata(bytes.NewReader(img))
		// The oracle: a copy counts when its JSON area (up to the first NUL) is not empty and
		// parses; of two that count, the higher sequence number wins, the primary on a tie.
		parse := func(js []byte) *Metadata {
			if i := bytes.IndexByte(js, 0); i >= 0 {
				js = js[:i]
			}
			var md Metadata
			if len(js) == 0 || json.Unmarshal(js, &md) != nil {
				return nil
			}
			return &md
		}
		w1, w2 := parse(js1), parse(js2)
		want := w1
		if w2 != nil && (w1 == nil || seq2 > seq1) {
			want = w2
		}
		switch {
		case want == nil && err == nil:
			t.Fatalf("read %+v from two bad copies", m)
		case want == nil:
			return
		case err != nil:
			t.Fatalf("a valid copy was not read: %v", err)
		case len(m.Tokens) != len(want.Tokens) || len(m.Keyslots) != len(want.Keyslots):
			t.Fatalf("read %d tokens %d keyslots, the copy that counts holds %d and %d", len(m.Tokens), len(m.Keyslots), len(want.Tokens), len(want.Keyslots))
		}
	})
}
