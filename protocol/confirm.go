package protocol

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// BootIDSize is the size of a boot id (one release of a VM's key).
const BootIDSize = 16

// ConfirmNonceSize is the size of the guest's per-request nonce; the answer must carry it
// back under the verifier's MAC, which binds the answer to the request it answers.
const ConfirmNonceSize = 16

// MaxConfirmReason bounds a refusal's reason text (it is under the answer's MAC).
const MaxConfirmReason = 512

// Confirmation protocol 0.3.0 (PROTOCOLS.md §3, docs/protocols.md). Both messages are
// authenticated with HMAC-SHA256 under keys derived from the confirmation key of the released
// secret payload, one key per direction, so the host that relays them can forge, replay or
// reflect neither. 0.2.0 (request MAC only, answer unauthenticated) is gone: a guest that
// accepted an unauthenticated answer could be told "confirmed" by the host.
const (
	confirmKeyInfoRequest = "svsm-e2e confirm 0.3.0 key guest->verifier"
	confirmKeyInfoAnswer  = "svsm-e2e confirm 0.3.0 key verifier->guest"
	confirmLabelRequest   = "svsm-e2e confirm 0.3.0 request\x00"
	confirmLabelAnswer    = "svsm-e2e confirm 0.3.0 answer\x00"
)

// ConfirmKeys are the two directional keys derived from a payload's confirmation key.
type ConfirmKeys struct {
	Request [32]byte // guest → verifier
	Answer  [32]byte // verifier → guest
}

// DeriveConfirmKeys derives the directional keys: HKDF-SHA256(IKM = confirmation key, no salt,
// info = the direction's label), 32 bytes each.
func DeriveConfirmKeys(confirmKey []byte) (ConfirmKeys, error) {
	var k ConfirmKeys
	if len(confirmKey) != 32 {
		return k, fmt.Errorf("confirm: key is %d bytes, want 32", len(confirmKey))
	}
	for _, d := range []struct {
		info string
		dst  *[32]byte
	}{{confirmKeyInfoRequest, &k.Request}, {confirmKeyInfoAnswer, &k.Answer}} {
		b, err := hkdf.Key(sha256.New, confirmKey, nil, d.info, 32)
		if err != nil {
			return k, fmt.Errorf("confirm: derive key: %w", err)
		}
		copy(d.dst[:], b)
	}
	return k, nil
}

// ConfirmRequest is svsm-e2e's confirmation: "the state now durably holds Counter". It travels
// inside a VersionConfirm NegotiationRequest on the proxy channel and as the JSON body of
// POST KBSPathConfirm to the verifier.
type ConfirmRequest struct {
	BootID  []byte `json:"boot_id"`
	Counter uint64 `json:"counter"`
	Nonce   []byte `json:"nonce"`
	MAC     []byte `json:"mac"`
}

// Validate checks sizes.
func (c *ConfirmRequest) Validate() error {
	if len(c.BootID) != BootIDSize {
		return fmt.Errorf("confirm: boot_id is %d bytes, want %d", len(c.BootID), BootIDSize)
	}
	if len(c.Nonce) != ConfirmNonceSize {
		return fmt.Errorf("confirm: nonce is %d bytes, want %d", len(c.Nonce), ConfirmNonceSize)
	}
	if len(c.MAC) != sha256.Size {
		return fmt.Errorf("confirm: mac is %d bytes, want %d", len(c.MAC), sha256.Size)
	}
	return nil
}

// RequestMACInput is the byte string the request MAC covers (docs/protocols.md):
// label ‖ boot_id (16) ‖ counter (u64 LE) ‖ nonce (16).
func RequestMACInput(bootID []byte, counter uint64, nonce []byte) []byte {
	b := make([]byte, 0, len(confirmLabelRequest)+BootIDSize+8+ConfirmNonceSize)
	b = append(b, confirmLabelRequest...)
	b = append(b, bootID...)
	b = binary.LittleEndian.AppendUint64(b, counter)
	return append(b, nonce...)
}

func mac(key []byte, msg []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(msg)
	return m.Sum(nil)
}

// NewConfirmRequest builds an authenticated confirmation with the guest's fresh nonce.
func NewConfirmRequest(keys ConfirmKeys, bootID []byte, counter uint64, nonce []byte) *ConfirmRequest {
	return &ConfirmRequest{
		BootID: append([]byte(nil), bootID...), Counter: counter, Nonce: append([]byte(nil), nonce...),
		MAC: mac(keys.Request[:], RequestMACInput(bootID, counter, nonce)),
	}
}

// Verify checks the request MAC in constant time.
func (c *ConfirmRequest) Verify(keys ConfirmKeys) error {
	if err := c.Validate(); err != nil {
		return err
	}
	if !hmac.Equal(c.MAC, mac(keys.Request[:], RequestMACInput(c.BootID, c.Counter, c.Nonce))) {
		return errors.New("confirm: request mac does not verify")
	}
	return nil
}

// ConfirmResponse answers a ConfirmRequest. It echoes the request's boot id, counter and nonce;
// Confirmed is the verifier's confirmed counter after the request; Reason explains a refusal.
// MAC is empty only when the verifier cannot authenticate its answer (an unknown boot id) or
// when the proxy speaks because the verifier could not: a guest treats both as no answer.
type ConfirmResponse struct {
	Version   Version `json:"version"`
	Success   bool    `json:"success"`
	BootID    []byte  `json:"boot_id"`
	Counter   uint64  `json:"counter"`
	Nonce     []byte  `json:"nonce"`
	Confirmed uint64  `json:"confirmed"`
	Reason    string  `json:"reason,omitempty"`
	MAC       []byte  `json:"mac,omitempty"`
}

// AnswerMACInput is the byte string the answer MAC covers (docs/protocols.md): label ‖
// boot_id (16) ‖ counter (u64 LE) ‖ nonce (16) ‖ request mac (32) ‖ success (u8) ‖
// confirmed (u64 LE) ‖ reason length (u16 LE) ‖ reason. The request's nonce and MAC bind the
// answer to exactly one request.
func AnswerMACInput(req *ConfirmRequest, success bool, confirmed uint64, reason string) []byte {
	b := make([]byte, 0, len(confirmLabelAnswer)+BootIDSize+8+ConfirmNonceSize+sha256.Size+1+8+2+len(reason))
	b = append(b, confirmLabelAnswer...)
	b = append(b, req.BootID...)
	b = binary.LittleEndian.AppendUint64(b, req.Counter)
	b = append(b, req.Nonce...)
	b = append(b, req.MAC...)
	if success {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	b = binary.LittleEndian.AppendUint64(b, confirmed)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(reason)))
	return append(b, reason...)
}

// NewConfirmAnswer builds the verifier's authenticated answer to req.
func NewConfirmAnswer(keys ConfirmKeys, req *ConfirmRequest, success bool, confirmed uint64, reason string) *ConfirmResponse {
	if len(reason) > MaxConfirmReason {
		reason = reason[:MaxConfirmReason]
	}
	return &ConfirmResponse{
		Version: VersionConfirm, Success: success, BootID: req.BootID, Counter: req.Counter, Nonce: req.Nonce,
		Confirmed: confirmed, Reason: reason, MAC: mac(keys.Answer[:], AnswerMACInput(req, success, confirmed, reason)),
	}
}

// UnauthenticatedAnswer is a refusal nobody could authenticate (unknown boot id, verifier
// unreachable). A guest never takes it for anything but "no valid answer".
func UnauthenticatedAnswer(req *ConfirmRequest, reason string) *ConfirmResponse {
	if len(reason) > MaxConfirmReason {
		reason = reason[:MaxConfirmReason]
	}
	r := &ConfirmResponse{Version: VersionConfirm, Reason: reason}
	if req != nil {
		r.BootID, r.Counter, r.Nonce = req.BootID, req.Counter, req.Nonce
	}
	return r
}

// ErrUnauthenticatedAnswer means an answer is not the verifier's authenticated answer to this
// request: wrong or missing MAC, another version, or fields that do not echo the request.
var ErrUnauthenticatedAnswer = errors.New("confirm answer is not authenticated")

// VerifyAnswer checks that r is the verifier's authenticated answer to req. It says nothing
// about success: the caller reads r.Success (authenticated) after a nil return.
func (r *ConfirmResponse) VerifyAnswer(keys ConfirmKeys, req *ConfirmRequest) error {
	if r.Version != VersionConfirm {
		return fmt.Errorf("%w: version %s, want %s", ErrUnauthenticatedAnswer, r.Version, VersionConfirm)
	}
	if len(r.MAC) == 0 {
		return fmt.Errorf("%w: no mac (success=%v, reason %q)", ErrUnauthenticatedAnswer, r.Success, r.Reason)
	}
	if len(r.Reason) > MaxConfirmReason {
		return fmt.Errorf("%w: reason of %d bytes", ErrUnauthenticatedAnswer, len(r.Reason))
	}
	if !hmac.Equal(r.MAC, mac(keys.Answer[:], AnswerMACInput(req, r.Success, r.Confirmed, r.Reason))) {
		return fmt.Errorf("%w: mac does not verify for this request (success=%v)", ErrUnauthenticatedAnswer, r.Success)
	}
	// The echoed fields are under no MAC of their own (the MAC covers the request's values);
	// a mismatch means somebody rewrote them: refuse rather than guess.
	if !hmac.Equal(r.BootID, req.BootID) || r.Counter != req.Counter || !hmac.Equal(r.Nonce, req.Nonce) {
		return fmt.Errorf("%w: echoed boot id, counter or nonce differ from the request", ErrUnauthenticatedAnswer)
	}
	return nil
}

// DecodeConfirmResponse parses an answer frame (bounded by the frame reader). It checks the
// shape only; VerifyAnswer decides whether it is the verifier's.
func DecodeConfirmResponse(b []byte) (*ConfirmResponse, error) {
	var r ConfirmResponse
	if err := unmarshalObject(b, &r, "version", "success"); err != nil {
		return nil, fmt.Errorf("confirm answer: %w", err)
	}
	return &r, nil
}
