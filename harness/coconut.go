package harness

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/svsm-e2e/svsm-e2e/igvm"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/qemu"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// The coconut backend runs upstream's own COCONUT-SVSM, booted from its IGVM file by an
// IGVM-capable QEMU under TCG (upstream `launch_guest.sh --nocc --tcg`), wired to the stack:
// COM1 the console, COM3 to svsm-proxy as a serial peer (-serial unix:, QEMU the client),
// COM4 to the VM's fakesnp report channel. The SVSM build must carry upstream's
// attest-serial feature and a report source on COM4 (README "Bring your own SVSM").

// Environment variables the suite and the CLI read to find the pieces.
const (
	EnvQEMUIGVM    = "SVSM_E2E_QEMU_IGVM"    // an IGVM-capable qemu-system-x86_64
	EnvCoconutIGVM = "SVSM_E2E_COCONUT_IGVM" // a COCONUT-SVSM IGVM with a COM4 report source
)

// Console markers of a real SVSM (UPSTREAM.md §4 and what the fakesnp build prints).
const (
	MarkerReport       = "fakesnp-report: got 1184-byte report"
	MarkerAttested     = "[SVSM] attestation successful"
	MarkerVTPM         = "VTPM: TPM 2.0 Reference Implementation initialized"
	MarkerInitDone     = "[init] Terminating task init"
	MarkerPanic        = "Panic on CPU"
	MarkerSerialAproxy = "Falling back to serial port transport"
	MarkerBoot         = "COCONUT Secure Virtual Machine Service Module"
	MarkerVTPMNew      = "VTPM: manufacturing new NV state"
	MarkerVTPMLoaded   = "VTPM: loaded existing NV state"
	MarkerStorageOpen  = "persistent CocoonFs storage opened successfully"
	MarkerStorageNone  = "no persistent CocoonFs storage found"
)

// CoconutOptions locate upstream's pieces.
type CoconutOptions struct {
	QEMU string // IGVM-capable qemu-system-x86_64
	IGVM string // COCONUT-SVSM IGVM (attest-serial, report from COM4)
	// Profile is qemu.CoconutNoCC (default: TCG, no SEV, the report from fakesnp on COM4) or
	// qemu.Coconut (SEV-SNP on KVM, the report from the real AMD-SP: the hardware leg).
	Profile qemu.Profile
	// CBitPos overrides the C-bit position the coconut profile reads from CPUID.
	CBitPos int
	// MemoryMiB and CPUs of the VM (defaults 2048 and 2).
	MemoryMiB, CPUs int
	// Spec adds policy to the registration (e.g. a minimum TCB); name, measurement, HOST_DATA
	// and the raw secret mode are set by NewCoconutVM.
	Spec verifier.VMSpec
	// Policy is the guest policy fakesnp reports for the launch (default: fakesnp's).
	Policy uint64
	// Timeout bounds one boot, from QEMU's start to the end of init or a panic (default 60 s).
	Timeout time.Duration
}

// EnvCoconutProfile selects the coconut profile the suite runs (coconut-nocc by default).
const EnvCoconutProfile = "SVSM_E2E_COCONUT_PROFILE"

// FindCoconut resolves the options from the environment, else the shared tools beside the
// project (root/../shared/tools). It returns a one-line reason when something is missing.
func FindCoconut(root string) (CoconutOptions, string) {
	o := CoconutOptions{QEMU: os.Getenv(EnvQEMUIGVM), IGVM: os.Getenv(EnvCoconutIGVM), Profile: qemu.Profile(os.Getenv(EnvCoconutProfile))}
	tools := filepath.Join(root, "..", "shared", "tools")
	if o.QEMU == "" {
		o.QEMU = filepath.Join(tools, "qemu-igvm", "bin", "qemu-system-x86_64")
	}
	if o.IGVM == "" {
		o.IGVM = filepath.Join(tools, "coconut-svsm", "coconut-svsm-fakesnp.igvm")
	}
	return CheckCoconut(o)
}

// CheckCoconut checks that o can run here: the files exist, and the QEMU's probe allows the
// profile. It returns a one-line reason when not.
func CheckCoconut(o CoconutOptions) (CoconutOptions, string) {
	if st, err := os.Stat(o.QEMU); err != nil || st.IsDir() {
		return o, fmt.Sprintf("no IGVM-capable QEMU at %s (set %s)", o.QEMU, EnvQEMUIGVM)
	}
	if _, err := os.Stat(o.IGVM); err != nil {
		return o, fmt.Sprintf("no COCONUT-SVSM IGVM at %s (set %s)", o.IGVM, EnvCoconutIGVM)
	}
	if o.Profile == "" {
		o.Profile = qemu.CoconutNoCC
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	caps, err := qemu.Probe(ctx, o.QEMU)
	if err != nil {
		return o, err.Error()
	}
	if _, err := caps.Choose(o.Profile); err != nil {
		return o, err.Error()
	}
	return o, ""
}

// CoconutVM is one VM registration running upstream's SVSM.
type CoconutVM struct {
	Name, Registration string
	Dir                string
	Measurement        []byte // the IGVM's SNP launch digest (igvmmeasure's rules)
	stack              *Stack
	opts               CoconutOptions
	hj                 *protocol.HostJSON
	mu                 sync.Mutex
	boots              int
	stateDisk          string
}

// NewCoconutVM measures the IGVM with our own code, launches it at fakesnp (that digest in
// MEASUREMENT) and registers it at the verifier in raw secret mode, as upstream expects.
func (s *Stack) NewCoconutVM(ctx context.Context, name string, o CoconutOptions) (*CoconutVM, error) {
	if o.Timeout == 0 {
		o.Timeout = 60 * time.Second
	}
	b, err := os.ReadFile(o.IGVM)
	if err != nil {
		return nil, err
	}
	f, err := igvm.Parse(b)
	if err != nil {
		return nil, fmt.Errorf("coconut IGVM %s: %w", o.IGVM, err)
	}
	m, err := igvm.MeasureSNP(f, igvm.MeasureOptions{})
	if err != nil {
		return nil, fmt.Errorf("coconut IGVM %s: %w", o.IGVM, err)
	}
	v := &CoconutVM{Name: name, Registration: name, Dir: filepath.Join(s.opts.WorkDir, "vms", name), Measurement: m.Digest[:], stack: s, opts: o}
	if err := os.MkdirAll(v.Dir, 0o755); err != nil {
		return nil, err
	}
	if v.hj, err = s.Host.AddVM(ctx, VMSetup{Name: name, Measurement: v.Measurement, SecretMode: protocol.SecretModeRaw, Spec: o.Spec, Policy: o.Policy}); err != nil {
		return nil, err
	}
	return v, WriteHostJSON(filepath.Join(v.Dir, "host.json"), v.hj)
}

// HostJSON is the VM's wiring (sockets and URLs).
func (v *CoconutVM) HostJSON() protocol.HostJSON {
	v.mu.Lock()
	defer v.mu.Unlock()
	return *v.hj
}

// StateDisk, when set before a boot, is given to the SVSM as its persistent state (the
// coconut profile: virtio-mmio, for an SVSM built with persistence).
func (v *CoconutVM) SetStateDisk(path string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.stateDisk = path
}

// Prime asks the verifier for one more boot.
func (v *CoconutVM) Prime(ctx context.Context) error {
	_, err := v.stack.Host.Admin.Prime(ctx, v.Registration)
	return err
}

// SetProxySocket points COM3 at another §1 socket (a MITM's).
func (v *CoconutVM) SetProxySocket(path string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	hj := *v.hj
	hj.ProxySocket = path
	v.hj = &hj
}

// CoconutBootOptions adjust one boot.
type CoconutBootOptions struct {
	NoPrime bool
	// Timeout overrides the boot bound (a spec that expects the SVSM to hang uses a short one).
	Timeout time.Duration
}

// CoconutRun is what one boot of the real SVSM showed.
type CoconutRun struct {
	Console string
	// Outcome: "init-done" (the SVSM finished its init), "panic", or "timeout" (neither
	// within the bound; QEMU was stopped).
	Outcome  string
	Duration time.Duration
	QEMUArgs []string
}

// Has reports whether the console shows marker.
func (r *CoconutRun) Has(marker string) bool { return strings.Contains(r.Console, marker) }

// Reached says how far the SVSM got, from its console: "boot" (the SVSM started), "report"
// (fakesnp answered its report request), "attested" (it decrypted the released secret),
// "vtpm" (its vTPM came up) and "init" (its init finished), in that order, plus "panic".
func (r *CoconutRun) Reached() []string {
	var out []string
	for _, st := range []struct{ name, marker string }{
		{"boot", MarkerBoot}, {"report", MarkerReport}, {"attested", MarkerAttested},
		{"vtpm", MarkerVTPM}, {"init", MarkerInitDone}, {"panic", MarkerPanic},
	} {
		if r.Has(st.marker) {
			out = append(out, st.name)
		}
	}
	return out
}

// Line returns the first console line containing s, or "".
func (r *CoconutRun) Line(s string) string {
	for _, l := range strings.Split(r.Console, "\n") {
		if strings.Contains(l, s) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

// CoconutRunning is a boot in progress.
type CoconutRunning struct {
	proc    *Proc
	console string
	start   time.Time
	bound   time.Duration
	args    []string
}

// CoconutLaunch is the QEMU launch for one boot: upstream's launch_guest.sh (--nocc --tcg
// for the coconut-nocc profile, SEV-SNP on KVM for coconut), COM3 to the proxy, and in the
// nocc profile COM4 to fakesnp's report channel.
func CoconutLaunch(o CoconutOptions, console, proxySocket, snpSocket string) *qemu.SVSMLaunch {
	l := &qemu.SVSMLaunch{IGVM: o.IGVM, Accel: qemu.TCG, MemoryMiB: o.MemoryMiB, CPUs: o.CPUs, Console: console, Proxy: proxySocket, Report: snpSocket}
	if l.MemoryMiB == 0 {
		l.MemoryMiB = 2048
	}
	if l.CPUs == 0 {
		l.CPUs = 2
	}
	if o.Profile == qemu.Coconut {
		l.CC, l.Accel, l.CBitPos, l.Report = true, qemu.KVM, o.CBitPos, "" // the real AMD-SP signs
	}
	return l
}

// Start boots the real SVSM once (priming a boot request unless NoPrime).
func (v *CoconutVM) Start(ctx context.Context, o CoconutBootOptions) (*CoconutRunning, error) {
	if !o.NoPrime {
		if err := v.Prime(ctx); err != nil {
			return nil, err
		}
	}
	v.mu.Lock()
	v.boots++
	n, hj, state := v.boots, *v.hj, v.stateDisk
	v.mu.Unlock()
	console := filepath.Join(v.Dir, fmt.Sprintf("%02d-boot.console", n))
	launch := CoconutLaunch(v.opts, console, hj.ProxySocket, hj.SNPSocket)
	launch.StateDisk = state
	args, err := launch.Args()
	if err != nil {
		return nil, err
	}
	_ = os.WriteFile(filepath.Join(v.Dir, fmt.Sprintf("%02d-boot.qemu-cmdline", n)), []byte(v.opts.QEMU+" "+strings.Join(args, " ")+"\n"), 0o644)
	p, err := StartProc("qemu-coconut", v.opts.QEMU, args, filepath.Join(v.Dir, fmt.Sprintf("%02d-boot.qemu.log", n)))
	if err != nil {
		return nil, err
	}
	bound := v.opts.Timeout
	if o.Timeout > 0 {
		bound = o.Timeout
	}
	r := &CoconutRunning{proc: p, console: console, start: time.Now(), bound: bound, args: append([]string{v.opts.QEMU}, args...)}
	v.stack.track(r)
	return r, nil
}

// Boot starts and waits.
func (v *CoconutVM) Boot(ctx context.Context, o CoconutBootOptions) (*CoconutRun, error) {
	r, err := v.Start(ctx, o)
	if err != nil {
		return nil, err
	}
	return r.Wait(ctx)
}

// Wait watches the console until the SVSM ends its init or panics (neither exits QEMU), or
// until the bound, then stops QEMU.
func (r *CoconutRunning) Wait(ctx context.Context) (*CoconutRun, error) {
	defer r.Stop()
	deadline := time.NewTimer(time.Until(r.start.Add(r.bound)))
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	run := &CoconutRun{QEMUArgs: r.args}
	read := func() {
		b, _ := os.ReadFile(r.console)
		run.Console = string(b)
	}
	for {
		select {
		case <-ctx.Done():
			read()
			return run, ctx.Err()
		case <-deadline.C:
			read()
			run.Outcome, run.Duration = "timeout", time.Since(r.start)
			return run, nil
		case <-r.proc.Done():
			read()
			if run.Outcome == "" {
				log, _ := os.ReadFile(r.proc.LogPath)
				return run, fmt.Errorf("QEMU exited before the SVSM finished (console %d bytes): %s", len(run.Console), bytes.TrimSpace(log))
			}
			return run, nil
		case <-tick.C:
			read()
			switch {
			case strings.Contains(run.Console, MarkerPanic):
				time.Sleep(100 * time.Millisecond) // let the panic message finish
				read()
				run.Outcome = "panic"
			case strings.Contains(run.Console, MarkerInitDone):
				run.Outcome = "init-done"
			default:
				continue
			}
			run.Duration = time.Since(r.start)
			return run, nil
		}
	}
}

// Stop ends QEMU (the SVSM never powers the VM off by itself).
func (r *CoconutRunning) Stop() {
	select {
	case <-r.proc.Done():
	default:
		r.proc.Kill()
		<-r.proc.Done()
	}
}

// track remembers a running QEMU so that Close stops it.
func (s *Stack) track(r *CoconutRunning) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.coconuts = append(s.coconuts, r)
}

// stopCoconuts stops every QEMU the stack started for the coconut backend.
func (s *Stack) stopCoconuts() error {
	s.mu.Lock()
	rs := s.coconuts
	s.coconuts = nil
	s.mu.Unlock()
	for _, r := range rs {
		r.Stop()
	}
	return nil
}

// View is the verifier's record of the VM.
func (v *CoconutVM) View(ctx context.Context) (*verifier.VMView, error) {
	return v.stack.Host.Admin.Show(ctx, v.Registration)
}
