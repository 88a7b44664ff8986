package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// MaxFrameSize bounds one length-prefixed frame. Upstream does not bound it; a hostile peer
// could otherwise make us allocate 2^64 bytes. 1 MiB is far above any legitimate message (an
// attestation request is about 2 KiB).
const MaxFrameSize = 1 << 20

// ErrFrameTooLarge is returned (wrapped) when a peer announces a frame above the limit.
var ErrFrameTooLarge = errors.New("frame too large")

// ReadFrame reads one frame: an 8-byte little-endian length, then that many bytes.
// It never allocates more than max bytes (MaxFrameSize if max <= 0).
func ReadFrame(r io.Reader, max int) ([]byte, error) {
	if max <= 0 {
		max = MaxFrameSize
	}
	var hdr [8]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("read frame length: truncated: %w", err)
		}
		return nil, fmt.Errorf("read frame length: %w", err)
	}
	n := binary.LittleEndian.Uint64(hdr[:])
	if n > uint64(max) {
		return nil, fmt.Errorf("read frame: length %d exceeds limit %d: %w", n, max, ErrFrameTooLarge)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, fmt.Errorf("read frame body (%d bytes): %w", n, err)
	}
	return buf, nil
}

// WriteFrame writes body with its 8-byte little-endian length prefix in one Write call, so a
// frame is never interleaved with another writer's bytes on a shared stream.
func WriteFrame(w io.Writer, body []byte) error {
	if len(body) > MaxFrameSize {
		return fmt.Errorf("write frame: length %d exceeds limit %d: %w", len(body), MaxFrameSize, ErrFrameTooLarge)
	}
	buf := make([]byte, 8+len(body))
	binary.LittleEndian.PutUint64(buf, uint64(len(body)))
	copy(buf[8:], body)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("write frame: %w", err)
	}
	return nil
}
