package statestore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// memDisk is an in-memory Device that can fail a write after a number of bytes (a torn write).
type memDisk struct {
	b         []byte
	tearAfter int // if > 0, the next write stores only this many bytes and fails
	syncs     int
}

func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memDisk) WriteAt(p []byte, off int64) (int, error) {
	if m.tearAfter > 0 {
		p = p[:m.tearAfter]
		m.tearAfter = 0
		m.grow(off + int64(len(p)))
		copy(m.b[off:], p)
		return len(p), errors.New("power lost")
	}
	m.grow(off + int64(len(p)))
	copy(m.b[off:], p)
	return len(p), nil
}

func (m *memDisk) grow(n int64) {
	if n > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, n-int64(len(m.b)))...)
	}
}

func (m *memDisk) Sync() error { m.syncs++; return nil }

func opts(key, vm byte) Options {
	var o Options
	for i := range o.Key {
		o.Key[i] = key
	}
	for i := range o.VMID {
		o.VMID[i] = vm
	}
	return o
}

func mustOpen(t *testing.T, d Device, o Options) (*Store, *State) {
	t.Helper()
	s, st, err := Open(d, o)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s, st
}

func TestFirstBootWriteReadAlternate(t *testing.T) {
	d := &memDisk{}
	s, st, err := Open(d, opts(1, 2))
	if !errors.Is(err, ErrEmpty) || st != nil {
		t.Fatalf("empty disk: got %v, %v; want ErrEmpty", st, err)
	}
	for i, want := range []struct {
		slot int
		gen  uint64
	}{{0, 1}, {1, 2}, {0, 3}, {1, 4}} {
		body := []byte(strings.Repeat("x", i+1))
		w, err := s.Write(uint64(10+i), body)
		if err != nil {
			t.Fatal(err)
		}
		if w.Slot != want.slot || w.Generation != want.gen {
			t.Fatalf("write %d: slot %d gen %d, want slot %d gen %d", i, w.Slot, w.Generation, want.slot, want.gen)
		}
		if d.syncs != i+1 {
			t.Fatalf("write %d: %d syncs, want %d (every write is flushed)", i, d.syncs, i+1)
		}
		s2, got := mustOpen(t, d, opts(1, 2))
		if got.Slot != want.slot || got.Generation != want.gen || got.Counter != uint64(10+i) || !bytes.Equal(got.Body, body) {
			t.Fatalf("reopen after write %d: %+v", i, got)
		}
		if len(s2.Problems) != 0 {
			t.Fatalf("problems on a clean disk: %v", s2.Problems)
		}
	}
}

func TestFileDevice(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.img")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s, _, err := Open(f, opts(3, 4))
	if !errors.Is(err, ErrEmpty) {
		t.Fatalf("new file: %v", err)
	}
	if _, err := s.Write(7, []byte("tpm")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write(7, []byte("tpm2")); err != nil {
		t.Fatal(err)
	}
	_, st := mustOpen(t, f, opts(3, 4))
	if string(st.Body) != "tpm2" || st.Slot != 1 {
		t.Fatalf("got %+v", st)
	}
}

func TestTornWriteKeepsPreviousGeneration(t *testing.T) {
	for _, tear := range []int{1, HeaderSize - 1, HeaderSize, HeaderSize + 10} {
		d := &memDisk{}
		s, _, _ := Open(d, opts(1, 1))
		if _, err := s.Write(1, []byte("first")); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Write(2, []byte("second")); err != nil {
			t.Fatal(err)
		}
		d.tearAfter = tear
		if _, err := s.Write(3, []byte("third, torn")); err == nil {
			t.Fatal("torn write reported success")
		}
		s2, st := mustOpen(t, d, opts(1, 1))
		if string(st.Body) != "second" || st.Generation != 2 {
			t.Fatalf("tear at %d: got %+v, want generation 2 'second'", tear, st)
		}
		// A tear inside bytes that did not change leaves slot A's old generation valid;
		// otherwise slot A is reported. Slot B is never touched.
		for _, p := range s2.Problems {
			if p.Slot != 0 {
				t.Fatalf("tear at %d: problem outside the written slot: %v", tear, p)
			}
		}
		if tear >= HeaderSize && len(s2.Problems) != 1 {
			t.Fatalf("tear at %d: problems %v, want slot A reported", tear, s2.Problems)
		}
	}
}

// rewriteCRC recomputes a header checksum after a deliberate field change, so the test
// reaches the check behind the checksum.
func rewriteCRC(b []byte, slot int) {
	h := b[slot*SlotSize : slot*SlotSize+HeaderSize]
	binary.LittleEndian.PutUint32(h[offCRC:], crc32.Checksum(h[:offCRC], crcTable))
}

func TestCorruptionIsReportedPrecisely(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(b []byte) []byte // on a disk whose newest generation is in slot B
		check  Check
	}{
		{"magic", func(b []byte) []byte { b[SlotSize] ^= 1; return b }, CheckMagic},
		{"header byte", func(b []byte) []byte { b[SlotSize+offCounter] ^= 1; return b }, CheckChecksum},
		{"crc", func(b []byte) []byte { b[SlotSize+offCRC] ^= 1; return b }, CheckChecksum},
		{"version", func(b []byte) []byte { b[SlotSize+offVersion] = 9; rewriteCRC(b, 1); return b }, CheckVersion},
		{"reserved", func(b []byte) []byte { b[SlotSize+offReserved] = 1; rewriteCRC(b, 1); return b }, CheckFields},
		{"length", func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[SlotSize+offBodyLen:], SlotSize)
			rewriteCRC(b, 1)
			return b
		}, CheckFields},
		{"vm id", func(b []byte) []byte { b[SlotSize+offVMID] ^= 1; rewriteCRC(b, 1); return b }, CheckVMID},
		{"counter with crc fixed", func(b []byte) []byte { b[SlotSize+offCounter] ^= 1; rewriteCRC(b, 1); return b }, CheckAuth},
		{"body", func(b []byte) []byte { b[SlotSize+HeaderSize+3] ^= 0x80; return b }, CheckAuth},
		{"tag", func(b []byte) []byte {
			n := binary.LittleEndian.Uint32(b[SlotSize+offBodyLen:])
			b[SlotSize+HeaderSize+int(n)-1] ^= 1
			return b
		}, CheckAuth},
		{"truncated body", func(b []byte) []byte { return b[:SlotSize+HeaderSize+2] }, CheckTruncated},
		{"truncated header", func(b []byte) []byte { return b[:SlotSize+5] }, CheckTruncated},
		{"zeroed header", func(b []byte) []byte { clear(b[SlotSize : SlotSize+HeaderSize]); return b }, CheckMagic},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := &memDisk{}
			s, _, _ := Open(d, opts(5, 6))
			if _, err := s.Write(1, []byte("generation one")); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Write(2, []byte("generation two")); err != nil {
				t.Fatal(err)
			}
			d.b = tc.mutate(d.b)
			s2, st, err := Open(d, opts(5, 6))
			if err != nil {
				t.Fatalf("slot A is intact, Open must use it: %v", err)
			}
			if st.Slot != 0 || string(st.Body) != "generation one" {
				t.Fatalf("fell back to %+v, want slot A generation one", st)
			}
			if len(s2.Problems) != 1 || s2.Problems[0].Slot != 1 || s2.Problems[0].Check != tc.check {
				t.Fatalf("problems %v, want slot B %s", s2.Problems, tc.check)
			}
			// Both slots broken: a CorruptError listing both, never ErrEmpty.
			d.b[0] ^= 1
			if _, _, err := Open(d, opts(5, 6)); err == nil {
				t.Fatal("both slots broken: Open succeeded")
			} else {
				var ce *CorruptError
				if !errors.As(err, &ce) || len(ce.Slots) != 2 {
					t.Fatalf("both slots broken: %v, want CorruptError with two slots", err)
				}
			}
		})
	}
}

func TestWrongKeyAndOtherVM(t *testing.T) {
	d := &memDisk{}
	s, _, _ := Open(d, opts(1, 1))
	if _, err := s.Write(1, []byte("x")); err != nil {
		t.Fatal(err)
	}
	var ce *CorruptError
	if _, _, err := Open(d, opts(2, 1)); !errors.As(err, &ce) || ce.Slots[0].Check != CheckAuth {
		t.Fatalf("wrong key: %v", err)
	}
	if _, _, err := Open(d, opts(1, 2)); !errors.As(err, &ce) || ce.Slots[0].Check != CheckVMID {
		t.Fatalf("other VM: %v", err)
	}
}

func TestWriteBounds(t *testing.T) {
	d := &memDisk{}
	s, _, _ := Open(d, opts(1, 1))
	if _, err := s.Write(1, make([]byte, MaxBodySize)); err != nil {
		t.Fatalf("max body: %v", err)
	}
	if _, err := s.Write(1, make([]byte, MaxBodySize+1)); err == nil {
		t.Fatal("oversized body accepted")
	}
	if len(d.b) > DiskSize {
		t.Fatalf("disk grew to %d > %d", len(d.b), DiskSize)
	}
	if _, st := mustOpen(t, d, opts(1, 1)); len(st.Body) != MaxBodySize {
		t.Fatalf("max body read back as %d bytes", len(st.Body))
	}
}

func FuzzOpen(f *testing.F) {
	d := &memDisk{}
	s, _, _ := Open(d, opts(1, 1))
	_, _ = s.Write(1, []byte("seed one"))
	_, _ = s.Write(2, []byte("seed two"))
	f.Add(d.b[:SlotSize+HeaderSize+40])
	f.Add(d.b[SlotSize : SlotSize+HeaderSize+40])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > DiskSize {
			b = b[:DiskSize]
		}
		st, s, err := func() (*State, *Store, error) {
			s, st, err := Open(&memDisk{b: bytes.Clone(b)}, opts(1, 1))
			return st, s, err
		}()
		if err != nil {
			var ce *CorruptError
			if !errors.Is(err, ErrEmpty) && !errors.As(err, &ce) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		if len(st.Body) > MaxBodySize || s == nil {
			t.Fatalf("accepted %d-byte body", len(st.Body))
		}
	})
}

// TestUseFallsBackToAnOlderCounter: the SVSM asks for the state at the confirmed counter when
// the newest slot holds an unconfirmed advance; the next write then replaces the newer slot.
func TestUseFallsBackToAnOlderCounter(t *testing.T) {
	d := &memDisk{}
	s, _, _ := Open(d, opts(1, 2))
	if _, err := s.Write(4, []byte("confirmed")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write(5, []byte("unconfirmed")); err != nil {
		t.Fatal(err)
	}
	s, newest := mustOpen(t, d, opts(1, 2))
	if newest.Counter != 5 {
		t.Fatalf("newest holds %d", newest.Counter)
	}
	if _, ok := s.Use(9); ok {
		t.Fatal("Use found a counter no slot holds")
	}
	st, ok := s.Use(4)
	if !ok || string(st.Body) != "confirmed" || st.Slot != 0 {
		t.Fatalf("Use(4) = %+v, %v", st, ok)
	}
	w, err := s.Write(5, []byte("again"))
	if err != nil {
		t.Fatal(err)
	}
	if w.Slot != 1 || w.Generation != 3 {
		t.Fatalf("write after Use: slot %d gen %d, want slot 1 gen 3 (over the unconfirmed one)", w.Slot, w.Generation)
	}
	_, got := mustOpen(t, d, opts(1, 2))
	if string(got.Body) != "again" {
		t.Fatalf("reopen: %q", got.Body)
	}
}

// TestOverIncompleteFirstWrite: a torn first write leaves one invalid slot and one never
// written; opened as empty, the next write goes to the clean slot and the disk is good again.
func TestOverIncompleteFirstWrite(t *testing.T) {
	d := &memDisk{}
	s, _, _ := Open(d, opts(1, 2))
	d.tearAfter = 200
	if _, err := s.Write(1, []byte(strings.Repeat("x", 4000))); err == nil {
		t.Fatal("torn write reported success")
	}
	if _, _, err := Open(d, opts(1, 2)); err == nil {
		t.Fatal("a torn first write opened without the option")
	}
	s, st, err := Open(d, Options{Key: opts(1, 2).Key, VMID: opts(1, 2).VMID, OverIncompleteFirstWrite: true})
	if !errors.Is(err, ErrEmpty) || st != nil {
		t.Fatalf("with the option: %v %v, want ErrEmpty", st, err)
	}
	w, err := s.Write(1, []byte("again"))
	if err != nil || w.Slot != 1 {
		t.Fatalf("first write after a torn one: %+v %v, want slot B", w, err)
	}
	s2, got := mustOpen(t, d, opts(1, 2))
	if string(got.Body) != "again" || len(s2.Problems) != 1 {
		t.Fatalf("reopen: %q, problems %v", got.Body, s2.Problems)
	}
}
