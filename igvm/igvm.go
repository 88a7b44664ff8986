// Package igvm reads and writes IGVM files (Microsoft's Independent Guest Virtual Machine
// format, version 1) and computes the SEV-SNP launch digest of the SNP-applicable directives
// exactly as PROTOCOLS.md §5 (and `igvmmeasure -b`) define it.
//
// File layout: a 24-byte fixed header, variable headers (type u32, length u32, body, padded to
// 8 bytes) in the order platform → initialization → directive headers, then the file data the
// headers point at (page contents, VP contexts, initial parameter data).
package igvm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Fixed header.
const (
	Magic           = 0x4D564749 // "IGVM"
	FormatVersion1  = 1
	fixedHeaderSize = 24
	PageSize4K      = 4096
	PageSize2M      = 2 << 20
)

// Variable header types.
const (
	TypeSupportedPlatform uint32 = 0x001
	TypeGuestPolicy       uint32 = 0x101
	TypeParameterArea     uint32 = 0x301
	TypePageData          uint32 = 0x302
	TypeParameterInsert   uint32 = 0x303
	TypeVPContext         uint32 = 0x304
	TypeRequiredMemory    uint32 = 0x305
)

// Platform types of IGVM_VHS_SUPPORTED_PLATFORM.
const (
	PlatformVSM    = 1
	PlatformSEVSNP = 2
	PlatformTDX    = 3
)

// Page data flags and types.
const (
	Flag2MB        uint32 = 1 << 0
	FlagUnmeasured uint32 = 1 << 1
	FlagShared     uint32 = 1 << 2

	DataNormal  uint16 = 0
	DataSecrets uint16 = 1
	DataCPUID   uint16 = 2
	DataCPUIDXF uint16 = 3
)

// Bounds on what a reader accepts.
const (
	MaxHeaders  = 1 << 20
	MaxFileSize = 1 << 32
)

// Header is one variable header.
type Header interface{ headerType() uint32 }

// SupportedPlatform declares a platform and its compatibility mask bit.
type SupportedPlatform struct {
	CompatMask        uint32
	HighestVTL        uint8
	PlatformType      uint8
	PlatformVersion   uint16
	SharedGPABoundary uint64
}

// GuestPolicy is the platform's guest policy (for SNP, the POLICY field).
type GuestPolicy struct {
	Policy     uint64
	CompatMask uint32
}

// ParameterArea declares a parameter area the loader fills at launch; Initial, when set,
// is its initial content from the file.
type ParameterArea struct {
	Bytes   uint64
	Index   uint32
	Initial []byte
}

// PageData is one page (4 KiB, or 2 MiB with Flag2MB) at GPA. Data empty means a zero page;
// shorter data is zero-padded.
type PageData struct {
	GPA        uint64
	CompatMask uint32
	Flags      uint32
	DataType   uint16
	Data       []byte
}

// ParameterInsert places parameter area Index at GPA.
type ParameterInsert struct {
	GPA        uint64
	CompatMask uint32
	Index      uint32
}

// VPContext is a virtual processor's initial state; for SNP, a VMSA page at GPA.
type VPContext struct {
	GPA        uint64
	CompatMask uint32
	VPIndex    uint16
	Data       []byte
}

// RequiredMemory declares memory the guest needs.
type RequiredMemory struct {
	GPA        uint64
	CompatMask uint32
	Bytes      uint32
	Flags      uint32
}

// Unknown keeps any other header verbatim (it is written back unchanged).
type Unknown struct {
	Type uint32
	Body []byte
}

func (SupportedPlatform) headerType() uint32 { return TypeSupportedPlatform }
func (GuestPolicy) headerType() uint32       { return TypeGuestPolicy }
func (ParameterArea) headerType() uint32     { return TypeParameterArea }
func (PageData) headerType() uint32          { return TypePageData }
func (ParameterInsert) headerType() uint32   { return TypeParameterInsert }
func (VPContext) headerType() uint32         { return TypeVPContext }
func (RequiredMemory) headerType() uint32    { return TypeRequiredMemory }
func (u Unknown) headerType() uint32         { return u.Type }

// File is a parsed IGVM file: its headers in file order.
type File struct {
	Headers []Header
}

// pageSize of a page data header.
func (p *PageData) pageSize() int {
	if p.Flags&Flag2MB != 0 {
		return PageSize2M
	}
	return PageSize4K
}

// Marshal writes the file.
func (f *File) Marshal() ([]byte, error) {
	var vh bytes.Buffer
	var data bytes.Buffer
	type fix struct{ at, dataOff int }
	var fixes []fix // file offsets to patch once the header size is known
	put := func(typ uint32, body []byte) {
		_ = binary.Write(&vh, binary.LittleEndian, typ)
		_ = binary.Write(&vh, binary.LittleEndian, uint32(len(body)))
		vh.Write(body)
		for vh.Len()%8 != 0 {
			vh.WriteByte(0)
		}
	}
	addData := func(b []byte, size int) int {
		off := data.Len()
		data.Write(b)
		data.Write(make([]byte, size-len(b)))
		return off
	}
	le := binary.LittleEndian
	for _, h := range f.Headers {
		var b []byte
		switch h := h.(type) {
		case SupportedPlatform:
			b = make([]byte, 16)
			le.PutUint32(b[0:], h.CompatMask)
			b[4], b[5] = h.HighestVTL, h.PlatformType
			le.PutUint16(b[6:], h.PlatformVersion)
			le.PutUint64(b[8:], h.SharedGPABoundary)
		case GuestPolicy:
			b = make([]byte, 16)
			le.PutUint64(b[0:], h.Policy)
			le.PutUint32(b[8:], h.CompatMask)
		case ParameterArea:
			b = make([]byte, 16)
			le.PutUint64(b[0:], h.Bytes)
			le.PutUint32(b[8:], h.Index)
			if len(h.Initial) > 0 {
				if uint64(len(h.Initial)) > h.Bytes {
					return nil, fmt.Errorf("parameter area %d: %d initial bytes exceed its %d", h.Index, len(h.Initial), h.Bytes)
				}
				fixes = append(fixes, fix{vh.Len() + 8 + 12, addData(h.Initial, int(h.Bytes))})
			}
		case PageData:
			b = make([]byte, 24)
			le.PutUint64(b[0:], h.GPA)
			le.PutUint32(b[8:], h.CompatMask)
			le.PutUint32(b[16:], h.Flags)
			le.PutUint16(b[20:], h.DataType)
			if len(h.Data) > h.pageSize() {
				return nil, fmt.Errorf("page data at %#x: %d bytes exceed the page", h.GPA, len(h.Data))
			}
			if len(h.Data) > 0 {
				fixes = append(fixes, fix{vh.Len() + 8 + 12, addData(h.Data, h.pageSize())})
			}
		case ParameterInsert:
			b = make([]byte, 16)
			le.PutUint64(b[0:], h.GPA)
			le.PutUint32(b[8:], h.CompatMask)
			le.PutUint32(b[12:], h.Index)
		case VPContext:
			b = make([]byte, 24)
			le.PutUint64(b[0:], h.GPA)
			le.PutUint32(b[8:], h.CompatMask)
			le.PutUint16(b[16:], h.VPIndex)
			if len(h.Data) > PageSize4K {
				return nil, fmt.Errorf("VP context: %d bytes exceed a page", len(h.Data))
			}
			fixes = append(fixes, fix{vh.Len() + 8 + 12, addData(h.Data, PageSize4K)})
		case RequiredMemory:
			b = make([]byte, 24)
			le.PutUint64(b[0:], h.GPA)
			le.PutUint32(b[8:], h.CompatMask)
			le.PutUint32(b[12:], h.Bytes)
			le.PutUint32(b[16:], h.Flags)
		case Unknown:
			b = h.Body
		default:
			return nil, fmt.Errorf("igvm: cannot write header %T", h)
		}
		put(h.headerType(), b)
	}
	base := fixedHeaderSize + vh.Len()
	out := make([]byte, base+data.Len())
	copy(out[fixedHeaderSize:], vh.Bytes())
	copy(out[base:], data.Bytes())
	for _, fx := range fixes {
		le.PutUint32(out[fixedHeaderSize+fx.at:], uint32(base+fx.dataOff))
	}
	if uint64(len(out)) >= MaxFileSize {
		return nil, fmt.Errorf("igvm: file of %d bytes is too large", len(out))
	}
	le.PutUint32(out[0:], Magic)
	le.PutUint32(out[4:], FormatVersion1)
	le.PutUint32(out[8:], fixedHeaderSize)
	le.PutUint32(out[12:], uint32(vh.Len()))
	le.PutUint32(out[16:], uint32(len(out)))
	le.PutUint32(out[20:], crc32.ChecksumIEEE(out[:base]))
	return out, nil
}

// Parse reads an IGVM file, checking every offset and length against the file.
func Parse(b []byte) (*File, error) {
	le := binary.LittleEndian
	if len(b) < fixedHeaderSize {
		return nil, fmt.Errorf("igvm: %d bytes, shorter than the fixed header", len(b))
	}
	if le.Uint32(b[0:]) != Magic {
		return nil, errors.New("igvm: bad magic")
	}
	if v := le.Uint32(b[4:]); v != 1 && v != 2 {
		return nil, fmt.Errorf("igvm: format version %d not supported", v)
	}
	vhOff, vhSize, total := uint64(le.Uint32(b[8:])), uint64(le.Uint32(b[12:])), uint64(le.Uint32(b[16:]))
	if total != uint64(len(b)) {
		return nil, fmt.Errorf("igvm: header says %d bytes, file has %d", total, len(b))
	}
	if vhOff < fixedHeaderSize || vhOff+vhSize > total {
		return nil, fmt.Errorf("igvm: variable headers [%d, +%d) outside the file", vhOff, vhSize)
	}
	sum := make([]byte, vhOff+vhSize)
	copy(sum, b[:vhOff+vhSize])
	le.PutUint32(sum[20:], 0)
	if got, want := le.Uint32(b[20:]), crc32.ChecksumIEEE(sum); got != want {
		return nil, fmt.Errorf("igvm: checksum %08x, computed %08x", got, want)
	}
	fileData := func(off uint32, n int, what string) ([]byte, error) {
		if off == 0 {
			return nil, nil
		}
		end := uint64(off) + uint64(n)
		if uint64(off) < vhOff+vhSize || end > total {
			return nil, fmt.Errorf("igvm: %s data [%d, +%d) outside the file data", what, off, n)
		}
		return bytes.Clone(b[off:end]), nil
	}
	f := &File{}
	r := b[vhOff : vhOff+vhSize]
	for len(r) > 0 {
		if len(f.Headers) >= MaxHeaders {
			return nil, fmt.Errorf("igvm: more than %d headers", MaxHeaders)
		}
		if len(r) < 8 {
			return nil, errors.New("igvm: truncated variable header")
		}
		typ, n := le.Uint32(r), uint64(le.Uint32(r[4:]))
		if n > uint64(len(r)-8) {
			return nil, fmt.Errorf("igvm: header type %#x length %d exceeds the header area", typ, n)
		}
		body := r[8 : 8+n]
		padded := (8 + n + 7) &^ 7
		if padded > uint64(len(r)) {
			padded = uint64(len(r))
		}
		r = r[padded:]
		want := map[uint32]uint64{TypeSupportedPlatform: 16, TypeGuestPolicy: 16, TypeParameterArea: 16,
			TypePageData: 24, TypeParameterInsert: 16, TypeVPContext: 24, TypeRequiredMemory: 24}
		if w, ok := want[typ]; ok && n != w {
			return nil, fmt.Errorf("igvm: header type %#x has length %d, want %d", typ, n, w)
		}
		var err error
		switch typ {
		case TypeSupportedPlatform:
			f.Headers = append(f.Headers, SupportedPlatform{CompatMask: le.Uint32(body), HighestVTL: body[4], PlatformType: body[5],
				PlatformVersion: le.Uint16(body[6:]), SharedGPABoundary: le.Uint64(body[8:])})
		case TypeGuestPolicy:
			f.Headers = append(f.Headers, GuestPolicy{Policy: le.Uint64(body), CompatMask: le.Uint32(body[8:])})
		case TypeParameterArea:
			h := ParameterArea{Bytes: le.Uint64(body), Index: le.Uint32(body[8:])}
			if h.Bytes > 1<<30 {
				return nil, fmt.Errorf("igvm: parameter area of %d bytes", h.Bytes)
			}
			if h.Initial, err = fileData(le.Uint32(body[12:]), int(h.Bytes), "parameter area"); err != nil {
				return nil, err
			}
			f.Headers = append(f.Headers, h)
		case TypePageData:
			h := PageData{GPA: le.Uint64(body), CompatMask: le.Uint32(body[8:]), Flags: le.Uint32(body[16:]), DataType: le.Uint16(body[20:])}
			if h.GPA%PageSize4K != 0 {
				return nil, fmt.Errorf("igvm: page data at unaligned GPA %#x", h.GPA)
			}
			if h.Data, err = fileData(le.Uint32(body[12:]), h.pageSize(), "page"); err != nil {
				return nil, err
			}
			f.Headers = append(f.Headers, h)
		case TypeParameterInsert:
			f.Headers = append(f.Headers, ParameterInsert{GPA: le.Uint64(body), CompatMask: le.Uint32(body[8:]), Index: le.Uint32(body[12:])})
		case TypeVPContext:
			h := VPContext{GPA: le.Uint64(body), CompatMask: le.Uint32(body[8:]), VPIndex: le.Uint16(body[16:])}
			if h.Data, err = fileData(le.Uint32(body[12:]), PageSize4K, "VP context"); err != nil {
				return nil, err
			}
			f.Headers = append(f.Headers, h)
		case TypeRequiredMemory:
			f.Headers = append(f.Headers, RequiredMemory{GPA: le.Uint64(body), CompatMask: le.Uint32(body[8:]), Bytes: le.Uint32(body[12:]), Flags: le.Uint32(body[16:])})
		default:
			f.Headers = append(f.Headers, Unknown{Type: typ, Body: bytes.Clone(body)})
		}
	}
	return f, nil
}
