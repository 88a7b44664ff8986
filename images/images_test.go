package images

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

// readNewc is a minimal newc reader for the test: name → (mode, data, rdev major).
func readNewc(t *testing.T, b []byte) map[string][3]any {
	t.Helper()
	out := map[string][3]any{}
	for off := 0; ; {
		if off+110 > len(b) || string(b[off:off+6]) != "070701" {
			t.Fatalf("bad header at %d", off)
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return int(v)
		}
		mode, size, rmajor, namesize := field(1), field(6), field(9), field(11)
		name := string(b[off+110 : off+110+namesize-1])
		off += 110 + namesize
		off = (off + 3) &^ 3
		data := b[off : off+size]
		off = (off + size + 3) &^ 3
		if name == "TRAILER!!!" {
			return out
		}
		out[name] = [3]any{mode, data, rmajor}
	}
}

func TestCPIO(t *testing.T) {
	var buf bytes.Buffer
	c := NewCPIO(&buf)
	c.Dir("dev")
	c.CharDev("dev/console", 0o600, 5, 1)
	c.File("/init", 0o755, []byte("#!init"))
	c.Symlink("bin", "usr/bin")
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Fatalf("archive of %d bytes is not 4-aligned", buf.Len())
	}
	files := readNewc(t, buf.Bytes())
	if e := files["dev/console"]; e[0].(int) != 0o020600 || e[2].(int) != 5 {
		t.Fatalf("console node %v", e)
	}
	if e := files["init"]; string(e[1].([]byte)) != "#!init" || e[0].(int) != 0o100755 {
		t.Fatalf("init %v", e)
	}
	if e := files["bin"]; string(e[1].([]byte)) != "usr/bin" {
		t.Fatalf("symlink %v", e)
	}
}

func TestExtractVmlinux(t *testing.T) {
	elf, err := os.ReadFile("/bin/true")
	if err != nil {
		t.Skip("no /bin/true to use as a small ELF")
	}
	cmd := exec.Command("xz", "--format=xz", "--check=crc32", "-c")
	cmd.Stdin = bytes.NewReader(elf)
	xz, err := cmd.Output()
	if err != nil {
		t.Fatalf("xz (Debian xz-utils) is needed: %v", err)
	}
	// A bzImage: setup code, then the xz stream, then padding; a false magic before it.
	bz := append(append(append([]byte("setup code \xfd7zXZ\x00 not a stream "), xz...), make([]byte, 64)...), 0xff)
	got, err := ExtractVmlinux(context.Background(), bz)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, elf) {
		t.Fatalf("extracted %d bytes, want the %d-byte ELF", len(got), len(elf))
	}
	if _, err := ExtractVmlinux(context.Background(), []byte("no kernel here")); err == nil {
		t.Fatal("found a kernel in garbage")
	}
}

// TestStripSymbols: the stripped copy has no symbol table, is smaller, and still runs (a Go
// program's stack trace comes from .gopclntab, which stays).
func TestStripSymbols(t *testing.T) {
	if _, err := exec.LookPath("objcopy"); err != nil {
		t.Skip("objcopy not installed (Debian package binutils)")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "main.go")
	prog := "package main\n\nfunc main() { println(\"up\"); panic(\"trace\") }\n"
	if err := os.WriteFile(src, []byte(prog), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "prog")
	if out, err := exec.Command("go", "build", "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if _, err := symbols(bin); err != nil {
		t.Fatalf("the unstripped build has no symbols: %v", err)
	}
	stripped, err := StripSymbols(context.Background(), bin)
	if err != nil {
		t.Fatal(err)
	}
	orig, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if len(stripped) >= len(orig) {
		t.Fatalf("stripped %d bytes, original %d", len(stripped), len(orig))
	}
	sp := filepath.Join(dir, "stripped")
	if err := os.WriteFile(sp, stripped, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := symbols(sp); !errors.Is(err, elf.ErrNoSymbols) {
		t.Fatalf("stripped copy: symbols err %v, want elf.ErrNoSymbols", err)
	}
	out, _ := exec.Command(sp).CombinedOutput()
	if !bytes.Contains(out, []byte("up")) || !bytes.Contains(out, []byte("main.main")) {
		t.Fatalf("stripped program's output lacks its output or its stack trace:\n%s", out)
	}
	if _, err := StripSymbols(context.Background(), filepath.Join(dir, "missing")); err == nil {
		t.Fatal("stripping a missing file succeeded")
	}
}

func symbols(path string) ([]elf.Symbol, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.Symbols()
}
