package protocol

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
)

// KBS protocol 0.4.0 (Trustee "RCAR"), PROTOCOLS.md §2.
const (
	KBSVersion       = "0.4.0"
	KBSPathAuth      = "/kbs/v0/auth"
	KBSPathAttest    = "/kbs/v0/attest"
	KBSPathResource  = "/kbs/v0/resource/"
	KBSSessionCookie = "kbs-session-id"
	// KBSPathConfirm is svsm-e2e's extension endpoint for the §3 confirmation; it lives beside
	// the KBS paths but is versioned by the ConfirmRequest it carries.
	KBSPathConfirm = "/kbs/v0/svsm-e2e/confirm"
	// DefaultResourcePath is the path upstream aproxy hard-codes.
	DefaultResourcePath = "default/sample/test"
)

// KBSRequest is the body of POST /kbs/v0/auth. kbs-types 0.14 makes extra-params any JSON
// value; aproxy sends "" (EmptyExtraParams), and a verifier must accept whatever kbs-types does.
type KBSRequest struct {
	Version     string          `json:"version"`
	Tee         string          `json:"tee"`
	ExtraParams json.RawMessage `json:"extra-params"`
}

// EmptyExtraParams is what upstream aproxy sends and our verifier answers: the empty string.
var EmptyExtraParams = json.RawMessage(`""`)

// KBSChallenge is the auth response body; extra-params is any JSON value (kbs-types 0.14).
type KBSChallenge struct {
	Nonce       string          `json:"nonce"`
	ExtraParams json.RawMessage `json:"extra-params"`
}

// TeePubKey is the JWK of the guest's ephemeral key, coordinates base64url without padding.
type TeePubKey struct {
	Kty string `json:"kty"`
	Crv string `json:"crv"`
	Alg string `json:"alg"`
	X   string `json:"x"`
	Y   string `json:"y"`
}

// ECPublicKey converts the JWK to raw coordinates, checking every field.
func (k TeePubKey) ECPublicKey() (ECPublicKey, error) {
	if k.Kty != "EC" || k.Crv != "P-521" {
		return ECPublicKey{}, fmt.Errorf("tee-pubkey: kty %q crv %q, want EC P-521", k.Kty, k.Crv)
	}
	if k.Alg != "" && k.Alg != JWEKeyAlg {
		return ECPublicKey{}, fmt.Errorf("tee-pubkey: alg %q, want %q", k.Alg, JWEKeyAlg)
	}
	x, err := base64.RawURLEncoding.DecodeString(k.X)
	if err != nil {
		return ECPublicKey{}, fmt.Errorf("tee-pubkey x: %w", err)
	}
	y, err := base64.RawURLEncoding.DecodeString(k.Y)
	if err != nil {
		return ECPublicKey{}, fmt.Errorf("tee-pubkey y: %w", err)
	}
	pk := ECPublicKey{X: x, Y: y}
	if err := pk.Validate(); err != nil {
		return ECPublicKey{}, fmt.Errorf("tee-pubkey: %w", err)
	}
	return pk, nil
}

// TeePubKeyFrom builds the JWK for a raw P-521 key.
func TeePubKeyFrom(k ECPublicKey) TeePubKey {
	return TeePubKey{
		Kty: "EC", Crv: "P-521", Alg: JWEKeyAlg,
		X: base64.RawURLEncoding.EncodeToString(k.X),
		Y: base64.RawURLEncoding.EncodeToString(k.Y),
	}
}

// RuntimeData binds the session nonce and the guest key.
type RuntimeData struct {
	Nonce     string    `json:"nonce"`
	TeePubKey TeePubKey `json:"tee-pubkey"`
}

// PrimaryEvidence is the SNP evidence as aproxy serialises it. SnpReport is standard base64
// of the 1184-byte report; CertsBuf, when the guest sent one, is standard base64 of the
// extended report's certificate table (GUID-indexed: VCEK or VLEK, ASK, ARK).
type PrimaryEvidence struct {
	SnpReport string  `json:"snp-report"`
	CertsBuf  *string `json:"certs-buf"`
}

// InitData is kbs-types 0.14's initialization data (format and body strings).
type InitData struct {
	Format string `json:"format"`
	Body   string `json:"body"`
}

// TeeEvidence wraps the primary evidence.
type TeeEvidence struct {
	PrimaryEvidence    PrimaryEvidence `json:"primary_evidence"`
	AdditionalEvidence string          `json:"additional_evidence"`
}

// KBSAttestation is the body of POST /kbs/v0/attest.
type KBSAttestation struct {
	InitData    *InitData   `json:"init-data"`
	RuntimeData RuntimeData `json:"runtime-data"`
	TeeEvidence TeeEvidence `json:"tee-evidence"`
}

// KBSAttestResponse is the attest response body.
type KBSAttestResponse struct {
	Token string `json:"token"`
}

// ProblemDetails is an RFC 7807 error body. Type follows Trustee's convention of an error
// name URI; Detail carries our specific reason.
type ProblemDetails struct {
	Type   string `json:"type"`
	Title  string `json:"title,omitempty"`
	Status int    `json:"status,omitempty"`
	Detail string `json:"detail"`
}

// ProblemTypeBase prefixes every ProblemDetails.Type we emit.
const ProblemTypeBase = "https://svsm-e2e.dev/errors/"

func (p *ProblemDetails) Error() string {
	return fmt.Sprintf("%d %s: %s", p.Status, p.Title, p.Detail)
}

// FlattenedJWE is the RFC 7516 flattened JSON serialisation returned by a resource GET.
type FlattenedJWE struct {
	Protected    string `json:"protected"`
	EncryptedKey string `json:"encrypted_key"`
	IV           string `json:"iv"`
	Ciphertext   string `json:"ciphertext"`
	Tag          string `json:"tag"`
}
