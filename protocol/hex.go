package protocol

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
)

// HexBytes is a byte string that travels as lowercase hex in our JSON admin APIs and files.
type HexBytes []byte

// MarshalJSON encodes as hex.
func (h HexBytes) MarshalJSON() ([]byte, error) { return json.Marshal(hex.EncodeToString(h)) }

// UnmarshalJSON decodes hex.
func (h *HexBytes) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	d, err := hex.DecodeString(s)
	if err != nil {
		return fmt.Errorf("hex: %w", err)
	}
	*h = d
	return nil
}

func (h HexBytes) String() string { return hex.EncodeToString(h) }
