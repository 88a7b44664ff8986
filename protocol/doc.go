// Package protocol defines, once, every message that crosses a trust boundary in the stack:
//
//   - the upstream COCONUT-SVSM ⇄ attestation-proxy protocol 0.1.0 (length-prefixed JSON),
//   - the Trustee KBS 0.4.0 "RCAR" types spoken between proxy and verifier,
//   - the JWE (ECDH-ES+A256KW on P-521, A256GCM) that carries the released secret,
//   - svsm-e2e's own versioned extensions (secret payload v1, confirmation 0.3.0),
//   - the SNP guest-request frames (MSG_REPORT_REQ/RSP) between guest and fakesnp.
//
// Both sides of every channel import these types; nothing is redefined elsewhere.
// docs/protocols.md in this repository mirrors the contract in shared/docs/PROTOCOLS.md.
package protocol
