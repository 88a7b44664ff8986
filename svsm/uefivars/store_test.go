package uefivars

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"sync"
	"testing"
	"time"
)

var owner = MustGUID("11111111-2222-3333-4444-555555555555")

type keys struct{ pk, kek, db, other *Key }

var (
	keysOnce sync.Once
	testKeys keys
)

// sbKeys generates the RSA keys once per test binary (keygen is the slow part).
func sbKeys(t testing.TB) keys {
	keysOnce.Do(func() {
		mk := func(cn string, parent *Key) *Key {
			k, err := NewKey(cn, parent)
			if err != nil {
				t.Fatal(err)
			}
			return k
		}
		testKeys.pk = mk("test PK", nil)
		testKeys.kek = mk("test KEK", testKeys.pk)
		testKeys.db = mk("test db", nil)
		testKeys.other = mk("attacker", nil)
	})
	return testKeys
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func enrolled(t *testing.T) *Store {
	t.Helper()
	k := sbKeys(t)
	s := New()
	tmpl, err := EnrollmentTemplate(k.pk, k.kek, k.db, owner, t0)
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range tmpl {
		if s.SecureBoot() {
			t.Fatalf("user mode before PK (%s)", u.Name)
		}
		if err := s.Apply(u); err != nil {
			t.Fatalf("enroll %s: %v", u.Name, err)
		}
	}
	if !s.SecureBoot() {
		t.Fatal("PK enrolled but not in user mode")
	}
	return s
}

func hashSig(s string) Signature {
	h := sha256.Sum256([]byte(s))
	return Signature{Type: CertSHA256, Owner: owner, Data: h[:]}
}

func status(err error) Status {
	var e *Error
	if errors.As(err, &e) {
		return e.Status
	}
	return ""
}

func TestSecureBootRules(t *testing.T) {
	k := sbKeys(t)
	cases := []struct {
		name   string
		update func(s *Store) (Update, error)
		want   Status // "" = accepted
		check  func(t *testing.T, s *Store)
	}{
		{"dbx append signed by KEK", func(s *Store) (Update, error) {
			return SignedUpdate(ImageSecurityDatabase, "dbx", []Signature{hashSig("revoked")}, t0.Add(time.Hour), true, k.kek)
		}, "", func(t *testing.T, s *Store) {
			v, _ := s.Get(ImageSecurityDatabase, "dbx")
			sigs, _ := ParseSignatureLists(v.Data)
			if len(sigs) != 1 || !bytes.Equal(sigs[0].Data, hashSig("revoked").Data) {
				t.Fatalf("dbx = %v", sigs)
			}
		}},
		{"db append signed by PK", func(s *Store) (Update, error) {
			return SignedUpdate(ImageSecurityDatabase, "db", []Signature{hashSig("app")}, t0.Add(time.Hour), true, k.pk)
		}, "", func(t *testing.T, s *Store) {
			v, _ := s.Get(ImageSecurityDatabase, "db")
			if sigs, _ := ParseSignatureLists(v.Data); len(sigs) != 2 {
				t.Fatalf("db has %d entries after append, want 2", len(sigs))
			}
		}},
		{"db signed by an unknown key", func(s *Store) (Update, error) {
			return SignedUpdate(ImageSecurityDatabase, "db", []Signature{hashSig("evil")}, t0.Add(time.Hour), true, k.other)
		}, SecurityViolation, nil},
		{"db signed by the db key itself", func(s *Store) (Update, error) {
			return SignedUpdate(ImageSecurityDatabase, "db", []Signature{hashSig("evil")}, t0.Add(time.Hour), true, k.db)
		}, SecurityViolation, nil},
		{"KEK signed by the db key", func(s *Store) (Update, error) {
			return SignedUpdate(GlobalVariable, "KEK", []Signature{k.other.Signature(owner)}, t0.Add(time.Hour), false, k.db)
		}, SecurityViolation, nil},
		{"db replace with the same timestamp (replay)", func(s *Store) (Update, error) {
			return SignedUpdate(ImageSecurityDatabase, "db", []Signature{hashSig("x")}, t0, false, k.kek)
		}, SecurityViolation, nil},
		{"db replace with an older timestamp", func(s *Store) (Update, error) {
			return SignedUpdate(ImageSecurityDatabase, "db", []Signature{hashSig("x")}, t0.Add(-time.Hour), false, k.kek)
		}, SecurityViolation, nil},
		{"PK with two certificates", func(s *Store) (Update, error) {
			return SignedUpdate(GlobalVariable, "PK", []Signature{k.pk.Signature(owner), k.kek.Signature(owner)}, t0.Add(time.Hour), false, k.pk)
		}, InvalidParameter, nil},
		{"policy variable without time-based attribute", func(s *Store) (Update, error) {
			return Update{GUID: ImageSecurityDatabase, Name: "db", Attributes: NonVolatile | BootserviceAccess, Payload: []byte{1}}, nil
		}, SecurityViolation, nil},
		{"SecureBoot is read-only", func(s *Store) (Update, error) {
			return Update{GUID: GlobalVariable, Name: "SecureBoot", Attributes: BootserviceAccess, Payload: []byte{0}}, nil
		}, WriteProtected, nil},
		{"tampered data after signing", func(s *Store) (Update, error) {
			u, err := SignedUpdate(ImageSecurityDatabase, "dbx", []Signature{hashSig("revoked")}, t0.Add(time.Hour), true, k.kek)
			u.Payload[len(u.Payload)-1] ^= 1
			return u, err
		}, SecurityViolation, nil},
		{"signed for db, applied to dbx", func(s *Store) (Update, error) {
			u, err := SignedUpdate(ImageSecurityDatabase, "db", []Signature{hashSig("revoked")}, t0.Add(time.Hour), true, k.kek)
			u.Name = "dbx"
			return u, err
		}, SecurityViolation, nil},
		{"delete PK signed by PK returns to setup mode", func(s *Store) (Update, error) {
			return SignedUpdate(GlobalVariable, "PK", nil, t0.Add(time.Hour), false, k.pk)
		}, "", func(t *testing.T, s *Store) {
			if s.SecureBoot() {
				t.Fatal("still in user mode")
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := enrolled(t)
			before, _ := s.MarshalBinary()
			u, err := tc.update(s)
			if err != nil {
				t.Fatal(err)
			}
			err = s.Apply(u)
			if got := status(err); got != tc.want {
				t.Fatalf("status %q (%v), want %q", got, err, tc.want)
			}
			if tc.want != "" {
				if after, _ := s.MarshalBinary(); !bytes.Equal(before, after) {
					t.Fatal("a refused write changed the store")
				}
			}
			if tc.check != nil {
				tc.check(t, s)
			}
		})
	}
}

func TestSetupModePKMustBeSelfSigned(t *testing.T) {
	k := sbKeys(t)
	s := New()
	u, err := SignedUpdate(GlobalVariable, "PK", []Signature{k.pk.Signature(owner)}, t0, false, k.other)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(u); status(err) != SecurityViolation {
		t.Fatalf("PK signed by another key in setup mode: %v", err)
	}
}

func TestPlainVariables(t *testing.T) {
	s := New()
	g := MustGUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
	attrs := NonVolatile | BootserviceAccess | RuntimeAccess
	if err := s.Set(g, "BootOrder", attrs, []byte{1, 0}); err != nil {
		t.Fatal(err)
	}
	if err := s.Set(g, "BootOrder", attrs|AppendWrite, []byte{2, 0}); err != nil {
		t.Fatal(err)
	}
	if v, _ := s.Get(g, "BootOrder"); !bytes.Equal(v.Data, []byte{1, 0, 2, 0}) {
		t.Fatalf("append: %x", v.Data)
	}
	if err := s.Set(g, "BootOrder", NonVolatile|BootserviceAccess, []byte{1}); status(err) != InvalidParameter {
		t.Fatalf("changed attributes: %v", err)
	}
	if err := s.Set(g, "X", RuntimeAccess, []byte{1}); status(err) != InvalidParameter {
		t.Fatalf("RT without BS: %v", err)
	}
	if err := s.Set(g, "BootOrder", attrs, nil); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Get(g, "BootOrder"); ok {
		t.Fatal("delete left the variable")
	}
	if err := s.Set(g, "Big", attrs, make([]byte, MaxDataSize+1)); status(err) != OutOfResources {
		t.Fatalf("oversized: %v", err)
	}
}

func TestMarshalRoundTripAndUpdateJSON(t *testing.T) {
	s := enrolled(t)
	b, err := s.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	s2 := New()
	if err := s2.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	if !s2.SecureBoot() || len(s2.Names()) != 3 {
		t.Fatalf("round trip: %v", s2.Names())
	}
	// The timestamp survives, so a replay is still refused after a reload.
	k := sbKeys(t)
	u, _ := SignedUpdate(ImageSecurityDatabase, "db", []Signature{hashSig("x")}, t0, false, k.kek)
	j, _ := json.Marshal(u)
	var u2 Update
	if err := json.Unmarshal(j, &u2); err != nil {
		t.Fatal(err)
	}
	if err := s2.Apply(u2); status(err) != SecurityViolation {
		t.Fatalf("replay after reload: %v", err)
	}
}

func TestGUIDString(t *testing.T) {
	if g := GlobalVariable.String(); g != "8be4df61-93ca-11d2-aa0d-00e098032b8c" {
		t.Fatal(g)
	}
	if GlobalVariable[0] != 0x61 || GlobalVariable[3] != 0x8b {
		t.Fatalf("EFI byte order: %x", GlobalVariable)
	}
}

func FuzzUnmarshalStore(f *testing.F) {
	s := New()
	_ = s.Set(owner, "a", NonVolatile|BootserviceAccess, []byte("x"))
	b, _ := s.MarshalBinary()
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		var s Store
		if s.UnmarshalBinary(b) == nil {
			out, _ := s.MarshalBinary()
			if !bytes.Equal(out, b) {
				t.Fatal("accepted input does not re-encode identically")
			}
		}
	})
}

func FuzzParseSignatureLists(f *testing.F) {
	f.Add(MarshalSignatureLists([]Signature{hashSig("a"), hashSig("b")}))
	f.Fuzz(func(t *testing.T, b []byte) {
		sigs, err := ParseSignatureLists(b)
		if err == nil && len(sigs) > len(b)/17+1 {
			t.Fatalf("%d entries from %d bytes", len(sigs), len(b))
		}
	})
}

func FuzzParseAuth2(f *testing.F) {
	a := &Auth2{Time: TimeOf(t0), SignedData: []byte{0x30, 0}}
	f.Add(a.Marshal([]byte("data")))
	f.Fuzz(func(t *testing.T, b []byte) {
		a, rest, err := ParseAuth2(b)
		if err != nil {
			return
		}
		if len(a.SignedData) > maxCertData || len(rest) > len(b) {
			t.Fatal("bounds")
		}
		// Verification of arbitrary descriptors must fail cleanly, never panic.
		_ = verifyAuth(a, "db", ImageSecurityDatabase, SecureBootPolicyAttrs, rest, nil)
	})
}
