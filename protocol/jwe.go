package protocol

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"

	jose "github.com/go-jose/go-jose/v4"
	josecipher "github.com/go-jose/go-jose/v4/cipher"
)

// JWE algorithms fixed by the upstream SVSM.
const (
	JWEKeyAlg = "ECDH-ES+A256KW"
	JWEEncAlg = "A256GCM"
)

// MaxSecretSize bounds a released secret.
const MaxSecretSize = 64 << 10

// EncryptSecret seals plaintext to the guest's P-521 key as a flattened JWE (verifier side).
func EncryptSecret(to ECPublicKey, plaintext []byte) (*FlattenedJWE, error) {
	pub, err := to.ECDSA()
	if err != nil {
		return nil, err
	}
	enc, err := jose.NewEncrypter(jose.A256GCM, jose.Recipient{Algorithm: jose.ECDH_ES_A256KW, Key: pub}, nil)
	if err != nil {
		return nil, fmt.Errorf("jwe encrypter: %w", err)
	}
	obj, err := enc.Encrypt(plaintext)
	if err != nil {
		return nil, fmt.Errorf("jwe encrypt: %w", err)
	}
	var out FlattenedJWE
	if err := json.Unmarshal([]byte(obj.FullSerialize()), &out); err != nil {
		return nil, fmt.Errorf("jwe serialise: %w", err)
	}
	return &out, nil
}

// ProtectedHeader is the subset of the JWE protected header we read.
type ProtectedHeader struct {
	Alg string `json:"alg"`
	Enc string `json:"enc"`
	EPK struct {
		Kty string `json:"kty"`
		Crv string `json:"crv"`
		X   string `json:"x"`
		Y   string `json:"y"`
	} `json:"epk"`
}

// DecryptionFromJWE maps a flattened JWE onto the §1 message-4 parts (proxy side). The AAD is
// the protected header string exactly as received, never re-serialised.
func DecryptionFromJWE(j *FlattenedJWE) (*Decryption, []byte, error) {
	hdrJSON, err := base64.RawURLEncoding.DecodeString(j.Protected)
	if err != nil {
		return nil, nil, fmt.Errorf("jwe protected header: %w", err)
	}
	var hdr ProtectedHeader
	if err := json.Unmarshal(hdrJSON, &hdr); err != nil {
		return nil, nil, fmt.Errorf("jwe protected header: %w", err)
	}
	if hdr.Alg != JWEKeyAlg || hdr.Enc != JWEEncAlg {
		return nil, nil, fmt.Errorf("jwe: alg %q enc %q, want %s/%s", hdr.Alg, hdr.Enc, JWEKeyAlg, JWEEncAlg)
	}
	epk, err := TeePubKey{Kty: hdr.EPK.Kty, Crv: hdr.EPK.Crv, X: hdr.EPK.X, Y: hdr.EPK.Y}.ECPublicKey()
	if err != nil {
		return nil, nil, fmt.Errorf("jwe epk: %w", err)
	}
	field := func(name, s string) ([]byte, error) {
		b, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil {
			return nil, fmt.Errorf("jwe %s: %w", name, err)
		}
		return b, nil
	}
	d := &Decryption{EPK: epk, AAD: []byte(j.Protected)}
	if d.WrappedCEK, err = field("encrypted_key", j.EncryptedKey); err != nil {
		return nil, nil, err
	}
	if d.IV, err = field("iv", j.IV); err != nil {
		return nil, nil, err
	}
	if d.Tag, err = field("tag", j.Tag); err != nil {
		return nil, nil, err
	}
	ct, err := field("ciphertext", j.Ciphertext)
	if err != nil {
		return nil, nil, err
	}
	if len(ct) == 0 || len(ct) > MaxSecretSize {
		return nil, nil, fmt.Errorf("jwe ciphertext is %d bytes, want 1..%d", len(ct), MaxSecretSize)
	}
	return d, ct, nil
}

// DecryptSecret does what the SVSM does with message 4 (guest side): ECDH on P-521 with the
// epk, Concat-KDF (SHA-256, "ECDH-ES+A256KW", empty PartyU/V, 256 bits), AES key unwrap of
// the CEK, then AES-256-GCM with the given AAD.
func DecryptSecret(priv *ecdh.PrivateKey, d *Decryption, ciphertext []byte) ([]byte, error) {
	if priv.Curve() != ecdh.P521() {
		return nil, errors.New("decrypt secret: private key is not P-521")
	}
	epk, err := d.EPK.ECDH()
	if err != nil {
		return nil, fmt.Errorf("decrypt secret: epk: %w", err)
	}
	z, err := priv.ECDH(epk)
	if err != nil {
		return nil, fmt.Errorf("decrypt secret: ecdh: %w", err)
	}
	// Concat-KDF per RFC 7518 §4.6.2: AlgorithmID and PartyU/VInfo are length-prefixed,
	// SuppPubInfo is keydatalen in bits as a 32-bit big-endian integer.
	kek := make([]byte, 32)
	kdf := josecipher.NewConcatKDF(crypto.SHA256, z, lengthPrefixed([]byte(JWEKeyAlg)), lengthPrefixed(nil), lengthPrefixed(nil), []byte{0, 0, 1, 0}, nil)
	if _, err := kdf.Read(kek); err != nil {
		return nil, fmt.Errorf("decrypt secret: kdf: %w", err)
	}
	if len(d.WrappedCEK) != 40 {
		return nil, fmt.Errorf("decrypt secret: wrapped cek is %d bytes, want 40", len(d.WrappedCEK))
	}
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, fmt.Errorf("decrypt secret: %w", err)
	}
	cek, err := josecipher.KeyUnwrap(block, d.WrappedCEK)
	if err != nil {
		return nil, fmt.Errorf("decrypt secret: unwrap cek: %w", err)
	}
	if len(d.IV) != 12 || len(d.Tag) != 16 {
		return nil, fmt.Errorf("decrypt secret: iv %d bytes, tag %d bytes, want 12 and 16", len(d.IV), len(d.Tag))
	}
	cb, err := aes.NewCipher(cek)
	if err != nil {
		return nil, fmt.Errorf("decrypt secret: cek: %w", err)
	}
	gcm, err := cipher.NewGCM(cb)
	if err != nil {
		return nil, fmt.Errorf("decrypt secret: %w", err)
	}
	sealed := append(bytes.Clone(ciphertext), d.Tag...)
	pt, err := gcm.Open(nil, d.IV, sealed, d.AAD)
	if err != nil {
		return nil, fmt.Errorf("decrypt secret: aes-gcm: %w", err)
	}
	return pt, nil
}

func lengthPrefixed(b []byte) []byte {
	out := make([]byte, 4+len(b))
	out[0], out[1], out[2], out[3] = byte(len(b)>>24), byte(len(b)>>16), byte(len(b)>>8), byte(len(b))
	copy(out[4:], b)
	return out
}

// ECDH converts wire coordinates to a crypto/ecdh key, checking the point is on P-521.
func (k ECPublicKey) ECDH() (*ecdh.PublicKey, error) {
	if err := k.Validate(); err != nil {
		return nil, err
	}
	raw := make([]byte, 0, 1+2*P521CoordSize)
	raw = append(raw, 4)
	raw = append(raw, k.X...)
	raw = append(raw, k.Y...)
	pub, err := ecdh.P521().NewPublicKey(raw)
	if err != nil {
		return nil, fmt.Errorf("P-521 point: %w", err)
	}
	return pub, nil
}

// ECPublicKeyFromECDH splits an uncompressed P-521 point into wire coordinates.
func ECPublicKeyFromECDH(pub *ecdh.PublicKey) ECPublicKey {
	b := pub.Bytes() // 0x04 ‖ X ‖ Y
	return ECPublicKey{X: bytes.Clone(b[1 : 1+P521CoordSize]), Y: bytes.Clone(b[1+P521CoordSize:])}
}

// Bytes is x ‖ y, the EcPublicKeyBytes contribution to REPORT_DATA.
func (k ECPublicKey) Bytes() []byte { return append(bytes.Clone(k.X), k.Y...) }

// ECDSA converts wire coordinates to the *ecdsa.PublicKey go-jose wants.
func (k ECPublicKey) ECDSA() (*ecdsa.PublicKey, error) {
	if _, err := k.ECDH(); err != nil {
		return nil, err
	}
	raw := append([]byte{4}, k.Bytes()...)
	pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P521(), raw)
	if err != nil {
		return nil, fmt.Errorf("P-521 point: %w", err)
	}
	return pub, nil
}
