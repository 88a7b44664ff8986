package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// GuestOptions are the flags of one `svsm-guest run` (PROTOCOLS.md §7).
type GuestOptions struct {
	HostJSON     string // path
	StateDisk    string
	DataDisk     string
	RecoveryFile string
	Kernel       string
	Initrd       string
	Cmdline      string // "" keeps the guest's default
	UEFITemplate string
	Actions      []string
	// Console receives the guest's stdout and stderr as they come (a log file).
	Console io.Writer
	// Timeout bounds the whole boot (default 2 minutes); the process is killed after it.
	Timeout time.Duration
	// ControlSocket is the unix socket of the control channel (the host listens).
	ControlSocket string
	// CrashAfter makes the guest cut its own power after an event (see svsm-guest --crash-after).
	CrashAfter string
	// CrashAt cuts the guest's power at a registered write point (svsm-guest --crash-at).
	CrashAt string
	// AttestTimeout bounds the guest's attestation and confirmations (its default when zero).
	AttestTimeout time.Duration
	// TestSeed, if set, is svsm-guest --test-seed: the boot's keys, nonces and vTPM follow
	// from it (process backend only).
	TestSeed string
	// OnEvent, if set, sees each event as the guest prints it, while the guest waits for
	// nothing: the host acts at that moment (snapshot a disk, kill a process).
	OnEvent func(protocol.Event)
}

// GuestRun is what one boot printed and how it ended.
type GuestRun struct {
	Events []protocol.Event
	// Arrived is when the host read each event (Events[i] at Arrived[i]): the per-phase
	// timeline of a boot, as the host sees it.
	Arrived  []time.Time
	ExitCode int
	Stdout   string
	Stderr   string
}

// Find returns the first event named name.
func (r *GuestRun) Find(name string) (protocol.Event, bool) {
	for _, e := range r.Events {
		if e.Event == name {
			return e, true
		}
	}
	return protocol.Event{}, false
}

// All returns every event named name.
func (r *GuestRun) All(name string) []protocol.Event {
	var out []protocol.Event
	for _, e := range r.Events {
		if e.Event == name {
			out = append(out, e)
		}
	}
	return out
}

// Last returns the last event (the failure, on a failed boot).
func (r *GuestRun) Last() protocol.Event {
	if len(r.Events) == 0 {
		return protocol.Event{}
	}
	return r.Events[len(r.Events)-1]
}

// Action returns the result event of the n-th action named name (0-based).
func (r *GuestRun) Action(name string, n int) (protocol.Event, bool) {
	for _, e := range r.All("action") {
		if e.String("action") == name {
			if n == 0 {
				return e, true
			}
			n--
		}
	}
	return protocol.Event{}, false
}

// eventStream collects a guest console's lines and events, for any backend.
type eventStream struct {
	done chan struct{} // closed when the boot is over (the instance's owner closes it)

	mu       sync.Mutex
	changed  chan struct{} // closed and replaced whenever an event arrives or the boot ends
	run      GuestRun
	out      strings.Builder
	parseErr error
	waitErr  error
	// tornLast is the parse error of the console's last line, forgiven if the boot ended in
	// a power cut (exit code -1).
	tornLast error
}

func newEventStream() *eventStream {
	return &eventStream{done: make(chan struct{}), changed: make(chan struct{})}
}

// feed reads console lines from r until EOF, echoing them to console and calling onEvent
// for each event as it arrives. An event line that does not parse is an error, unless it is
// the console's last and the boot ended in a power cut (finish), which can end the output in
// the middle of a line.
func (s *eventStream) feed(r io.Reader, console io.Writer, onEvent func(protocol.Event)) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), protocol.MaxEventLine)
	var torn error // the last line's parse error, if it was the last
	for sc.Scan() {
		line := sc.Text()
		fmt.Fprintln(console, line)
		ev, ok, perr := protocol.ParseEventLine(line)
		s.mu.Lock()
		s.out.WriteString(line + "\n")
		if torn != nil && s.parseErr == nil {
			s.parseErr = torn // a line followed it: it was not cut by the end
		}
		torn = perr
		if ok && perr == nil {
			s.run.Events = append(s.run.Events, ev)
			s.run.Arrived = append(s.run.Arrived, time.Now())
		}
		s.notifyLocked()
		s.mu.Unlock()
		if ok && perr == nil && onEvent != nil {
			onEvent(ev)
		}
	}
	s.mu.Lock()
	s.tornLast = torn
	s.mu.Unlock()
	if err := sc.Err(); err != nil {
		s.mu.Lock()
		if s.parseErr == nil {
			s.parseErr = fmt.Errorf("guest console: %w", err)
		}
		s.mu.Unlock()
		_, _ = io.Copy(io.Discard, r) // keep the guest from blocking on a full pipe
	}
}

// finish records how the boot ended and wakes every waiter.
func (s *eventStream) finish(exitCode int, stderr string, waitErr error) {
	s.mu.Lock()
	if s.tornLast != nil && s.parseErr == nil && exitCode >= 0 {
		s.parseErr = s.tornLast // the guest ended on its own: nothing cut its last line
	}
	s.run.Stdout, s.run.Stderr, s.run.ExitCode = s.out.String(), stderr, exitCode
	s.waitErr = waitErr
	s.notifyLocked()
	s.mu.Unlock()
	close(s.done)
}

func (s *eventStream) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// Events returns the events so far.
func (s *eventStream) Events() []protocol.Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]protocol.Event(nil), s.run.Events...)
}

// WaitForEvent waits up to timeout for the first event, from the start of the boot, that
// match accepts. It fails when the boot ends or the time is up without one.
func (s *eventStream) WaitForEvent(ctx context.Context, timeout time.Duration, match func(protocol.Event) bool) (protocol.Event, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	seen := 0
	for {
		s.mu.Lock()
		evs, changed := s.run.Events, s.changed
		s.mu.Unlock()
		exited := s.isDone()
		for ; seen < len(evs); seen++ {
			if match(evs[seen]) {
				return evs[seen], nil
			}
		}
		if exited {
			return protocol.Event{}, fmt.Errorf("guest exited without the awaited event (last: %+v)", last(evs))
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return protocol.Event{}, fmt.Errorf("no awaited event within %s (last: %+v): %w", timeout, last(evs), ctx.Err())
		}
	}
}

func (s *eventStream) isDone() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

func last(evs []protocol.Event) protocol.Event {
	if len(evs) == 0 {
		return protocol.Event{}
	}
	return evs[len(evs)-1]
}

// result waits for the end (killing the guest via kill if ctx ends first) and returns what
// the guest printed. A non-zero exit is not an error (failing closed is an outcome); a
// malformed event line or a timeout is.
func (s *eventStream) result(ctx context.Context, kill func()) (*GuestRun, error) {
	select {
	case <-s.done:
	case <-ctx.Done():
		kill()
		<-s.done
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	run := s.run
	run.Events = append([]protocol.Event(nil), s.run.Events...)
	run.Arrived = append([]time.Time(nil), s.run.Arrived...)
	if s.waitErr != nil {
		return &run, s.waitErr
	}
	if ctx.Err() != nil {
		return &run, ctx.Err()
	}
	return &run, s.parseErr
}

// GuestProcess is a running svsm-guest (the process backend's instance of a VM).
type GuestProcess struct {
	*eventStream
	cmd *exec.Cmd
}

// StartGuest starts svsm-guest and streams its events. The process is killed after
// o.Timeout (default 2 minutes) and when the harness dies.
func StartGuest(ctx context.Context, bin string, o GuestOptions) (*GuestProcess, error) {
	if bin == "" {
		return nil, errors.New("svsm-guest binary not found (run `make build`)")
	}
	if o.Timeout == 0 {
		o.Timeout = 2 * time.Minute
	}
	args := []string{"run", "--host-json", o.HostJSON, "--state-disk", o.StateDisk}
	for _, kv := range [][2]string{{"--data-disk", o.DataDisk}, {"--recovery-passphrase-file", o.RecoveryFile},
		{"--kernel", o.Kernel}, {"--initrd", o.Initrd}, {"--cmdline", o.Cmdline}, {"--uefi-template", o.UEFITemplate}} {
		if kv[1] != "" {
			args = append(args, kv[0], kv[1])
		}
	}
	if len(o.Actions) > 0 {
		args = append(args, "--then", strings.Join(o.Actions, ","))
	}
	if o.CrashAt != "" {
		args = append(args, "--crash-at", o.CrashAt)
	}
	if o.CrashAfter != "" {
		args = append(args, "--crash-after", o.CrashAfter)
	}
	if o.ControlSocket != "" {
		args = append(args, "--control-socket", o.ControlSocket)
	}
	if o.AttestTimeout > 0 {
		args = append(args, "--attest-timeout", o.AttestTimeout.String())
	}
	if o.TestSeed != "" {
		args = append(args, "--test-seed", o.TestSeed)
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	g := &GuestProcess{eventStream: newEventStream(), cmd: cmd}
	console := o.Console
	if console == nil {
		console = io.Discard
	}
	console = &lockedWriter{w: console}
	var stderr bytes.Buffer
	cmd.Stderr = io.MultiWriter(&stderr, console)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		cancel()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		cancel()
		return nil, fmt.Errorf("start svsm-guest: %w", err)
	}
	go func() {
		g.feed(stdout, console, o.OnEvent)
		werr := cmd.Wait()
		code := 0
		var waitErr error
		var ee *exec.ExitError
		switch {
		case ctx.Err() != nil && !errors.Is(ctx.Err(), context.Canceled):
			waitErr = fmt.Errorf("svsm-guest did not finish within %s: %w", o.Timeout, ctx.Err())
		case errors.As(werr, &ee):
			code = ee.ExitCode()
		case werr != nil:
			waitErr = fmt.Errorf("run svsm-guest: %w", werr)
		}
		cancel()
		g.finish(code, stderr.String(), waitErr)
	}()
	return g, nil
}

// Kill stops the guest with SIGKILL (a power cut) and waits for it.
func (g *GuestProcess) Kill() {
	_ = g.cmd.Process.Kill()
	<-g.done
}

// Wait waits for the guest to exit and returns what it printed.
func (g *GuestProcess) Wait(ctx context.Context) (*GuestRun, error) {
	return g.result(ctx, g.Kill)
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// NewDataDisk formats a LUKS2 image at path with the recovery passphrase in keyslot 0.
// Test volumes use PBKDF2 at 1000 iterations (stated here and in docs/guest.md) so that a
// boot is not dominated by the KDF; DefaultKDF keeps cryptsetup's argon2id defaults.
func NewDataDisk(ctx context.Context, path string, sizeMiB int, recovery []byte, defaultKDF bool) error {
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		return err
	}
	if err := os.Truncate(path, int64(sizeMiB)<<20); err != nil {
		return err
	}
	args := []string{"luksFormat", "--type", "luks2", "--batch-mode", "--key-file=-"}
	if !defaultKDF {
		args = append(args, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "cryptsetup", append(args, path)...)
	cmd.Stdin = bytes.NewReader(recovery)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("cryptsetup luksFormat %s: %w: %s", path, err, out)
	}
	return nil
}
