// Package svsm is the SVSM layer of the simulated guest: it attests through the proxy,
// opens the encrypted state with the released key, enforces freshness (PROTOCOLS.md §3),
// and runs the vTPM and the UEFI variable store whose contents live in that state. Above it,
// the firmware and the OS see only TPM command bytes and the variable API.
package svsm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/google/go-sev-guest/client"

	"github.com/svsm-e2e/svsm-e2e/internal/crashpoint"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm/attest"
	"github.com/svsm-e2e/svsm-e2e/svsm/statestore"
	"github.com/svsm-e2e/svsm-e2e/svsm/uefivars"
	"github.com/svsm-e2e/svsm-e2e/svsm/vtpm"
)

// Emitter receives the layer's events.
type Emitter interface{ Emit(protocol.Event) }

// Dialer opens a fresh connection to the proxy (one per protocol exchange).
type Dialer func(ctx context.Context) (io.ReadWriteCloser, error)

// Config is what the SVSM gets from its platform.
type Config struct {
	Proxy     Dialer
	Quote     client.QuoteProvider
	StateDisk statestore.Device
	Events    Emitter
	// ExchangeTimeout bounds each exchange with the proxy: the attestation and every
	// confirmation (60 s when zero). A confirmation without an answer in time fails closed.
	ExchangeTimeout time.Duration
	// Crash marks every durable write at its registered crash point (nil: none chosen; an
	// unregistered point still panics).
	Crash *crashpoint.Injector
}

// crashDevice routes the state store's writes through the current crash point, so a power
// cut can land before, in the middle of (torn), or after a slot write.
type crashDevice struct {
	statestore.Device
	in    *crashpoint.Injector
	point string
}

func (d *crashDevice) WriteAt(p []byte, off int64) (int, error) {
	return d.in.Write(d.point, p, off, d.Device.WriteAt)
}

// writeReason is the registry's name for a state write's reason ("uefi-var db" → "uefi-var").
func writeReason(why string) string {
	r, _, _ := strings.Cut(why, " ")
	return r
}

// Codes name why the SVSM failed closed; they are the "reason" of the final event.
const (
	CodeAttestation  = "attestation-failed"
	CodeSecret       = "bad-secret"
	CodeStateIO      = "state-io"
	CodeStateCorrupt = "state-corrupt"
	CodeStateWiped   = "state-missing"
	CodeStale        = "stale-state"
	CodeAhead        = "state-ahead-of-verifier"
	// Confirmation: anything but the verifier's authenticated success stops the SVSM.
	CodeConfirmUnauthenticated = "confirm-unauthenticated"
	CodeConfirmRefused         = "confirm-refused"
	CodeConfirmTimeout         = "confirm-timeout"
	CodeConfirmNoAnswer        = "confirm-no-answer"
	CodeConfirmUnreachable     = "confirm-unreachable"
	CodeTPM                    = "vtpm-failed"
	CodeUEFI                   = "uefi-vars-failed"
	CodeStateBodyError         = "state-body-invalid"
)

// Error is a fail-closed stop of the SVSM with a stable code.
type Error struct {
	Code string
	Err  error
}

func (e *Error) Error() string { return e.Code + ": " + e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

func fail(code string, format string, a ...any) error {
	return &Error{Code: code, Err: fmt.Errorf(format, a...)}
}

// SVSM is a booted SVSM: state open and fresh, vTPM and variable store running.
type SVSM struct {
	cfg     Config
	mu      sync.Mutex
	store   *statestore.Store
	payload *protocol.SecretPayloadV1 // nil in raw mode
	counter uint64                    // counter the state on disk holds
	tpm     *vtpm.TPM
	vars    *uefivars.Store
	savedNV [32]byte // hash of the NV image last persisted
	off     bool
	halted  *Error // set when a runtime write could not be made durable and confirmed
	launch  []byte // MEASUREMENT from this boot's attestation report
	keys    protocol.ConfirmKeys
	dev     *crashDevice
}

// ErrHalted is what every TPM and variable call returns once the SVSM has halted.
var ErrHalted = errors.New("svsm: halted")

// Halted reports why the SVSM stopped serving the OS, or nil while it runs.
func (s *SVSM) Halted() *Error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.halted
}

// LaunchDigest is the MEASUREMENT of the report this boot attested with.
func (s *SVSM) LaunchDigest() []byte { return bytes.Clone(s.launch) }

func (s *SVSM) emit(ev string, fields map[string]any) {
	s.cfg.Events.Emit(protocol.Event{Event: ev, Layer: protocol.LayerSVSM, Fields: fields})
}

// Boot runs the SVSM's start-up: attest, open state, check freshness, advance and confirm the
// counter (v1), start the vTPM and the variable store. Any failure is an *Error and nothing
// on the state disk has been changed by this boot unless the error says so.
func Boot(ctx context.Context, cfg Config) (*SVSM, error) {
	if cfg.ExchangeTimeout <= 0 {
		cfg.ExchangeTimeout = 60 * time.Second
	}
	s := &SVSM{cfg: cfg, dev: &crashDevice{Device: cfg.StateDisk, in: cfg.Crash}}
	actx, cancel := context.WithTimeout(ctx, cfg.ExchangeTimeout)
	defer cancel()
	conn, err := cfg.Proxy(actx)
	if err != nil {
		return nil, fail(CodeAttestation, "connect to proxy: %w", err)
	}
	res, err := attest.Attest(actx, conn, cfg.Quote)
	conn.Close()
	if err != nil {
		return nil, &Error{Code: CodeAttestation, Err: err}
	}
	s.launch = bytes.Clone(res.Report[0x90:0xC0])
	opts := statestore.Options{}
	mode := protocol.SecretModeRaw
	switch len(res.Secret) {
	case protocol.StateKeySize:
		copy(opts.Key[:], res.Secret)
	case protocol.SecretPayloadV1Size:
		var p protocol.SecretPayloadV1
		if err := p.UnmarshalBinary(res.Secret); err != nil {
			return nil, fail(CodeSecret, "%w", err)
		}
		s.payload, mode = &p, protocol.SecretModeV1
		opts.Key, opts.VMID = p.StateKey, p.VMID
		if s.keys, err = protocol.DeriveConfirmKeys(p.ConfirmKey[:]); err != nil {
			return nil, fail(CodeSecret, "%w", err)
		}
	default:
		return nil, fail(CodeSecret, "released secret is %d bytes: neither a raw state key nor payload v1", len(res.Secret))
	}
	attested := map[string]any{"secret_mode": mode, "challenge": fmt.Sprintf("%x", res.Challenge)}
	if s.payload != nil {
		attested["expected_counter"] = s.payload.ExpectedCounter
		attested["next_counter"] = s.payload.NextCounter
		attested["boot_id"] = fmt.Sprintf("%x", s.payload.BootID)
		attested["write_through"] = s.payload.WriteThrough
	}
	s.emit("attested", attested)

	store, st, err := statestore.Open(s.dev, opts)
	var corrupt *statestore.CorruptError
	if errors.As(err, &corrupt) && firstWriteIncomplete(corrupt, s.payload) {
		// The only write this disk ever saw was cut short, and nothing on it was confirmed:
		// start over as a first boot rather than brick the VM.
		for _, p := range corrupt.Slots {
			s.emitSlotProblem(p)
		}
		s.emit("state-first-write-incomplete", map[string]any{"slot": statestore.SlotName(corrupt.Slots[0].Slot)})
		opts.OverIncompleteFirstWrite = true
		store, st, err = statestore.Open(s.dev, opts)
	}
	switch {
	case errors.As(err, &corrupt):
		for _, p := range corrupt.Slots {
			s.emitSlotProblem(p)
		}
		return nil, &Error{Code: CodeStateCorrupt, Err: err}
	case err != nil && !errors.Is(err, statestore.ErrEmpty):
		return nil, &Error{Code: CodeStateIO, Err: err}
	}
	s.store = store
	for _, p := range store.Problems {
		s.emitSlotProblem(p)
	}
	first := st == nil

	// Freshness (v1): the verifier says which counter the state must hold.
	if s.payload != nil {
		want := s.payload.ExpectedCounter
		switch {
		case first && want != 0:
			return nil, fail(CodeStateWiped, "state disk is empty but the verifier expects counter %d: the host replaced or wiped the disk", want)
		case !first && st.Counter < want:
			return nil, fail(CodeStale, "state holds counter %d, the verifier expects %d: the host restored an old state disk", st.Counter, want)
		case !first && st.Counter > want+1:
			return nil, fail(CodeAhead, "state holds counter %d, the verifier expects %d: the verifier's record is behind", st.Counter, want)
		case !first && st.Counter == want+1:
			// The newest slot holds an advance the verifier never confirmed (a crash or a
			// halted write-through write). Come up with the confirmed state if a slot still
			// holds it; its write is then overwritten by this boot's advance.
			if old, ok := store.Use(want); ok {
				s.emit("state-unconfirmed-skipped", map[string]any{
					"slot": statestore.SlotName(st.Slot), "counter": st.Counter, "using_slot": statestore.SlotName(old.Slot), "using_counter": old.Counter})
				st = old
			}
		}
	}

	var b *body
	if first {
		tpm, err := vtpm.Manufacture()
		if err != nil {
			return nil, &Error{Code: CodeTPM, Err: err}
		}
		s.tpm, s.vars = tpm, uefivars.New()
	} else {
		if b, err = parseBody(st.Body); err != nil {
			return nil, &Error{Code: CodeStateBodyError, Err: err}
		}
		s.vars = uefivars.New()
		if err := s.vars.UnmarshalBinary(b.uefi); err != nil {
			return nil, &Error{Code: CodeUEFI, Err: err}
		}
		if s.tpm, err = vtpm.Restore(b.tpmNV); err != nil {
			return nil, &Error{Code: CodeTPM, Err: err}
		}
		s.counter = st.Counter
		s.savedNV = sha256.Sum256(b.tpmNV)
	}
	opened := map[string]any{"first_boot": first, "counter": s.counter, "slot": "", "generation": uint64(0)}
	if st != nil {
		opened["slot"], opened["generation"] = statestore.SlotName(st.Slot), st.Generation
	}
	s.emit("state-opened", opened)

	ok := false
	defer func() {
		if !ok {
			s.tpm.Close()
		}
	}()
	ek, err := vtpm.EKHash(s.tpm.Transport())
	if err != nil {
		return nil, &Error{Code: CodeTPM, Err: err}
	}
	if first {
		s.emit("tpm-manufactured", map[string]any{"ek_hash": ek})
	} else {
		s.emit("tpm-restored", map[string]any{"ek_hash": ek})
	}

	if err := s.advance(ctx, first); err != nil {
		return nil, err
	}
	s.emit("uefi-vars-loaded", map[string]any{"count": len(s.vars.Names()), "secure_boot": s.vars.SecureBoot()})
	ok = true
	return s, nil
}

// firstWriteIncomplete tells a first write cut short by a power cut from damaged state: one
// slot never written, the other invalid, and nothing confirmed — in v1 the verifier expects
// counter 0 (no state was ever confirmed); in raw mode there is no counter, and a wiped disk
// is indistinguishable from a first boot there anyway (raw mode's known limitation).
func firstWriteIncomplete(c *statestore.CorruptError, p *protocol.SecretPayloadV1) bool {
	if c.Empty != statestore.SlotCount-1 || len(c.Slots) != 1 {
		return false
	}
	return p == nil || p.ExpectedCounter == 0
}

func (s *SVSM) emitSlotProblem(p *statestore.SlotError) {
	s.emit("state-slot-invalid", map[string]any{"slot": statestore.SlotName(p.Slot), "check": string(p.Check), "detail": p.Detail})
}

// advance makes the state on disk hold the verifier's next counter, confirms it, and then
// writes it to the other slot as well, so a later corruption of either slot still leaves a
// fresh copy. Raw mode writes a first state and otherwise leaves the disk alone.
func (s *SVSM) advance(ctx context.Context, first bool) error {
	if s.payload == nil {
		if first {
			return s.persistLocked(ctx, 0, "first-boot")
		}
		return nil
	}
	next := s.payload.NextCounter
	if first || s.counter != next {
		if err := s.persistLocked(ctx, next, "advance"); err != nil {
			return err
		}
	}
	if err := s.confirm(ctx, next, "advance"); err != nil {
		return err
	}
	return s.persistLocked(ctx, next, "mirror")
}

func (s *SVSM) confirm(ctx context.Context, counter uint64, why string) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.ExchangeTimeout)
	defer cancel()
	conn, err := s.cfg.Proxy(ctx)
	if err != nil {
		return fail(CodeConfirmUnreachable, "connect to proxy: %w", err)
	}
	defer conn.Close()
	point := "guest/confirm/" + writeReason(why)
	resp, err := attest.Confirm(ctx, conn, s.keys, s.payload.BootID[:], counter, func() { s.cfg.Crash.At(point + "/sent") })
	if resp != nil {
		s.cfg.Crash.At(point + "/answered") // an authenticated answer, success or refusal
	}
	if err != nil {
		code := CodeConfirmNoAnswer
		switch {
		case errors.Is(err, attest.ErrConfirmUnauthenticated):
			code = CodeConfirmUnauthenticated
		case errors.Is(err, attest.ErrConfirmRefused):
			code = CodeConfirmRefused
		case errors.Is(err, attest.ErrConfirmTimeout):
			code = CodeConfirmTimeout
		}
		return &Error{Code: code, Err: err}
	}
	s.emit("confirmed", map[string]any{"counter": resp.Confirmed})
	return nil
}

// persistLocked writes the current TPM NV and variables with counter.
func (s *SVSM) persistLocked(_ context.Context, counter uint64, why string) error {
	nv, err := s.tpm.Checkpoint()
	if err != nil {
		return &Error{Code: CodeTPM, Err: err}
	}
	return s.write(counter, nv, why)
}

func (s *SVSM) write(counter uint64, nv []byte, why string) error {
	uefi, err := s.vars.MarshalBinary()
	if err != nil {
		return &Error{Code: CodeUEFI, Err: err}
	}
	b, err := (&body{tpmNV: nv, uefi: uefi}).marshal()
	if err != nil {
		return &Error{Code: CodeStateIO, Err: err}
	}
	point := "guest/state/" + writeReason(why)
	s.cfg.Crash.At(point + "/before")
	s.dev.point = point + "/write"
	st, err := s.store.Write(counter, b)
	if err != nil {
		return &Error{Code: CodeStateIO, Err: err}
	}
	s.cfg.Crash.At(point + "/synced")
	s.counter = counter
	s.savedNV = sha256.Sum256(nv)
	s.emit("state-written", map[string]any{"slot": statestore.SlotName(st.Slot), "generation": st.Generation, "counter": counter, "why": why})
	return nil
}

// runtimeWrite persists a change made while the OS runs. In write-through mode the counter
// advances and the verifier confirms each write, closing the intra-boot rollback window;
// otherwise the counter stays (the documented limitation).
//
// A write that cannot be made durable (and, in write-through mode, confirmed) halts the SVSM:
// the OS gets no answer to the call that caused it, nor to any later one, because the vTPM's
// state is no longer the persisted one.
func (s *SVSM) runtimeWrite(ctx context.Context, nv []byte, why string) error {
	counter := s.counter
	if s.payload != nil && s.payload.WriteThrough {
		counter++
	}
	err := s.write(counter, nv, why)
	if err == nil && s.payload != nil && s.payload.WriteThrough {
		err = s.confirm(ctx, counter, why)
	}
	if err != nil {
		return s.haltLocked(err, why)
	}
	return nil
}

// haltLocked stops the SVSM for good: a real SVSM would stop the VM here.
func (s *SVSM) haltLocked(err error, why string) error {
	var se *Error
	if !errors.As(err, &se) {
		se = &Error{Code: CodeStateIO, Err: err}
	}
	s.halted = se
	s.emit("halted", map[string]any{"cause": se.Code, "write": why, "detail": se.Err.Error(), "counter": s.counter})
	return se
}

// Counter returns the counter the state on disk holds.
func (s *SVSM) Counter() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counter
}

// TPM returns the vTPM's command transport. NV changes a command makes are on the state disk
// before its response can be read.
func (s *SVSM) TPM(ctx context.Context) io.ReadWriter { return &tpmPort{s: s, ctx: ctx} }

type tpmPort struct {
	s   *SVSM
	ctx context.Context
}

func (p *tpmPort) Write(cmd []byte) (int, error) {
	s := p.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.halted != nil {
		return 0, ErrHalted
	}
	if s.off {
		return 0, errors.New("svsm: powered off")
	}
	n, err := s.tpm.Transport().Write(cmd)
	if err != nil {
		return n, err
	}
	nv, err := s.tpm.Checkpoint()
	if err != nil {
		return 0, err
	}
	if sha256.Sum256(nv) != s.savedNV {
		if err := s.runtimeWrite(p.ctx, nv, "tpm-nv"); err != nil {
			return 0, fmt.Errorf("persist TPM NV: %w", err)
		}
	}
	return n, nil
}

func (p *tpmPort) Read(b []byte) (int, error) {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.s.halted != nil {
		return 0, ErrHalted // the answer that depended on an unconfirmed write never leaves
	}
	return p.s.tpm.Transport().Read(b)
}

// Variables is the UEFI variable service the firmware and OS call.
func (s *SVSM) Variables(ctx context.Context) *VariableService {
	return &VariableService{s: s, ctx: ctx}
}

// VariableService is GetVariable/SetVariable; every accepted SetVariable is persisted
// before it returns.
type VariableService struct {
	s   *SVSM
	ctx context.Context
}

// Get returns a variable.
func (v *VariableService) Get(guid uefivars.GUID, name string) (*uefivars.Variable, bool) {
	v.s.mu.Lock()
	defer v.s.mu.Unlock()
	if v.s.halted != nil {
		return nil, false
	}
	return v.s.vars.Get(guid, name)
}

// SecureBoot reports whether Secure Boot is enforced (a PK is enrolled).
func (v *VariableService) SecureBoot() bool {
	v.s.mu.Lock()
	defer v.s.mu.Unlock()
	return v.s.vars.SecureBoot()
}

// Set is SetVariable. A refused write returns *uefivars.Error and changes nothing.
func (v *VariableService) Set(u uefivars.Update) error {
	s := v.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.halted != nil {
		return ErrHalted
	}
	if s.off {
		return errors.New("svsm: powered off")
	}
	before, _ := s.vars.MarshalBinary()
	if err := s.vars.Apply(u); err != nil {
		return err
	}
	after, _ := s.vars.MarshalBinary()
	if bytes.Equal(before, after) {
		return nil
	}
	nv, err := s.tpm.Checkpoint()
	if err != nil {
		return err
	}
	return s.runtimeWrite(v.ctx, nv, "uefi-var "+u.Name)
}

// PowerOff shuts the vTPM down cleanly and persists its final NV image.
func (s *SVSM) PowerOff(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.halted != nil {
		s.off = true
		s.tpm.Close()
		return s.halted
	}
	if s.off {
		return nil
	}
	s.off = true
	nv, err := s.tpm.Shutdown()
	if err != nil {
		return &Error{Code: CodeTPM, Err: err}
	}
	if sha256.Sum256(nv) == s.savedNV {
		return nil
	}
	return s.runtimeWrite(ctx, nv, "power-off")
}

// Abort releases the vTPM without persisting (a failed boot above the SVSM).
func (s *SVSM) Abort() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.off {
		s.off = true
		s.tpm.Close()
	}
}
