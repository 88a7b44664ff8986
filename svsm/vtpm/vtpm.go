// Package vtpm is the SVSM's virtual TPM: the TCG reference TPM (go-tpm-tools' simulator)
// whose NV memory lives in the SVSM's encrypted state instead of a file. The firmware and the
// OS reach it only through Transport, as TPM command bytes.
package vtpm

import (
	"crypto/sha256"
	"crypto/x509"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/legacy/tpm2"
)

// ErrNotLinked means the simulator's NV symbols are missing from this binary.
var ErrNotLinked = errors.New("vtpm: simulator NV memory (s_NV) not linked; go-tpm-tools internals changed")

// TPM is a running vTPM. Only one can exist per process (the simulator is a C global).
type TPM struct {
	mu     sync.Mutex
	sim    *simulator.Simulator
	closed bool
}

// Manufacture starts a brand-new TPM (fresh seeds, empty NV) as on a VM's first boot.
func Manufacture() (*TPM, error) {
	if !nvLinked() {
		return nil, ErrNotLinked
	}
	sim, err := simulator.Get()
	if err != nil {
		return nil, fmt.Errorf("vtpm manufacture: %w", err)
	}
	if err := allocateUpstreamBanks(sim); err != nil {
		_ = sim.Close()
		return nil, fmt.Errorf("vtpm manufacture: %w", err)
	}
	return &TPM{sim: sim}, nil
}

// ActiveBanks returns the PCR banks a newly manufactured vTPM has active, as in upstream
// COCONUT-SVSM's vTPM: its TPM profile implements SHA-1, SHA-256 and SHA-384 and no SHA-512
// (libtcgtpm/deps/TpmConfiguration/TpmConfiguration/TpmProfile_Common.h), and the TCG
// reference TPM it builds activates only SHA-256 and SHA-384 at manufacture
// (TrustedComputingGroup/TPM TPMCmd/Platform/src/PlatformPcr.c, DefaultActivePcrBanks).
// go-tpm-tools' older reference TPM activates every implemented bank (SHA-1, SHA-256,
// SHA-384, SHA-512), which would make firmware measure twice as many banks as the real one.
func ActiveBanks() []tpm2.Algorithm { return []tpm2.Algorithm{tpm2.AlgSHA256, tpm2.AlgSHA384} }

// allocateUpstreamBanks sets the PCR allocation to ActiveBanks (every PCR) with the other
// banks empty, and restarts the TPM so that it takes effect (TPM2_PCR_Allocate applies at
// the next _TPM_Init). The allocation lives in NV, so restored TPMs keep it.
func allocateUpstreamBanks(sim io.ReadWriter) error {
	all := make([]int, 24)
	for i := range all {
		all[i] = i
	}
	var sel []tpm2.PCRSelection
	for _, alg := range []tpm2.Algorithm{tpm2.AlgSHA1, tpm2.AlgSHA256, tpm2.AlgSHA384, tpm2.AlgSHA512} {
		s := tpm2.PCRSelection{Hash: alg}
		if slices.Contains(ActiveBanks(), alg) {
			s.PCRs = all
		}
		sel = append(sel, s)
	}
	auth := tpm2.AuthCommand{Session: tpm2.HandlePasswordSession, Attributes: tpm2.AttrContinueSession}
	if err := tpm2.PCRAllocate(sim, tpm2.HandlePlatform, auth, sel); err != nil {
		return fmt.Errorf("allocate PCR banks: %w", err)
	}
	if err := tpm2.Shutdown(sim, tpm2.StartupClear); err != nil {
		return fmt.Errorf("shutdown after PCR allocation: %w", err)
	}
	platReset()
	if err := tpm2.Startup(sim, tpm2.StartupClear); err != nil {
		return fmt.Errorf("startup after PCR allocation: %w", err)
	}
	return nil
}

// Restore starts a TPM from an NV image saved by Checkpoint or Shutdown: seeds, hierarchies,
// NV indices and counters come back; the TPM sees a power cycle (Startup(CLEAR)).
// The image must come from authenticated state: the reference TPM's C code trusts its NV
// and may crash on arbitrary bytes.
func Restore(nv []byte) (*TPM, error) {
	if len(nv) != NVSize {
		return nil, fmt.Errorf("vtpm restore: NV image is %d bytes, want %d", len(nv), NVSize)
	}
	if !nvLinked() {
		return nil, ErrNotLinked
	}
	sim, err := simulator.Get() // manufactures a throw-away TPM we then overwrite
	if err != nil {
		return nil, fmt.Errorf("vtpm restore: %w", err)
	}
	if err := tpm2.Shutdown(sim, tpm2.StartupClear); err != nil {
		_ = sim.Close()
		return nil, fmt.Errorf("vtpm restore: shutdown of the fresh TPM: %w", err)
	}
	nvLoad(nv)
	platReset()
	if err := tpm2.Startup(sim, tpm2.StartupClear); err != nil {
		// Close would send Shutdown to a TPM that never started; release the lock anyway.
		_ = sim.Close()
		return nil, fmt.Errorf("vtpm restore: startup from saved NV: %w", err)
	}
	return &TPM{sim: sim}, nil
}

// Transport is the TPM's command interface: write one command, read its response.
func (t *TPM) Transport() io.ReadWriter { return transport{t} }

type transport struct{ t *TPM }

func (tr transport) Write(b []byte) (int, error) {
	tr.t.mu.Lock()
	defer tr.t.mu.Unlock()
	if tr.t.closed {
		return 0, errors.New("vtpm: powered off")
	}
	return tr.t.sim.Write(b)
}

func (tr transport) Read(b []byte) (int, error) {
	tr.t.mu.Lock()
	defer tr.t.mu.Unlock()
	if tr.t.closed {
		return 0, errors.New("vtpm: powered off")
	}
	return tr.t.sim.Read(b)
}

// Checkpoint returns the current NV image without stopping the TPM (as a power loss would
// leave it: the next start is a non-orderly TPM Reset).
func (t *TPM) Checkpoint() ([]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, errors.New("vtpm: powered off")
	}
	if err := t.scrub(); err != nil {
		return nil, err
	}
	return nvSave(), nil
}

// scrub zeroes the stack garbage NV index entries carry (see scrubIndexPadding). The caller
// holds t.mu.
func (t *TPM) scrub() error { return scrubIndexPadding(indexHandles()) }

// Shutdown sends TPM2_Shutdown(CLEAR), returns the NV image and releases the simulator.
func (t *TPM) Shutdown() ([]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, errors.New("vtpm: powered off")
	}
	if err := t.scrub(); err != nil {
		return nil, err
	}
	t.closed = true
	if err := t.sim.Close(); err != nil { // Close sends Shutdown(CLEAR)
		return nil, fmt.Errorf("vtpm shutdown: %w", err)
	}
	return nvSave(), nil
}

// Close releases the simulator without saving (a failed boot).
func (t *TPM) Close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.closed {
		t.closed = true
		_ = t.sim.Close()
	}
}

// CheckBinary verifies, from an unstripped binary's symbol table, that the simulator's s_NV
// has the size the bridge copies. Returns elf.ErrNoSymbols for stripped binaries.
func CheckBinary(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("vtpm check %s: %w", path, err)
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		return fmt.Errorf("vtpm check %s: %w", path, err)
	}
	for _, s := range syms {
		if s.Name == "s_NV" {
			if s.Size != NVSize {
				return fmt.Errorf("vtpm check %s: s_NV is %d bytes, the bridge copies %d: go-tpm-tools changed NV_MEMORY_SIZE", path, s.Size, NVSize)
			}
			return nil
		}
	}
	return fmt.Errorf("vtpm check %s: no s_NV symbol: go-tpm-tools simulator internals changed", path)
}

// EKHash returns the hex SHA-256 of the ECC endorsement key's PKIX public key: the TPM's
// identity as a verifier would see it.
func EKHash(rw io.ReadWriter) (string, error) {
	ek, err := client.EndorsementKeyECC(rw)
	if err != nil {
		return "", fmt.Errorf("create EK: %w", err)
	}
	defer ek.Close()
	der, err := x509.MarshalPKIXPublicKey(ek.PublicKey())
	if err != nil {
		return "", fmt.Errorf("encode EK: %w", err)
	}
	sum := sha256.Sum256(der)
	return fmt.Sprintf("%x", sum), nil
}
