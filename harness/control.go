package harness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// control is the host end of a VM's control channel: the harness listens, the guest (or
// QEMU for it) connects, and each line is one workload action.
type control struct {
	ln    net.Listener
	ready chan struct{}
	mu    sync.Mutex
	conn  net.Conn
	err   error
	seq   int
}

func listenControl(path string) (*control, error) {
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control channel: %w", err)
	}
	c := &control{ln: ln, ready: make(chan struct{})}
	go func() {
		conn, err := ln.Accept()
		ln.Close()
		c.mu.Lock()
		c.conn, c.err = conn, err
		c.mu.Unlock()
		close(c.ready)
	}()
	return c, nil
}

func (c *control) close() {
	c.ln.Close()
	<-c.ready
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		c.conn.Close()
	}
}

// send writes one command line and returns its sequence number.
func (c *control) send(ctx context.Context, action string) (int, error) {
	if strings.ContainsAny(action, "\n\r") {
		return 0, errors.New("control command contains a line break")
	}
	select {
	case <-c.ready:
	case <-ctx.Done():
		return 0, fmt.Errorf("the guest never opened its control channel: %w", ctx.Err())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, fmt.Errorf("control channel: %w", c.err)
	}
	_ = c.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintln(c.conn, action); err != nil {
		return 0, fmt.Errorf("control channel: %w", err)
	}
	c.seq++
	return c.seq, nil
}

// Running is one boot in progress: the backend's instance plus the host's control channel.
type Running struct {
	Instance
	ctl *control
}

// Command sends one workload action over the control channel (BootOptions.Control) and
// waits up to timeout for its result event. "poweroff" and "reboot" end the boot and have no
// result event: Command returns once they are sent.
func (r *Running) Command(ctx context.Context, action string, timeout time.Duration) (protocol.Event, error) {
	if r.ctl == nil {
		return protocol.Event{}, errors.New("this boot has no control channel (BootOptions.Control)")
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	seq, err := r.ctl.send(ctx, action)
	if err != nil {
		return protocol.Event{}, err
	}
	if action == "poweroff" || action == "reboot" {
		return protocol.Event{}, nil
	}
	return r.WaitForEvent(ctx, timeout, func(e protocol.Event) bool {
		n, err := e.Uint("seq")
		return e.Event == "action" && err == nil && n == uint64(seq)
	})
}

// Stop ends the boot: a clean power-off through the control channel when the boot has one,
// otherwise a power cut (Kill). It returns what the guest printed.
func (r *Running) Stop(ctx context.Context) (*GuestRun, error) {
	if r.ctl != nil {
		if _, err := r.Command(ctx, "poweroff", 30*time.Second); err == nil {
			return r.Wait(ctx)
		}
	}
	r.Kill()
	return r.Wait(ctx)
}
