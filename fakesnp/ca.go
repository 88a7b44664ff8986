package fakesnp

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/google/go-sev-guest/kds"

	"github.com/svsm-e2e/svsm-e2e/internal/atomicfile"
)

// ProductLine is the AMD product line the simulated AMD-SP claims to be.
const ProductLine = "Milan"

// productName is the VCEK's product-name extension (line-stepping).
const productName = "Milan-B0"

// CA is the fake AMD root of trust: ARK (self-signed) → ASK → one VCEK per chip and TCB.
// Its keys live in a state directory so a restarted fakesnp keeps the same chain.
type CA struct {
	arkKey  *rsa.PrivateKey
	askKey  *rsa.PrivateKey
	asvkKey *rsa.PrivateKey
	Ark     *x509.Certificate
	Ask     *x509.Certificate
	// Asvk signs VLEKs (versioned loaded endorsement keys, which a cloud provider loads into
	// its platforms instead of using per-chip VCEKs).
	Asvk    *x509.Certificate
	vleks   map[kds.TCBVersion]*vcek
	mu      sync.Mutex
	vceks   map[vcekID]*vcek
	created time.Time
}

type vcekID struct {
	chip string
	tcb  kds.TCBVersion
}

type vcek struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
}

// CAOptions configures LoadOrCreateCA.
type CAOptions struct {
	// Dir holds ark.key, ask.key, ark.crt, ask.crt. Created if missing.
	Dir string
	// RSABits is the ARK/ASK key size; AMD uses 4096, which is the default.
	RSABits int
}

func amdName(cn string) pkix.Name {
	return pkix.Name{
		Country: []string{"US"}, Locality: []string{"Santa Clara"}, Province: []string{"CA"},
		Organization: []string{"Advanced Micro Devices"}, OrganizationalUnit: []string{"Engineering"},
		CommonName: cn,
	}
}

// LoadOrCreateCA loads the CA from opts.Dir or creates and persists a new one.
func LoadOrCreateCA(opts CAOptions) (*CA, error) {
	if opts.RSABits == 0 {
		opts.RSABits = 4096
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("ca dir: %w", err)
	}
	ca := &CA{vceks: map[vcekID]*vcek{}, vleks: map[kds.TCBVersion]*vcek{}}
	arkKeyPath := filepath.Join(opts.Dir, "ark.key")
	if _, err := os.Stat(arkKeyPath); errors.Is(err, os.ErrNotExist) {
		if err := createCA(opts); err != nil {
			return nil, err
		}
	}
	var err error
	if ca.arkKey, err = readPEM(arkKeyPath, x509.ParsePKCS1PrivateKey); err != nil {
		return nil, err
	}
	if ca.askKey, err = readPEM(filepath.Join(opts.Dir, "ask.key"), x509.ParsePKCS1PrivateKey); err != nil {
		return nil, err
	}
	if ca.Ark, err = readPEM(filepath.Join(opts.Dir, "ark.crt"), x509.ParseCertificate); err != nil {
		return nil, err
	}
	if ca.Ask, err = readPEM(filepath.Join(opts.Dir, "ask.crt"), x509.ParseCertificate); err != nil {
		return nil, err
	}
	ca.created = ca.Ark.NotBefore
	if _, err := os.Stat(filepath.Join(opts.Dir, "asvk.key")); errors.Is(err, os.ErrNotExist) {
		if err := ca.createASVK(opts); err != nil {
			return nil, err
		}
	}
	if ca.asvkKey, err = readPEM(filepath.Join(opts.Dir, "asvk.key"), x509.ParsePKCS1PrivateKey); err != nil {
		return nil, err
	}
	if ca.Asvk, err = readPEM(filepath.Join(opts.Dir, "asvk.crt"), x509.ParseCertificate); err != nil {
		return nil, err
	}
	return ca, nil
}

// createASVK adds the VLEK signing key to a CA (also to one made before VLEKs existed).
func (ca *CA) createASVK(opts CAOptions) error {
	key, err := rsa.GenerateKey(rand.Reader, opts.RSABits)
	if err != nil {
		return fmt.Errorf("generate ASVK key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(3), Subject: amdName("SEV-VLEK-" + ProductLine),
		NotBefore: ca.Ark.NotBefore, NotAfter: ca.Ark.NotAfter, SignatureAlgorithm: x509.SHA384WithRSAPSS,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: true,
		CRLDistributionPoints: []string{fmt.Sprintf("https://kdsintf.amd.com/vlek/v1/%s/crl", ProductLine)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Ark, &key.PublicKey, ca.arkKey)
	if err != nil {
		return fmt.Errorf("sign ASVK: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(opts.Dir, "asvk.crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(opts.Dir, "asvk.key"), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600)
}

// VLEKChainPEM is the KDS /vlek/v1/{product}/cert_chain body: ASVK then ARK.
func (ca *CA) VLEKChainPEM() []byte {
	out := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Asvk.Raw})
	return append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Ark.Raw})...)
}

// RootsPEM is every certificate a verifier of this fake AMD needs: ASK, ASVK, ARK.
func (ca *CA) RootsPEM() []byte {
	var out []byte
	for _, c := range []*x509.Certificate{ca.Ask, ca.Asvk, ca.Ark} {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// VLEKCSPID is the cloud service provider the fake VLEKs name (their CSP_ID extension).
const VLEKCSPID = "svsm-e2e-fake-csp"

// VLEK returns the loaded endorsement key for a TCB: derived from the ASVK key and the TCB
// (one per provider and TCB, not per chip), signed by the ASVK, with CSP_ID and no HWID.
func (ca *CA) VLEK(tcb kds.TCBVersion) (*ecdsa.PrivateKey, *x509.Certificate, error) {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if v, ok := ca.vleks[tcb]; ok {
		return v.key, v.cert, nil
	}
	seed := sha512.Sum384(ca.asvkKey.D.Bytes())
	key, err := deriveP384(seed[:], uint64(tcb)|1<<63)
	if err != nil {
		return nil, nil, err
	}
	parts := kds.DecomposeTCBVersion(tcb)
	exts := vcekExtensions(parts, nil)
	csp, _ := asn1.MarshalWithParams(VLEKCSPID, "ia5")
	exts = append(exts[:len(exts)-1], pkix.Extension{Id: kds.OidCspID, Value: csp}) // no HWID
	tmpl := &x509.Certificate{
		Version: 3, SerialNumber: big.NewInt(0), Subject: amdName("SEV-VLEK"),
		NotBefore: ca.created, NotAfter: ca.created.AddDate(7, 0, 0), SignatureAlgorithm: x509.SHA384WithRSAPSS,
		ExtraExtensions: exts,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Asvk, &key.PublicKey, ca.asvkKey)
	if err != nil {
		return nil, nil, fmt.Errorf("sign VLEK: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	ca.vleks[tcb] = &vcek{key, cert}
	return key, cert, nil
}

func createCA(opts CAOptions) error {
	arkKey, err := rsa.GenerateKey(rand.Reader, opts.RSABits)
	if err != nil {
		return fmt.Errorf("generate ARK key: %w", err)
	}
	askKey, err := rsa.GenerateKey(rand.Reader, opts.RSABits)
	if err != nil {
		return fmt.Errorf("generate ASK key: %w", err)
	}
	now := time.Now().Add(-time.Hour).UTC().Truncate(time.Second)
	crl := []string{fmt.Sprintf("https://kdsintf.amd.com/vcek/v1/%s/crl", ProductLine)}
	arkTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: amdName("ARK-" + ProductLine), Issuer: amdName("ARK-" + ProductLine),
		NotBefore: now, NotAfter: now.AddDate(25, 0, 0), SignatureAlgorithm: x509.SHA384WithRSAPSS,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: true,
		CRLDistributionPoints: crl,
	}
	arkDER, err := x509.CreateCertificate(rand.Reader, arkTmpl, arkTmpl, &arkKey.PublicKey, arkKey)
	if err != nil {
		return fmt.Errorf("sign ARK: %w", err)
	}
	ark, _ := x509.ParseCertificate(arkDER)
	askTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: amdName("SEV-" + ProductLine),
		NotBefore: now, NotAfter: now.AddDate(25, 0, 0), SignatureAlgorithm: x509.SHA384WithRSAPSS,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: true,
		CRLDistributionPoints: crl,
	}
	askDER, err := x509.CreateCertificate(rand.Reader, askTmpl, ark, &askKey.PublicKey, arkKey)
	if err != nil {
		return fmt.Errorf("sign ASK: %w", err)
	}
	files := map[string]*pem.Block{
		"ark.key": {Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(arkKey)},
		"ask.key": {Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(askKey)},
		"ark.crt": {Type: "CERTIFICATE", Bytes: arkDER},
		"ask.crt": {Type: "CERTIFICATE", Bytes: askDER},
	}
	// ark.key is written last: its presence marks a complete CA.
	for _, name := range []string{"ask.key", "ark.crt", "ask.crt", "ark.key"} {
		if err := atomicfile.Write(filepath.Join(opts.Dir, name), pem.EncodeToMemory(files[name]), 0o600); err != nil {
			return err
		}
	}
	return nil
}

// CertChainPEM is the KDS cert_chain body: ASK then ARK.
func (ca *CA) CertChainPEM() []byte {
	out := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Ask.Raw})
	return append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Ark.Raw})...)
}

// VCEK returns the chip's VCEK for a TCB. Like the real AMD-SP, the key is derived from a
// chip secret and the TCB, so a TCB change yields a different key and certificate.
func (ca *CA) VCEK(chip *Chip, tcb kds.TCBVersion) (*ecdsa.PrivateKey, *x509.Certificate, error) {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	id := vcekID{chip.Name, tcb}
	if v, ok := ca.vceks[id]; ok {
		return v.key, v.cert, nil
	}
	key, err := deriveP384(chip.seed[:], uint64(tcb))
	if err != nil {
		return nil, nil, err
	}
	parts := kds.DecomposeTCBVersion(tcb)
	tmpl := &x509.Certificate{
		Version: 3, SerialNumber: big.NewInt(0), Subject: amdName("SEV-VCEK"),
		NotBefore: ca.created, NotAfter: ca.created.AddDate(7, 0, 0), SignatureAlgorithm: x509.SHA384WithRSAPSS,
		ExtraExtensions: vcekExtensions(parts, chip.ID[:]),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Ask, &key.PublicKey, ca.askKey)
	if err != nil {
		return nil, nil, fmt.Errorf("sign VCEK for chip %s: %w", chip.Name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	ca.vceks[id] = &vcek{key, cert}
	return key, cert, nil
}

// deriveP384 derives a P-384 private key deterministically from a seed and the TCB.
func deriveP384(seed []byte, tcb uint64) (*ecdsa.PrivateKey, error) {
	info := fmt.Sprintf("fakesnp vcek tcb=%016x", tcb)
	for i := 0; i < 16; i++ {
		d, err := hkdf.Key(sha512.New384, seed, []byte{byte(i)}, info, 48)
		if err != nil {
			return nil, err
		}
		key, err := ecdsa.ParseRawPrivateKey(elliptic.P384(), d)
		if err == nil {
			return key, nil
		}
	}
	return nil, errors.New("derive VCEK: no valid scalar")
}

func vcekExtensions(tcb kds.TCBParts, hwid []byte) []pkix.Extension {
	mustInt := func(v uint8) []byte { b, _ := asn1.Marshal(int(v)); return b }
	zero, _ := asn1.Marshal(0)
	name, _ := asn1.MarshalWithParams(productName, "ia5")
	hw, _ := asn1.Marshal(hwid)
	return []pkix.Extension{
		{Id: kds.OidStructVersion, Value: zero},
		{Id: kds.OidProductName1, Value: name},
		{Id: kds.OidBlSpl, Value: mustInt(tcb.BlSpl)},
		{Id: kds.OidTeeSpl, Value: mustInt(tcb.TeeSpl)},
		{Id: kds.OidSnpSpl, Value: mustInt(tcb.SnpSpl)},
		{Id: kds.OidSpl4, Value: mustInt(tcb.Spl4)},
		{Id: kds.OidSpl5, Value: mustInt(tcb.Spl5)},
		{Id: kds.OidSpl6, Value: mustInt(tcb.Spl6)},
		{Id: kds.OidSpl7, Value: mustInt(tcb.Spl7)},
		{Id: kds.OidUcodeSpl, Value: mustInt(tcb.UcodeSpl)},
		{Id: kds.OidHwid, Value: hw},
	}
}

// signReport signs the report's signed component (bytes 0..0x2A0) with the VCEK, SHA-384.
func signReport(key *ecdsa.PrivateKey, data []byte) (r, s *big.Int, err error) {
	h := crypto.SHA384.New()
	h.Write(data)
	return ecdsa.Sign(rand.Reader, key, h.Sum(nil))
}

// readPEM reads the single PEM block of path and parses it.
func readPEM[T any](path string, parse func([]byte) (T, error)) (T, error) {
	var zero T
	b, err := os.ReadFile(path)
	if err != nil {
		return zero, fmt.Errorf("read %s: %w", path, err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return zero, fmt.Errorf("read %s: no PEM block", path)
	}
	v, err := parse(blk.Bytes)
	if err != nil {
		return zero, fmt.Errorf("read %s: %w", path, err)
	}
	return v, nil
}

// CRL is the product's certificate revocation list as AMD's KDS serves it at
// /vcek/v1/{product}/crl: signed by the ARK, listing revoked ASK serials (AMD revokes keys,
// not VCEKs: newer TCBs supersede those). revokeASK lists this chain's own ASK.
func (ca *CA) CRL(revokeASK bool) ([]byte, error) {
	now := time.Now().UTC().Truncate(time.Second)
	tmpl := &x509.RevocationList{
		Number: big.NewInt(now.Unix()), ThisUpdate: now.Add(-time.Minute), NextUpdate: now.Add(24 * time.Hour),
		SignatureAlgorithm: x509.SHA384WithRSAPSS,
	}
	if revokeASK {
		tmpl.RevokedCertificateEntries = []x509.RevocationListEntry{{SerialNumber: ca.Ask.SerialNumber, RevocationTime: now.Add(-time.Minute)}}
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, ca.Ark, ca.arkKey)
	if err != nil {
		return nil, fmt.Errorf("sign CRL: %w", err)
	}
	return der, nil
}
