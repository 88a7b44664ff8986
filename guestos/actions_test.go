package guestos

import "testing"

func TestParseActions(t *testing.T) {
	for _, tc := range []struct {
		in    string
		n     int
		error bool
	}{
		{"", 0, false},
		{"nv-increment", 1, false},
		{"nv-increment, uefi-set=/tmp/u.json ,wait=1s,reboot", 4, false},
		{"nv-write=a=b", 1, false},
		{"bogus", 0, true},
		{"uefi-set", 0, true},
		{"nv-read=x", 0, true},
		{"reboot,nv-read", 0, true},
		{"poweroff,reboot", 0, true},
	} {
		got, err := ParseActions(tc.in)
		if (err != nil) != tc.error || len(got) != tc.n {
			t.Errorf("%q: %v, %v", tc.in, got, err)
		}
	}
	got, _ := ParseActions("nv-write=a=b")
	if got[0].Arg != "a=b" {
		t.Errorf("argument %q", got[0].Arg)
	}
}
