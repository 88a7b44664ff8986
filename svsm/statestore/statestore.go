// Package statestore is the SVSM's persistent state on an untrusted disk: two slots, each a
// header and an AES-256-GCM body, written alternately so that a torn write leaves the
// previous generation intact. docs/state-format.md is the byte-level description.
//
// The store authenticates and bounds everything it reads; it does not judge freshness (the
// counter's meaning belongs to the caller, which knows what the verifier expects).
package statestore

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Layout constants (docs/state-format.md).
const (
	HeaderSize  = 128
	SlotSize    = 256 << 10
	SlotCount   = 2
	DiskSize    = SlotCount * SlotSize
	MaxBodySize = SlotSize - HeaderSize - TagSize // plaintext bound
	TagSize     = 16
	NonceSize   = 12
	VMIDSize    = 32
	KeySize     = 32
	Version     = 1

	offMagic    = 0x00
	offVersion  = 0x08
	offHdrSize  = 0x0A
	offFlags    = 0x0C
	offVMID     = 0x10
	offCounter  = 0x30
	offGen      = 0x38
	offBodyLen  = 0x40
	offNonce    = 0x44
	offReserved = 0x50
	offCRC      = 0x7C
)

// Magic opens every slot header.
var Magic = [8]byte{'S', 'V', 'S', 'M', 'S', 'T', 'A', 'T'}

// kdfInfo separates the slot encryption key from other uses of the state key.
const kdfInfo = "svsm-e2e state v1"

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// Device is the state disk: a file in the process backend, a block device in a VM.
type Device interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
}

// Check names the validation a slot failed, for precise corruption reports.
type Check string

// Checks, in the order they are applied to a slot.
const (
	CheckTruncated = Check("truncated")       // the disk ends inside the slot
	CheckMagic     = Check("magic")           // not a slot header (and not empty)
	CheckChecksum  = Check("header-checksum") // CRC32C over the header does not match
	CheckVersion   = Check("version")         // unknown format version or header size
	CheckFields    = Check("header-fields")   // flags/reserved non-zero, length out of bounds
	CheckVMID      = Check("vm-id")           // the slot belongs to another VM
	CheckAuth      = Check("authentication")  // AES-GCM failed: wrong key or tampered header/body
)

// SlotName is "A" for slot 0 and "B" for slot 1.
func SlotName(i int) string { return string(rune('A' + i)) }

// SlotError says which slot failed which check.
type SlotError struct {
	Slot   int
	Check  Check
	Detail string
}

func (e *SlotError) Error() string {
	return fmt.Sprintf("state slot %s: %s: %s", SlotName(e.Slot), e.Check, e.Detail)
}

// ErrEmpty means neither slot has ever been written: a first boot.
var ErrEmpty = errors.New("state disk is empty")

// CorruptError means no slot is usable although the disk is not empty. It lists each slot's
// failure; nothing is overwritten by Open.
type CorruptError struct {
	Slots []*SlotError
	// Empty is how many slots were never written (all zero or beyond the disk's end).
	Empty int
}

func (e *CorruptError) Error() string {
	var b bytes.Buffer
	b.WriteString("no valid state slot:")
	for _, s := range e.Slots {
		fmt.Fprintf(&b, " [%s]", s.Error())
	}
	return b.String()
}

// State is one decrypted generation.
type State struct {
	Slot       int
	Counter    uint64
	Generation uint64
	Body       []byte
}

// Options configure a Store.
type Options struct {
	// Key is the state key released by the verifier (or the raw secret).
	Key [KeySize]byte
	// VMID binds the state to one VM; all zero in raw mode, where only the key binds it.
	VMID [VMIDSize]byte
	// Rand supplies nonces; crypto/rand when nil.
	Rand io.Reader
	// OverIncompleteFirstWrite opens a disk whose only written slot is invalid (a first write
	// cut short) as an empty one: ErrEmpty, with the next write going to the never-written
	// slot, so the damaged one is only overwritten once a good copy exists. The caller decides
	// when that is safe (nothing on the disk was ever confirmed).
	OverIncompleteFirstWrite bool
}

// Store reads and writes the two slots of one state disk.
type Store struct {
	dev    Device
	aead   cipher.AEAD
	vmID   [VMIDSize]byte
	rand   io.Reader
	newest int    // slot the next write must not overwrite (the state in use), -1 if none
	gen    uint64 // highest valid generation on disk
	valid  []*State
	// Problems found by Open in slots that were not used (reported, then repaired by the
	// next write to that slot).
	Problems []*SlotError
}

// Open reads both slots and returns the newest valid generation. It returns ErrEmpty for a
// never-written disk (the Store is then ready for the first Write), and *CorruptError when
// no slot is valid. A slot that fails while the other is valid is listed in s.Problems.
func Open(dev Device, opts Options) (*Store, *State, error) {
	key, err := hkdf.Key(sha256.New, opts.Key[:], nil, kdfInfo, KeySize)
	if err != nil {
		return nil, nil, fmt.Errorf("derive state key: %w", err)
	}
	blk, err := aes.NewCipher(key)
	if err != nil {
		return nil, nil, err
	}
	aead, err := cipher.NewGCM(blk)
	if err != nil {
		return nil, nil, err
	}
	s := &Store{dev: dev, aead: aead, vmID: opts.VMID, rand: opts.Rand, newest: -1}
	if s.rand == nil {
		s.rand = rand.Reader
	}
	var best *State
	var problems []*SlotError
	empty := 0
	for i := range SlotCount {
		st, err := s.readSlot(i)
		switch {
		case errors.Is(err, errSlotEmpty):
			empty++
		case err != nil:
			var se *SlotError
			if !errors.As(err, &se) {
				return nil, nil, fmt.Errorf("read state slot %s: %w", SlotName(i), err)
			}
			problems = append(problems, se)
		case best != nil && st.Generation == best.Generation:
			// Two slots never share a generation; treat it as tampering with the later one.
			problems = append(problems, &SlotError{Slot: i, Check: CheckFields,
				Detail: fmt.Sprintf("generation %d duplicates slot %s", st.Generation, SlotName(best.Slot))})
		default:
			s.valid = append(s.valid, st)
			if best == nil || st.Generation > best.Generation {
				best = st
			}
		}
	}
	s.Problems = problems
	if best == nil {
		if empty == SlotCount {
			return s, nil, ErrEmpty
		}
		if opts.OverIncompleteFirstWrite && empty == SlotCount-1 && len(problems) == 1 {
			s.newest = problems[0].Slot // the next write goes to the other, never-written slot
			return s, nil, ErrEmpty
		}
		return nil, nil, &CorruptError{Slots: problems, Empty: empty}
	}
	s.newest, s.gen = best.Slot, best.Generation
	return s, best, nil
}

// Use makes the newest valid state that holds counter the one in use, if there is one, and
// returns it. The next Write then goes to the other slot, overwriting whatever was newer.
// The SVSM uses it to come up with the last confirmed state when the newest slot holds an
// advance the verifier never confirmed.
func (s *Store) Use(counter uint64) (*State, bool) {
	var pick *State
	for _, st := range s.valid {
		if st.Counter == counter && (pick == nil || st.Generation > pick.Generation) {
			pick = st
		}
	}
	if pick == nil {
		return nil, false
	}
	s.newest = pick.Slot
	return pick, true
}

var errSlotEmpty = errors.New("slot empty")

// readSlot reads and authenticates slot i.
func (s *Store) readSlot(i int) (*State, error) {
	base := int64(i) * SlotSize
	h := make([]byte, HeaderSize)
	n, err := s.dev.ReadAt(h, base)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if n == 0 || isZero(h[:n]) {
		return s.checkEmpty(i, n)
	}
	if n < HeaderSize {
		return nil, &SlotError{i, CheckTruncated, fmt.Sprintf("disk ends %d bytes into the header", n)}
	}
	if !bytes.Equal(h[offMagic:offMagic+8], Magic[:]) {
		return nil, &SlotError{i, CheckMagic, fmt.Sprintf("found %x", h[offMagic:offMagic+8])}
	}
	if got, want := binary.LittleEndian.Uint32(h[offCRC:]), crc32.Checksum(h[:offCRC], crcTable); got != want {
		return nil, &SlotError{i, CheckChecksum, fmt.Sprintf("stored %08x, computed %08x", got, want)}
	}
	if v := binary.LittleEndian.Uint16(h[offVersion:]); v != Version {
		return nil, &SlotError{i, CheckVersion, fmt.Sprintf("format version %d, want %d", v, Version)}
	}
	if hs := binary.LittleEndian.Uint16(h[offHdrSize:]); hs != HeaderSize {
		return nil, &SlotError{i, CheckVersion, fmt.Sprintf("header size %d, want %d", hs, HeaderSize)}
	}
	if f := binary.LittleEndian.Uint32(h[offFlags:]); f != 0 {
		return nil, &SlotError{i, CheckFields, fmt.Sprintf("unknown flags %#x", f)}
	}
	if !isZero(h[offReserved:offCRC]) {
		return nil, &SlotError{i, CheckFields, "reserved bytes not zero"}
	}
	bodyLen := binary.LittleEndian.Uint32(h[offBodyLen:])
	if bodyLen < TagSize || bodyLen > SlotSize-HeaderSize {
		return nil, &SlotError{i, CheckFields, fmt.Sprintf("body length %d outside [%d, %d]", bodyLen, TagSize, SlotSize-HeaderSize)}
	}
	if !bytes.Equal(h[offVMID:offVMID+VMIDSize], s.vmID[:]) {
		return nil, &SlotError{i, CheckVMID, fmt.Sprintf("slot belongs to VM %x, this is VM %x", h[offVMID:offVMID+VMIDSize], s.vmID)}
	}
	body := make([]byte, bodyLen)
	n, err = s.dev.ReadAt(body, base+HeaderSize)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if n < len(body) {
		return nil, &SlotError{i, CheckTruncated, fmt.Sprintf("disk ends %d bytes into a %d-byte body", n, bodyLen)}
	}
	plain, err := s.aead.Open(nil, h[offNonce:offNonce+NonceSize], body, s.aad(h))
	if err != nil {
		return nil, &SlotError{i, CheckAuth, "AES-256-GCM tag mismatch: wrong state key, or header/body modified"}
	}
	return &State{
		Slot:       i,
		Counter:    binary.LittleEndian.Uint64(h[offCounter:]),
		Generation: binary.LittleEndian.Uint64(h[offGen:]),
		Body:       plain,
	}, nil
}

// checkEmpty decides whether a slot whose header reads as zeros (n bytes of it exist) was
// never written. Zeroing only the header of a written slot is tampering, not emptiness.
func (s *Store) checkEmpty(i, n int) (*State, error) {
	if n == 0 {
		return nil, errSlotEmpty
	}
	if n < HeaderSize {
		return nil, &SlotError{i, CheckTruncated, fmt.Sprintf("disk ends %d bytes into the header", n)}
	}
	rest := make([]byte, SlotSize-HeaderSize)
	m, err := s.dev.ReadAt(rest, int64(i)*SlotSize+HeaderSize)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if !isZero(rest[:m]) {
		return nil, &SlotError{i, CheckMagic, "header is zeroed but the slot body is not empty"}
	}
	return nil, errSlotEmpty
}

// aad is the header (without its checksum) followed by the VM id the reader expects.
func (s *Store) aad(h []byte) []byte {
	a := make([]byte, 0, offCRC+VMIDSize)
	a = append(a, h[:offCRC]...)
	return append(a, s.vmID[:]...)
}

// Write stores body with counter as the next generation, in the slot that does not hold the
// newest one, and syncs the device before returning. On error the newest generation on
// disk is unchanged.
func (s *Store) Write(counter uint64, body []byte) (*State, error) {
	if len(body) > MaxBodySize {
		return nil, fmt.Errorf("state body of %d bytes exceeds %d", len(body), MaxBodySize)
	}
	slot := 0
	if s.newest == 0 {
		slot = 1
	}
	gen := s.gen + 1
	h := make([]byte, HeaderSize)
	copy(h[offMagic:], Magic[:])
	binary.LittleEndian.PutUint16(h[offVersion:], Version)
	binary.LittleEndian.PutUint16(h[offHdrSize:], HeaderSize)
	copy(h[offVMID:], s.vmID[:])
	binary.LittleEndian.PutUint64(h[offCounter:], counter)
	binary.LittleEndian.PutUint64(h[offGen:], gen)
	binary.LittleEndian.PutUint32(h[offBodyLen:], uint32(len(body)+TagSize))
	if _, err := io.ReadFull(s.rand, h[offNonce:offNonce+NonceSize]); err != nil {
		return nil, fmt.Errorf("state nonce: %w", err)
	}
	binary.LittleEndian.PutUint32(h[offCRC:], crc32.Checksum(h[:offCRC], crcTable))
	sealed := s.aead.Seal(nil, h[offNonce:offNonce+NonceSize], body, s.aad(h))
	buf := append(h, sealed...)
	if _, err := s.dev.WriteAt(buf, int64(slot)*SlotSize); err != nil {
		return nil, fmt.Errorf("write state slot %s: %w", SlotName(slot), err)
	}
	if err := s.dev.Sync(); err != nil {
		return nil, fmt.Errorf("sync state slot %s: %w", SlotName(slot), err)
	}
	s.newest, s.gen = slot, gen
	return &State{Slot: slot, Counter: counter, Generation: gen, Body: body}, nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// HeaderInfo is what anyone — the host included — can read from a slot without the key:
// headers are authenticated but not encrypted.
type HeaderInfo struct {
	Slot       int
	Present    bool // the header is not all zeros
	Valid      bool // magic and checksum are right
	Counter    uint64
	Generation uint64
	VMID       [VMIDSize]byte
}

// InspectHeaders reads both slot headers without decrypting anything.
func InspectHeaders(dev io.ReaderAt) ([SlotCount]HeaderInfo, error) {
	var out [SlotCount]HeaderInfo
	for i := range SlotCount {
		h := make([]byte, HeaderSize)
		n, err := dev.ReadAt(h, int64(i)*SlotSize)
		if err != nil && !errors.Is(err, io.EOF) {
			return out, err
		}
		hi := HeaderInfo{Slot: i, Present: n > 0 && !isZero(h[:n])}
		if n == HeaderSize && bytes.Equal(h[:8], Magic[:]) && binary.LittleEndian.Uint32(h[offCRC:]) == crc32.Checksum(h[:offCRC], crcTable) {
			hi.Valid = true
			hi.Counter = binary.LittleEndian.Uint64(h[offCounter:])
			hi.Generation = binary.LittleEndian.Uint64(h[offGen:])
			copy(hi.VMID[:], h[offVMID:])
		}
		out[i] = hi
	}
	return out, nil
}
