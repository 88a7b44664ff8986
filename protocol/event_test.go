package protocol

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestEventLineRoundTrip(t *testing.T) {
	ev := Event{Event: "state-opened", Layer: LayerSVSM, Fields: map[string]any{"counter": uint64(7), "slot": "B", "first_boot": false}}
	line, err := ev.Line()
	if err != nil {
		t.Fatal(err)
	}
	want := `SVSM-E2E-EVENT {"event":"state-opened","layer":"svsm","counter":7,"first_boot":false,"slot":"B"}`
	if line != want {
		t.Fatalf("line\n got %s\nwant %s", line, want)
	}
	got, ok, err := ParseEventLine("[  1.234] " + line + "\r\n")
	if err != nil || !ok {
		t.Fatalf("parse: %v %v", ok, err)
	}
	if n, err := got.Uint("counter"); err != nil || n != 7 || got.String("slot") != "B" || got.Layer != LayerSVSM {
		t.Fatalf("parsed %+v (%v)", got, err)
	}
}

func TestParseEventLineErrors(t *testing.T) {
	for _, tc := range []struct {
		line   string
		ok     bool
		hasErr bool
	}{
		{"plain console output", false, false},
		{EventPrefix + `{"event":"x"}`, true, true},           // no layer
		{EventPrefix + `{"event":"x","layer":1}`, true, true}, // layer not a string
		{EventPrefix + `not json`, true, true},
		{EventPrefix + `{"event":"x","layer":"os"}`, true, false},
		{EventPrefix + strings.Repeat("x", MaxEventLine), true, true},
	} {
		_, ok, err := ParseEventLine(tc.line)
		if ok != tc.ok || (err != nil) != tc.hasErr {
			t.Errorf("%.40q: ok=%v err=%v", tc.line, ok, err)
		}
	}
	if _, err := (Event{Event: "x", Layer: "os", Fields: map[string]any{"reason": "no"}}).Line(); err == nil {
		t.Error("reserved field accepted")
	}
}

func FuzzParseEventLine(f *testing.F) {
	f.Add(EventPrefix + `{"event":"a","layer":"svsm","n":1}`)
	f.Fuzz(func(t *testing.T, line string) {
		ev, ok, err := ParseEventLine(line)
		if ok && err == nil {
			if ev.Event == "" || ev.Layer == "" {
				t.Fatal("accepted an event without event/layer")
			}
			if _, err := ev.Line(); err != nil {
				t.Fatalf("accepted event does not re-encode: %v", err)
			}
		}
	})
}

// TestEventUptime: the guest's uptime field reads back from a printed and parsed line, and a
// missing, negative, huge or non-numeric one is absent.
func TestEventUptime(t *testing.T) {
	line, err := Event{Event: "attested", Layer: LayerSVSM, Fields: map[string]any{EventUptimeField: 1234.56}}.Line()
	if err != nil {
		t.Fatal(err)
	}
	ev, ok, err := ParseEventLine(line)
	if err != nil || !ok {
		t.Fatalf("parse %q: %v %v", line, ok, err)
	}
	if up, ok := ev.Uptime(); !ok || up != 1234560*time.Microsecond {
		t.Fatalf("Uptime() = %v, %v; want 1.23456s", up, ok)
	}
	for _, v := range []any{nil, -1.0, 1e300, "12", json.Number("x")} {
		e := Event{Event: "e", Layer: LayerOS, Fields: map[string]any{EventUptimeField: v}}
		if v == nil {
			e.Fields = nil
		}
		if up, ok := e.Uptime(); ok {
			t.Errorf("Uptime() with %v = %v, true", v, up)
		}
	}
}
