package svsm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/svsm-e2e/svsm-e2e/svsm/statestore"
	"github.com/svsm-e2e/svsm-e2e/svsm/vtpm"
)

// The plaintext of a state slot (docs/state-format.md): magic, version, section count, then
// sections of (type u16, reserved u16, length u32, data).
var bodyMagic = []byte("SVSMBODY")

const (
	bodyVersion    = 1
	sectionTPM     = 1
	sectionUEFI    = 2
	sectionHeader  = 8
	bodyHeaderSize = 8 + 2 + 2
)

type body struct {
	tpmNV []byte
	uefi  []byte
}

func (b *body) marshal() ([]byte, error) {
	var out bytes.Buffer
	out.Write(bodyMagic)
	_ = binary.Write(&out, binary.LittleEndian, uint16(bodyVersion))
	_ = binary.Write(&out, binary.LittleEndian, uint16(2))
	for _, s := range []struct {
		typ  uint16
		data []byte
	}{{sectionTPM, b.tpmNV}, {sectionUEFI, b.uefi}} {
		_ = binary.Write(&out, binary.LittleEndian, s.typ)
		_ = binary.Write(&out, binary.LittleEndian, uint16(0))
		_ = binary.Write(&out, binary.LittleEndian, uint32(len(s.data)))
		out.Write(s.data)
	}
	if out.Len() > statestore.MaxBodySize {
		return nil, fmt.Errorf("state body of %d bytes exceeds %d", out.Len(), statestore.MaxBodySize)
	}
	return out.Bytes(), nil
}

func parseBody(p []byte) (*body, error) {
	if len(p) < bodyHeaderSize || !bytes.Equal(p[:8], bodyMagic) {
		return nil, errors.New("state body: bad magic")
	}
	if v := binary.LittleEndian.Uint16(p[8:]); v != bodyVersion {
		return nil, fmt.Errorf("state body: version %d, want %d", v, bodyVersion)
	}
	n := int(binary.LittleEndian.Uint16(p[10:]))
	r := p[bodyHeaderSize:]
	var b body
	seen := map[uint16]bool{}
	for i := range n {
		if len(r) < sectionHeader {
			return nil, fmt.Errorf("state body: section %d truncated", i)
		}
		typ := binary.LittleEndian.Uint16(r)
		ln := binary.LittleEndian.Uint32(r[4:])
		r = r[sectionHeader:]
		if uint64(ln) > uint64(len(r)) {
			return nil, fmt.Errorf("state body: section %d length %d exceeds remaining %d", i, ln, len(r))
		}
		if seen[typ] {
			return nil, fmt.Errorf("state body: duplicate section type %d", typ)
		}
		seen[typ] = true
		data := r[:ln]
		r = r[ln:]
		switch typ {
		case sectionTPM:
			if len(data) != vtpm.NVSize {
				return nil, fmt.Errorf("state body: TPM NV section is %d bytes, want %d", len(data), vtpm.NVSize)
			}
			b.tpmNV = data
		case sectionUEFI:
			b.uefi = data
		default:
			return nil, fmt.Errorf("state body: unknown section type %d", typ)
		}
	}
	if len(r) != 0 {
		return nil, fmt.Errorf("state body: %d trailing bytes", len(r))
	}
	if b.tpmNV == nil || b.uefi == nil {
		return nil, errors.New("state body: TPM or UEFI section missing")
	}
	return &b, nil
}
