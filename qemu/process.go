package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
	"github.com/digitalocean/go-qemu/qmp/raw"
)

// Process is a running QEMU.
type Process struct {
	cmd    *exec.Cmd
	done   chan struct{}
	stderr bytes.Buffer
	mu     sync.Mutex
	err    error
	mon    *qmp.SocketMonitor
	events []qmp.Event
}

// Start runs QEMU with m's arguments. It dies with the harness (PDEATHSIG).
func Start(bin string, m *Machine) (*Process, error) {
	args, err := m.Args()
	if err != nil {
		return nil, err
	}
	return StartArgs(bin, args)
}

// StartArgs runs QEMU with the given arguments.
func StartArgs(bin string, args []string) (*Process, error) {
	if bin == "" {
		bin = DefaultBinary
	}
	p := &Process{cmd: exec.Command(bin, args...), done: make(chan struct{})}
	p.cmd.Stderr = &lockedBuffer{b: &p.stderr, mu: &p.mu}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() {
		err := p.cmd.Wait()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.done)
	}()
	return p, nil
}

type lockedBuffer struct {
	b  *bytes.Buffer
	mu *sync.Mutex
}

func (l *lockedBuffer) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() > 1<<20 {
		return len(b), nil // keep the first MiB of complaints
	}
	return l.b.Write(b)
}

// PID is QEMU's process id.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Done is closed when QEMU has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Stderr is what QEMU printed.
func (p *Process) Stderr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// Exit returns QEMU's exit error once it has exited.
func (p *Process) Exit() error {
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Kill kills QEMU by PID (its whole process group) and waits for it.
func (p *Process) Kill() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// ConnectQMP connects to the QMP socket within timeout and drains its events continuously
// (go-qemu's monitor blocks commands otherwise).
func (p *Process) ConnectQMP(socket string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		mon, err := qmp.NewSocketMonitor("unix", socket, 2*time.Second)
		if err == nil {
			if err = mon.Connect(); err == nil {
				evs, err := mon.Events(context.Background())
				if err != nil {
					_ = mon.Disconnect()
					return err
				}
				p.mu.Lock()
				p.mon = mon
				p.mu.Unlock()
				go func() {
					for e := range evs {
						p.mu.Lock()
						if len(p.events) < 10000 {
							p.events = append(p.events, e)
						}
						p.mu.Unlock()
					}
				}()
				return nil
			}
		}
		select {
		case <-p.done:
			return fmt.Errorf("qemu exited before QMP was up: %s", p.Stderr())
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("QMP at %s not up within %s: %w", socket, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WaitEvent waits until QMP has delivered an event named name (lifecycle waits follow QMP's
// events: SHUTDOWN, STOP, RESUME, RESET), or QEMU exits, or the bound passes.
func (p *Process) WaitEvent(ctx context.Context, name string, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		for _, e := range p.QMPEvents() {
			if e == name {
				return nil
			}
		}
		select {
		case <-tick.C:
		case <-p.done:
			for _, e := range p.QMPEvents() {
				if e == name {
					return nil
				}
			}
			return fmt.Errorf("QEMU exited without a %s event", name)
		case <-deadline.C:
			return fmt.Errorf("no %s event within %s", name, timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// QMPEvents returns the QMP event names seen so far (for artifacts and assertions).
func (p *Process) QMPEvents() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.events))
	for _, e := range p.events {
		out = append(out, e.Event)
	}
	return out
}

// typed runs one command of go-qemu's typed QMP API with a bound; on timeout QEMU is killed
// (a wedged monitor is not worth waiting for).
func (p *Process) typed(ctx context.Context, name string, timeout time.Duration, call func(*raw.Monitor) error) error {
	p.mu.Lock()
	mon := p.mon
	p.mu.Unlock()
	if mon == nil {
		return errors.New("QMP not connected")
	}
	ch := make(chan error, 1)
	go func() { ch <- call(raw.NewMonitor(mon)) }()
	select {
	case err := <-ch:
		if err != nil {
			return fmt.Errorf("QMP %s: %w", name, err)
		}
		return nil
	case <-time.After(timeout):
		p.Kill()
		return fmt.Errorf("QMP %s: no answer within %s; QEMU killed", name, timeout)
	case <-ctx.Done():
		p.Kill()
		return ctx.Err()
	}
}

// Reset is QMP system_reset (under -no-reboot, QEMU then shuts down: SHUTDOWN event).
func (p *Process) Reset(ctx context.Context) error {
	return p.typed(ctx, "system_reset", 10*time.Second, func(m *raw.Monitor) error { return m.SystemReset() })
}

// Pause is QMP stop: the vCPUs halt, the devices stay.
func (p *Process) Pause(ctx context.Context) error {
	return p.typed(ctx, "stop", 10*time.Second, func(m *raw.Monitor) error { return m.Stop() })
}

// Resume is QMP cont.
func (p *Process) Resume(ctx context.Context) error {
	return p.typed(ctx, "cont", 10*time.Second, func(m *raw.Monitor) error { return m.Cont() })
}

// Close disconnects QMP.
func (p *Process) Close() {
	p.mu.Lock()
	mon := p.mon
	p.mon = nil
	p.mu.Unlock()
	if mon != nil {
		_ = mon.Disconnect()
	}
}

// Status returns QMP query-status's "status" (running, paused, shutdown, ...). A guest that
// stalls under an unusable accelerator shows up here as paused or internal-error.
func (p *Process) Status(ctx context.Context) (string, error) {
	var st raw.StatusInfo
	err := p.typed(ctx, "query-status", 10*time.Second, func(m *raw.Monitor) error {
		var err error
		st, err = m.QueryStatus()
		return err
	})
	if err != nil {
		return "", err
	}
	return st.Status.String(), nil
}

// Quit asks QEMU to exit over QMP and waits (bounded); QEMU is killed if it does not go.
func (p *Process) Quit(ctx context.Context) error {
	if err := p.typed(ctx, "quit", 10*time.Second, func(m *raw.Monitor) error { return m.Quit() }); err != nil {
		select {
		case <-p.done: // QEMU may close the monitor before answering
			return nil
		default:
			return err
		}
	}
	if err := p.WaitEvent(ctx, "SHUTDOWN", 30*time.Second); err != nil && !strings.Contains(err.Error(), "exited") {
		p.Kill()
		return fmt.Errorf("QEMU quit: %w; killed", err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(30 * time.Second):
		p.Kill()
		return errors.New("QEMU did not exit within 30 s of its SHUTDOWN event; killed")
	}
}
