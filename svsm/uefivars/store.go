package uefivars

import (
	"bytes"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"unicode/utf8"
)

// Bounds of the store (they keep the encrypted state small and every parse bounded).
const (
	MaxNameLen   = 128      // characters
	MaxDataSize  = 64 << 10 // one variable's data
	MaxStoreSize = 96 << 10 // all variables, encoded
	MaxVariables = 256
)

// Status is the EFI_STATUS a refused SetVariable returns.
type Status string

// Statuses the store returns.
const (
	InvalidParameter  Status = "EFI_INVALID_PARAMETER"
	SecurityViolation Status = "EFI_SECURITY_VIOLATION"
	WriteProtected    Status = "EFI_WRITE_PROTECTED"
	OutOfResources    Status = "EFI_OUT_OF_RESOURCES"
	Unsupported       Status = "EFI_UNSUPPORTED"
	NotFound          Status = "EFI_NOT_FOUND"
)

// Error is a refused variable operation.
type Error struct {
	Status Status
	Name   string
	Detail string
}

func (e *Error) Error() string {
	return fmt.Sprintf("SetVariable(%s): %s: %s", e.Name, e.Status, e.Detail)
}

// Variable is one stored variable.
type Variable struct {
	GUID       GUID
	Name       string
	Attributes Attributes
	Data       []byte
	Time       EFITime // time-based authenticated variables only
}

// Store holds the variables. It is not safe for concurrent use; the SVSM serialises calls.
type Store struct {
	vars []*Variable
}

// New returns an empty store: no PK, so Setup Mode.
func New() *Store { return &Store{} }

func (s *Store) find(guid GUID, name string) int {
	return slices.IndexFunc(s.vars, func(v *Variable) bool { return v.GUID == guid && v.Name == name })
}

// Get returns a copy of a variable. SecureBoot and SetupMode (global GUID) are derived.
func (s *Store) Get(guid GUID, name string) (*Variable, bool) {
	if guid == GlobalVariable && (name == "SecureBoot" || name == "SetupMode") {
		on := s.SecureBoot()
		if name == "SetupMode" {
			on = !on
		}
		d := []byte{0}
		if on {
			d[0] = 1
		}
		return &Variable{GUID: guid, Name: name, Attributes: BootserviceAccess | RuntimeAccess, Data: d}, true
	}
	i := s.find(guid, name)
	if i < 0 {
		return nil, false
	}
	v := *s.vars[i]
	v.Data = bytes.Clone(v.Data)
	return &v, true
}

// Names lists the stored variables as "guid/name", in insertion order.
func (s *Store) Names() []string {
	out := make([]string, 0, len(s.vars))
	for _, v := range s.vars {
		out = append(out, v.GUID.String()+"/"+v.Name)
	}
	return out
}

// SecureBoot reports User Mode (a PK is enrolled): image verification is enforced.
func (s *Store) SecureBoot() bool { return s.find(GlobalVariable, "PK") >= 0 }

// policyVar reports whether (guid, name) is one of the Secure Boot policy variables.
func policyVar(guid GUID, name string) bool {
	return guid == GlobalVariable && (name == "PK" || name == "KEK") ||
		guid == ImageSecurityDatabase && (name == "db" || name == "dbx")
}

func (s *Store) certsOf(guid GUID, name string) []*x509.Certificate {
	i := s.find(guid, name)
	if i < 0 {
		return nil
	}
	sigs, err := ParseSignatureLists(s.vars[i].Data)
	if err != nil {
		return nil
	}
	return certificates(sigs)
}

// Set is SetVariable. For time-based authenticated variables, payload is an
// EFI_VARIABLE_AUTHENTICATION_2 descriptor followed by the data. Empty data without
// AppendWrite deletes the variable.
func (s *Store) Set(guid GUID, name string, attrs Attributes, payload []byte) error {
	fail := func(st Status, format string, a ...any) error {
		return &Error{Status: st, Name: name, Detail: fmt.Sprintf(format, a...)}
	}
	if name == "" || utf8.RuneCountInString(name) > MaxNameLen || !utf8.ValidString(name) || bytes.IndexByte([]byte(name), 0) >= 0 {
		return fail(InvalidParameter, "name must be 1..%d valid characters without NUL", MaxNameLen)
	}
	if len(payload) > MaxDataSize+16+winCertHeader+maxCertData {
		return fail(OutOfResources, "payload of %d bytes", len(payload))
	}
	if guid == GlobalVariable && (name == "SecureBoot" || name == "SetupMode") {
		return fail(WriteProtected, "read-only variable")
	}
	if attrs&(AuthenticatedWriteAccess|EnhancedAuthenticatedAccess|HardwareErrorRecord) != 0 {
		return fail(Unsupported, "attributes %#x not supported", uint32(attrs))
	}
	if attrs&RuntimeAccess != 0 && attrs&BootserviceAccess == 0 {
		return fail(InvalidParameter, "RUNTIME_ACCESS without BOOTSERVICE_ACCESS")
	}
	appendWrite := attrs&AppendWrite != 0
	base := attrs &^ AppendWrite
	isPolicy := policyVar(guid, name)
	if isPolicy && base != SecureBootPolicyAttrs {
		return fail(SecurityViolation, "Secure Boot policy variables need NV|BS|RT|TIME_BASED_AUTHENTICATED_WRITE_ACCESS")
	}
	idx := s.find(guid, name)
	var old *Variable
	if idx >= 0 {
		old = s.vars[idx]
		if old.Attributes != base {
			return fail(InvalidParameter, "attributes %#x differ from the existing %#x", uint32(base), uint32(old.Attributes))
		}
	}
	if base&TimeBasedAuthenticatedWriteAccess != 0 && !isPolicy {
		return fail(Unsupported, "time-based authenticated variables other than PK, KEK, db, dbx are not supported")
	}

	data := payload
	var ts EFITime
	if isPolicy {
		a, rest, err := ParseAuth2(payload)
		if err != nil {
			return fail(SecurityViolation, "%v", err)
		}
		data, ts = rest, a.Time
		if len(data) > MaxDataSize {
			return fail(OutOfResources, "data of %d bytes exceeds %d", len(data), MaxDataSize)
		}
		newSigs, err := ParseSignatureLists(data)
		if err != nil {
			return fail(InvalidParameter, "%v", err)
		}
		if name == "PK" && len(data) > 0 && (len(newSigs) != 1 || newSigs[0].Type != CertX509) {
			return fail(InvalidParameter, "PK must hold exactly one X509 certificate")
		}
		var trusted []*x509.Certificate
		verify := true
		switch {
		case name == "PK" && !s.SecureBoot():
			// Setup Mode: the new PK must be self-signed (its payload signed by itself).
			trusted = certificates(newSigs)
		case name == "PK":
			trusted = s.certsOf(GlobalVariable, "PK")
		case !s.SecureBoot():
			verify = false // Setup Mode: KEK, db, dbx are writable without a signature (as EDK2)
		case name == "KEK":
			trusted = s.certsOf(GlobalVariable, "PK")
		default: // db, dbx
			trusted = append(s.certsOf(GlobalVariable, "KEK"), s.certsOf(GlobalVariable, "PK")...)
		}
		if verify {
			if err := verifyAuth(a, name, guid, attrs, data, trusted); err != nil {
				return fail(SecurityViolation, "%v", err)
			}
		}
		if old != nil && !appendWrite && !ts.after(old.Time) {
			return fail(SecurityViolation, "timestamp %s is not later than the stored %s (replay or rollback)", ts, old.Time)
		}
		if appendWrite && old != nil {
			have, _ := ParseSignatureLists(old.Data)
			data = MarshalSignatureLists(appendSignatures(have, newSigs))
			if !ts.after(old.Time) {
				ts = old.Time
			}
		}
	} else if appendWrite && old != nil {
		data = append(bytes.Clone(old.Data), payload...)
	}
	if len(data) > MaxDataSize {
		return fail(OutOfResources, "data of %d bytes exceeds %d", len(data), MaxDataSize)
	}

	if len(data) == 0 && !appendWrite {
		if idx < 0 {
			return fail(NotFound, "no such variable to delete")
		}
		s.vars = slices.Delete(s.vars, idx, idx+1)
		return nil
	}
	if len(data) == 0 && old == nil {
		return nil // appending nothing to nothing
	}
	nv := &Variable{GUID: guid, Name: name, Attributes: base, Data: bytes.Clone(data), Time: ts}
	next := slices.Clone(s.vars)
	if idx >= 0 {
		next[idx] = nv
	} else {
		next = append(next, nv)
	}
	if len(next) > MaxVariables {
		return fail(OutOfResources, "more than %d variables", MaxVariables)
	}
	if n := encodedSize(next); n > MaxStoreSize {
		return fail(OutOfResources, "store would hold %d bytes, limit %d", n, MaxStoreSize)
	}
	s.vars = next
	return nil
}

var storeMagic = []byte("UEFIVAR1")

const varHeader = 16 + 4 + 16 + 2 + 4

func encodedSize(vars []*Variable) int {
	n := len(storeMagic) + 4
	for _, v := range vars {
		n += varHeader + len(v.Name) + len(v.Data)
	}
	return n
}

// MarshalBinary encodes the store (docs/state-format.md, section "uefi").
func (s *Store) MarshalBinary() ([]byte, error) {
	var b bytes.Buffer
	b.Write(storeMagic)
	_ = binary.Write(&b, binary.LittleEndian, uint32(len(s.vars)))
	for _, v := range s.vars {
		b.Write(v.GUID[:])
		_ = binary.Write(&b, binary.LittleEndian, uint32(v.Attributes))
		b.Write(v.Time.bytes())
		_ = binary.Write(&b, binary.LittleEndian, uint16(len(v.Name)))
		_ = binary.Write(&b, binary.LittleEndian, uint32(len(v.Data)))
		b.WriteString(v.Name)
		b.Write(v.Data)
	}
	return b.Bytes(), nil
}

// UnmarshalBinary decodes a store, bounding every count and length.
func (s *Store) UnmarshalBinary(b []byte) error {
	if len(b) > MaxStoreSize {
		return fmt.Errorf("uefi variable store: %d bytes exceeds %d", len(b), MaxStoreSize)
	}
	if len(b) < len(storeMagic)+4 || !bytes.Equal(b[:len(storeMagic)], storeMagic) {
		return errors.New("uefi variable store: bad magic")
	}
	n := binary.LittleEndian.Uint32(b[len(storeMagic):])
	if n > MaxVariables {
		return fmt.Errorf("uefi variable store: %d variables exceeds %d", n, MaxVariables)
	}
	r := b[len(storeMagic)+4:]
	vars := make([]*Variable, 0, n)
	for i := range n {
		if len(r) < varHeader {
			return fmt.Errorf("uefi variable store: variable %d truncated", i)
		}
		v := &Variable{}
		copy(v.GUID[:], r)
		v.Attributes = Attributes(binary.LittleEndian.Uint32(r[16:]))
		_ = binary.Read(bytes.NewReader(r[20:36]), binary.LittleEndian, &v.Time)
		nl := int(binary.LittleEndian.Uint16(r[36:]))
		dl := int(binary.LittleEndian.Uint32(r[38:]))
		r = r[varHeader:]
		if nl == 0 || nl > 4*MaxNameLen || dl > MaxDataSize || nl+dl > len(r) {
			return fmt.Errorf("uefi variable store: variable %d: name %d / data %d bytes out of bounds", i, nl, dl)
		}
		v.Name = string(r[:nl])
		if !utf8.ValidString(v.Name) {
			return fmt.Errorf("uefi variable store: variable %d: name is not UTF-8", i)
		}
		v.Data = bytes.Clone(r[nl : nl+dl])
		r = r[nl+dl:]
		for _, w := range vars {
			if w.GUID == v.GUID && w.Name == v.Name {
				return fmt.Errorf("uefi variable store: duplicate variable %s", v.Name)
			}
		}
		vars = append(vars, v)
	}
	if len(r) != 0 {
		return fmt.Errorf("uefi variable store: %d trailing bytes", len(r))
	}
	s.vars = vars
	return nil
}
