// Package igvm reads and writes IGVM files (Microsoft's Independent Guest Virtual Machine
// format, version 1) and computes the SEV-SNP launch digest of the SNP-applicable directives
// exactly as PROTOCOLS.md §5 (and `igvmmeasure -b`) define it.
//
// File layout: a fixed header (24 bytes in version 1, 32 in version 2: architecture and page
// size follow), variable headers (type u32, length u32, body, padded to 8 bytes) in the order
// platform → initialization → directive headers, then the file data the headers point at (page
// contents, VP contexts, initial parameter data).
//
// Byte compatibility with the microsoft/igvm crate (igvm_defs) is the rule: every header's
// length is the size of the crate's #[repr(C)] struct, whose little-endian integer types have
// alignment 1 where the crate says so (IGVM_VHS_VP_CONTEXT is 20 bytes, not 24), and identical
// file data is stored once, as the crate's FileDataSerializer does.
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
	Magic             = 0x4D564749 // "IGVM"
	FormatVersion1    = 1
	FormatVersion2    = 2
	fixedHeaderSize   = 24 // IGVM_FIXED_HEADER
	fixedHeaderSizeV2 = 32 // IGVM_FIXED_HEADER_V2: + architecture u32, page size u32
	PageSize4K        = 4096
	PageSize2M        = 2 << 20
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
	TypeVPCount           uint32 = 0x307
	TypeSRAT              uint32 = 0x308
	TypeMADT              uint32 = 0x309
	TypeMMIORanges        uint32 = 0x30A
	TypeSNPIDBlock        uint32 = 0x30B
	TypeMemoryMap         uint32 = 0x30C
	TypeErrorRange        uint32 = 0x30D
	TypeCommandLine       uint32 = 0x30E
	TypeSLIT              uint32 = 0x30F
	TypePPTT              uint32 = 0x310
	TypeDeviceTree        uint32 = 0x312
	TypeEnvironmentInfo   uint32 = 0x313

	// OptionalBit marks a header type a loader may ignore when it does not know it.
	OptionalBit uint32 = 1 << 31
)

// headerLen is each typed header's length: size_of the crate's struct (igvm_defs).
var headerLen = map[uint32]uint64{
	TypeSupportedPlatform: 16, // IGVM_VHS_SUPPORTED_PLATFORM
	TypeGuestPolicy:       16, // IGVM_VHS_GUEST_POLICY
	TypeParameterArea:     16, // IGVM_VHS_PARAMETER_AREA
	TypePageData:          24, // IGVM_VHS_PAGE_DATA
	TypeParameterInsert:   16, // IGVM_VHS_PARAMETER_INSERT
	TypeVPContext:         20, // IGVM_VHS_VP_CONTEXT: gpa is u64_le (align 1), so no tail padding
	TypeRequiredMemory:    24, // IGVM_VHS_REQUIRED_MEMORY
	TypeVPCount:           8,  // IGVM_VHS_PARAMETER
	TypeSRAT:              8,
	TypeMADT:              8,
	TypeMMIORanges:        8,
	TypeMemoryMap:         8,
	TypeCommandLine:       8,
	TypeSLIT:              8,
	TypePPTT:              8,
	TypeDeviceTree:        8,
	TypeEnvironmentInfo:   8,
	TypeSNPIDBlock:        SNPIDBlockSize, // IGVM_VHS_SNP_ID_BLOCK
	TypeErrorRange:        16,             // IGVM_VHS_ERROR_RANGE
}

// parameterTypes are the headers that are an IGVM_VHS_PARAMETER (area index, byte offset):
// where the loader deposits a piece of runtime information.
var parameterTypes = map[uint32]string{
	TypeVPCount: "vp-count", TypeSRAT: "srat", TypeMADT: "madt", TypeMMIORanges: "mmio-ranges",
	TypeMemoryMap: "memory-map", TypeCommandLine: "command-line", TypeSLIT: "slit", TypePPTT: "pptt",
	TypeDeviceTree: "device-tree", TypeEnvironmentInfo: "environment-info",
}

// Platform types of IGVM_VHS_SUPPORTED_PLATFORM.
const (
	PlatformNative = 0
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

// Parameter tells the loader to deposit one piece of runtime information (Type: VP count,
// memory map, command line, device tree, environment info, ACPI tables) at ByteOffset of
// parameter area AreaIndex.
type Parameter struct {
	Type       uint32
	AreaIndex  uint32
	ByteOffset uint32
}

// Name is the parameter's kind, e.g. "memory-map".
func (p Parameter) Name() string { return parameterTypes[p.Type] }

// SNPIDBlockSize is size_of IGVM_VHS_SNP_ID_BLOCK.
const SNPIDBlockSize = 696

// SNPIDBlock is the SEV-SNP ID block: LD is the launch digest the block's signer expects.
// Raw keeps the whole header (signatures and keys) for writing it back.
type SNPIDBlock struct {
	CompatMask uint32
	LD         [48]byte
	FamilyID   [16]byte
	ImageID    [16]byte
	Version    uint32
	GuestSVN   uint32
	Raw        []byte
}

// ErrorRange is GPA space the guest reports errors in (host visible).
type ErrorRange struct {
	GPA        uint64
	CompatMask uint32
	Size       uint32
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
func (p Parameter) headerType() uint32       { return p.Type }
func (SNPIDBlock) headerType() uint32        { return TypeSNPIDBlock }
func (ErrorRange) headerType() uint32        { return TypeErrorRange }
func (u Unknown) headerType() uint32         { return u.Type }

// File is a parsed IGVM file: its format version and headers in file order.
type File struct {
	// Version is the format version: 1 (default when zero) or 2 (needed for a native VP context).
	Version uint32
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
	stored := map[string]int{} // identical file data is stored once, as the crate does
	addData := func(b []byte, size int) int {
		padded := make([]byte, size)
		copy(padded, b)
		if off, ok := stored[string(padded)]; ok {
			return off
		}
		off := data.Len()
		data.Write(padded)
		stored[string(padded)] = off
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
			b = make([]byte, headerLen[TypeVPContext])
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
		case Parameter:
			if _, ok := parameterTypes[h.Type]; !ok {
				return nil, fmt.Errorf("igvm: %#x is not a parameter header type", h.Type)
			}
			b = make([]byte, 8)
			le.PutUint32(b[0:], h.AreaIndex)
			le.PutUint32(b[4:], h.ByteOffset)
		case SNPIDBlock:
			if len(h.Raw) != SNPIDBlockSize {
				return nil, fmt.Errorf("igvm: SNP ID block of %d bytes, want %d", len(h.Raw), SNPIDBlockSize)
			}
			b = h.Raw
		case ErrorRange:
			b = make([]byte, 16)
			le.PutUint64(b[0:], h.GPA)
			le.PutUint32(b[8:], h.CompatMask)
			le.PutUint32(b[12:], h.Size)
		case Unknown:
			b = h.Body
		default:
			return nil, fmt.Errorf("igvm: cannot write header %T", h)
		}
		put(h.headerType(), b)
	}
	version, fixed := uint32(FormatVersion1), fixedHeaderSize
	switch f.Version {
	case 0, FormatVersion1:
	case FormatVersion2:
		version, fixed = FormatVersion2, fixedHeaderSizeV2
	default:
		return nil, fmt.Errorf("igvm: cannot write format version %d", f.Version)
	}
	base := fixed + vh.Len()
	out := make([]byte, base+data.Len())
	copy(out[fixed:], vh.Bytes())
	copy(out[base:], data.Bytes())
	for _, fx := range fixes {
		le.PutUint32(out[fixed+fx.at:], uint32(base+fx.dataOff))
	}
	if uint64(len(out)) >= MaxFileSize {
		return nil, fmt.Errorf("igvm: file of %d bytes is too large", len(out))
	}
	le.PutUint32(out[0:], Magic)
	le.PutUint32(out[4:], version)
	le.PutUint32(out[8:], uint32(fixed))
	if version == FormatVersion2 {
		le.PutUint32(out[24:], 0) // architecture: X64
		le.PutUint32(out[28:], PageSize4K)
	}
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
	version := le.Uint32(b[4:])
	fixed := uint64(fixedHeaderSize)
	switch version {
	case FormatVersion1:
	case FormatVersion2:
		fixed = fixedHeaderSizeV2
		if len(b) < fixedHeaderSizeV2 {
			return nil, fmt.Errorf("igvm: %d bytes, shorter than the version 2 fixed header", len(b))
		}
		if arch := le.Uint32(b[24:]); arch != 0 {
			return nil, fmt.Errorf("igvm: architecture %d, only x64 (0) is supported", arch)
		}
		if ps := le.Uint32(b[28:]); ps != PageSize4K {
			return nil, fmt.Errorf("igvm: page size %d, only 4096 is supported", ps)
		}
	default:
		return nil, fmt.Errorf("igvm: format version %d not supported", version)
	}
	vhOff, vhSize, total := uint64(le.Uint32(b[8:])), uint64(le.Uint32(b[12:])), uint64(le.Uint32(b[16:]))
	if total != uint64(len(b)) {
		return nil, fmt.Errorf("igvm: header says %d bytes, file has %d", total, len(b))
	}
	if vhOff < fixed || vhOff%8 != 0 || vhOff+vhSize > total {
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
	f := &File{Version: version}
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
		if w, ok := headerLen[typ]; ok && n != w {
			return nil, fmt.Errorf("igvm: header type %#x has length %d, want %d (the size of the igvm crate's struct)", typ, n, w)
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
		case TypeVPCount, TypeSRAT, TypeMADT, TypeMMIORanges, TypeMemoryMap, TypeCommandLine, TypeSLIT, TypePPTT, TypeDeviceTree, TypeEnvironmentInfo:
			f.Headers = append(f.Headers, Parameter{Type: typ, AreaIndex: le.Uint32(body), ByteOffset: le.Uint32(body[4:])})
		case TypeSNPIDBlock:
			h := SNPIDBlock{CompatMask: le.Uint32(body), Version: le.Uint32(body[88:]), GuestSVN: le.Uint32(body[92:]), Raw: bytes.Clone(body)}
			copy(h.LD[:], body[8:56])
			copy(h.FamilyID[:], body[56:72])
			copy(h.ImageID[:], body[72:88])
			f.Headers = append(f.Headers, h)
		case TypeErrorRange:
			f.Headers = append(f.Headers, ErrorRange{GPA: le.Uint64(body), CompatMask: le.Uint32(body[8:]), Size: le.Uint32(body[12:])})
		default:
			f.Headers = append(f.Headers, Unknown{Type: typ, Body: bytes.Clone(body)})
		}
	}
	return f, nil
}
