package svsm

import (
	"bytes"
	"testing"

	"github.com/svsm-e2e/svsm-e2e/svsm/vtpm"
)

func TestBodyRoundTripAndBounds(t *testing.T) {
	b := &body{tpmNV: bytes.Repeat([]byte{7}, vtpm.NVSize), uefi: []byte("UEFIVAR1\x00\x00\x00\x00")}
	enc, err := b.marshal()
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseBody(enc)
	if err != nil || !bytes.Equal(got.tpmNV, b.tpmNV) || !bytes.Equal(got.uefi, b.uefi) {
		t.Fatalf("round trip: %v", err)
	}
	for name, mutate := range map[string]func([]byte) []byte{
		"magic":       func(p []byte) []byte { p[0] = 'X'; return p },
		"version":     func(p []byte) []byte { p[8] = 9; return p },
		"trailing":    func(p []byte) []byte { return append(p, 0) },
		"truncated":   func(p []byte) []byte { return p[:len(p)-1] },
		"short nv":    func(p []byte) []byte { p[bodyHeaderSize+5]--; return p },
		"one section": func(p []byte) []byte { p[10] = 1; return p },
	} {
		if _, err := parseBody(mutate(bytes.Clone(enc))); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func FuzzParseBody(f *testing.F) {
	enc, _ := (&body{tpmNV: make([]byte, vtpm.NVSize), uefi: []byte("u")}).marshal()
	f.Add(enc)
	f.Fuzz(func(t *testing.T, p []byte) {
		b, err := parseBody(p)
		if err == nil && len(b.tpmNV) != vtpm.NVSize {
			t.Fatal("accepted a wrong-size NV image")
		}
	})
}
