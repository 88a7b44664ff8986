package qemu

import (
	"path/filepath"
	"testing"
	"time"
)

// TestTypedQMPLifecycle drives the installed QEMU through go-qemu's typed API: status while
// paused, cont, stop, then quit, with the lifecycle waits following QMP's events.
func TestTypedQMPLifecycle(t *testing.T) {
	if _, err := Probe(t.Context(), ""); err != nil {
		t.Skip(err)
	}
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	p, err := StartArgs("", []string{"-machine", "none", "-nodefaults", "-nographic", "-S", "-qmp", "unix:" + sock + ",server=on,wait=off"})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	if err := p.ConnectQMP(sock, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if st, err := p.Status(ctx); err != nil || st != "prelaunch" {
		t.Fatalf("status = %q, %v; want prelaunch", st, err)
	}
	if err := p.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.WaitEvent(ctx, "RESUME", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := p.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.WaitEvent(ctx, "STOP", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if st, _ := p.Status(ctx); st != "paused" {
		t.Fatalf("status after stop = %q", st)
	}
	if err := p.Quit(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	default:
		t.Fatal("QEMU still running after quit")
	}
}
