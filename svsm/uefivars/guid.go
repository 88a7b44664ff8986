// Package uefivars is the SVSM's UEFI variable store: variables with GUID, name, attributes
// and data, with the UEFI 2.10 §8.2 rules for time-based authenticated variables (PK, KEK,
// db, dbx), persisted in the SVSM's encrypted state. docs/uefi-vars.md states the rules and
// where they follow EDK2.
package uefivars

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strings"
)

// GUID in the EFI byte layout (first three fields little-endian).
type GUID [16]byte

// MustGUID parses "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" or panics (for constants).
func MustGUID(s string) GUID {
	g, err := ParseGUID(s)
	if err != nil {
		panic(err)
	}
	return g
}

// ParseGUID parses the registry format.
func ParseGUID(s string) (GUID, error) {
	var g GUID
	parts := strings.Split(s, "-")
	if len(parts) != 5 || len(parts[0]) != 8 || len(parts[1]) != 4 || len(parts[2]) != 4 || len(parts[3]) != 4 || len(parts[4]) != 12 {
		return g, fmt.Errorf("GUID %q: want 8-4-4-4-12 hex digits", s)
	}
	b, err := hex.DecodeString(strings.Join(parts, ""))
	if err != nil {
		return g, fmt.Errorf("GUID %q: %w", s, err)
	}
	binary.LittleEndian.PutUint32(g[0:], binary.BigEndian.Uint32(b[0:]))
	binary.LittleEndian.PutUint16(g[4:], binary.BigEndian.Uint16(b[4:]))
	binary.LittleEndian.PutUint16(g[6:], binary.BigEndian.Uint16(b[6:]))
	copy(g[8:], b[8:])
	return g, nil
}

func (g GUID) String() string {
	return fmt.Sprintf("%08x-%04x-%04x-%x-%x", binary.LittleEndian.Uint32(g[0:]),
		binary.LittleEndian.Uint16(g[4:]), binary.LittleEndian.Uint16(g[6:]), g[8:10], g[10:])
}

// Well-known GUIDs (UEFI 2.10).
var (
	GlobalVariable        = MustGUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
	ImageSecurityDatabase = MustGUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
	CertX509              = MustGUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
	CertSHA256            = MustGUID("c1c41626-504c-4092-aca9-41f936934328")
	CertTypePKCS7         = MustGUID("4aafd29d-68df-49ee-8aa9-347d375665a7")
)

// Attributes of a variable.
type Attributes uint32

// Attribute bits.
const (
	NonVolatile                       Attributes = 0x01
	BootserviceAccess                 Attributes = 0x02
	RuntimeAccess                     Attributes = 0x04
	HardwareErrorRecord               Attributes = 0x08
	AuthenticatedWriteAccess          Attributes = 0x10 // deprecated; refused
	TimeBasedAuthenticatedWriteAccess Attributes = 0x20
	AppendWrite                       Attributes = 0x40
	EnhancedAuthenticatedAccess       Attributes = 0x80 // not supported; refused

	// SecureBootPolicyAttrs is what PK, KEK, db and dbx must carry.
	SecureBootPolicyAttrs = NonVolatile | BootserviceAccess | RuntimeAccess | TimeBasedAuthenticatedWriteAccess
)
