package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/svsm-e2e/svsm-e2e/guest"
	"github.com/svsm-e2e/svsm-e2e/images"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/qemu"
	"github.com/svsm-e2e/svsm-e2e/svsm/statestore"
)

// QEMUOptions configure the QEMU backend.
type QEMUOptions struct {
	Binary string // default qemu-system-x86_64
	// ImageCache holds the kernel download and built initramfs images (default
	// $SVSM_E2E_IMAGES, else ~/.cache/svsm-e2e/images).
	ImageCache string
	// Guest is the statically linked svsm-guest that becomes /init.
	Guest     string
	Profile   qemu.Profile // "" lets the probe choose
	MemoryMiB int          // default 512
	// CPUs is the VM's vCPU count (default DefaultVMCPUs).
	CPUs int
	// KernelBoot boots with -kernel/-initrd/-append even where QEMU has igvm-cfg (to compare).
	KernelBoot bool
}

// QEMUBackend boots each VM boot as one QEMU process: svsm-guest is the initramfs's /init,
// disks are virtio-blk, channels virtio-serial ports wired to the host's unix sockets.
type QEMUBackend struct {
	opts   QEMUOptions
	Caps   *qemu.Capabilities
	Choice qemu.Choice
	Image  *images.Image
	// IGVMBoot: each VM boots from its IGVM launch image (its NATIVE platform) through
	// igvm-cfg, not from -kernel/-initrd/-append.
	IGVMBoot bool
	tscKHz   int
	mu       sync.Mutex
	started  int
}

// DefaultVMCPUs is the vCPU count of a VM: two, so that the guest hashes its kernel for
// measured boot beside loading its drivers and attesting, as a multi-vCPU guest would; under
// TCG each vCPU is a host thread (MTTCG), and a bare boot takes no longer with two (measured
// on our 2-vCPU machines).
const DefaultVMCPUs = 2

// EnvQEMU names the QEMU the suite's QEMU backend runs (default qemu-system-x86_64). An
// IGVM-capable one (igvm-cfg) makes every VM boot from its IGVM launch image on q35.
const EnvQEMU = "SVSM_E2E_QEMU"

// DefaultImageCache is where images are built unless told otherwise.
func DefaultImageCache() string {
	if d := os.Getenv("SVSM_E2E_IMAGES"); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "svsm-e2e", "images")
	}
	return filepath.Join(os.TempDir(), "svsm-e2e-images")
}

// NewQEMUBackend probes QEMU, picks profile and accelerator, and makes sure the guest image
// is built (rebuilt only when its inputs change).
func NewQEMUBackend(ctx context.Context, o QEMUOptions) (*QEMUBackend, error) {
	if o.Guest == "" {
		return nil, errors.New("qemu backend: the static svsm-guest binary is required (make build)")
	}
	if o.ImageCache == "" {
		o.ImageCache = DefaultImageCache()
	}
	caps, err := qemu.Probe(ctx, o.Binary)
	if err != nil {
		return nil, err
	}
	choice, err := caps.Choose(o.Profile)
	if err != nil {
		return nil, err
	}
	img, err := images.Ensure(ctx, images.Options{Cache: o.ImageCache, Guest: o.Guest})
	if err != nil {
		return nil, fmt.Errorf("guest image: %w", err)
	}
	b := &QEMUBackend{opts: o, Caps: caps, Choice: choice, Image: img,
		IGVMBoot: choice.Profile == qemu.Q35 && caps.Objects["igvm-cfg"] && !o.KernelBoot}
	if choice.Profile == qemu.Microvm && choice.Accel == qemu.TCG {
		b.tscKHz = qemu.TSCKHz()
	}
	return b, nil
}

// Name implements Backend.
func (b *QEMUBackend) Name() string { return "qemu" }

// CPUs is the vCPU count of this backend's VMs.
func (b *QEMUBackend) CPUs() int {
	if b.opts.CPUs > 0 {
		return b.opts.CPUs
	}
	return DefaultVMCPUs
}

// Cmdline is the kernel command line for a VM whose own part is vmCmdline. It is measured
// (PCR 8), so it is the same for every boot of a VM on one host.
func (b *QEMUBackend) Cmdline(vmCmdline string) string {
	base := "console=ttyS0 quiet loglevel=1 panic=-1"
	if b.tscKHz > 0 {
		base += fmt.Sprintf(" tsc_early_khz=%d", b.tscKHz)
	}
	return base + " " + vmCmdline
}

// BootMarkerTimeout bounds the wait for a VM's first event (about 5 s under TCG here).
const BootMarkerTimeout = 90 * time.Second

// QEMUInstance is one boot in one QEMU process.
type QEMUInstance struct {
	*eventStream
	Proc *qemu.Process
}

// Reset asks QEMU for a system reset over QMP. QEMU runs with -no-reboot, so the reset ends
// this QEMU process like a power cycle; the next boot is a new Start.
func (q *QEMUInstance) Reset(ctx context.Context) error {
	if err := q.Proc.Reset(ctx); err != nil {
		return err
	}
	// Under -no-reboot the reset is a shutdown: QMP's SHUTDOWN event says it happened.
	return q.Proc.WaitEvent(ctx, "SHUTDOWN", 30*time.Second)
}

// Kill cuts the power: QEMU is killed by PID.
func (q *QEMUInstance) Kill() {
	q.Proc.Kill()
	<-q.done
}

// Wait waits for the boot to end.
func (q *QEMUInstance) Wait(ctx context.Context) (*GuestRun, error) {
	return q.result(ctx, q.Kill)
}

// Start implements Backend.
func (b *QEMUBackend) Start(ctx context.Context, vm *VM, o GuestOptions) (Instance, error) {
	if o.Timeout == 0 {
		o.Timeout = 3 * time.Minute
	}
	b.mu.Lock()
	b.started++
	n := b.started
	b.mu.Unlock()
	hj, err := protocol.ReadHostJSON(o.HostJSON)
	if err != nil {
		return nil, err
	}
	bc := &guest.BootConfig{CrashAfter: o.CrashAfter, CrashAt: o.CrashAt, AttestMillis: o.AttestTimeout.Milliseconds(), DataDisk: o.DataDisk != "",
		Files: map[string][]byte{}, Control: o.ControlSocket != ""}
	if o.RecoveryFile != "" {
		if bc.Recovery, err = os.ReadFile(o.RecoveryFile); err != nil {
			return nil, err
		}
	}
	if o.UEFITemplate != "" {
		if bc.Files["uefi-template.json"], err = os.ReadFile(o.UEFITemplate); err != nil {
			return nil, err
		}
		bc.UEFITemplate = "uefi-template.json"
	}
	// Actions that name host files get the files on the config disk.
	for i, a := range o.Actions {
		name, arg, _ := strings.Cut(a, "=")
		prefix, path := "", ""
		switch {
		case name == "uefi-set":
			path = arg
		case name == "fde-prepare-update" && (strings.HasPrefix(arg, "kernel:") || strings.HasPrefix(arg, "initrd:")):
			prefix, path, _ = strings.Cut(arg, ":")
			prefix += ":"
		}
		if path != "" {
			data, err := os.ReadFile(path)
			if err != nil {
				return nil, err
			}
			file := fmt.Sprintf("file-%d-%s", i, filepath.Base(path))
			bc.Files[file] = data
			a = name + "=" + prefix + file
		}
		bc.Actions = append(bc.Actions, a)
	}
	cfgDisk, err := guest.MarshalConfigDisk(bc)
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(vm.Dir, fmt.Sprintf("qemu-%02d-config.img", n))
	if err := os.WriteFile(cfgPath, cfgDisk, 0o600); err != nil {
		return nil, err
	}
	if _, err := os.Stat(o.StateDisk); errors.Is(err, os.ErrNotExist) {
		if err := os.WriteFile(o.StateDisk, make([]byte, statestore.DiskSize), 0o600); err != nil {
			return nil, err
		}
	}
	run := vm.stack.Host.RunPath
	conPath, qmpPath := run(fmt.Sprintf("q%d.con", n)), run(fmt.Sprintf("q%d.qmp", n))
	ln, err := net.Listen("unix", conPath)
	if err != nil {
		return nil, err
	}
	m := &qemu.Machine{
		Profile: b.Choice.Profile, Accel: b.Choice.Accel, MemoryMiB: b.opts.MemoryMiB, CPUs: b.CPUs(),
		// What runs is what the VM's launch image holds (extracted by the harness).
		Kernel: o.Kernel, Initrd: o.Initrd, Cmdline: b.Cmdline(o.Cmdline),
		Console: conPath, QMP: qmpPath, RNG: true,
		Ports: []qemu.Port{{Name: guest.PortProxy, Socket: hj.ProxySocket}, {Name: guest.PortSNP, Socket: hj.SNPSocket}},
		Disks: []qemu.Disk{{ID: "state", Path: o.StateDisk, Serial: guest.SerialState, SVSM: true},
			{ID: "config", Path: cfgPath, Serial: guest.SerialConfig, ReadOnly: true}},
	}
	if o.DataDisk != "" {
		m.Disks = append(m.Disks, qemu.Disk{ID: "data", Path: o.DataDisk, Serial: guest.SerialData})
	}
	if o.ControlSocket != "" {
		m.Ports = append(m.Ports, qemu.Port{Name: guest.PortControl, Socket: o.ControlSocket})
	}
	if b.IGVMBoot {
		// QEMU loads the launch image itself: the pages the verifier's digest covers.
		m.IGVM, m.Kernel, m.Initrd, m.Cmdline = vm.LaunchImage, "", "", ""
	}
	args, _ := m.Args()
	_ = os.WriteFile(filepath.Join(vm.Dir, fmt.Sprintf("qemu-%02d.cmdline", n)), []byte(b.Caps.Binary+" "+strings.Join(args, " ")+"\n"), 0o644)
	p, err := qemu.Start(b.opts.Binary, m)
	if err != nil {
		ln.Close()
		return nil, err
	}
	inst := &QEMUInstance{eventStream: newEventStream(), Proc: p}
	console := o.Console
	if console == nil {
		console = io.Discard
	}
	console = &lockedWriter{w: console}
	if err := p.ConnectQMP(qmpPath, 30*time.Second); err != nil {
		p.Kill()
		ln.Close()
		return nil, err
	}
	conns := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		ln.Close()
		if err == nil {
			conns <- c
		}
		close(conns)
	}()
	// A guest that never prints its first event within the bound is stuck (an accelerator
	// that cannot run it stalls instead of failing): kill it and say so.
	var markerMu sync.Mutex
	var noMarker error
	go func() {
		_, err := inst.WaitForEvent(context.Background(), BootMarkerTimeout, func(protocol.Event) bool { return true })
		if err != nil && !inst.isDone() {
			markerMu.Lock()
			noMarker = fmt.Errorf("no boot marker (first guest event) within %s under %s (%s); QEMU killed", BootMarkerTimeout, b.Choice.Accel, b.Choice.Reason)
			markerMu.Unlock()
			p.Kill()
		}
	}()
	go func() {
		timer := time.NewTimer(o.Timeout)
		defer timer.Stop()
		var waitErr error
		select {
		case c, ok := <-conns:
			if ok {
				fed := make(chan struct{})
				go func() { inst.feed(c, console, o.OnEvent); close(fed) }()
				select {
				case <-fed:
				case <-timer.C:
					waitErr = fmt.Errorf("QEMU boot did not finish within %s", o.Timeout)
					p.Kill()
					<-fed
				}
				c.Close()
			}
		case <-timer.C:
			waitErr = fmt.Errorf("QEMU never connected its console within %s", o.Timeout)
		case <-p.Done():
		}
		ln.Close()
		select {
		case <-p.Done():
		case <-time.After(30 * time.Second):
			p.Kill() // the console closed but QEMU lingers: no QEMU outlives its boot
		}
		p.Close()
		qerr := p.Exit()
		markerMu.Lock()
		if noMarker != nil && waitErr == nil {
			waitErr = noMarker
		}
		markerMu.Unlock()
		inst.finish(qemuExitCode(inst.Events(), qerr), p.Stderr(), waitErr)
	}()
	return inst, nil
}

// qemuExitCode maps a VM boot's end onto svsm-guest's exit status: 0 after a clean
// poweroff/reboot event, 1 after a "failed" event, -1 when QEMU was killed or the guest cut
// its own power at a crash point (its last event "power-cut", as the process backend's
// killed process), 2 when the guest ended without either (a crash of the guest kernel or init).
func qemuExitCode(evs []protocol.Event, qerr error) int {
	if qerr != nil {
		return -1
	}
	switch last(evs).Event {
	case "poweroff", "reboot":
		return 0
	case "failed":
		return 1
	case "power-cut":
		return -1
	}
	return 2
}
