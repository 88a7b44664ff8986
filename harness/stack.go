package harness

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// Instance is one running boot of a VM, whatever runs it (a process, a QEMU).
type Instance interface {
	// WaitForEvent waits up to timeout for the first event of this boot that match accepts.
	WaitForEvent(ctx context.Context, timeout time.Duration, match func(protocol.Event) bool) (protocol.Event, error)
	// Events returns the events so far.
	Events() []protocol.Event
	// Kill cuts the power.
	Kill()
	// Wait waits for the boot to end and returns what the guest printed.
	Wait(ctx context.Context) (*GuestRun, error)
}

// Backend runs a VM's boots.
type Backend interface {
	Name() string
	Start(ctx context.Context, vm *VM, opts GuestOptions) (Instance, error)
}

// ProcessBackend runs svsm-guest as a host process: disks are files, channels unix sockets.
type ProcessBackend struct{ Guest string }

// Name implements Backend.
func (ProcessBackend) Name() string { return "process" }

// Start implements Backend.
func (b ProcessBackend) Start(ctx context.Context, _ *VM, o GuestOptions) (Instance, error) {
	return StartGuest(ctx, b.Guest, o)
}

// StackOptions configure a Stack.
type StackOptions struct {
	// WorkDir holds everything of this stack: host logs, VM disks and consoles. It is the
	// artifact bundle when a scenario fails.
	WorkDir  string
	Binaries Binaries
	// CADir is a pre-generated fake AMD chain to share (see HostOptions.CADir).
	CADir string
	// Seed drives every choice the harness makes (passphrases, offsets a scenario picks
	// through Rand). Keys and nonces inside the real processes come from crypto/rand, as
	// they would in deployment, unless Seeded.
	Seed uint64
	// Seeded (test mode) derives every process's --test-seed from Seed too: fakesnp, each
	// verifier start and each process-backend boot (by VM name and boot number), so that
	// one seed replays a run's keys, nonces, boot ids, vTPM and disk bytes.
	Seeded  bool
	Backend Backend // default ProcessBackend with Binaries.Guest
	Logger  *slog.Logger
	// VerifierArgs are extra `svsm-verifier serve` flags.
	VerifierArgs []string
	// GenuineAMD: the verifier trusts AMD's roots and KDS (see HostOptions).
	GenuineAMD bool
	// Postgres and Replicas: the verifier's state in a PostgreSQL the host starts, shared by
	// that many verifier replicas behind the proxy (see HostOptions).
	Postgres bool
	Replicas int
}

// Stack is a host side (fakesnp, svsm-verifier, svsm-proxy as processes) plus the VMs the
// harness runs against it, and the host's powers over them.
type Stack struct {
	Host    *Host
	opts    StackOptions
	backend Backend
	mu      sync.Mutex
	rng     *rand.Rand
	vms     []*VM
	// coconuts are the QEMU processes of the coconut backend still to stop.
	coconuts []*CoconutRunning
}

// NewStack starts the host side in opts.WorkDir.
func NewStack(ctx context.Context, opts StackOptions) (*Stack, error) {
	if opts.WorkDir == "" {
		return nil, errors.New("harness: StackOptions.WorkDir is required")
	}
	if opts.Backend == nil {
		opts.Backend = ProcessBackend{Guest: opts.Binaries.Guest}
	}
	h, err := StartHost(ctx, HostOptions{WorkDir: opts.WorkDir, Binaries: opts.Binaries, CADir: opts.CADir, Logger: opts.Logger, VerifierArgs: opts.VerifierArgs, GenuineAMD: opts.GenuineAMD,
		Seeded: opts.Seeded, TestSeed: opts.Seed, Postgres: opts.Postgres, Replicas: opts.Replicas})
	if err != nil {
		return nil, err
	}
	s := &Stack{Host: h, opts: opts, backend: opts.Backend, rng: rand.New(rand.NewPCG(opts.Seed, opts.Seed^0x5356534d45324545))}
	if err := os.WriteFile(filepath.Join(opts.WorkDir, "seed"), fmt.Appendf(nil, "%d\n", opts.Seed), 0o644); err != nil {
		_ = h.Stop()
		return nil, err
	}
	return s, nil
}

// Seed returns the seed the stack was made with.
func (s *Stack) Seed() uint64 { return s.opts.Seed }

// Rand returns the stack's seeded source (not safe for concurrent use across goroutines
// without the caller's own locking).
func (s *Stack) Rand() *rand.Rand { return s.rng }

// Close stops any real SVSM still running, then the host side.
func (s *Stack) Close() error {
	_ = s.stopCoconuts()
	return s.Host.Stop()
}

// RestartVerifier stops the verifier and starts it again on the same database and addresses.
func (s *Stack) RestartVerifier(ctx context.Context) error { return s.Host.RestartVerifier(ctx) }

// Audit returns the verifier's audit trail for vm ("" for all).
func (s *Stack) Audit(ctx context.Context, vm string) ([]verifier.AuditEvent, error) {
	return s.Host.Admin.Audit(ctx, vm, 0)
}

// CollectArtifacts completes the bundle in WorkDir with what only live processes can tell:
// the verifier's audit trail and each VM's registration. Consoles, logs and disk snapshots
// are already there.
func (s *Stack) CollectArtifacts(ctx context.Context) error {
	var errs []error
	if evs, err := s.Audit(ctx, ""); err == nil {
		errs = append(errs, writeJSON(filepath.Join(s.opts.WorkDir, "verifier-audit.json"), evs))
	} else {
		errs = append(errs, fmt.Errorf("audit: %w", err))
	}
	s.mu.Lock()
	vms := append([]*VM(nil), s.vms...)
	s.mu.Unlock()
	for _, v := range vms {
		if view, err := s.Host.Admin.Show(ctx, v.Registration); err == nil {
			errs = append(errs, writeJSON(filepath.Join(v.Dir, "verifier-view.json"), view))
		}
	}
	return errors.Join(errs...)
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
