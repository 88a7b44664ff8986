package uefivars

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
	"unicode/utf16"

	"github.com/smallstep/pkcs7"
)

// EFITime is EFI_TIME (16 bytes). For authenticated variables only the date and time fields
// may be non-zero.
type EFITime struct {
	Year                       uint16
	Month, Day                 uint8
	Hour, Minute, Second, Pad1 uint8
	Nanosecond                 uint32
	TimeZone                   int16
	Daylight, Pad2             uint8
}

// TimeOf converts t (UTC) to an EFITime with the fields authenticated variables allow.
func TimeOf(t time.Time) EFITime {
	t = t.UTC()
	return EFITime{Year: uint16(t.Year()), Month: uint8(t.Month()), Day: uint8(t.Day()),
		Hour: uint8(t.Hour()), Minute: uint8(t.Minute()), Second: uint8(t.Second())}
}

func (t EFITime) bytes() []byte {
	var b bytes.Buffer
	_ = binary.Write(&b, binary.LittleEndian, t)
	return b.Bytes()
}

// after reports whether t is strictly later than u.
func (t EFITime) after(u EFITime) bool {
	a := []int{int(t.Year), int(t.Month), int(t.Day), int(t.Hour), int(t.Minute), int(t.Second)}
	b := []int{int(u.Year), int(u.Month), int(u.Day), int(u.Hour), int(u.Minute), int(u.Second)}
	for i := range a {
		if a[i] != b[i] {
			return a[i] > b[i]
		}
	}
	return false
}

func (t EFITime) String() string {
	return fmt.Sprintf("%04d-%02d-%02dT%02d:%02d:%02dZ", t.Year, t.Month, t.Day, t.Hour, t.Minute, t.Second)
}

const (
	winCertRevision = 0x0200
	winCertTypeGUID = 0x0EF1
	winCertHeader   = 8 + 16 // WIN_CERTIFICATE + CertType
	maxCertData     = 16 << 10
)

// Auth2 is a parsed EFI_VARIABLE_AUTHENTICATION_2 descriptor.
type Auth2 struct {
	Time       EFITime
	SignedData []byte // PKCS#7 SignedData, as in the descriptor (no outer ContentInfo)
}

// ParseAuth2 splits b into the descriptor and the variable data after it.
func ParseAuth2(b []byte) (*Auth2, []byte, error) {
	if len(b) < 16+winCertHeader {
		return nil, nil, fmt.Errorf("authentication descriptor: %d bytes, need at least %d", len(b), 16+winCertHeader)
	}
	var a Auth2
	if err := binary.Read(bytes.NewReader(b[:16]), binary.LittleEndian, &a.Time); err != nil {
		return nil, nil, err
	}
	if a.Time.Pad1 != 0 || a.Time.Nanosecond != 0 || a.Time.TimeZone != 0 || a.Time.Daylight != 0 || a.Time.Pad2 != 0 {
		return nil, nil, errors.New("authentication descriptor: TimeStamp Pad1, Nanosecond, TimeZone, Daylight and Pad2 must be zero")
	}
	length := int(binary.LittleEndian.Uint32(b[16:]))
	if rev := binary.LittleEndian.Uint16(b[20:]); rev != winCertRevision {
		return nil, nil, fmt.Errorf("authentication descriptor: WIN_CERTIFICATE revision %#x, want %#x", rev, winCertRevision)
	}
	if typ := binary.LittleEndian.Uint16(b[22:]); typ != winCertTypeGUID {
		return nil, nil, fmt.Errorf("authentication descriptor: certificate type %#x, want WIN_CERT_TYPE_EFI_GUID", typ)
	}
	if !bytes.Equal(b[24:40], CertTypePKCS7[:]) {
		return nil, nil, errors.New("authentication descriptor: CertType is not EFI_CERT_TYPE_PKCS7_GUID")
	}
	if length < winCertHeader || length-winCertHeader > maxCertData || 16+length > len(b) {
		return nil, nil, fmt.Errorf("authentication descriptor: dwLength %d out of bounds", length)
	}
	a.SignedData = bytes.Clone(b[16+winCertHeader : 16+length])
	return &a, b[16+length:], nil
}

// Marshal encodes the descriptor followed by data.
func (a *Auth2) Marshal(data []byte) []byte {
	var b bytes.Buffer
	b.Write(a.Time.bytes())
	var h [winCertHeader]byte
	binary.LittleEndian.PutUint32(h[0:], uint32(winCertHeader+len(a.SignedData)))
	binary.LittleEndian.PutUint16(h[4:], winCertRevision)
	binary.LittleEndian.PutUint16(h[6:], winCertTypeGUID)
	copy(h[8:], CertTypePKCS7[:])
	b.Write(h[:])
	b.Write(a.SignedData)
	b.Write(data)
	return b.Bytes()
}

// signedBytes is what the PKCS#7 signature covers (UEFI 2.10 §8.2.2):
// VariableName (UTF-16LE, no terminator) ‖ VendorGuid ‖ Attributes ‖ TimeStamp ‖ Data.
func signedBytes(name string, guid GUID, attrs Attributes, ts EFITime, data []byte) []byte {
	var b bytes.Buffer
	for _, u := range utf16.Encode([]rune(name)) {
		_ = binary.Write(&b, binary.LittleEndian, u)
	}
	b.Write(guid[:])
	_ = binary.Write(&b, binary.LittleEndian, uint32(attrs))
	b.Write(ts.bytes())
	b.Write(data)
	return b.Bytes()
}

var oidSignedData = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 2}

type contentInfo struct {
	ContentType asn1.ObjectIdentifier
	Content     asn1.RawValue `asn1:"explicit,tag:0"`
}

// withContentInfo wraps a bare SignedData (the UEFI form) in a ContentInfo; data that already
// is a signedData ContentInfo is returned as is (some signing tools emit that).
func withContentInfo(sd []byte) ([]byte, error) {
	var ci contentInfo
	if rest, err := asn1.Unmarshal(sd, &ci); err == nil && len(rest) == 0 && ci.ContentType.Equal(oidSignedData) {
		return sd, nil
	}
	return asn1.Marshal(contentInfo{ContentType: oidSignedData, Content: asn1.RawValue{FullBytes: sd}})
}

// verifyAuth checks that the descriptor signs (name, guid, attrs, time, data) with SHA-256 by
// a signer that is one of trusted or directly issued by one of them. Certificate validity
// periods are not checked: firmware has no trusted clock (EDK2 does the same).
func verifyAuth(a *Auth2, name string, guid GUID, attrs Attributes, data []byte, trusted []*x509.Certificate) error {
	der, err := withContentInfo(a.SignedData)
	if err != nil {
		return fmt.Errorf("PKCS#7: %w", err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		return fmt.Errorf("PKCS#7: %w", err)
	}
	if len(p7.Signers) != 1 {
		return fmt.Errorf("PKCS#7: %d signers, want 1", len(p7.Signers))
	}
	if !p7.Signers[0].DigestAlgorithm.Algorithm.Equal(pkcs7.OIDDigestAlgorithmSHA256) {
		return fmt.Errorf("PKCS#7: digest algorithm %v, UEFI requires SHA-256", p7.Signers[0].DigestAlgorithm.Algorithm)
	}
	p7.Content = signedBytes(name, guid, attrs, a.Time, data)
	if err := p7.Verify(); err != nil {
		return fmt.Errorf("PKCS#7 signature: %w", err)
	}
	signer := p7.GetOnlySigner()
	if signer == nil {
		return errors.New("PKCS#7: signer certificate not included")
	}
	for _, t := range trusted {
		if signer.Equal(t) || signer.CheckSignatureFrom(t) == nil {
			return nil
		}
	}
	return fmt.Errorf("signer %q is not trusted for %s", signer.Subject.CommonName, name)
}

// Sign produces the payload a caller of SetVariable passes for an authenticated write of data
// to (name, guid) with attrs at time ts: descriptor ‖ data. key signs; cert is included.
func Sign(name string, guid GUID, attrs Attributes, ts EFITime, data []byte, cert *x509.Certificate, key crypto.Signer) ([]byte, error) {
	sd, err := pkcs7.NewSignedData(signedBytes(name, guid, attrs, ts, data))
	if err != nil {
		return nil, err
	}
	sd.SetDigestAlgorithm(pkcs7.OIDDigestAlgorithmSHA256)
	if err := sd.AddSigner(cert, key, pkcs7.SignerInfoConfig{}); err != nil {
		return nil, fmt.Errorf("sign %s: %w", name, err)
	}
	sd.Detach()
	der, err := sd.Finish()
	if err != nil {
		return nil, err
	}
	var ci contentInfo
	if _, err := asn1.Unmarshal(der, &ci); err != nil {
		return nil, err
	}
	a := &Auth2{Time: ts, SignedData: ci.Content.FullBytes}
	return a.Marshal(data), nil
}
