package protocol

import (
	"crypto/sha512"
	"fmt"
)

// ReportData computes the 64-byte REPORT_DATA the SVSM requests: SHA-512 over the negotiated
// params in their listed order, EcPublicKeyBytes contributing x ‖ y and Challenge the raw
// nonce. Both the guest and the verifier call this, so the binding is defined in one place.
func ReportData(params []string, key ECPublicKey, challenge []byte) ([64]byte, error) {
	h := sha512.New()
	for _, p := range params {
		switch p {
		case ParamEcPublicKeyBytes:
			if err := key.Validate(); err != nil {
				return [64]byte{}, err
			}
			h.Write(key.Bytes())
		case ParamChallenge:
			h.Write(challenge)
		default:
			return [64]byte{}, fmt.Errorf("report data: unknown param %q", p)
		}
	}
	var out [64]byte
	copy(out[:], h.Sum(nil))
	return out, nil
}

// DefaultParams is the order our proxy (and upstream aproxy) announces.
func DefaultParams() []string { return []string{ParamEcPublicKeyBytes, ParamChallenge} }
