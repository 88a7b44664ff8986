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

// Rules names whose reading of an IGVM file the digest follows. The three implementations
// that matter disagree on a few constructs (UPSTREAM.md §3); Warnings name every such
// construct a file contains, whatever the rules chosen.
type Rules int

const (
	// RulesIgvmmeasure follows COCONUT-SVSM's tools/igvmmeasure (`igvmmeasure -b`, the
	// default): shared pages are measured like any page, a parameter insert is one
	// unmeasured page whatever the area's size, empty page data is a normal page of zeros
	// (NativeZero: a zero page), VMSAs in file order.
	RulesIgvmmeasure Rules = iota
	// RulesCrate follows the microsoft/igvm crate's measurement/snp.rs: shared pages are
	// skipped, a parameter insert is one unmeasured page per page of the area, empty page data
	// is a normal page of zeros, 2 MiB page data is refused.
	RulesCrate
	// RulesQEMU follows what a real SNP launch by QEMU's IGVM loader (backends/igvm.c) makes
	// the firmware measure: shared pages measured, a parameter insert is one unmeasured page
	// per page of the area, empty page data is an SNP zero page, and the VMSA is measured when
	// the launch is finished, after every page, whatever its place in the file.
	RulesQEMU
)

func (r Rules) String() string {
	switch r {
	case RulesCrate:
		return "crate"
	case RulesQEMU:
		return "qemu"
	}
	return "igvmmeasure"
}

// ParseRules reads "igvmmeasure", "crate" or "qemu".
func ParseRules(s string) (Rules, error) {
	for _, r := range []Rules{RulesIgvmmeasure, RulesCrate, RulesQEMU} {
		if r.String() == s {
			return r, nil
		}
	}
	return 0, fmt.Errorf("igvm: rules %q: want igvmmeasure, crate or qemu", s)
}

// MeasureOptions select the digest rules.
type MeasureOptions struct {
	Rules Rules
	// NativeZero measures empty page data as SNP zero pages under RulesIgvmmeasure
	// (igvmmeasure's --native-zero). RulesQEMU always does, RulesCrate never.
	NativeZero bool
}

// Warning is one kind of construct of the file on which the implementations disagree, with
// where it first occurs and how often.
type Warning struct {
	Header int    // index in File.Headers of the first occurrence
	GPA    uint64 // where that one lands
	Count  int    // occurrences in the file
	Text   string
}

func (w Warning) String() string {
	s := fmt.Sprintf("header %d at gpa %#x: %s", w.Header, w.GPA, w.Text)
	if w.Count > 1 {
		s += fmt.Sprintf(" (%d such headers in the file)", w.Count)
	}
	return s
}

// Measurement is the launch digest with how it was computed.
type Measurement struct {
	Digest   [48]byte
	Pages    []MeasuredPage
	Warnings []Warning
}

// MeasureSNP computes the SEV-SNP launch digest over the directives applicable to the
// file's SEV-SNP platform (PROTOCOLS.md §5): starting from 48 zero bytes,
// digest = SHA-384(digest ‖ contents ‖ 0x70 u16 ‖ type ‖ imi=0 ‖ 0 ‖ vmpl perms 0,0,0 ‖ gpa u64)
// per 4 KiB page, under the chosen rules. Required-memory declarations and parameters are not
// measured.
func MeasureSNP(f *File, o MeasureOptions) (*Measurement, error) {
	var mask uint32
	for _, h := range f.Headers {
		if p, ok := h.(SupportedPlatform); ok && p.PlatformType == PlatformSEVSNP {
			mask = p.CompatMask
		}
	}
	if mask == 0 {
		return nil, errors.New("igvm: the file declares no SEV-SNP platform")
	}
	m := &Measurement{}
	seen := map[string]int{}
	warn := func(i int, gpa uint64, format string, a ...any) {
		text := fmt.Sprintf(format, a...)
		if at, ok := seen[text]; ok {
			m.Warnings[at].Count++
			return
		}
		seen[text] = len(m.Warnings)
		m.Warnings = append(m.Warnings, Warning{Header: i, GPA: gpa, Count: 1, Text: text})
	}
	areas := map[uint32]uint64{}
	var digest [48]byte
	step := func(gpa uint64, typ uint8, contents [48]byte) {
		var info [0x70]byte
		copy(info[0:48], digest[:])
		copy(info[48:96], contents[:])
		binary.LittleEndian.PutUint16(info[96:], 0x70)
		info[98] = typ
		binary.LittleEndian.PutUint64(info[104:], gpa)
		digest = sha512.Sum384(info[:])
		m.Pages = append(m.Pages, MeasuredPage{GPA: gpa, Type: typ, Contents: contents, Digest: digest})
	}
	zeroPage := sha512.Sum384(make([]byte, PageSize4K))
	nativeZero := o.Rules == RulesQEMU || (o.Rules == RulesIgvmmeasure && o.NativeZero)
	var vmsas []VPContext // RulesQEMU: measured at the end
	lastVMSA := -1
	for i, h := range f.Headers {
		switch h := h.(type) {
		case ParameterArea:
			areas[h.Index] = h.Bytes
		case PageData:
			if h.CompatMask&mask == 0 {
				continue
			}
			if lastVMSA >= 0 {
				warn(i, h.GPA, "page after the VMSA: QEMU measures the VMSA last, igvmmeasure and the crate in file order (igvmmeasure --check-kvm refuses this)")
			}
			if h.Flags&FlagShared != 0 {
				warn(i, h.GPA, "shared page: igvmmeasure and QEMU measure it, the igvm crate skips it")
				if o.Rules == RulesCrate {
					continue
				}
			}
			if len(h.Data) == 0 && h.DataType == DataNormal && h.Flags&FlagUnmeasured == 0 {
				warn(i, h.GPA, "page without data: igvmmeasure and the crate measure a normal page of zeros, QEMU an SNP zero page (igvmmeasure --native-zero)")
			}
			if h.Flags&Flag2MB != 0 {
				warn(i, h.GPA, "2 MiB page: the igvm crate cannot measure it")
				if o.Rules == RulesCrate {
					return nil, fmt.Errorf("igvm: header %d: 2 MiB page data at %#x (the igvm crate's rules refuse it)", i, h.GPA)
				}
			}
			if h.Flags&FlagUnmeasured != 0 && h.DataType != DataNormal {
				// All three agree: the page type wins over the unmeasured flag.
				warn(i, h.GPA, "unmeasured flag on a secrets/CPUID page: measured as its page type by every implementation")
			}
			n := h.pageSize() / PageSize4K
			for p := range n {
				gpa := h.GPA + uint64(p)*PageSize4K
				switch {
				case h.DataType == DataSecrets:
					step(gpa, PageSecrets, [48]byte{})
				case h.DataType == DataCPUID || h.DataType == DataCPUIDXF:
					step(gpa, PageCPUID, [48]byte{})
				case h.DataType != DataNormal:
					warn(i, gpa, "page data type %d is not measured", h.DataType)
				case h.Flags&FlagUnmeasured != 0:
					step(gpa, PageUnmeasured, [48]byte{})
				case len(h.Data) == 0 && nativeZero:
					step(gpa, PageZero, [48]byte{})
				case len(h.Data) == 0:
					step(gpa, PageNormal, zeroPage)
				default:
					page := make([]byte, PageSize4K)
					if lo := p * PageSize4K; lo < len(h.Data) {
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
				return nil, fmt.Errorf("igvm: parameter insert of undeclared area %d", h.Index)
			}
			if lastVMSA >= 0 {
				warn(i, h.GPA, "parameter insert after the VMSA: QEMU measures the VMSA last (igvmmeasure --check-kvm refuses this)")
			}
			pages := (size + PageSize4K - 1) / PageSize4K
			if pages > 1 {
				warn(i, h.GPA, "parameter area of %d pages: igvmmeasure measures one unmeasured page, the crate and QEMU %d", pages, pages)
			}
			if o.Rules == RulesIgvmmeasure {
				pages = 1
			}
			for p := range pages {
				step(h.GPA+p*PageSize4K, PageUnmeasured, [48]byte{})
			}
		case VPContext:
			if h.CompatMask&mask == 0 {
				continue
			}
			lastVMSA = i
			if o.Rules == RulesQEMU {
				vmsas = append(vmsas, h)
				continue
			}
			page := make([]byte, PageSize4K)
			copy(page, h.Data)
			step(h.GPA, PageVMSA, sha512.Sum384(page))
		}
	}
	for _, h := range vmsas {
		page := make([]byte, PageSize4K)
		copy(page, h.Data)
		step(h.GPA, PageVMSA, sha512.Sum384(page))
	}
	m.Digest = digest
	return m, nil
}

// VMSA offsets (SEV-ES save area) the KVM check reads.
const vmsaCR0 = 0x158

// CheckKVM applies igvmmeasure's --check-kvm rules to the SEV-SNP directives: QEMU/KVM
// accepts exactly one VMSA, at GPA 0xFFFFFFFFF000, with CR0 0x31 (protected mode) or 0x30
// (real mode) because KVM overrides CR0 when it measures, and as the last page directive
// because KVM measures the VMSA when the launch is finished. A file that breaks a rule has a
// digest no KVM launch reproduces.
func CheckKVM(f *File) error {
	var mask uint32
	for _, h := range f.Headers {
		if p, ok := h.(SupportedPlatform); ok && p.PlatformType == PlatformSEVSNP {
			mask = p.CompatMask
		}
	}
	if mask == 0 {
		return errors.New("igvm: the file declares no SEV-SNP platform")
	}
	vmsas := 0
	for i, h := range f.Headers {
		switch h := h.(type) {
		case PageData, ParameterInsert:
			var m uint32
			switch h := h.(type) {
			case PageData:
				m = h.CompatMask
			case ParameterInsert:
				m = h.CompatMask
			}
			if m&mask != 0 && vmsas > 0 {
				return fmt.Errorf("igvm: kvm: header %d comes after the VMSA: the VMSA must be the last page directive (KVM measures it last)", i)
			}
		case VPContext:
			if h.CompatMask&mask == 0 {
				continue
			}
			vmsas++
			if vmsas > 1 {
				return fmt.Errorf("igvm: kvm: header %d is a second VMSA: QEMU/KVM sets the VMSA of the first vCPU only", i)
			}
			if h.GPA != VMSAGPA {
				return fmt.Errorf("igvm: kvm: VMSA at GPA %#x, KVM always places it at %#x", h.GPA, uint64(VMSAGPA))
			}
			var cr0 uint64
			if len(h.Data) >= vmsaCR0+8 {
				cr0 = binary.LittleEndian.Uint64(h.Data[vmsaCR0:])
			}
			if cr0 != 0x31 && cr0 != 0x30 {
				return fmt.Errorf("igvm: kvm: VMSA CR0 is %#x, KVM overrides it with 0x31 or 0x30 when measuring", cr0)
			}
		}
	}
	if vmsas == 0 {
		return errors.New("igvm: kvm: no VMSA for the SEV-SNP platform")
	}
	return nil
}
