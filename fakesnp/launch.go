package fakesnp

import (
	"crypto/rand"
	"crypto/sha512"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"

	"github.com/svsm-e2e/svsm-e2e/internal/atomicfile"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// Chip is one simulated AMD processor: a CHIP_ID and the secret its VCEKs derive from.
type Chip struct {
	Name string
	ID   [abi.ChipIDSize]byte
	seed [32]byte
}

// Policy bits (SNP ABI guest policy).
const (
	PolicyReservedBit = 1 << 17 // must be one
	PolicySMT         = 1 << 16
	PolicyMigrateMA   = 1 << 18
	PolicyDebug       = 1 << 19
	// DefaultPolicy allows SMT and nothing else, with ABI 0.0.
	DefaultPolicy = PolicyReservedBit | PolicySMT
)

// DefaultTCB is the TCB a chip reports unless told otherwise.
var DefaultTCB = kds.TCBParts{BlSpl: 3, TeeSpl: 0, SnpSpl: 8, UcodeSpl: 115}

// Faults are the knobs that make the simulated AMD-SP misbehave or look like a worse machine.
type Faults struct {
	// BadSignature flips one bit of the report signature.
	BadSignature bool `json:"bad_signature,omitempty"`
	// StaleTCB makes the platform report (and sign with the VCEK of) a TCB one SNP SPL older.
	StaleTCB bool `json:"stale_tcb,omitempty"`
	// FirmwareStatus, if non-zero, is returned as MSG_REPORT_RSP.STATUS with no report.
	FirmwareStatus uint32 `json:"firmware_status,omitempty"`
	// SignWithChip signs with another chip's VCEK while reporting this chip's CHIP_ID.
	SignWithChip string `json:"sign_with_chip,omitempty"`
}

// LaunchSpec describes one launched VM as the AMD-SP sees it. JSON field names are the
// admin API's.
type LaunchSpec struct {
	Name        string   `json:"name"`
	Chip        string   `json:"chip"`
	Measurement HexBytes `json:"measurement"`
	HostData    HexBytes `json:"host_data,omitempty"`
	Policy      uint64   `json:"policy,omitempty"`
	// TCB is the platform TCB as kds TCB parts; zero means DefaultTCB.
	TCB      *kds.TCBParts `json:"tcb,omitempty"`
	GuestSVN uint32        `json:"guest_svn,omitempty"`
	// Socket is where the §4 channel listens; empty means <state>/launches/<name>.sock.
	Socket string `json:"socket,omitempty"`
	// VLEK: the platform has a VLEK loaded (a cloud provider's): reports are signed with it
	// (SIGNER_INFO.SIGNING_KEY = 1) unless the guest asks for the VCEK (key selector 1).
	VLEK   bool   `json:"vlek,omitempty"`
	Faults Faults `json:"faults"`
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Validate normalises defaults and checks sizes.
func (s *LaunchSpec) Validate() error {
	if !nameRE.MatchString(s.Name) {
		return fmt.Errorf("launch name %q: want %s", s.Name, nameRE)
	}
	if s.Chip == "" {
		s.Chip = "chip0"
	}
	if len(s.Measurement) != abi.MeasurementSize {
		return fmt.Errorf("launch %s: measurement is %d bytes, want %d", s.Name, len(s.Measurement), abi.MeasurementSize)
	}
	if len(s.HostData) == 0 {
		s.HostData = make([]byte, abi.HostDataSize)
	}
	if len(s.HostData) != abi.HostDataSize {
		return fmt.Errorf("launch %s: host_data is %d bytes, want %d", s.Name, len(s.HostData), abi.HostDataSize)
	}
	if s.Policy == 0 {
		s.Policy = DefaultPolicy
	}
	if _, err := abi.ParseSnpPolicy(s.Policy); err != nil {
		return fmt.Errorf("launch %s: policy %#x: %w", s.Name, s.Policy, err)
	}
	if s.TCB == nil {
		t := DefaultTCB
		s.TCB = &t
	}
	if _, err := kds.ComposeTCBParts(*s.TCB); err != nil {
		return fmt.Errorf("launch %s: tcb: %w", s.Name, err)
	}
	return nil
}

// HexBytes travels as hex in JSON.
type HexBytes = protocol.HexBytes

// loadOrCreateChip persists a chip's secret under dir/chips.
func loadOrCreateChip(dir, name string) (*Chip, error) {
	if !nameRE.MatchString(name) {
		return nil, fmt.Errorf("chip name %q: want %s", name, nameRE)
	}
	path := filepath.Join(dir, "chips", name+".seed")
	c := &Chip{Name: name}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if _, err := rand.Read(c.seed[:]); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, fmt.Errorf("chip dir: %w", err)
		}
		if err := atomicfile.Write(path, []byte(hex.EncodeToString(c.seed[:])), 0o600); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, fmt.Errorf("read chip %s: %w", name, err)
	default:
		d, err := hex.DecodeString(string(b))
		if err != nil || len(d) != 32 {
			return nil, fmt.Errorf("chip %s: corrupt seed file %s", name, path)
		}
		copy(c.seed[:], d)
	}
	id := sha512.Sum512(append([]byte("fakesnp chip id\x00"), c.seed[:]...))
	c.ID = id
	return c, nil
}

// Milan B0: family 0x19, model 0x01, stepping 0x01 (CPUID 1 EAX, extended fields split).
const (
	fmsFamily   = 0x19
	fmsModel    = 0x01
	fmsStepping = 0x01
)

// buildReport lays out an ATTESTATION_REPORT (version 3) and signs it.
func (s *Server) buildReport(l *launch, req *protocol.ReportRequest) ([]byte, uint32) {
	if l.spec.Faults.FirmwareStatus != 0 {
		return nil, l.spec.Faults.FirmwareStatus
	}
	useVLEK := l.spec.VLEK && req.KeySelector != 1
	if req.VMPL > 3 || req.KeySelector > 2 || (req.KeySelector == 2 && !l.spec.VLEK) {
		// KeySelector 2 asks for the VLEK: only a launch whose platform has one loaded.
		return nil, protocol.StatusInvalidParams
	}
	tcbParts := *l.spec.TCB
	if l.spec.Faults.StaleTCB && tcbParts.SnpSpl > 0 {
		tcbParts.SnpSpl--
	}
	tcb, _ := kds.ComposeTCBParts(tcbParts)

	r := make([]byte, protocol.ReportSize)
	binary.LittleEndian.PutUint32(r[0x00:], abi.ReportVersion3)
	binary.LittleEndian.PutUint32(r[0x04:], l.spec.GuestSVN)
	binary.LittleEndian.PutUint64(r[0x08:], l.spec.Policy)
	binary.LittleEndian.PutUint32(r[0x30:], req.VMPL)
	binary.LittleEndian.PutUint32(r[0x34:], abi.SignEcdsaP384Sha384)
	binary.LittleEndian.PutUint64(r[0x38:], uint64(tcb)) // CURRENT_TCB
	copy(r[0x50:0x90], req.ReportData[:])
	copy(r[0x90:0xC0], l.spec.Measurement)
	copy(r[0xC0:0xE0], l.spec.HostData)
	copy(r[0x140:0x160], l.reportID[:])
	for i := 0x160; i < 0x180; i++ { // REPORT_ID_MA: no migration agent
		r[i] = 0xff
	}
	binary.LittleEndian.PutUint64(r[0x180:], uint64(tcb)) // REPORTED_TCB
	r[0x188], r[0x189], r[0x18A] = fmsFamily, fmsModel, fmsStepping
	copy(r[0x1A0:0x1E0], l.chip.ID[:])
	binary.LittleEndian.PutUint64(r[0x1E0:], uint64(tcb)) // COMMITTED_TCB
	r[0x1E8], r[0x1E9], r[0x1EA] = 21, 55, 1              // current build, minor, major
	r[0x1EC], r[0x1ED], r[0x1EE] = 21, 55, 1              // committed build, minor, major
	binary.LittleEndian.PutUint64(r[0x1F0:], uint64(tcb)) // LAUNCH_TCB

	signer := l.chip
	if name := l.spec.Faults.SignWithChip; name != "" {
		other, err := s.chip(name)
		if err != nil {
			s.log.Error("fault sign_with_chip", "launch", l.spec.Name, "err", err)
			return nil, protocol.StatusInvalidParams
		}
		signer = other
	}
	key, _, err := s.ca.VCEK(signer, tcb)
	if useVLEK {
		binary.LittleEndian.PutUint32(r[0x48:], uint32(abi.VlekReportSigner)<<2) // SIGNER_INFO.SIGNING_KEY
		key, _, err = s.ca.VLEK(tcb)
	}
	if err != nil {
		s.log.Error("endorsement key", "err", err)
		return nil, protocol.StatusInvalidParams
	}
	R, S, err := signReport(key, abi.SignedComponent(r))
	if err != nil {
		s.log.Error("sign report", "err", err)
		return nil, protocol.StatusInvalidParams
	}
	if err := abi.SetSignature(R, S, r); err != nil {
		return nil, protocol.StatusInvalidParams
	}
	if l.spec.Faults.BadSignature {
		r[0x2A0] ^= 0x01
	}
	return r, protocol.StatusSuccess
}
