package fakesnp

import (
	"context"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAdminAPINeedsToken: the admin API refuses callers without the token (constant-time
// compare), the KDS endpoints stay public.
func TestAdminAPINeedsToken(t *testing.T) {
	dir := t.TempDir()
	s := newServer(t, dir)
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	ctx := context.Background()
	spec := LaunchSpec{Name: "vm", Measurement: make([]byte, 48)}
	for name, tok := range map[string]string{"no token": "", "wrong token": strings.Repeat("0", 64)} {
		c := &Client{BaseURL: ts.URL, Token: tok}
		if _, err := c.AddLaunch(ctx, spec); err == nil || !strings.Contains(err.Error(), "401") {
			t.Fatalf("%s: AddLaunch = %v, want HTTP 401", name, err)
		}
	}
	tok, err := os.ReadFile(filepath.Join(dir, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	c := &Client{BaseURL: ts.URL, Token: strings.TrimSpace(string(tok))}
	if _, err := c.AddLaunch(ctx, spec); err != nil {
		t.Fatalf("with the token: %v", err)
	}
	if _, err := (&Client{BaseURL: ts.URL}).CertChain(ctx); err != nil {
		t.Fatalf("KDS without token: %v", err)
	}
}

// TestLaunchSocketConfined: a launch's socket is a file in the socket directory; paths
// elsewhere are refused, and nothing that is not a socket is ever replaced.
func TestLaunchSocketConfined(t *testing.T) {
	dir := t.TempDir()
	s := newServer(t, dir)
	victim := filepath.Join(t.TempDir(), "precious")
	if err := os.WriteFile(victim, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	inDir := filepath.Join(dir, "launches", "squat.sock")
	if err := os.MkdirAll(filepath.Dir(inDir), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(inDir, []byte("a regular file"), 0o600); err != nil {
		t.Fatal(err)
	}
	for i, sock := range []string{victim, "../escape.sock", "a/b.sock", filepath.Join(dir, "launches", "..", "x.sock"), inDir, "no-suffix"} {
		spec := LaunchSpec{Name: "bad" + string(rune('a'+i)), Measurement: make([]byte, 48), Socket: sock}
		if _, err := s.AddLaunch(spec); err == nil {
			t.Errorf("socket %q accepted", sock)
		}
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep me" {
		t.Fatal("a file outside the socket directory was replaced")
	}
	if b, _ := os.ReadFile(inDir); string(b) != "a regular file" {
		t.Fatal("a non-socket in the socket directory was replaced")
	}
	info, err := s.AddLaunch(LaunchSpec{Name: "good", Measurement: make([]byte, 48), Socket: "good.sock"})
	if err != nil || info.Socket != filepath.Join(dir, "launches", "good.sock") {
		t.Fatalf("good socket: %+v %v", info, err)
	}
	if err := s.RemoveLaunch("good"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(info.Socket); !os.IsNotExist(err) {
		t.Fatalf("removed launch left its socket: %v", err)
	}
}
