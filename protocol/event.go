package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"
)

// EventPrefix starts every event line the guest prints (PROTOCOLS.md §7).
const EventPrefix = "SVSM-E2E-EVENT "

// MaxEventLine bounds one event line; longer lines are not events.
const MaxEventLine = 64 << 10

// EventUptimeField is the field the guest adds to each event: its machine's uptime
// (CLOCK_BOOTTIME) in milliseconds when it printed the event. In a VM it counts from the
// kernel's start, so phases measured with it leave out the console's way to the host.
const EventUptimeField = "uptime_ms"

// Uptime is the event's EventUptimeField, when it has one.
func (e Event) Uptime() (time.Duration, bool) {
	var ms float64
	switch v := e.Fields[EventUptimeField].(type) {
	case json.Number: // as parsed
		f, err := v.Float64()
		if err != nil {
			return 0, false
		}
		ms = f
	case float64: // as the guest sets it
		ms = v
	default:
		return 0, false
	}
	if ms < 0 || ms > float64(math.MaxInt64/int64(time.Millisecond)) {
		return 0, false
	}
	return time.Duration(ms * float64(time.Millisecond)), true
}

// Layers an event can come from.
const (
	LayerSVSM     = "svsm"
	LayerFirmware = "firmware"
	LayerOS       = "os"
	LayerHost     = "host"
)

// Event is one step the guest reports: a JSON object with at least "event" and "layer",
// "reason" on failures, and event-specific fields (docs/guest.md lists them).
type Event struct {
	Event  string
	Layer  string
	Reason string
	Fields map[string]any
}

// MarshalJSON flattens Fields next to the fixed keys, in a stable key order.
func (e Event) MarshalJSON() ([]byte, error) {
	keys := make([]string, 0, len(e.Fields))
	for k := range e.Fields {
		switch k {
		case "event", "layer", "reason":
			return nil, fmt.Errorf("event %s: field %q is reserved", e.Event, k)
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b bytes.Buffer
	b.WriteByte('{')
	put := func(k string, v any) error {
		if b.Len() > 1 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		vb, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("event %s field %s: %w", e.Event, k, err)
		}
		b.Write(kb)
		b.WriteByte(':')
		b.Write(vb)
		return nil
	}
	if err := put("event", e.Event); err != nil {
		return nil, err
	}
	if err := put("layer", e.Layer); err != nil {
		return nil, err
	}
	if e.Reason != "" {
		if err := put("reason", e.Reason); err != nil {
			return nil, err
		}
	}
	for _, k := range keys {
		if err := put(k, e.Fields[k]); err != nil {
			return nil, err
		}
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// UnmarshalJSON reads an event object; numbers in Fields stay json.Number.
func (e *Event) UnmarshalJSON(b []byte) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var m map[string]any
	if err := d.Decode(&m); err != nil {
		return err
	}
	str := func(k string) (string, error) {
		v, ok := m[k]
		if !ok {
			return "", nil
		}
		s, ok := v.(string)
		if !ok {
			return "", fmt.Errorf("event key %q is not a string", k)
		}
		delete(m, k)
		return s, nil
	}
	var err error
	if e.Event, err = str("event"); err != nil {
		return err
	}
	if e.Layer, err = str("layer"); err != nil {
		return err
	}
	if e.Reason, err = str("reason"); err != nil {
		return err
	}
	if e.Event == "" || e.Layer == "" {
		return errors.New(`event needs "event" and "layer"`)
	}
	e.Fields = m
	return nil
}

// Line renders the event as one console line, prefix included, without the newline.
func (e Event) Line() (string, error) {
	b, err := json.Marshal(e)
	if err != nil {
		return "", err
	}
	return EventPrefix + string(b), nil
}

// ParseEventLine returns the event on a console line, ok=false when the line is not one.
// A line that has the prefix but does not parse is an error: the guest never prints one.
func ParseEventLine(line string) (ev Event, ok bool, err error) {
	line = strings.TrimRight(line, "\r\n")
	i := strings.Index(line, EventPrefix)
	if i < 0 {
		return Event{}, false, nil
	}
	if len(line) > MaxEventLine {
		return Event{}, true, fmt.Errorf("event line of %d bytes exceeds %d", len(line), MaxEventLine)
	}
	if err := json.Unmarshal([]byte(line[i+len(EventPrefix):]), &ev); err != nil {
		return Event{}, true, fmt.Errorf("event line: %w", err)
	}
	return ev, true, nil
}

// String returns Fields[k] as a string ("" when absent or not a string).
func (e Event) String(k string) string {
	s, _ := e.Fields[k].(string)
	return s
}

// Uint returns Fields[k] as an unsigned integer.
func (e Event) Uint(k string) (uint64, error) {
	switch v := e.Fields[k].(type) {
	case json.Number:
		return strconv.ParseUint(v.String(), 10, 64)
	case uint64:
		return v, nil
	case int:
		if v >= 0 {
			return uint64(v), nil
		}
	}
	return 0, fmt.Errorf("event %s: field %q is not an unsigned integer (%v)", e.Event, k, e.Fields[k])
}
