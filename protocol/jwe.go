package protocol

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"sort"

	josecipher "github.com/go-jose/go-jose/v4/cipher"
)

// JWE algorithms fixed by the upstream SVSM.
const (
	JWEKeyAlg = "ECDH-ES+A256KW"
	JWEEncAlg = "A256GCM"
)

// MaxSecretSize bounds a released secret.
const MaxSecretSize = 64 << 10

// EncryptSecret seals plaintext to the guest's P-521 key as a flattened JWE (verifier side):
// ECDH-ES+A256KW with a fresh ephemeral key, A256GCM content encryption. The protected header
// is written in exactly the form kbs-types' ProtectedHeader::generate_aad rebuilds it (see
// KBSTypesAAD): a real aproxy re-serialises the header to make the AAD it hands the SVSM, so
// any other byte order makes the real SVSM's AES-GCM check fail (UPSTREAM.md §1).
func EncryptSecret(to ECPublicKey, plaintext []byte) (*FlattenedJWE, error) {
	pub, err := to.ECDH()
	if err != nil {
		return nil, err
	}
	eph, err := ecdh.P521().GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("jwe ephemeral key: %w", err)
	}
	z, err := eph.ECDH(pub)
	if err != nil {
		return nil, fmt.Errorf("jwe ecdh: %w", err)
	}
	kek, err := concatKDF(z)
	if err != nil {
		return nil, err
	}
	cek := make([]byte, 32)
	iv := make([]byte, 12)
	if _, err := rand.Read(cek); err != nil {
		return nil, err
	}
	if _, err := rand.Read(iv); err != nil {
		return nil, err
	}
	kb, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	wrapped, err := josecipher.KeyWrap(kb, cek)
	if err != nil {
		return nil, fmt.Errorf("jwe key wrap: %w", err)
	}
	epk := ECPublicKeyFromECDH(eph.PublicKey())
	protected := base64.RawURLEncoding.EncodeToString([]byte(canonicalProtectedHeader(epk)))
	cb, err := aes.NewCipher(cek)
	if err != nil {
		return nil, err
	}
	gcm, err := cipher.NewGCM(cb)
	if err != nil {
		return nil, err
	}
	sealed := gcm.Seal(nil, iv, plaintext, []byte(protected))
	ct, tag := sealed[:len(sealed)-gcm.Overhead()], sealed[len(sealed)-gcm.Overhead():]
	b64 := base64.RawURLEncoding.EncodeToString
	return &FlattenedJWE{Protected: protected, EncryptedKey: b64(wrapped), IV: b64(iv), Ciphertext: b64(ct), Tag: b64(tag)}, nil
}

// canonicalProtectedHeader is the header text kbs-types' serde produces: "alg", "enc", then
// the other fields (here only "epk") in sorted key order, nested keys sorted, compact.
func canonicalProtectedHeader(epk ECPublicKey) string {
	b64 := base64.RawURLEncoding.EncodeToString
	return `{"alg":"` + JWEKeyAlg + `","enc":"` + JWEEncAlg + `","epk":{"crv":"P-521","kty":"EC","x":"` +
		b64(epk.X) + `","y":"` + b64(epk.Y) + `"}}`
}

// KBSTypesAAD rebuilds the AES-GCM AAD from a JWE protected header the way a real aproxy does
// (kbs-types 0.14 ProtectedHeader, serde_json without preserve_order): decode the header,
// serialise "alg", "enc", then every other field in sorted key order with nested objects'
// keys sorted, compact, and base64url without padding. Strings that serde_json and
// encoding/json escape differently (U+2028, U+2029) are not expected in a JWE header and are
// refused rather than guessed.
func KBSTypesAAD(protected string) ([]byte, error) {
	raw, err := base64.RawURLEncoding.DecodeString(protected)
	if err != nil {
		return nil, fmt.Errorf("protected header: %w", err)
	}
	if bytes.Contains(raw, []byte(`\u2028`)) || bytes.Contains(raw, []byte(`\u2029`)) || bytes.ContainsRune(raw, 0x2028) || bytes.ContainsRune(raw, 0x2029) {
		return nil, errors.New("protected header: U+2028/U+2029 would serialise differently")
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var fields map[string]any
	if err := dec.Decode(&fields); err != nil {
		return nil, fmt.Errorf("protected header: %w", err)
	}
	alg, ok1 := fields["alg"].(string)
	enc, ok2 := fields["enc"].(string)
	if !ok1 || !ok2 {
		return nil, errors.New("protected header: alg and enc must be strings (kbs-types requires both)")
	}
	var out bytes.Buffer
	w := json.NewEncoder(&out)
	w.SetEscapeHTML(false) // serde_json does not escape <, > and &
	put := func(v any) error {
		if err := w.Encode(v); err != nil {
			return err
		}
		out.Truncate(out.Len() - 1) // Encode's newline
		return nil
	}
	out.WriteString(`{"alg":`)
	if err := put(alg); err != nil {
		return nil, err
	}
	out.WriteString(`,"enc":`)
	if err := put(enc); err != nil {
		return nil, err
	}
	delete(fields, "alg")
	delete(fields, "enc")
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		out.WriteByte(',')
		if err := put(k); err != nil {
			return nil, err
		}
		out.WriteByte(':')
		if err := put(fields[k]); err != nil { // encoding/json sorts nested map keys
			return nil, err
		}
	}
	out.WriteByte('}')
	return []byte(base64.RawURLEncoding.EncodeToString(out.Bytes())), nil
}

func concatKDF(z []byte) ([]byte, error) {
	// Concat-KDF per RFC 7518 §4.6.2: AlgorithmID and PartyU/VInfo are length-prefixed,
	// SuppPubInfo is keydatalen in bits as a 32-bit big-endian integer.
	kek := make([]byte, 32)
	kdf := josecipher.NewConcatKDF(crypto.SHA256, z, lengthPrefixed([]byte(JWEKeyAlg)), lengthPrefixed(nil), lengthPrefixed(nil), []byte{0, 0, 1, 0}, nil)
	if _, err := kdf.Read(kek); err != nil {
		return nil, fmt.Errorf("jwe kdf: %w", err)
	}
	return kek, nil
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
	kek, err := concatKDF(z)
	if err != nil {
		return nil, fmt.Errorf("decrypt secret: %w", err)
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
