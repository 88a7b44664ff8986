package uefivars

import (
	"bytes"
	"crypto/x509"
	"encoding/binary"
	"fmt"
)

// Signature is one EFI_SIGNATURE_DATA entry of a list of type Type.
type Signature struct {
	Type  GUID
	Owner GUID
	Data  []byte // DER certificate for CertX509, a 32-byte digest for CertSHA256
}

const sigListHeader = 28

// ParseSignatureLists parses a concatenation of EFI_SIGNATURE_LISTs (the data of PK, KEK, db,
// dbx), checking every size. X509 entries must parse as certificates and SHA-256 entries
// must be 32 bytes.
func ParseSignatureLists(b []byte) ([]Signature, error) {
	var out []Signature
	for off := 0; off < len(b); {
		if len(b)-off < sigListHeader {
			return nil, fmt.Errorf("signature list at %d: %d bytes left, header needs %d", off, len(b)-off, sigListHeader)
		}
		var typ GUID
		copy(typ[:], b[off:])
		listSize := int(binary.LittleEndian.Uint32(b[off+16:]))
		hdrSize := int(binary.LittleEndian.Uint32(b[off+20:]))
		sigSize := int(binary.LittleEndian.Uint32(b[off+24:]))
		if listSize < sigListHeader || listSize > len(b)-off {
			return nil, fmt.Errorf("signature list at %d: size %d outside [%d, %d]", off, listSize, sigListHeader, len(b)-off)
		}
		if hdrSize > listSize-sigListHeader {
			return nil, fmt.Errorf("signature list at %d: header size %d too large", off, hdrSize)
		}
		body := listSize - sigListHeader - hdrSize
		if sigSize <= 16 || body%sigSize != 0 || body == 0 {
			return nil, fmt.Errorf("signature list at %d: %d bytes of entries not a positive multiple of entry size %d", off, body, sigSize)
		}
		for p := off + sigListHeader + hdrSize; p < off+listSize; p += sigSize {
			var s Signature
			s.Type = typ
			copy(s.Owner[:], b[p:])
			s.Data = bytes.Clone(b[p+16 : p+sigSize])
			switch typ {
			case CertX509:
				if _, err := x509.ParseCertificate(s.Data); err != nil {
					return nil, fmt.Errorf("signature list at %d: X509 entry: %w", off, err)
				}
			case CertSHA256:
				if len(s.Data) != 32 {
					return nil, fmt.Errorf("signature list at %d: SHA-256 entry of %d bytes", off, len(s.Data))
				}
			}
			out = append(out, s)
		}
		off += listSize
	}
	return out, nil
}

// MarshalSignatureLists encodes signatures as one list per entry (X509 entries differ in
// size) or per run of equal type and size.
func MarshalSignatureLists(sigs []Signature) []byte {
	var out bytes.Buffer
	for i := 0; i < len(sigs); {
		j := i + 1
		for j < len(sigs) && sigs[j].Type == sigs[i].Type && len(sigs[j].Data) == len(sigs[i].Data) {
			j++
		}
		sigSize := 16 + len(sigs[i].Data)
		var h [sigListHeader]byte
		copy(h[:], sigs[i].Type[:])
		binary.LittleEndian.PutUint32(h[16:], uint32(sigListHeader+sigSize*(j-i)))
		binary.LittleEndian.PutUint32(h[24:], uint32(sigSize))
		out.Write(h[:])
		for _, s := range sigs[i:j] {
			out.Write(s.Owner[:])
			out.Write(s.Data)
		}
		i = j
	}
	return out.Bytes()
}

// appendSignatures merges add into have, dropping entries already present (UEFI append
// semantics for signature databases).
func appendSignatures(have, add []Signature) []Signature {
	out := append([]Signature(nil), have...)
	for _, a := range add {
		dup := false
		for _, h := range out {
			if h.Type == a.Type && bytes.Equal(h.Data, a.Data) {
				dup = true
				break
			}
		}
		if !dup {
			out = append(out, a)
		}
	}
	return out
}

// certificates returns the X509 entries of sigs.
func certificates(sigs []Signature) []*x509.Certificate {
	var out []*x509.Certificate
	for _, s := range sigs {
		if s.Type == CertX509 {
			if c, err := x509.ParseCertificate(s.Data); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}
