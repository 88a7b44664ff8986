package protocol

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// BootIDSize is the size of a boot id (one release of a VM's key).
const BootIDSize = 16

// ConfirmRequest is svsm-e2e's confirmation (PROTOCOLS.md §3): "the state now durably holds
// Counter". It travels inside a VersionConfirm NegotiationRequest on the proxy channel and as
// the JSON body of POST KBSPathConfirm to the verifier. MAC authenticates it with the confirm
// key from the secret payload, so neither host nor proxy can forge one.
type ConfirmRequest struct {
	BootID  []byte `json:"boot_id"`
	Counter uint64 `json:"counter"`
	MAC     []byte `json:"mac"`
}

// Validate checks sizes.
func (c *ConfirmRequest) Validate() error {
	if len(c.BootID) != BootIDSize {
		return fmt.Errorf("confirm: boot_id is %d bytes, want %d", len(c.BootID), BootIDSize)
	}
	if len(c.MAC) != sha256.Size {
		return fmt.Errorf("confirm: mac is %d bytes, want %d", len(c.MAC), sha256.Size)
	}
	return nil
}

const confirmLabel = "svsm-e2e confirm v1\x00"

// ConfirmMAC is HMAC-SHA256(key, "svsm-e2e confirm v1\0" ‖ boot_id ‖ counter as u64 LE).
func ConfirmMAC(key []byte, bootID []byte, counter uint64) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(confirmLabel))
	m.Write(bootID)
	var c [8]byte
	binary.LittleEndian.PutUint64(c[:], counter)
	m.Write(c[:])
	return m.Sum(nil)
}

// NewConfirmRequest builds an authenticated confirmation.
func NewConfirmRequest(key, bootID []byte, counter uint64) *ConfirmRequest {
	return &ConfirmRequest{BootID: append([]byte(nil), bootID...), Counter: counter, MAC: ConfirmMAC(key, bootID, counter)}
}

// Verify checks the MAC in constant time.
func (c *ConfirmRequest) Verify(key []byte) error {
	if !hmac.Equal(c.MAC, ConfirmMAC(key, c.BootID, c.Counter)) {
		return errors.New("confirm: mac mismatch")
	}
	return nil
}

// ConfirmResponse answers a ConfirmRequest. Counter is the verifier's confirmed counter after
// the request; Reason explains a refusal.
type ConfirmResponse struct {
	Success bool   `json:"success"`
	Counter uint64 `json:"counter"`
	Reason  string `json:"reason,omitempty"`
}
