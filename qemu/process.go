package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
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

// Command runs a QMP command with a bound; on timeout QEMU is killed (a wedged monitor is
// not worth waiting for).
func (p *Process) Command(ctx context.Context, name string, timeout time.Duration) (json.RawMessage, error) {
	p.mu.Lock()
	mon := p.mon
	p.mu.Unlock()
	if mon == nil {
		return nil, errors.New("QMP not connected")
	}
	cmd, _ := json.Marshal(map[string]string{"execute": name})
	type result struct {
		b   []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		b, err := mon.Run(cmd)
		ch <- result{b, err}
	}()
	select {
	case r := <-ch:
		return r.b, r.err
	case <-time.After(timeout):
		p.Kill()
		return nil, fmt.Errorf("QMP %s: no answer within %s; QEMU killed", name, timeout)
	case <-ctx.Done():
		p.Kill()
		return nil, ctx.Err()
	}
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
	raw, err := p.Command(ctx, "query-status", 10*time.Second)
	if err != nil {
		return "", err
	}
	var r struct {
		Return struct {
			Status string `json:"status"`
		} `json:"return"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return "", fmt.Errorf("query-status: %w", err)
	}
	return r.Return.Status, nil
}

// Quit asks QEMU to exit over QMP and waits (bounded); QEMU is killed if it does not go.
func (p *Process) Quit(ctx context.Context) error {
	if _, err := p.Command(ctx, "quit", 10*time.Second); err != nil {
		select {
		case <-p.done: // QEMU may close the monitor before answering
			return nil
		default:
			return err
		}
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(30 * time.Second):
		p.Kill()
		return errors.New("QEMU did not exit within 30 s of quit; killed")
	}
}
