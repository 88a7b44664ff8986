package guest

import (
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/svsm-e2e/svsm-e2e/guestos"
)

// Names the host gives the VM's devices.
const (
	PortProxy    = "svsm.proxy"   // virtio-serial port: §1 channel (to svsm-proxy)
	PortSNP      = "svsm.snp"     // virtio-serial port: §4 channel (to fakesnp)
	PortControl  = "svsm.control" // virtio-serial port: the control channel (optional)
	SerialState  = "svsm-state"   // virtio-blk serials
	SerialData   = "svsm-data"
	SerialConfig = "svsm-config"
	// ModuleList is the initramfs's module load order (images.ModuleListPath).
	ModuleList = "/etc/svsm-e2e/modules"
)

// RunInit is svsm-guest as a VM's /init: mount the pseudo filesystems, load modules, find the
// channels and disks, boot once as Run does, and reset the machine (QEMU runs with
// -no-reboot, so the reset ends the VM; the last event says whether it was a reboot).
func RunInit() {
	out := os.Stdout
	err := initAndRun(out)
	if err != nil {
		fmt.Fprintf(out, "svsm-guest init: %v\n", err)
	}
	unix.Sync()
	// The reset cuts the serial console at once: drain it first, or the last event (the one
	// saying why the boot ended) is cut mid-line.
	flush(out)
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	select {} // PID 1 must not exit
}

// mapExecutable maps the running /init read-only instead of copying it (tens of megabytes
// copied cost a tenth of a second under emulation). Its bytes cannot change under the
// mapping: it is the executable this process runs (writes to it fail with ETXTBSY) on the
// initramfs nothing else writes. The mapping lives until the VM resets.
func mapExecutable(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if fi.Size() == 0 || fi.Size() > MaxComponentSize {
		return nil, fmt.Errorf("%s is %d bytes, want 1 to %d", path, fi.Size(), MaxComponentSize)
	}
	b, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_PRIVATE)
	if err != nil {
		return nil, fmt.Errorf("map %s: %w", path, err)
	}
	return b, nil
}

// initKernel is what a VM's firmware measures as its kernel: this /init.
const initKernel = "/init"

func initAndRun(out io.Writer) error {
	for _, m := range []struct{ src, dst, fstype string }{
		{"devtmpfs", "/dev", "devtmpfs"}, {"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"},
		{"tmpfs", "/run", "tmpfs"}, {"tmpfs", "/tmp", "tmpfs"},
	} {
		if err := unix.Mount(m.src, m.dst, m.fstype, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	os.Setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin") // before any os/exec (cryptsetup)
	// The firmware measures /init as the kernel: its hashing starts now, beside the drivers'
	// loading and the attestation.
	comps := loadComponents(&Config{Kernel: initKernel}, mapExecutable)
	// Go computes P-521's table of generator multiples at the curve's first key generation:
	// a tenth of a second of an emulated boot, on attestation's path (its ephemeral key).
	// Generating a throwaway key now computes it beside the module loading instead.
	go func() { _, _ = ecdh.P521().GenerateKey(rand.Reader) }()
	if err := loadModules(); err != nil {
		return err
	}
	proxyPort, err := waitPort(PortProxy)
	if err != nil {
		return err
	}
	snpPort, err := waitPort(PortSNP)
	if err != nil {
		return err
	}
	cfgDev, err := waitDisk(SerialConfig)
	if err != nil {
		return err
	}
	state, err := waitDisk(SerialState)
	if err != nil {
		return err
	}
	f, err := os.Open(cfgDev)
	if err != nil {
		return err
	}
	bc, err := ReadConfigDisk(f)
	f.Close()
	if err != nil {
		return err
	}
	cfg := Config{StateDisk: state, Out: out, Kernel: initKernel, Components: comps, OpenLUKS: true, CrashAfter: bc.CrashAfter, CrashAt: bc.CrashAt,
		RecoveryPassphrase: bc.Recovery, AttestTimeout: time.Duration(bc.AttestMillis) * time.Millisecond}
	if b, err := os.ReadFile("/proc/cmdline"); err == nil {
		cfg.Cmdline = strings.TrimSpace(string(b))
	}
	if bc.DataDisk {
		if cfg.DataDisk, err = waitDisk(SerialData); err != nil {
			return err
		}
		cfg.DataDevice = "/dev/mapper/svsm-data"
	}
	dir := "/run/svsm-e2e/files"
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for name, data := range bc.Files {
		if strings.ContainsAny(name, "/\x00") || name == "" || name == "." || name == ".." {
			return fmt.Errorf("config file name %q", name)
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return err
		}
	}
	if bc.UEFITemplate != "" {
		cfg.UEFITemplate = filepath.Join(dir, bc.UEFITemplate)
	}
	var actions []string
	for _, a := range bc.Actions {
		name, arg, _ := strings.Cut(a, "=")
		switch {
		case name == "uefi-set":
			a = name + "=" + filepath.Join(dir, arg)
		case name == "fde-prepare-update" && (strings.HasPrefix(arg, "kernel:") || strings.HasPrefix(arg, "initrd:")):
			what, file, _ := strings.Cut(arg, ":")
			a = name + "=" + what + ":" + filepath.Join(dir, file)
		}
		actions = append(actions, a)
	}
	if cfg.Actions, err = guestos.ParseActions(strings.Join(actions, ",")); err != nil {
		return err
	}
	proxy, err := os.OpenFile(proxyPort, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	snp, err := os.OpenFile(snpPort, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	cfg.SNP = snp
	if bc.Control {
		p, err := waitPort(PortControl)
		if err != nil {
			return err
		}
		if cfg.Control, err = os.OpenFile(p, os.O_RDWR, 0); err != nil {
			return err
		}
	}
	// One serial stream for every session (the proxy runs with --persistent).
	cfg.ProxyDial = func(context.Context) (io.ReadWriteCloser, error) { return keepOpen{proxy}, nil }
	_, _ = Run(context.Background(), cfg) // a failure is already reported as the "failed" event
	return nil
}

type keepOpen struct{ *os.File }

func (keepOpen) Close() error { return nil }

// loadModules loads the initramfs's modules, passing each the "module.param=value" settings
// of the kernel command line as modprobe would (QEMU's microvm describes its virtio-mmio
// devices as virtio_mmio.device=... there). Modules load side by side, each once those it
// depends on are in: the virtio and device-mapper chains are independent, and loading one
// after the other kept a vCPU idle for a twentieth of a second of an emulated boot.
func loadModules() error {
	b, err := os.ReadFile(ModuleList)
	if err != nil {
		return fmt.Errorf("module list: %w", err)
	}
	mods, err := parseModuleList(string(b))
	if err != nil {
		return err
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	pci, _ := filepath.Glob("/sys/bus/pci/devices/*") // enumerated before init runs
	var needed []moduleLine
	for _, m := range mods {
		if neededModule(m.name, len(pci) > 0) {
			needed = append(needed, m)
		}
	}
	return loadConcurrently(needed, func(name string) error {
		var params []string
		for _, arg := range strings.Fields(string(cmdline)) {
			if mod, kv, ok := strings.Cut(arg, "."); ok && strings.ReplaceAll(mod, "-", "_") == name && strings.Contains(kv, "=") {
				params = append(params, kv)
			}
		}
		f, err := os.Open("/lib/modules/" + name + ".ko")
		if err != nil {
			return err
		}
		defer f.Close()
		if err := unix.FinitModule(int(f.Fd()), strings.Join(params, " "), 0); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("load module %s: %w", name, err)
		}
		return nil
	})
}

// moduleLine is one line of the module list: a module and the modules it depends on.
type moduleLine struct {
	name string
	deps []string
}

// maxModules bounds the module list (the initramfs holds about a dozen).
const maxModules = 256

// parseModuleList reads "name dependency..." lines; a module's dependencies come before it.
func parseModuleList(s string) ([]moduleLine, error) {
	var out []moduleLine
	seen := map[string]bool{}
	for _, l := range strings.Split(s, "\n") {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		if len(out) == maxModules {
			return nil, fmt.Errorf("module list: more than %d modules", maxModules)
		}
		if seen[f[0]] {
			return nil, fmt.Errorf("module list: %s listed twice", f[0])
		}
		for _, d := range f[1:] {
			if !seen[d] {
				return nil, fmt.Errorf("module list: %s depends on %s, which is not listed before it", f[0], d)
			}
		}
		seen[f[0]] = true
		out = append(out, moduleLine{name: f[0], deps: f[1:]})
	}
	return out, nil
}

// loadConcurrently runs load for each module once every dependency that is also in mods has
// loaded, independent modules at the same time, and returns every failure. A module whose
// dependency failed is still tried: the kernel's refusal names what is missing.
func loadConcurrently(mods []moduleLine, load func(name string) error) error {
	done := make(map[string]chan struct{}, len(mods))
	errs := make([]error, len(mods))
	var wg sync.WaitGroup
	for i, m := range mods {
		var waits []chan struct{}
		for _, d := range m.deps {
			if ch, ok := done[d]; ok {
				waits = append(waits, ch)
			}
		}
		ch := make(chan struct{})
		done[m.name] = ch
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(ch)
			for _, w := range waits {
				<-w
			}
			errs[i] = load(m.name)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// neededModule says whether a module of the initramfs's list is needed on this machine: one
// initramfs serves both profiles, and a machine without PCI devices (microvm) has no use for
// virtio's PCI transport (three modules, 20 ms of an emulated boot).
func neededModule(name string, pciDevices bool) bool {
	return pciDevices || (name != "virtio_pci" && !strings.HasPrefix(name, "virtio_pci_"))
}

// deviceWait bounds how long the guest waits for a device to appear.
const deviceWait = 20 * time.Second

func waitPort(name string) (string, error) {
	deadline := time.Now().Add(deviceWait)
	for {
		ports, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, p := range ports {
			if b, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(b)) == name {
				dev := "/dev/" + filepath.Base(filepath.Dir(p))
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("virtio-serial port %q did not appear within %s (%s)", name, deviceWait, inventory())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func waitDisk(serial string) (string, error) {
	deadline := time.Now().Add(deviceWait)
	for {
		disks, _ := filepath.Glob("/sys/block/*/serial")
		for _, p := range disks {
			if b, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(b)) == serial {
				dev := "/dev/" + filepath.Base(filepath.Dir(p))
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("disk with serial %q did not appear within %s (%s)", serial, deviceWait, inventory())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// inventory describes the devices the guest sees, for a failure message.
func inventory() string {
	var parts []string
	for _, g := range []string{"/sys/class/virtio-ports/*/name", "/sys/block/*/serial", "/sys/bus/virtio/devices/*/device"} {
		files, _ := filepath.Glob(g)
		for _, f := range files {
			b, _ := os.ReadFile(f)
			parts = append(parts, f+"="+strings.TrimSpace(string(b)))
		}
	}
	if b, err := os.ReadFile("/proc/cmdline"); err == nil {
		parts = append(parts, "cmdline:"+strings.TrimSpace(string(b)))
	}
	mods, _ := os.ReadFile("/proc/modules")
	for _, l := range strings.Split(string(mods), "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			parts = append(parts, "mod:"+f[0])
		}
	}
	return strings.Join(parts, " ")
}
