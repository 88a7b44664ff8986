package attest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// answerWith plays the proxy and verifier on the other end of a pipe: it reads the guest's
// confirmation and writes what answer(req) returns.
func answerWith(t *testing.T, answer func(req *protocol.ConfirmRequest) []byte) net.Conn {
	t.Helper()
	guest, host := net.Pipe()
	go func() {
		defer host.Close()
		b, err := protocol.ReadFrame(host, protocol.MaxFrameSize)
		if err != nil {
			return
		}
		neg, err := protocol.DecodeNegotiationRequest(b)
		if err != nil {
			return
		}
		if out := answer(neg.Confirm); out != nil {
			_ = protocol.WriteFrame(host, out)
		}
	}()
	return guest
}

// TestConfirmTakesOnlyAnAuthenticatedSuccessForItsCounter: what the guest accepts and how
// it names everything else.
func TestConfirmTakesOnlyAnAuthenticatedSuccessForItsCounter(t *testing.T) {
	keys, _ := protocol.DeriveConfirmKeys(bytes.Repeat([]byte{3}, 32))
	boot := bytes.Repeat([]byte{4}, protocol.BootIDSize)
	enc := func(v any) []byte { b, _ := json.Marshal(v); return b }
	for _, tc := range []struct {
		name   string
		answer func(req *protocol.ConfirmRequest) []byte
		want   error
	}{
		{"authenticated success", func(r *protocol.ConfirmRequest) []byte {
			return enc(protocol.NewConfirmAnswer(keys, r, true, r.Counter, ""))
		}, nil},
		{"authenticated refusal", func(r *protocol.ConfirmRequest) []byte {
			return enc(protocol.NewConfirmAnswer(keys, r, false, r.Counter-1, "superseded"))
		}, ErrConfirmRefused},
		{"authenticated success for another counter (a verifier bug)", func(r *protocol.ConfirmRequest) []byte {
			return enc(protocol.NewConfirmAnswer(keys, r, true, r.Counter+1, ""))
		}, ErrConfirmRefused},
		{"forged success", func(r *protocol.ConfirmRequest) []byte {
			return []byte(`{"success":true,"counter":5}`)
		}, ErrConfirmUnauthenticated},
		{"unauthenticated refusal", func(r *protocol.ConfirmRequest) []byte {
			return enc(protocol.UnauthenticatedAnswer(r, "verifier down"))
		}, ErrConfirmUnauthenticated},
		{"no answer", func(r *protocol.ConfirmRequest) []byte { return nil }, ErrConfirmNoAnswer},
	} {
		conn := answerWith(t, tc.answer)
		_, err := Confirm(context.Background(), conn, keys, boot, 5, nil)
		conn.Close()
		if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	// Silence past the bound is a timeout.
	guest, host := net.Pipe()
	defer host.Close()
	go func() { _, _ = protocol.ReadFrame(host, protocol.MaxFrameSize) }()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := Confirm(ctx, guest, keys, boot, 5, nil); !errors.Is(err, ErrConfirmTimeout) {
		t.Errorf("silence: %v, want ErrConfirmTimeout", err)
	}
}
