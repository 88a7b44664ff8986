package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// Protocol versions spoken on the SVSM ⇄ proxy channel.
var (
	// VersionAttest is upstream COCONUT-SVSM's attestation protocol (PROTOCOLS.md §1).
	VersionAttest = Version{0, 1, 0}
	// VersionConfirm is svsm-e2e's confirmation extension (PROTOCOLS.md §3). A connection
	// announcing it carries exactly one ConfirmRequest and one ConfirmResponse, both
	// authenticated. 0.2.0 (answer unauthenticated) is refused like any unknown version.
	VersionConfirm = Version{0, 3, 0}
)

// TeeSNP is the only TEE this stack speaks.
const TeeSNP = "snp"

// P521CoordSize is the size of one big-endian P-521 coordinate on the wire.
const P521CoordSize = 66

// NonceMaxSize bounds a challenge; KBS nonces are 32 bytes, we allow room but not abuse.
const NonceMaxSize = 256

// Version is a 3-element protocol version, serialised as a JSON array [major, minor, patch].
type Version [3]uint32

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v[0], v[1], v[2]) }

// UnmarshalJSON insists on exactly three elements: encoding/json would silently pad or drop.
func (v *Version) UnmarshalJSON(b []byte) error {
	var parts []uint32
	if err := json.Unmarshal(b, &parts); err != nil {
		return fmt.Errorf("version: %w", err)
	}
	if len(parts) != 3 {
		return fmt.Errorf("version: want 3 elements, got %d", len(parts))
	}
	copy(v[:], parts)
	return nil
}

// NegotiationRequest is message 1 (SVSM → proxy). For VersionConfirm connections the
// Confirm field carries the confirmation; it is absent in upstream traffic.
type NegotiationRequest struct {
	Version Version         `json:"version"`
	Tee     string          `json:"tee"`
	Confirm *ConfirmRequest `json:"confirm,omitempty"`
}

// Negotiation parameters, hashed into REPORT_DATA in the order the proxy lists them.
const (
	ParamEcPublicKeyBytes = "EcPublicKeyBytes"
	ParamChallenge        = "Challenge"
)

// NegotiationResponse is message 2 (proxy → SVSM).
type NegotiationResponse struct {
	Challenge []byte   `json:"challenge"`
	Params    []string `json:"params"`
}

// ECPublicKey is a P-521 public key as two 66-byte big-endian coordinates.
type ECPublicKey struct {
	X []byte `json:"x"`
	Y []byte `json:"y"`
}

// Validate checks coordinate sizes (not curve membership: crypto/ecdh does that on use).
func (k ECPublicKey) Validate() error {
	if len(k.X) != P521CoordSize || len(k.Y) != P521CoordSize {
		return fmt.Errorf("P-521 key coordinates must be %d bytes, got x=%d y=%d", P521CoordSize, len(k.X), len(k.Y))
	}
	return nil
}

// SnpEvidence is the body of the externally tagged {"Snp": {...}} evidence enum.
type SnpEvidence struct {
	Report []byte `json:"report"`
	// CertsBuf is optional; the SVSM leaves it out. Absent and null both decode to nil.
	CertsBuf []byte `json:"certs_buf,omitempty"`
}

// Evidence is the externally tagged enum; SNP is the only variant.
type Evidence struct {
	Snp *SnpEvidence `json:"Snp"`
}

// AttestationRequest is message 3 (SVSM → proxy).
type AttestationRequest struct {
	Tee       string      `json:"tee"`
	Evidence  Evidence    `json:"evidence"`
	Challenge []byte      `json:"challenge"`
	Key       ECPublicKey `json:"key"`
}

// ReportSize is the size of an SNP ATTESTATION_REPORT.
const ReportSize = 1184

// Validate checks every bounded field so later code can index without fear.
func (r *AttestationRequest) Validate() error {
	if r.Tee != TeeSNP {
		return fmt.Errorf("attestation request: tee %q, want %q", r.Tee, TeeSNP)
	}
	if r.Evidence.Snp == nil {
		return errors.New("attestation request: evidence has no Snp variant")
	}
	if n := len(r.Evidence.Snp.Report); n != ReportSize {
		return fmt.Errorf("attestation request: report is %d bytes, want %d", n, ReportSize)
	}
	if n := len(r.Challenge); n == 0 || n > NonceMaxSize {
		return fmt.Errorf("attestation request: challenge is %d bytes, want 1..%d", n, NonceMaxSize)
	}
	if err := r.Key.Validate(); err != nil {
		return fmt.Errorf("attestation request: %w", err)
	}
	return nil
}

// Decryption carries the JWE parts the SVSM needs to unwrap the secret.
type Decryption struct {
	EPK        ECPublicKey `json:"epk"`
	WrappedCEK []byte      `json:"wrapped_cek"`
	AAD        []byte      `json:"aad"`
	IV         []byte      `json:"iv"`
	Tag        []byte      `json:"tag"`
}

// Token is the externally tagged {"Jwt": ".."} / {"Cwt": ".."} enum; the SVSM ignores it.
type Token struct {
	Jwt *string `json:"Jwt,omitempty"`
	Cwt *string `json:"Cwt,omitempty"`
}

// AttestationResponse is message 4 (proxy → SVSM).
//
// On failure Secret must be absent — not null — because the SVSM's deserializer rejects
// null there; Decryption and Token are null. MarshalJSON and UnmarshalJSON enforce this.
type AttestationResponse struct {
	Success    bool
	Secret     []byte
	Decryption *Decryption
	Token      *Token
}

type attestationResponseWire struct {
	Success    bool        `json:"success"`
	Secret     []byte      `json:"secret,omitempty"`
	Decryption *Decryption `json:"decryption"`
	Token      *Token      `json:"token"`
}

// MarshalJSON writes secret only when present, and null decryption/token when absent.
func (r AttestationResponse) MarshalJSON() ([]byte, error) {
	if r.Success && (len(r.Secret) == 0 || r.Decryption == nil) {
		return nil, errors.New("attestation response: success needs secret and decryption")
	}
	return json.Marshal(attestationResponseWire(r))
}

// UnmarshalJSON refuses "secret": null, as the SVSM does, and checks consistency.
func (r *AttestationResponse) UnmarshalJSON(b []byte) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return fmt.Errorf("attestation response: %w", err)
	}
	if raw, ok := fields["secret"]; ok && bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
		return errors.New("attestation response: secret is null, must be absent or a string")
	}
	if _, ok := fields["success"]; !ok {
		return errors.New("attestation response: missing success")
	}
	var w attestationResponseWire
	if err := json.Unmarshal(b, &w); err != nil {
		return fmt.Errorf("attestation response: %w", err)
	}
	if w.Success {
		if len(w.Secret) == 0 {
			return errors.New("attestation response: success without secret")
		}
		if w.Decryption == nil {
			return errors.New("attestation response: success without decryption")
		}
		if err := w.Decryption.EPK.Validate(); err != nil {
			return fmt.Errorf("attestation response: epk: %w", err)
		}
	}
	*r = AttestationResponse(w)
	return nil
}

// FailureResponse is the upstream-compatible refusal.
func FailureResponse() AttestationResponse { return AttestationResponse{} }

// DecodeNegotiationRequest parses and validates message 1.
func DecodeNegotiationRequest(b []byte) (*NegotiationRequest, error) {
	var m NegotiationRequest
	if err := unmarshalObject(b, &m, "version", "tee"); err != nil {
		return nil, fmt.Errorf("negotiation request: %w", err)
	}
	if m.Tee != TeeSNP {
		return nil, fmt.Errorf("negotiation request: tee %q, want %q", m.Tee, TeeSNP)
	}
	switch m.Version {
	case VersionAttest:
		if m.Confirm != nil {
			return nil, fmt.Errorf("negotiation request: confirm is not part of version %s", m.Version)
		}
	case VersionConfirm:
		if m.Confirm == nil {
			return nil, fmt.Errorf("negotiation request: version %s needs a confirm body", m.Version)
		}
		if err := m.Confirm.Validate(); err != nil {
			return nil, fmt.Errorf("negotiation request: %w", err)
		}
	default:
		return nil, fmt.Errorf("negotiation request: unsupported version %s", m.Version)
	}
	return &m, nil
}

// DecodeNegotiationResponse parses and validates message 2.
func DecodeNegotiationResponse(b []byte) (*NegotiationResponse, error) {
	var m NegotiationResponse
	if err := unmarshalObject(b, &m, "challenge", "params"); err != nil {
		return nil, fmt.Errorf("negotiation response: %w", err)
	}
	if n := len(m.Challenge); n == 0 || n > NonceMaxSize {
		return nil, fmt.Errorf("negotiation response: challenge is %d bytes, want 1..%d", n, NonceMaxSize)
	}
	if len(m.Params) == 0 || len(m.Params) > 8 {
		return nil, fmt.Errorf("negotiation response: %d params, want 1..8", len(m.Params))
	}
	for _, p := range m.Params {
		if p != ParamEcPublicKeyBytes && p != ParamChallenge {
			return nil, fmt.Errorf("negotiation response: unknown param %q", p)
		}
	}
	return &m, nil
}

// DecodeAttestationRequest parses and validates message 3.
func DecodeAttestationRequest(b []byte) (*AttestationRequest, error) {
	var m AttestationRequest
	if err := unmarshalObject(b, &m, "tee", "evidence", "challenge", "key"); err != nil {
		return nil, fmt.Errorf("attestation request: %w", err)
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return &m, nil
}

// DecodeAttestationResponse parses and validates message 4.
func DecodeAttestationResponse(b []byte) (*AttestationResponse, error) {
	var m AttestationResponse
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	return &m, nil
}

// unmarshalObject decodes a JSON object, requiring the listed keys to be present and non-null
// and refusing trailing data. Unknown keys are ignored, as serde does by default.
func unmarshalObject(b []byte, v any, required ...string) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return err
	}
	if fields == nil {
		return errors.New("not a JSON object")
	}
	for _, k := range required {
		raw, ok := fields[k]
		if !ok {
			return fmt.Errorf("missing field %q", k)
		}
		if bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
			return fmt.Errorf("field %q is null", k)
		}
	}
	return json.Unmarshal(b, v)
}
