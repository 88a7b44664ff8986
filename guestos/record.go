package guestos

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// The data disk holds one record, the workload's data, at offset 0 of the unlocked device:
// magic "SVSMDATA", length u32 LE, data, SHA-256 of data. No filesystem is needed to show
// that data written through dm-crypt survives reboots.
var recordMagic = []byte("SVSMDATA")

// MaxRecord bounds the record.
const MaxRecord = 64 << 10

// WriteRecord writes data as the record and syncs the device.
func WriteRecord(dev string, data []byte) error {
	if len(data) > MaxRecord {
		return fmt.Errorf("record of %d bytes exceeds %d", len(data), MaxRecord)
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	var b bytes.Buffer
	b.Write(recordMagic)
	_ = binary.Write(&b, binary.LittleEndian, uint32(len(data)))
	b.Write(data)
	sum := sha256.Sum256(data)
	b.Write(sum[:])
	if _, err := f.WriteAt(b.Bytes(), 0); err != nil {
		return fmt.Errorf("write record on %s: %w", dev, err)
	}
	return f.Sync()
}

// ReadRecord reads and checks the record.
func ReadRecord(dev string) ([]byte, error) {
	f, err := os.Open(dev)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := make([]byte, 12)
	if _, err := io.ReadFull(f, h); err != nil {
		return nil, fmt.Errorf("read record on %s: %w", dev, err)
	}
	if !bytes.Equal(h[:8], recordMagic) {
		return nil, errors.New("no record on the data disk")
	}
	n := binary.LittleEndian.Uint32(h[8:])
	if n > MaxRecord {
		return nil, fmt.Errorf("record length %d exceeds %d", n, MaxRecord)
	}
	rest := make([]byte, int(n)+32)
	if _, err := io.ReadFull(f, rest); err != nil {
		return nil, fmt.Errorf("read record on %s: %w", dev, err)
	}
	if sum := sha256.Sum256(rest[:n]); !bytes.Equal(sum[:], rest[n:]) {
		return nil, errors.New("record checksum mismatch")
	}
	return rest[:n], nil
}
