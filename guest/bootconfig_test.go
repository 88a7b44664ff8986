package guest

import (
	"bytes"
	"reflect"
	"testing"
)

func TestConfigDiskRoundTrip(t *testing.T) {
	c := &BootConfig{Actions: []string{"nv-increment", "uefi-set=u.json"}, Files: map[string][]byte{"u.json": []byte("{}")},
		Recovery: []byte("pass"), DataDisk: true, CrashAfter: "confirmed", AttestMillis: 5000}
	b, err := MarshalConfigDisk(c)
	if err != nil {
		t.Fatal(err)
	}
	if len(b)%4096 != 0 {
		t.Fatalf("config disk of %d bytes is not whole blocks", len(b))
	}
	got, err := ReadConfigDisk(bytes.NewReader(b))
	if err != nil || !reflect.DeepEqual(got, c) {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	for name, bad := range map[string][]byte{
		"empty":     nil,
		"magic":     append([]byte("SVSMCFG2"), b[8:]...),
		"too long":  append(append([]byte("SVSMCFG1"), 0xff, 0xff, 0xff, 0x7f), b[12:]...),
		"truncated": b[:14],
	} {
		if _, err := ReadConfigDisk(bytes.NewReader(bad)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// The config disk comes from the host: a guest must survive whatever is on it.
func FuzzReadConfigDisk(f *testing.F) {
	b, _ := MarshalConfigDisk(&BootConfig{Actions: []string{"nv-read"}})
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ReadConfigDisk(bytes.NewReader(b))
		if err == nil && c == nil {
			t.Fatal("nil config without error")
		}
	})
}
