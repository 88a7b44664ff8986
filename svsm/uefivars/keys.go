package uefivars

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"math/big"
	"time"
)

// Key is a Secure Boot signing key (PK, KEK or db owner) with its certificate.
type Key struct {
	Cert   *x509.Certificate
	Signer crypto.Signer
}

// NewKey makes an RSA-2048 key with a certificate: self-signed when parent is nil, else
// issued by parent (as KEKs are issued under a platform owner's CA).
func NewKey(commonName string, parent *Key) (*Key, error) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: commonName},
		NotBefore: time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC), NotAfter: time.Date(2050, 1, 1, 0, 0, 0, 0, time.UTC),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	issuer, signer := tmpl, crypto.Signer(priv)
	if parent != nil {
		issuer, signer = parent.Cert, parent.Signer
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, priv.Public(), signer)
	if err != nil {
		return nil, fmt.Errorf("certificate for %s: %w", commonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &Key{Cert: cert, Signer: priv}, nil
}

// Signature returns the key's certificate as an X509 signature-list entry owned by owner.
func (k *Key) Signature(owner GUID) Signature {
	return Signature{Type: CertX509, Owner: owner, Data: k.Cert.Raw}
}

// Update is one SetVariable call prepared ahead of time: a template entry for first-boot
// enrollment, or a signed db/dbx update the OS applies. Its JSON form is what
// `svsm-guest run --uefi-template` and the uefi-set action read.
type Update struct {
	GUID       GUID
	Name       string
	Attributes Attributes
	Payload    []byte // base64 in JSON
}

type updateJSON struct {
	GUID string `json:"guid"`
	Name string `json:"name"`
	Attr uint32 `json:"attributes"`
	Data []byte `json:"payload"`
}

// MarshalJSON writes the GUID in registry format.
func (u Update) MarshalJSON() ([]byte, error) {
	return json.Marshal(updateJSON{u.GUID.String(), u.Name, uint32(u.Attributes), u.Payload})
}

// UnmarshalJSON reads the form MarshalJSON writes.
func (u *Update) UnmarshalJSON(b []byte) error {
	var j updateJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	g, err := ParseGUID(j.GUID)
	if err != nil {
		return err
	}
	*u = Update{GUID: g, Name: j.Name, Attributes: Attributes(j.Attr), Payload: j.Data}
	return nil
}

// Apply calls Set with the update.
func (s *Store) Apply(u Update) error { return s.Set(u.GUID, u.Name, u.Attributes, u.Payload) }

// SignedUpdate builds an authenticated write of sigs to a policy variable, signed by key at
// time ts; append selects EFI_VARIABLE_APPEND_WRITE.
func SignedUpdate(guid GUID, name string, sigs []Signature, ts time.Time, appendWrite bool, key *Key) (Update, error) {
	attrs := SecureBootPolicyAttrs
	if appendWrite {
		attrs |= AppendWrite
	}
	payload, err := Sign(name, guid, attrs, TimeOf(ts), MarshalSignatureLists(sigs), key.Cert, key.Signer)
	if err != nil {
		return Update{}, err
	}
	return Update{GUID: guid, Name: name, Attributes: attrs, Payload: payload}, nil
}

// EnrollmentTemplate returns the updates that take an empty store from Setup Mode to User
// Mode with db, KEK and finally PK enrolled (the order firmware uses), dated ts.
func EnrollmentTemplate(pk, kek, db *Key, owner GUID, ts time.Time) ([]Update, error) {
	var out []Update
	for _, st := range []struct {
		guid GUID
		name string
		key  *Key
		cert *Key
	}{
		{ImageSecurityDatabase, "db", pk, db},
		{GlobalVariable, "KEK", pk, kek},
		{GlobalVariable, "PK", pk, pk},
	} {
		u, err := SignedUpdate(st.guid, st.name, []Signature{st.cert.Signature(owner)}, ts, false, st.key)
		if err != nil {
			return nil, err
		}
		out = append(out, u)
	}
	return out, nil
}
