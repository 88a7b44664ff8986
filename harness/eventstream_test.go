package harness

import (
	"io"
	"strings"
	"testing"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// TestTornLastLine: a power cut may end the console in the middle of an event line; that
// last line is forgiven only when the boot ended in a power cut (exit -1). A malformed line
// with more output after it, or at the end of a boot that ended on its own, is an error.
func TestTornLastLine(t *testing.T) {
	good := protocol.EventPrefix + `{"event":"boot-start","layer":"svsm"}` + "\n"
	torn := protocol.EventPrefix + `{"event":"power-c`
	for _, tc := range []struct {
		name    string
		console string
		exit    int
		wantErr bool
	}{
		{"torn last line, power cut", good + torn, -1, false},
		{"torn last line, clean exit", good + torn, 0, true},
		{"torn line before another", good + torn + "\n" + good, -1, true},
		{"all good", good + good, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newEventStream()
			s.feed(strings.NewReader(tc.console), io.Discard, nil)
			s.finish(tc.exit, "", nil)
			_, err := s.result(t.Context(), func() {})
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
		})
	}
}
