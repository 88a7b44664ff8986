// Package guest boots the simulated confidential VM once: the SVSM layer (attestation,
// state, vTPM, UEFI variables), the firmware layer (measured boot) and the OS layer (FDE,
// workload actions), printing one event per step (PROTOCOLS.md §7).
package guest

import (
	"bufio"
	"context"
	"crypto"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/svsm-e2e/svsm-e2e/firmware"
	"github.com/svsm-e2e/svsm-e2e/guestos"
	"github.com/svsm-e2e/svsm-e2e/internal/crashpoint"
	"github.com/svsm-e2e/svsm-e2e/internal/libcrypto"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm"
	"github.com/svsm-e2e/svsm-e2e/svsm/attest"
	"github.com/svsm-e2e/svsm-e2e/svsm/uefivars"
	"github.com/svsm-e2e/svsm-e2e/svsm/vtpm"
)

// Config describes one boot.
type Config struct {
	ProxySocket string // §1 channel (a unix socket), unless ProxyDial is set
	SNPSocket   string // §4 channel (a unix socket), unless SNP is set
	// ProxyDial and SNP replace the sockets with other transports (serial ports in a VM).
	ProxyDial svsm.Dialer
	SNP       io.ReadWriter
	// DataDevice is the unlocked data disk (/dev/mapper/...) for the data-* actions; empty
	// when the disk is only verified (process backend).
	DataDevice string
	StateDisk  string
	DataDisk   string // LUKS2 image; empty for none
	// RecoveryPassphrase is what a user at the console would type; nil for nobody.
	RecoveryPassphrase []byte
	Kernel             string // boot component files; Kernel defaults to this executable
	Initrd             string
	Cmdline            string
	UEFITemplate       string // JSON list of uefivars.Update enrolled on a store without PK
	Actions            []guestos.Action
	OpenLUKS           bool // unlock through device-mapper instead of --test-passphrase
	Out                io.Writer
	// AttestTimeout bounds attestation and each confirmation (60 s when zero).
	AttestTimeout time.Duration
	// Control, if set, is the control channel: after Actions the OS takes one action per
	// line ("nv-increment", "uefi-set=FILE", ..., "poweroff" or "reboot" to end), reporting
	// each as an "action" event carrying the command's sequence number.
	Control io.Reader
	// CrashAt cuts the power at a registered write point (internal/crashpoint):
	// NAME[#n][:torn].
	CrashAt string
	// CrashAfter is a fault-injection point for crash-window tests: right after printing
	// the first event that matches "EVENT" or "EVENT=WHY" (matching the "why" or "action"
	// field), the process kills itself with SIGKILL, as a power cut would.
	CrashAfter string
	// Components, when set, are the boot components loaded (and being hashed) before Run,
	// by LoadComponents with this Config's Kernel and Initrd.
	Components *Components
}

// Components are the kernel and initrd the firmware will measure, read once and hashed in
// the background from the moment they are loaded: hashing a kernel is the costliest step of
// measured boot (a second or more under emulation), and it then overlaps the SVSM's
// attestation and, in a VM, the loading of drivers.
type Components struct {
	kernel, initrd *firmware.Component
	err            error
}

// idleDigest is libcrypto.Digest on a thread at the lowest CPU priority (nice 19). The
// components are hashed ahead, beside a boot whose steps until the measurement each wait on
// the one before (drivers, attestation, state): at normal priority the hashing took their
// CPU on a VM's two vCPUs (microvm boots, alternating builds: 1.60 and 1.61× a bare boot at
// nice 19, 1.63 and 1.64× without). The goroutine keeps the thread locked, so the thread
// ends with it, its priority with it.
func idleDigest(h crypto.Hash, data []byte) ([]byte, error) {
	runtime.LockOSThread()
	_ = unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), 19) // best effort: only speed depends on it
	return libcrypto.Digest(h, data)
}

// LoadComponents reads cfg's kernel (default: this executable) and initrd and starts hashing
// them in the banks a new vTPM activates. A read error is kept and reported when the firmware
// runs, where it was always reported.
func LoadComponents(cfg *Config) *Components { return loadComponents(cfg, readBounded) }

// loadComponents is LoadComponents reading the kernel with readKernel.
func loadComponents(cfg *Config, readKernel func(string) ([]byte, error)) *Components {
	c := &Components{}
	kernel := cfg.Kernel
	if kernel == "" {
		exe, err := os.Executable()
		if err != nil {
			c.err = fmt.Errorf("kernel: %w", err)
			return c
		}
		kernel = exe
	}
	var hashes []crypto.Hash
	for _, alg := range vtpm.ActiveBanks() {
		if h, err := alg.Hash(); err == nil {
			hashes = append(hashes, h)
		}
	}
	load := func(name, path string, read func(string) ([]byte, error)) (*firmware.Component, error) {
		d, err := read(path)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		return &firmware.Component{Name: name, Data: d, Hashed: firmware.Prehash(d, idleDigest, hashes...)}, nil
	}
	if c.kernel, c.err = load("kernel", kernel, readKernel); c.err != nil {
		return c
	}
	if cfg.Initrd != "" {
		c.initrd, c.err = load("initrd", cfg.Initrd, readBounded)
	}
	return c
}

// Outcome is how a successful boot ended.
type Outcome string

// Outcomes.
const (
	PowerOff Outcome = "poweroff"
	Reboot   Outcome = "reboot"
)

// Failure is a fail-closed stop: the layer and the stable reason of the final event.
type Failure struct {
	Layer, Reason string
	Err           error
}

func (f *Failure) Error() string { return fmt.Sprintf("%s layer: %s: %v", f.Layer, f.Reason, f.Err) }
func (f *Failure) Unwrap() error { return f.Err }

type emitter struct {
	mu         sync.Mutex
	out        io.Writer
	crashAfter string
}

// powerCut ends the boot the way a power cut would: no flush, no clean-up.
func powerCut() {
	if os.Getpid() == 1 {
		// A VM's init cannot kill itself: reset the machine without syncing instead.
		_ = syscall.Reboot(syscall.LINUX_REBOOT_CMD_RESTART)
	}
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // SIGKILL cannot be caught; never continue past a crash point
}

// Emit prints ev with the guest's uptime (protocol.EventUptimeField).
func (e *emitter) Emit(ev protocol.Event) {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) == nil {
		fields := make(map[string]any, len(ev.Fields)+1)
		maps.Copy(fields, ev.Fields)
		fields[protocol.EventUptimeField] = float64(ts.Nano()/1e4) / 100 // 10 µs resolution
		ev.Fields = fields
	}
	line, err := ev.Line()
	if err != nil {
		line = fmt.Sprintf(`%s{"event":"event-encoding-failed","layer":%q,"reason":%q}`, protocol.EventPrefix, ev.Layer, err.Error())
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	fmt.Fprintln(e.out, line)
	if e.crashAfter != "" && crashMatches(e.crashAfter, ev) {
		flush(e.out)
		powerCut()
	}
}

// flush makes sure what was printed has left before a power cut: a sync for a file or pipe,
// and for a terminal (a VM's serial console) a drain of its output queue (tcdrain), or the
// cut lands in the middle of the event line that reports it.
func flush(out io.Writer) {
	f, ok := out.(*os.File)
	if !ok {
		return
	}
	_ = f.Sync()
	_ = unix.IoctlSetInt(int(f.Fd()), unix.TCSBRK, 1) // tcdrain; ENOTTY on a pipe
}

func crashMatches(spec string, ev protocol.Event) bool {
	name, sub, hasSub := strings.Cut(spec, "=")
	if ev.Event != name {
		return false
	}
	return !hasSub || ev.String("why") == sub || ev.String("action") == sub
}

func (e *emitter) layer(layer string) func(event, reason string, fields map[string]any) {
	return func(event, reason string, fields map[string]any) {
		e.Emit(protocol.Event{Event: event, Layer: layer, Reason: reason, Fields: fields})
	}
}

// Run boots once. On failure the last event printed is "failed" with the layer and reason,
// and the error is a *Failure.
func Run(ctx context.Context, cfg Config) (Outcome, error) {
	em := &emitter{out: cfg.Out, crashAfter: cfg.CrashAfter}
	crash, err := crashpoint.New(cfg.CrashAt, func() {
		em.Emit(protocol.Event{Event: "power-cut", Layer: protocol.LayerHost, Fields: map[string]any{"crash_at": cfg.CrashAt}})
		flush(cfg.Out)
		powerCut()
	})
	if err != nil {
		em.Emit(protocol.Event{Event: "failed", Layer: protocol.LayerHost, Reason: "bad-crash-point", Fields: map[string]any{"detail": err.Error()}})
		return "", &Failure{Layer: protocol.LayerHost, Reason: "bad-crash-point", Err: err}
	}
	out, err := run(ctx, cfg, em, crash)
	if err != nil {
		var f *Failure
		if !errors.As(err, &f) {
			f = &Failure{Layer: protocol.LayerSVSM, Reason: "internal", Err: err}
		}
		em.Emit(protocol.Event{Event: "failed", Layer: f.Layer, Reason: f.Reason, Fields: map[string]any{"detail": f.Err.Error()}})
		return "", f
	}
	return out, nil
}

func run(ctx context.Context, cfg Config, em *emitter, crash *crashpoint.Injector) (Outcome, error) {
	svsmFail := func(err error) error {
		var se *svsm.Error
		if errors.As(err, &se) {
			return &Failure{protocol.LayerSVSM, se.Code, se.Err}
		}
		return &Failure{protocol.LayerSVSM, "internal", err}
	}
	timeout := cfg.AttestTimeout
	if timeout == 0 {
		timeout = 60 * time.Second
	}
	if cfg.Components == nil {
		cfg.Components = LoadComponents(&cfg)
	}
	em.Emit(protocol.Event{Event: "boot-start", Layer: protocol.LayerSVSM, Fields: map[string]any{"state_disk": cfg.StateDisk}})

	disk, err := os.OpenFile(cfg.StateDisk, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return "", svsmFail(&svsm.Error{Code: svsm.CodeStateIO, Err: err})
	}
	defer disk.Close()
	snp := cfg.SNP
	if snp == nil {
		c, err := net.Dial("unix", cfg.SNPSocket)
		if err != nil {
			return "", svsmFail(&svsm.Error{Code: svsm.CodeAttestation, Err: fmt.Errorf("connect to the SNP report channel: %w", err)})
		}
		defer c.Close()
		snp = c
	}
	dial := cfg.ProxyDial
	if dial == nil {
		dial = func(ctx context.Context) (io.ReadWriteCloser, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", cfg.ProxySocket)
			if err != nil {
				return nil, err
			}
			_ = c.SetDeadline(time.Now().Add(timeout))
			return c, nil
		}
	}
	bootCtx, cancel := context.WithTimeout(ctx, 4*timeout)
	defer cancel()
	s, err := svsm.Boot(bootCtx, svsm.Config{
		Proxy: dial, Quote: attest.NewChannelQuoteProvider(snp, timeout), StateDisk: disk, Events: em, ExchangeTimeout: timeout, Crash: crash,
	})
	if err != nil {
		return "", svsmFail(err)
	}
	poweredOff := false
	defer func() {
		if !poweredOff {
			s.Abort()
		}
	}()

	// Firmware layer.
	fwFail := func(reason string, err error) error { return &Failure{protocol.LayerFirmware, reason, err} }
	boot, err := cfg.bootComponents(s.LaunchDigest())
	if err != nil {
		return "", fwFail("boot-components", err)
	}
	var tmpl []uefivars.Update
	if cfg.UEFITemplate != "" {
		if tmpl, err = readTemplate(cfg.UEFITemplate); err != nil {
			return "", fwFail("uefi-template", err)
		}
	}
	tpm := s.TPM(ctx)
	vars := s.Variables(ctx)
	res, err := firmware.Run(ctx, tpm, vars, tmpl, boot)
	var sbErr *firmware.ErrSecureBoot
	switch {
	case s.Halted() != nil:
		return "", svsmFail(s.Halted())
	case errors.As(err, &sbErr):
		return "", fwFail("secure-boot-violation", err)
	case err != nil:
		return "", fwFail("measured-boot-failed", err)
	}
	pcrs := map[string]any{}
	for i, v := range res.PCRs {
		pcrs[fmt.Sprint(i)] = fmt.Sprintf("%x", v)
	}
	em.Emit(protocol.Event{Event: "measured", Layer: protocol.LayerFirmware, Fields: map[string]any{
		"secure_boot": res.SecureBoot, "event_log_bytes": len(res.Log), "cmdline": boot.Cmdline}})
	em.Emit(protocol.Event{Event: "pcr-values", Layer: protocol.LayerFirmware, Fields: map[string]any{"bank": "sha256", "pcrs": pcrs}})

	// OS layer.
	osEmit := em.layer(protocol.LayerOS)
	osFail := func(reason string, err error) error { return &Failure{protocol.LayerOS, reason, err} }
	var fde *guestos.FDE
	if cfg.DataDisk != "" {
		fde = &guestos.FDE{TPM: tpm, Device: cfg.DataDisk, Recovery: cfg.RecoveryPassphrase,
			Open: cfg.OpenLUKS, MapperName: "svsm-data", Emit: osEmit, Crash: crash}
		if _, err := fde.Unlock(ctx); err != nil {
			if h := s.Halted(); h != nil {
				return "", svsmFail(h)
			}
			return "", osFail("fde-locked", err)
		}
	}
	w := &guestos.Workload{TPM: tpm, Vars: vars, FDE: fde, DataDevice: cfg.DataDevice}
	// runAction reports false once the SVSM has halted: the VM stops there.
	runAction := func(a guestos.Action, seq int) bool {
		fields, err := w.Run(ctx, a)
		if s.Halted() != nil {
			return false // the OS never saw an answer: no action result either
		}
		if fields == nil {
			fields = map[string]any{}
		}
		fields["action"] = a.Name
		fields["ok"] = err == nil
		if seq > 0 {
			fields["seq"] = seq
		}
		reason := ""
		if err != nil {
			reason = err.Error()
		}
		osEmit("action", reason, fields)
		return true
	}
	outcome, done := PowerOff, false
	for _, a := range cfg.Actions {
		if a.Name == "reboot" || a.Name == "poweroff" {
			outcome, done = Outcome(a.Name), true
			break
		}
		if !runAction(a, 0) {
			return "", svsmFail(s.Halted())
		}
	}
	if !done && cfg.Control != nil {
		osEmit("control-ready", "", nil)
		outcome = serveControl(ctx, cfg.Control, runAction, osEmit)
		if h := s.Halted(); h != nil {
			return "", svsmFail(h)
		}
	}
	poweredOff = true
	if err := s.PowerOff(ctx); err != nil {
		return "", svsmFail(err)
	}
	em.Emit(protocol.Event{Event: string(outcome), Layer: protocol.LayerOS, Fields: map[string]any{"counter": s.Counter()}})
	return outcome, nil
}

// bootComponents is what the firmware boots: the components loaded at the boot's start.
func (cfg *Config) bootComponents(launch []byte) (firmware.Boot, error) {
	b := firmware.Boot{LaunchDigest: launch, Cmdline: cfg.Cmdline}
	c := cfg.Components
	if c.err != nil {
		return b, c.err
	}
	b.Kernel, b.Initrd = *c.kernel, c.initrd
	return b, nil
}

// MaxComponentSize bounds a boot component the firmware loads.
const MaxComponentSize = 512 << 20

func readBounded(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Size() > MaxComponentSize {
		return nil, fmt.Errorf("%s is %d bytes, limit %d", path, fi.Size(), MaxComponentSize)
	}
	return os.ReadFile(path)
}

// MaxControlIdle bounds how long the OS waits for the next command on the control channel.
const MaxControlIdle = 10 * time.Minute

// serveControl runs commands from the control channel until poweroff, reboot, EOF or idle.
func serveControl(ctx context.Context, r io.Reader, run func(guestos.Action, int) bool, emit func(string, string, map[string]any)) Outcome {
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 0, 4096), 4096)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			case <-ctx.Done():
				return
			}
		}
	}()
	for seq := 1; ; seq++ {
		var line string
		var ok bool
		select {
		case line, ok = <-lines:
		case <-time.After(MaxControlIdle):
			emit("control-closed", "idle for "+MaxControlIdle.String(), nil)
			return PowerOff
		case <-ctx.Done():
			return PowerOff
		}
		if !ok {
			emit("control-closed", "end of channel", nil)
			return PowerOff
		}
		acts, err := guestos.ParseActions(strings.TrimSpace(line))
		if err != nil || len(acts) != 1 {
			emit("action", fmt.Sprintf("control command %q: %v", line, err), map[string]any{"ok": false, "seq": seq})
			continue
		}
		switch acts[0].Name {
		case "poweroff":
			return PowerOff
		case "reboot":
			return Reboot
		}
		if !run(acts[0], seq) {
			return PowerOff // halted: the caller reports why
		}
	}
}
