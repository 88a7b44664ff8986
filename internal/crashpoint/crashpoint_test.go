package crashpoint

import (
	"strings"
	"testing"
)

type cut struct{}

func TestParse(t *testing.T) {
	for in, want := range map[string]string{
		"guest/state/advance/before":         "guest/state/advance/before",
		"guest/state/tpm-nv/write#3:torn":    "guest/state/tpm-nv/write#3:torn",
		"verifier/release/after-commit#1":    "verifier/release/after-commit",
		"proxy/confirm/mid-frame:torn":       "proxy/confirm/mid-frame:torn",
		"guest/confirm/advance/sent#2":       "guest/confirm/advance/sent#2",
		"guest/luks/kill-old-keyslot/done#1": "guest/luks/kill-old-keyslot/done",
	} {
		sp, err := Parse(in)
		if err != nil || sp.String() != want {
			t.Errorf("Parse(%q) = %v %v, want %s", in, sp, err, want)
		}
	}
	for _, bad := range []string{"", "nope", "guest/state/advance/before#0", "guest/state/advance/before#x", "guest/state/advance/before:torn", "verifier/release/after-commit:torn"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

// TestInjector: the chosen hit cuts the power; :torn leaves a sector-aligned prefix first;
// an unregistered point panics whether or not a crash was asked for.
func TestInjector(t *testing.T) {
	crashed := func(f func()) (hit bool) {
		defer func() {
			if r := recover(); r != nil {
				if _, ok := r.(cut); !ok {
					panic(r)
				}
				hit = true
			}
		}()
		f()
		return false
	}
	in, err := New("guest/state/mirror/before#2", func() { panic(cut{}) })
	if err != nil {
		t.Fatal(err)
	}
	if crashed(func() { in.At("guest/state/mirror/before") }) {
		t.Fatal("crashed on the first hit, want the second")
	}
	if crashed(func() { in.At("guest/state/advance/before") }) {
		t.Fatal("crashed at another point")
	}
	if !crashed(func() { in.At("guest/state/mirror/before") }) {
		t.Fatal("no crash on the second hit")
	}

	torn, _ := New("guest/state/tpm-nv/write:torn", func() { panic(cut{}) })
	var got []byte
	write := func(p []byte, _ int64) (int, error) { got = append(got, p...); return len(p), nil }
	if !crashed(func() { _, _ = torn.Write("guest/state/tpm-nv/write", make([]byte, 4096+128), 0, write) }) {
		t.Fatal("torn write did not crash")
	}
	if len(got) == 0 || len(got)%512 != 0 || len(got) >= 4096+128 {
		t.Fatalf("torn write left %d bytes, want a non-empty sector-aligned prefix", len(got))
	}

	var none *Injector
	if crashed(func() { none.At("verifier/prime/after-commit") }) {
		t.Fatal("nil injector crashed")
	}
	defer func() {
		if r := recover(); r == nil || !strings.Contains(r.(string), "unregistered") {
			t.Fatalf("an unregistered write point did not panic: %v", r)
		}
	}()
	none.At("guest/state/somewhere-new/before")
}

func TestRegistryShape(t *testing.T) {
	all := All()
	if len(all) < 30 {
		t.Fatalf("%d points", len(all))
	}
	for _, c := range []string{"guest", "verifier", "proxy"} {
		if len(Of(c)) == 0 {
			t.Errorf("no %s points", c)
		}
	}
}
