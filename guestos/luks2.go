package guestos

import (
	"bytes"
	"crypto"
	_ "crypto/sha1" // LUKS2 header checksum algorithms cryptsetup accepts
	_ "crypto/sha256"
	_ "crypto/sha512"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"slices"
)

// The LUKS2 on-disk header (cryptsetup's docs/on-disk-format-luks2.pdf and
// lib/luks2/luks2_disk_metadata.c): two copies, each a 4096-byte binary header followed by
// the JSON area, hdr_size bytes in all, the second copy at offset hdr_size.
const (
	luks2BinHeaderSize = 4096
	luks2CsumOffset    = 448 // csum[64], zeroed while the checksum is computed
	luks2CsumSize      = 64
)

var (
	luks2MagicPrimary   = []byte("LUKS\xba\xbe")
	luks2MagicSecondary = []byte("SKUL\xba\xbe")
	// luks2HeaderSizes are the hdr_size values cryptsetup accepts (16 KiB to 4 MiB).
	luks2HeaderSizes = []uint64{16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20}
	luks2Checksums   = map[string]crypto.Hash{"sha1": crypto.SHA1, "sha256": crypto.SHA256, "sha512": crypto.SHA512}
)

// ReadMetadata reads a LUKS2 device's JSON metadata without running cryptsetup, choosing the
// header copy as cryptsetup does: each copy must carry its magic, version 2, an accepted
// size, its own offset, a matching checksum and JSON that parses; of two valid copies the one
// with the higher sequence number wins (the primary on a tie). When the primary is unreadable the secondary
// is looked for at every accepted size. Every length is bounded (4 MiB per copy).
//
// The device is the host's to alter: what this returns is only a hint (which token and
// keyslot to try); cryptsetup checks the header again when it opens the device, and the
// token's secret is sealed to the TPM.
func ReadMetadata(dev io.ReaderAt) (*Metadata, error) {
	primary, perr := readLUKS2Copy(dev, 0, luks2MagicPrimary)
	offsets := luks2HeaderSizes
	if perr == nil {
		offsets = []uint64{primary.size}
	}
	var secondary *luks2Copy
	var serr error
	for _, off := range offsets {
		if secondary, serr = readLUKS2Copy(dev, off, luks2MagicSecondary); serr == nil {
			break
		}
	}
	var use *luks2Copy
	switch {
	case perr == nil && serr == nil:
		use = primary
		if secondary.seqid > primary.seqid {
			use = secondary
		}
	case perr == nil:
		use = primary
	case serr == nil:
		use = secondary
	default:
		return nil, fmt.Errorf("no valid LUKS2 header: primary: %v; secondary: %v", perr, serr)
	}
	return use.md, nil
}

type luks2Copy struct {
	offset, size, seqid uint64
	md                  *Metadata
}

// readLUKS2Copy reads and checks the header copy at off.
func readLUKS2Copy(dev io.ReaderAt, off uint64, magic []byte) (*luks2Copy, error) {
	bin := make([]byte, luks2BinHeaderSize)
	if _, err := dev.ReadAt(bin, int64(off)); err != nil {
		return nil, fmt.Errorf("read header at %d: %w", off, err)
	}
	if !bytes.Equal(bin[:6], magic) {
		return nil, fmt.Errorf("header at %d: bad magic %q", off, bin[:6])
	}
	if v := binary.BigEndian.Uint16(bin[6:8]); v != 2 {
		return nil, fmt.Errorf("header at %d: version %d, want 2", off, v)
	}
	c := &luks2Copy{offset: off, size: binary.BigEndian.Uint64(bin[8:16]), seqid: binary.BigEndian.Uint64(bin[16:24])}
	if !slices.Contains(luks2HeaderSizes, c.size) {
		return nil, fmt.Errorf("header at %d: hdr_size %d is not a LUKS2 header size", off, c.size)
	}
	if at := binary.BigEndian.Uint64(bin[256:264]); at != off {
		return nil, fmt.Errorf("header at %d says it is at %d", off, at)
	}
	alg := string(bytes.TrimRight(bin[72:104], "\x00"))
	h, ok := luks2Checksums[alg]
	if !ok {
		return nil, fmt.Errorf("header at %d: checksum algorithm %q", off, alg)
	}
	area := make([]byte, c.size-luks2BinHeaderSize)
	if _, err := dev.ReadAt(area, int64(off+luks2BinHeaderSize)); err != nil {
		return nil, fmt.Errorf("read JSON area at %d: %w", off, err)
	}
	sum := h.New()
	want := bytes.Clone(bin[luks2CsumOffset : luks2CsumOffset+h.Size()])
	clear(bin[luks2CsumOffset : luks2CsumOffset+luks2CsumSize])
	sum.Write(bin)
	sum.Write(area)
	if !bytes.Equal(sum.Sum(nil), want) {
		return nil, fmt.Errorf("header at %d: checksum mismatch", off)
	}
	if i := bytes.IndexByte(area, 0); i >= 0 {
		area = area[:i]
	}
	if len(area) == 0 {
		return nil, fmt.Errorf("header at %d: empty JSON area", off)
	}
	// A copy whose JSON does not parse is a bad copy, as for cryptsetup: the other one counts.
	c.md = &Metadata{}
	if err := json.Unmarshal(area, c.md); err != nil {
		return nil, fmt.Errorf("header at %d: JSON metadata: %w", off, err)
	}
	return c, nil
}
