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
	// OnEvent, if set, sees each event as the guest prints it, while the guest waits for
	// nothing: the host acts at that moment (snapshot a disk, kill a process).
	OnEvent func(protocol.Event)
}

// GuestRun is what one boot printed and how it ended.
type GuestRun struct {
	Events   []protocol.Event
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

// RunGuest runs svsm-guest once and collects its events. A non-zero exit is not an error
// (failing closed is an outcome); a malformed event line, a timeout or a missing binary is.
func RunGuest(ctx context.Context, bin string, o GuestOptions) (*GuestRun, error) {
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
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr bytes.Buffer
	console := o.Console
	if console == nil {
		console = io.Discard
	}
	cmd.Stderr = io.MultiWriter(&stderr, console)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start svsm-guest: %w", err)
	}
	run := &GuestRun{}
	var out strings.Builder
	var parseErr error
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 0, 64<<10), protocol.MaxEventLine)
	for sc.Scan() {
		line := sc.Text()
		out.WriteString(line + "\n")
		fmt.Fprintln(console, line)
		ev, ok, err := protocol.ParseEventLine(line)
		if err != nil && parseErr == nil {
			parseErr = err
		}
		if ok && err == nil {
			run.Events = append(run.Events, ev)
			if o.OnEvent != nil {
				o.OnEvent(ev)
			}
		}
	}
	if err := sc.Err(); err != nil && parseErr == nil {
		parseErr = fmt.Errorf("guest console: %w", err)
		_, _ = io.Copy(io.Discard, stdout) // keep the guest from blocking on a full pipe
	}
	err = cmd.Wait()
	run.Stdout, run.Stderr = out.String(), stderr.String()
	if ctx.Err() != nil {
		return run, fmt.Errorf("svsm-guest did not finish within %s: %w", o.Timeout, ctx.Err())
	}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		run.ExitCode = ee.ExitCode()
	case err != nil:
		return run, fmt.Errorf("run svsm-guest: %w", err)
	}
	return run, parseErr
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
