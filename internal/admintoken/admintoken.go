// Package admintoken is the bearer token that guards the host services' admin APIs (the
// verifier's and fakesnp's): created once in the service's own directory with mode 0600,
// compared in constant time.
package admintoken

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
)

// MinLen is the shortest token accepted from a file (hex of 16 bytes).
const MinLen = 32

// LoadOrCreate reads the token at path, or creates a random one there.
func LoadOrCreate(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		t := strings.TrimSpace(string(b))
		if len(t) < MinLen {
			return "", fmt.Errorf("admin token %s is too short (%d characters, want at least %d)", path, len(t), MinLen)
		}
		return t, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("read admin token: %w", err)
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", err
	}
	t := hex.EncodeToString(raw)
	if err := os.WriteFile(path, []byte(t+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("write admin token: %w", err)
	}
	return t, nil
}

// Read reads an existing token file (for clients).
func Read(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read admin token: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// Valid reports whether r carries "Authorization: Bearer <token>", compared in constant time.
func Valid(r *http.Request, token string) bool {
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return ok && token != "" && subtle.ConstantTimeCompare([]byte(got), []byte(token)) == 1
}
