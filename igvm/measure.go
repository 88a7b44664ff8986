package igvm

import (
	"crypto/sha512"
	"encoding/binary"
	"errors"
	"fmt"
)

// SNP page types of PAGE_INFO (SEV-SNP ABI, SNP_LAUNCH_UPDATE).
const (
	PageNormal     = 1
	PageVMSA       = 2
	PageZero       = 3
	PageUnmeasured = 4
	PageSecrets    = 5
	PageCPUID      = 6
)

// MeasuredPage is one step of the digest chain.
type MeasuredPage struct {
	GPA      uint64
	Type     uint8
	Contents [48]byte // SHA-384 of the page for normal and VMSA pages, else zero
	Digest   [48]byte // the launch digest after this page
}

// MeasureOptions select the igvmmeasure variants.
type MeasureOptions struct {
	// NativeZero measures empty page data as SNP zero pages; otherwise as normal pages of zeros.
	NativeZero bool
}

// MeasureSNP computes the SEV-SNP launch digest over the directives applicable to the
// file's SEV-SNP platform, in file order (PROTOCOLS.md §5): starting from 48 zero bytes,
// digest = SHA-384(digest ‖ contents ‖ 0x70 u16 ‖ type ‖ imi=0 ‖ 0 ‖ vmpl perms 0,0,0 ‖ gpa u64)
// per 4 KiB page. Shared pages and required-memory declarations are not measured; parameter
// inserts are unmeasured pages (the loader fills them).
func MeasureSNP(f *File, o MeasureOptions) ([48]byte, []MeasuredPage, error) {
	var mask uint32
	for _, h := range f.Headers {
		if p, ok := h.(SupportedPlatform); ok && p.PlatformType == PlatformSEVSNP {
			mask = p.CompatMask
		}
	}
	if mask == 0 {
		return [48]byte{}, nil, errors.New("igvm: the file declares no SEV-SNP platform")
	}
	areas := map[uint32]uint64{}
	var digest [48]byte
	var pages []MeasuredPage
	step := func(gpa uint64, typ uint8, contents [48]byte) {
		var info [0x70]byte
		copy(info[0:48], digest[:])
		copy(info[48:96], contents[:])
		binary.LittleEndian.PutUint16(info[96:], 0x70)
		info[98] = typ
		binary.LittleEndian.PutUint64(info[104:], gpa)
		digest = sha512.Sum384(info[:])
		pages = append(pages, MeasuredPage{GPA: gpa, Type: typ, Contents: contents, Digest: digest})
	}
	zeroPage := sha512.Sum384(make([]byte, PageSize4K))
	for _, h := range f.Headers {
		switch h := h.(type) {
		case ParameterArea:
			areas[h.Index] = h.Bytes
		case PageData:
			if h.CompatMask&mask == 0 || h.Flags&FlagShared != 0 {
				continue
			}
			n := h.pageSize() / PageSize4K
			for i := range n {
				gpa := h.GPA + uint64(i)*PageSize4K
				switch {
				case h.Flags&FlagUnmeasured != 0:
					step(gpa, PageUnmeasured, [48]byte{})
				case h.DataType == DataSecrets:
					step(gpa, PageSecrets, [48]byte{})
				case h.DataType == DataCPUID || h.DataType == DataCPUIDXF:
					step(gpa, PageCPUID, [48]byte{})
				case len(h.Data) == 0 && o.NativeZero:
					step(gpa, PageZero, [48]byte{})
				case len(h.Data) == 0:
					step(gpa, PageNormal, zeroPage)
				default:
					page := make([]byte, PageSize4K)
					if lo := i * PageSize4K; lo < len(h.Data) {
						copy(page, h.Data[lo:min(len(h.Data), lo+PageSize4K)])
					}
					step(gpa, PageNormal, sha512.Sum384(page))
				}
			}
		case ParameterInsert:
			if h.CompatMask&mask == 0 {
				continue
			}
			size, ok := areas[h.Index]
			if !ok {
				return [48]byte{}, nil, fmt.Errorf("igvm: parameter insert of undeclared area %d", h.Index)
			}
			for off := uint64(0); off < size; off += PageSize4K {
				step(h.GPA+off, PageUnmeasured, [48]byte{})
			}
		case VPContext:
			if h.CompatMask&mask == 0 {
				continue
			}
			page := make([]byte, PageSize4K)
			copy(page, h.Data)
			step(h.GPA, PageVMSA, sha512.Sum384(page))
		}
	}
	return digest, pages, nil
}
