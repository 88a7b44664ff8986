// Package firmware is the firmware layer of the simulated guest: measured boot into the vTPM
// with a TCG PC Client event log, and Secure Boot state from the UEFI variable store. It
// reaches the TPM only through command bytes and the variables only through their API.
package firmware

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	_ "crypto/sha512" // SHA-384/512 banks
	"fmt"
	"io"
	"slices"
	"unsafe"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"

	"github.com/svsm-e2e/svsm-e2e/svsm/uefivars"
)

// PCRs the firmware extends (documented in docs/guest.md).
const (
	PCRLaunch     = 0 // S-CRTM version and the SNP launch digest
	PCRBootApp    = 4 // the kernel
	PCRSecureBoot = 7 // SecureBoot, PK, KEK, db, dbx
	PCRCmdline    = 8 // the kernel command line
	PCRInitrd     = 9 // the initrd
)

// Version is measured as the S-CRTM version.
const Version = "svsm-e2e firmware 1"

// Variables is what the firmware needs from the UEFI variable service.
type Variables interface {
	Get(guid uefivars.GUID, name string) (*uefivars.Variable, bool)
	SecureBoot() bool
	Set(u uefivars.Update) error
}

// Component is one boot component the firmware loads and measures.
type Component struct {
	Name string // "kernel" or "initrd"
	Data []byte
	// Hashed, when set, is Data's hashing started earlier (Prehash): the firmware takes the
	// digests it holds and computes any other itself.
	Hashed *Prehashed
}

// Prehashed is a component's digests being computed in the background.
type Prehashed struct {
	data []byte
	sums map[crypto.Hash]*prehash
}

type prehash struct {
	done chan struct{}
	sum  []byte
}

// Digest computes h(data), as an alternative implementation of Go's (a guest passes
// OpenSSL's, faster under emulation: package libcrypto).
type Digest func(h crypto.Hash, data []byte) ([]byte, error)

// Prehash starts hashing data in each of hashes, each in a background goroutine of its own,
// so that a guest can hash its kernel while it loads drivers and the SVSM attests, and
// measure it without waiting. data must not change afterwards. digest, when not nil,
// computes the digests instead of Go's crypto; a digest it fails to give (an error, or the
// wrong length) is computed by the firmware. The guest's digest runs at the lowest CPU
// priority, so the banks share whatever CPU the boot leaves idle (in a microvm the
// measurement then waited 0.03–0.05 s for them instead of 0.07–0.08 s with one goroutine;
// at normal priority, concurrent banks had slowed the drivers' loading).
func Prehash(data []byte, digest Digest, hashes ...crypto.Hash) *Prehashed {
	p := &Prehashed{data: data, sums: map[crypto.Hash]*prehash{}}
	var order []crypto.Hash
	for _, h := range hashes {
		if _, dup := p.sums[h]; dup || !h.Available() {
			continue
		}
		p.sums[h] = &prehash{done: make(chan struct{})}
		order = append(order, h)
	}
	for _, h := range order {
		go func() {
			r := p.sums[h]
			if digest == nil {
				d := h.New()
				d.Write(data)
				r.sum = d.Sum(nil)
			} else if sum, err := digest(h, data); err == nil && len(sum) == h.Size() {
				r.sum = sum
			}
			close(r.done)
		}()
	}
	return p
}

// sum is the digest of the data in h, waited for; ok is false when Prehash was not asked
// for h or did not get it (the caller hashes it then).
func (p *Prehashed) sum(h crypto.Hash) (sum []byte, ok bool) {
	r, ok := p.sums[h]
	if !ok {
		return nil, false
	}
	<-r.done
	return r.sum, r.sum != nil
}

// Boot is what the firmware boots.
type Boot struct {
	LaunchDigest []byte // MEASUREMENT of the attestation report
	Kernel       Component
	Initrd       *Component
	Cmdline      string
}

// ErrSecureBoot means a component is revoked by dbx while Secure Boot is on.
type ErrSecureBoot struct{ Component, Hash string }

func (e *ErrSecureBoot) Error() string {
	return fmt.Sprintf("secure boot: %s (sha256 %s) is listed in dbx", e.Component, e.Hash)
}

// Result is the measured boot's outcome.
type Result struct {
	Log        []byte
	SecureBoot bool
	PCRs       map[int][]byte // SHA-256 bank, the PCRs the firmware extended
}

// enrolled reports whether the store already holds exactly what the template update u would
// write: the same data under the same timestamp.
func enrolled(vars Variables, u uefivars.Update) bool {
	v, ok := vars.Get(u.GUID, u.Name)
	if !ok {
		return false
	}
	a, data, err := uefivars.ParseAuth2(u.Payload)
	if err != nil {
		return false
	}
	return v.Time == a.Time && bytes.Equal(v.Data, data)
}

// Run enrolls the first-boot template if the store is empty (Setup Mode without keys),
// measures the launch, the Secure Boot configuration and the boot components, and enforces
// dbx on the components when Secure Boot is on.
func Run(_ context.Context, tpm io.ReadWriter, vars Variables, template []uefivars.Update, boot Boot) (*Result, error) {
	if _, ok := vars.Get(uefivars.GlobalVariable, "PK"); !ok && len(template) > 0 {
		for _, u := range template {
			if enrolled(vars, u) {
				// A power cut during an earlier first boot left this one in: applying it again
				// would be refused as a replay (same timestamp) and brick the VM.
				continue
			}
			if err := vars.Set(u); err != nil {
				return nil, fmt.Errorf("enroll %s from template: %w", u.Name, err)
			}
		}
	}
	banks, err := allocatedBanks(tpm)
	if err != nil {
		return nil, err
	}
	log := newEventLog(banks)
	extend := func(pcr int, typ uint32, digests [][]byte, data []byte) error {
		for i, b := range banks {
			if err := tpm2.PCRExtend(tpm, tpmutil.Handle(pcr), tpm2.Algorithm(b.Alg), digests[i], ""); err != nil {
				return fmt.Errorf("extend PCR %d (%v): %w", pcr, b.Hash, err)
			}
		}
		log.add(pcr, typ, digests, data)
		return nil
	}
	measure := func(pcr int, typ uint32, digestOf, data []byte) error {
		return extend(pcr, typ, digestsOf(banks, digestOf), data)
	}
	ver := utf16z(Version)
	if err := measure(PCRLaunch, EvSCRTMVersion, ver, ver); err != nil {
		return nil, err
	}
	if err := measure(PCRLaunch, EvEFIPlatformFirmwareBlob, boot.LaunchDigest, boot.LaunchDigest); err != nil {
		return nil, err
	}
	sb := vars.SecureBoot()
	sbByte := []byte{0}
	if sb {
		sbByte[0] = 1
	}
	for _, v := range []struct {
		guid uefivars.GUID
		name string
	}{
		{uefivars.GlobalVariable, "SecureBoot"}, {uefivars.GlobalVariable, "PK"}, {uefivars.GlobalVariable, "KEK"},
		{uefivars.ImageSecurityDatabase, "db"}, {uefivars.ImageSecurityDatabase, "dbx"},
	} {
		var data []byte
		if v.name == "SecureBoot" {
			data = sbByte
		} else if got, ok := vars.Get(v.guid, v.name); ok {
			data = got.Data
		}
		ev := uefiVariableData(v.guid, v.name, data)
		if err := measure(PCRSecureBoot, EvEFIVariableDriverConfig, ev, ev); err != nil {
			return nil, err
		}
	}
	sep := []byte{0, 0, 0, 0}
	for pcr := range 8 {
		if err := measure(pcr, EvSeparator, sep, sep); err != nil {
			return nil, err
		}
	}
	// Each component is hashed once per bank; the dbx check reuses the SHA-256 bank's digest
	// (hashed besides only when that bank is inactive): a kernel image is the costliest
	// thing firmware hashes.
	hashes := banks
	shaAt := slices.IndexFunc(banks, func(b Bank) bool { return b.Alg == tpmAlgSHA256 })
	if sb && shaAt < 0 {
		hashes, shaAt = append(slices.Clone(banks), Bank{tpmAlgSHA256, crypto.SHA256}), len(banks)
	}
	comps := []Component{boot.Kernel}
	if boot.Initrd != nil {
		comps = append(comps, *boot.Initrd)
	}
	digests := make([][][]byte, len(comps))
	for i, c := range comps {
		digests[i] = componentDigests(hashes, c)
	}
	if sb {
		sha := make([][]byte, len(comps))
		for i := range comps {
			sha[i] = digests[i][shaAt]
		}
		if err := checkDBX(vars, comps, sha); err != nil {
			return nil, err
		}
	}
	if err := extend(PCRBootApp, EvEFIBootServicesApplication, digests[0][:len(banks)], imageLoadEvent(len(boot.Kernel.Data))); err != nil {
		return nil, err
	}
	if boot.Initrd != nil {
		if err := extend(PCRInitrd, EvIPL, digests[1][:len(banks)], []byte("initrd\x00")); err != nil {
			return nil, err
		}
	}
	cl := []byte(boot.Cmdline)
	if err := measure(PCRCmdline, EvIPL, cl, append([]byte("kernel_cmdline: "), cl...)); err != nil {
		return nil, err
	}
	pcrs, err := tpm2.ReadPCRs(tpm, tpm2.PCRSelection{Hash: tpm2.AlgSHA256, PCRs: []int{0, 4, 7, 8, 9}})
	if err != nil {
		return nil, fmt.Errorf("read PCRs: %w", err)
	}
	return &Result{Log: log.Bytes(), SecureBoot: sb, PCRs: pcrs}, nil
}

// checkDBX refuses a component whose SHA-256 (sha256s[i] for comps[i]) dbx lists.
func checkDBX(vars Variables, comps []Component, sha256s [][]byte) error {
	dbx, ok := vars.Get(uefivars.ImageSecurityDatabase, "dbx")
	if !ok {
		return nil
	}
	sigs, err := uefivars.ParseSignatureLists(dbx.Data)
	if err != nil {
		return fmt.Errorf("dbx: %w", err)
	}
	for i, c := range comps {
		h := sha256s[i]
		if slices.ContainsFunc(sigs, func(s uefivars.Signature) bool {
			return s.Type == uefivars.CertSHA256 && bytes.Equal(s.Data, h)
		}) {
			return &ErrSecureBoot{Component: c.Name, Hash: fmt.Sprintf("%x", h)}
		}
	}
	return nil
}

// componentDigests returns c's digest in each bank's hash, in bank order: the prehashed ones
// where there are, the others computed now.
func componentDigests(banks []Bank, c Component) [][]byte {
	// Prehashed digests count only for the very bytes they were started on (the same
	// slice; comparing contents would cost as much as hashing them).
	if c.Hashed == nil || len(c.Hashed.data) != len(c.Data) || unsafe.SliceData(c.Hashed.data) != unsafe.SliceData(c.Data) {
		return digestsOf(banks, c.Data)
	}
	out := make([][]byte, len(banks))
	var missing []Bank
	var at []int
	for i, b := range banks {
		if sum, ok := c.Hashed.sum(b.Hash); ok {
			out[i] = sum
		} else {
			missing, at = append(missing, b), append(at, i)
		}
	}
	for j, d := range digestsOf(missing, c.Data) {
		out[at[j]] = d
	}
	return out
}

// digestsOf returns data's digest in each bank's hash, in bank order.
func digestsOf(banks []Bank, data []byte) [][]byte {
	out := make([][]byte, len(banks))
	for i, b := range banks {
		h := b.Hash.New()
		h.Write(data)
		out[i] = h.Sum(nil)
	}
	return out
}

func utf16z(s string) []byte {
	var b []byte
	for _, r := range s + "\x00" {
		b = append(b, byte(r), 0)
	}
	return b
}

var bankOf = map[tpm2.Algorithm]Bank{
	tpm2.AlgSHA1:   {tpmAlgSHA1, crypto.SHA1},
	tpm2.AlgSHA256: {tpmAlgSHA256, crypto.SHA256},
	tpm2.AlgSHA384: {tpmAlgSHA384, crypto.SHA384},
	tpm2.AlgSHA512: {tpmAlgSHA512, crypto.SHA512},
}

// allocatedBanks asks the TPM which PCR banks are allocated (with at least one PCR).
func allocatedBanks(tpm io.ReadWriter) ([]Bank, error) {
	caps, _, err := tpm2.GetCapability(tpm, tpm2.CapabilityPCRs, 16, 0)
	if err != nil {
		return nil, fmt.Errorf("read PCR allocation: %w", err)
	}
	var out []Bank
	for _, c := range caps {
		sel, ok := c.(tpm2.PCRSelection)
		if !ok || len(sel.PCRs) == 0 {
			continue
		}
		if b, ok := bankOf[sel.Hash]; ok {
			out = append(out, b)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("TPM has no supported PCR bank allocated")
	}
	return out, nil
}

// PredictPCRs returns the SHA-256 values PCRs 4, 8 and 9 will hold when this firmware boots
// kernel, initrd and cmdline (nil initrd: none), following Run's extend order. The OS uses it
// to re-seal before an update; only the parts passed non-nil are predicted.
func PredictPCRs(kernel, initrd []byte, cmdline *string) map[int][]byte {
	extend := func(pcr []byte, data []byte) []byte {
		d := sha256.Sum256(data)
		h := sha256.New()
		h.Write(pcr)
		h.Write(d[:])
		return h.Sum(nil)
	}
	zero := make([]byte, sha256.Size)
	out := map[int][]byte{}
	if kernel != nil {
		out[PCRBootApp] = extend(extend(zero, []byte{0, 0, 0, 0}), kernel)
	}
	if initrd != nil {
		out[PCRInitrd] = extend(zero, initrd)
	}
	if cmdline != nil {
		out[PCRCmdline] = extend(zero, []byte(*cmdline))
	}
	return out
}
