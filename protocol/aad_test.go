package protocol

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"testing"

	jose "github.com/go-jose/go-jose/v4"
)

// TestKBSTypesAADKnownAnswer pins the rebuild against kbs-types' own unit test
// (confidential-containers/kbs-types v0.14.0, src/lib.rs, protected_header_generate_aad):
// {alg: "fakealg", enc: "fakeenc"} → "eyJhbGciOiJmYWtlYWxnIiwiZW5jIjoiZmFrZWVuYyJ9".
func TestKBSTypesAADKnownAnswer(t *testing.T) {
	for _, tc := range []struct{ header, want string }{
		{`{"alg":"fakealg","enc":"fakeenc"}`, "eyJhbGciOiJmYWtlYWxnIiwiZW5jIjoiZmFrZWVuYyJ9"},
		// Field order and spacing of the input do not matter: serde re-serialises.
		{`{ "enc" : "fakeenc", "alg" : "fakealg" }`, "eyJhbGciOiJmYWtlYWxnIiwiZW5jIjoiZmFrZWVuYyJ9"},
	} {
		got, err := KBSTypesAAD(base64.RawURLEncoding.EncodeToString([]byte(tc.header)))
		if err != nil || string(got) != tc.want {
			t.Errorf("%s: got %s %v, want %s", tc.header, got, err, tc.want)
		}
	}
	// Other fields follow alg and enc in sorted order, nested keys sorted too (BTreeMap).
	got, _ := KBSTypesAAD(base64.RawURLEncoding.EncodeToString([]byte(`{"zz":1,"epk":{"y":"b","kty":"EC","x":"a","crv":"P-521"},"enc":"E","alg":"A"}`)))
	dec, _ := base64.RawURLEncoding.DecodeString(string(got))
	if want := `{"alg":"A","enc":"E","epk":{"crv":"P-521","kty":"EC","x":"a","y":"b"},"zz":1}`; string(dec) != want {
		t.Fatalf("rebuilt %s, want %s", dec, want)
	}
}

// TestVerifierJWEDecryptsWithRebuiltAAD: what a real aproxy hands a real SVSM (the AAD rebuilt
// by kbs-types from our protected header) decrypts our secret, because our header already is
// in that form. A go-jose header (epk keys kty, crv, x, y) would not survive the rebuild.
func TestVerifierJWEDecryptsWithRebuiltAAD(t *testing.T) {
	priv, _ := ecdh.P521().GenerateKey(rand.Reader)
	secret := bytes.Repeat([]byte{0x42}, 32)
	jwe, err := EncryptSecret(ECPublicKeyFromECDH(priv.PublicKey()), secret)
	if err != nil {
		t.Fatal(err)
	}
	aad, err := KBSTypesAAD(jwe.Protected)
	if err != nil {
		t.Fatal(err)
	}
	if string(aad) != jwe.Protected {
		hdr, _ := base64.RawURLEncoding.DecodeString(jwe.Protected)
		t.Fatalf("protected header %s is not in kbs-types form", hdr)
	}
	d, ct, err := DecryptionFromJWE(jwe)
	if err != nil {
		t.Fatal(err)
	}
	d.AAD = aad // what aproxy sends
	if got, err := DecryptSecret(priv, d, ct); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("decrypt with the rebuilt AAD: %x %v", got, err)
	}

	// The failure the bug report saw: a go-jose-made header rebuilt by kbs-types no longer
	// matches the AAD the content was sealed with.
	pub, _ := ECPublicKeyFromECDH(priv.PublicKey()).ECDSA()
	enc, _ := jose.NewEncrypter(jose.A256GCM, jose.Recipient{Algorithm: jose.ECDH_ES_A256KW, Key: pub}, nil)
	obj, _ := enc.Encrypt(secret)
	var gj FlattenedJWE
	if err := jsonUnmarshal([]byte(obj.FullSerialize()), &gj); err != nil {
		t.Fatal(err)
	}
	rebuilt, err := KBSTypesAAD(gj.Protected)
	if err != nil {
		t.Fatal(err)
	}
	if string(rebuilt) == gj.Protected {
		t.Skip("go-jose now writes kbs-types' order; the negative case no longer applies")
	}
	d2, ct2, _ := DecryptionFromJWE(&gj)
	d2.AAD = rebuilt
	if _, err := DecryptSecret(priv, d2, ct2); err == nil {
		t.Fatal("a go-jose header decrypted with the rebuilt AAD: the negative case proves nothing")
	}
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
