package protocol

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// Secret modes a VM can be registered with.
const (
	SecretModeRaw = "raw" // upstream: the secret is the 32-byte state key
	SecretModeV1  = "v1"  // SecretPayloadV1
)

// StateKeySize is the size of the SVSM's storage root key.
const StateKeySize = 32

// SecretPayloadV1 is the structured secret released in "v1" mode. Byte layout, little-endian,
// 0x90 bytes in all (docs/protocols.md repeats it):
//
//	0x00  8  magic "SVSME2E\x01"
//	0x08  2  layout version = 1
//	0x0A  2  flags: bit 0 = write-through (confirm every runtime state write)
//	0x0C  4  reserved, zero
//	0x10 32  state key
//	0x30  8  expected counter: the counter the state must hold
//	0x38  8  next counter: the counter to advance to and confirm before firmware runs
//	0x40 16  boot id
//	0x50 32  confirmation key (HMAC-SHA256, see ConfirmMAC)
//	0x70 32  VM id: the verifier's identifier of this VM; state is bound to it
type SecretPayloadV1 struct {
	WriteThrough    bool
	StateKey        [StateKeySize]byte
	ExpectedCounter uint64
	NextCounter     uint64
	BootID          [BootIDSize]byte
	ConfirmKey      [32]byte
	VMID            [32]byte
}

// SecretPayloadV1Size is the exact encoded size.
const SecretPayloadV1Size = 0x90

var secretMagic = []byte("SVSME2E\x01")

// FlagWriteThrough marks write-through confirmation mode.
const FlagWriteThrough = 1

// MarshalBinary encodes the payload.
func (p *SecretPayloadV1) MarshalBinary() ([]byte, error) {
	b := make([]byte, SecretPayloadV1Size)
	copy(b[0:8], secretMagic)
	binary.LittleEndian.PutUint16(b[0x08:], 1)
	if p.WriteThrough {
		binary.LittleEndian.PutUint16(b[0x0A:], FlagWriteThrough)
	}
	copy(b[0x10:0x30], p.StateKey[:])
	binary.LittleEndian.PutUint64(b[0x30:], p.ExpectedCounter)
	binary.LittleEndian.PutUint64(b[0x38:], p.NextCounter)
	copy(b[0x40:0x50], p.BootID[:])
	copy(b[0x50:0x70], p.ConfirmKey[:])
	copy(b[0x70:0x90], p.VMID[:])
	return b, nil
}

// UnmarshalBinary decodes and checks a payload.
func (p *SecretPayloadV1) UnmarshalBinary(b []byte) error {
	if len(b) != SecretPayloadV1Size {
		return fmt.Errorf("secret payload v1: %d bytes, want %d", len(b), SecretPayloadV1Size)
	}
	if !bytes.Equal(b[0:8], secretMagic) {
		return errors.New("secret payload v1: bad magic")
	}
	if v := binary.LittleEndian.Uint16(b[0x08:]); v != 1 {
		return fmt.Errorf("secret payload v1: layout version %d, want 1", v)
	}
	flags := binary.LittleEndian.Uint16(b[0x0A:])
	if flags&^FlagWriteThrough != 0 {
		return fmt.Errorf("secret payload v1: unknown flags %#x", flags)
	}
	if binary.LittleEndian.Uint32(b[0x0C:]) != 0 {
		return errors.New("secret payload v1: reserved bytes not zero")
	}
	p.WriteThrough = flags&FlagWriteThrough != 0
	copy(p.StateKey[:], b[0x10:0x30])
	p.ExpectedCounter = binary.LittleEndian.Uint64(b[0x30:])
	p.NextCounter = binary.LittleEndian.Uint64(b[0x38:])
	if p.NextCounter != p.ExpectedCounter+1 {
		return fmt.Errorf("secret payload v1: next counter %d is not expected+1 (%d)", p.NextCounter, p.ExpectedCounter)
	}
	copy(p.BootID[:], b[0x40:0x50])
	copy(p.ConfirmKey[:], b[0x50:0x70])
	copy(p.VMID[:], b[0x70:0x90])
	return nil
}
