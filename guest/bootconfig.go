package guest

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// BootConfig is what the host hands a VM guest for one boot on its config disk (virtio-blk
// with serial "svsm-config"): the process backend's flags, in a form that needs no host
// files. The kernel command line stays fixed so that it can be measured.
type BootConfig struct {
	Actions []string `json:"actions,omitempty"`
	// Files are materialised under /run/svsm-e2e/files; actions name them (uefi-set=NAME).
	Files        map[string][]byte `json:"files,omitempty"`
	UEFITemplate string            `json:"uefi_template,omitempty"` // a key of Files
	Recovery     []byte            `json:"recovery,omitempty"`
	DataDisk     bool              `json:"data_disk,omitempty"`
	CrashAfter   string            `json:"crash_after,omitempty"`
	CrashAt      string            `json:"crash_at,omitempty"`
	Control      bool              `json:"control,omitempty"` // a control channel port is wired
	AttestMillis int64             `json:"attest_timeout_ms,omitempty"`
}

var configMagic = []byte("SVSMCFG1")

// MaxConfig bounds the config disk's payload.
const MaxConfig = 4 << 20

// MarshalConfigDisk encodes c as a config disk image: magic, length u32 LE, JSON, zero
// padding to a whole number of 4 KiB blocks.
func MarshalConfigDisk(c *BootConfig) ([]byte, error) {
	j, err := json.Marshal(c)
	if err != nil {
		return nil, err
	}
	if len(j) > MaxConfig {
		return nil, fmt.Errorf("boot config of %d bytes exceeds %d", len(j), MaxConfig)
	}
	var b bytes.Buffer
	b.Write(configMagic)
	_ = binary.Write(&b, binary.LittleEndian, uint32(len(j)))
	b.Write(j)
	for b.Len()%4096 != 0 {
		b.WriteByte(0)
	}
	return b.Bytes(), nil
}

// ReadConfigDisk decodes a config disk.
func ReadConfigDisk(r io.Reader) (*BootConfig, error) {
	h := make([]byte, 12)
	if _, err := io.ReadFull(r, h); err != nil {
		return nil, fmt.Errorf("config disk: %w", err)
	}
	if !bytes.Equal(h[:8], configMagic) {
		return nil, errors.New("config disk: bad magic")
	}
	n := binary.LittleEndian.Uint32(h[8:])
	if n > MaxConfig {
		return nil, fmt.Errorf("config disk: length %d exceeds %d", n, MaxConfig)
	}
	j := make([]byte, n)
	if _, err := io.ReadFull(r, j); err != nil {
		return nil, fmt.Errorf("config disk: %w", err)
	}
	var c BootConfig
	if err := json.Unmarshal(j, &c); err != nil {
		return nil, fmt.Errorf("config disk: %w", err)
	}
	return &c, nil
}
