package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/internal/detrand"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm/statestore"
	"github.com/svsm-e2e/svsm-e2e/svsm/uefivars"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// VMOptions describe a new VM.
type VMOptions struct {
	Name         string
	SecretMode   string // v1 (default) or raw
	WriteThrough bool
	// Spec overrides verifier policy fields of the registration.
	Spec verifier.VMSpec
	// DataDiskMiB is the LUKS2 data disk's size (default 32: 16 MiB of LUKS2 header plus data; -1 for none).
	DataDiskMiB int
	// DefaultKDF formats the data disk with cryptsetup's argon2id defaults instead of the
	// fast PBKDF2 test setting.
	DefaultKDF bool
	// NoSecureBoot leaves the variable store in Setup Mode (no key template).
	NoSecureBoot bool
	Cmdline      string // default "console=ttyS0 root=/dev/mapper/svsm-data"
}

// VM is one simulated VM: its registration, launch and files. The harness, as the host,
// owns the files and may do anything to them.
type VM struct {
	Name string
	// Registration is the verifier's name for the VM (a clone shares its source's).
	Registration string
	Dir          string
	HostJSON     string
	StateDisk    string
	DataDisk     string
	RecoveryFile string
	Recovery     []byte
	Kernel       string
	Initrd       string
	Template     string
	Cmdline      string
	Keys         *SecureBootKeys
	// LaunchImage is the IGVM file the host launches (kernel, initrd, command line);
	// Measurement is its SNP launch digest.
	LaunchImage string
	Measurement []byte

	stack       *Stack
	hj          *protocol.HostJSON
	boots       int
	launchCache *launchedFiles
}

// NewVM registers a VM at the verifier, launches it at fakesnp and creates its files.
func (s *Stack) NewVM(ctx context.Context, o VMOptions) (*VM, error) {
	if o.SecretMode == "" {
		o.SecretMode = protocol.SecretModeV1
	}
	if o.Cmdline == "" {
		o.Cmdline = "console=ttyS0 root=/dev/mapper/svsm-data"
	}
	var err error
	v := &VM{Name: o.Name, Registration: o.Name, Dir: filepath.Join(s.opts.WorkDir, "vms", o.Name), Cmdline: o.Cmdline, stack: s}
	if err := os.MkdirAll(filepath.Join(v.Dir, "steps"), 0o755); err != nil {
		return nil, err
	}
	v.HostJSON = filepath.Join(v.Dir, "host.json")
	v.StateDisk = filepath.Join(v.Dir, "state.img")
	v.RecoveryFile = filepath.Join(v.Dir, "recovery-passphrase")
	v.Kernel = filepath.Join(v.Dir, "vmlinux")
	v.Initrd = filepath.Join(v.Dir, "initrd")
	v.LaunchImage = filepath.Join(v.Dir, "launch.igvm")
	// Stand-ins for the kernel and initrd the process backend's firmware loads and measures.
	if err := os.WriteFile(v.Kernel, []byte("svsm-e2e test kernel 1\n"), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(v.Initrd, []byte("svsm-e2e test initrd 1\n"), 0o644); err != nil {
		return nil, err
	}
	// The launch image and its SNP digest: what fakesnp reports and the verifier expects.
	measurement, err := v.buildLaunch()
	if err != nil {
		return nil, err
	}
	spec := o.Spec
	spec.WriteThrough = spec.WriteThrough || o.WriteThrough
	hj, err := s.Host.AddVM(ctx, VMSetup{Name: o.Name, SecretMode: o.SecretMode, Spec: spec, Measurement: measurement})
	if err != nil {
		return nil, fmt.Errorf("add VM %s: %w", o.Name, err)
	}
	v.hj = hj
	if err := WriteHostJSON(v.HostJSON, hj); err != nil {
		return nil, err
	}
	s.mu.Lock()
	v.Recovery = []byte(fmt.Sprintf("recovery-%016x", s.rng.Uint64()))
	s.mu.Unlock()
	if err := os.WriteFile(v.RecoveryFile, v.Recovery, 0o600); err != nil {
		return nil, err
	}
	// Stand-ins for the kernel and initrd the firmware loads and measures.
	if err := os.WriteFile(v.Kernel, []byte("svsm-e2e test kernel 1\n"), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(v.Initrd, []byte("svsm-e2e test initrd 1\n"), 0o644); err != nil {
		return nil, err
	}
	if o.DataDiskMiB >= 0 {
		if o.DataDiskMiB == 0 {
			o.DataDiskMiB = 32
		}
		v.DataDisk = filepath.Join(v.Dir, "data.img")
		if err := NewDataDisk(ctx, v.DataDisk, o.DataDiskMiB, v.Recovery, o.DefaultKDF); err != nil {
			return nil, err
		}
	}
	if !o.NoSecureBoot {
		if v.Keys, err = NewSecureBootKeys(); err != nil {
			return nil, err
		}
		v.Template = filepath.Join(v.Dir, "uefi-template.json")
		if err := v.Keys.WriteTemplate(v.Template); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	s.vms = append(s.vms, v)
	s.mu.Unlock()
	return v, nil
}

// BootOptions adjust one boot.
type BootOptions struct {
	Actions []string
	// NoPrime withholds the boot request (the owner did not approve this boot).
	NoPrime bool
	// NoRecovery: nobody is at the console to type the recovery passphrase.
	NoRecovery bool
	Timeout    time.Duration
	OnEvent    func(protocol.Event)
	// Control opens a control channel: after Actions the guest takes commands from
	// Running.Command until "poweroff" or "reboot".
	Control bool
	// CrashAfter cuts the guest's power right after an event (see GuestOptions).
	CrashAfter string
	// CrashAt cuts the guest's power at a registered write point (see GuestOptions).
	CrashAt       string
	AttestTimeout time.Duration
}

// Prime asks the verifier for one more boot of this VM's registration.
func (v *VM) Prime(ctx context.Context) error {
	_, err := v.stack.Host.Admin.Prime(ctx, v.Registration)
	return err
}

// View is the verifier's record of the VM.
func (v *VM) View(ctx context.Context) (*verifier.VMView, error) {
	return v.stack.Host.Admin.Show(ctx, v.Registration)
}

// Start boots the VM (priming a boot request unless NoPrime) and returns the running
// instance. The state disk as it was before the boot is kept under steps/.
func (v *VM) Start(ctx context.Context, o BootOptions) (*Running, error) {
	if !o.NoPrime {
		if err := v.Prime(ctx); err != nil {
			return nil, fmt.Errorf("prime %s: %w", v.Name, err)
		}
	}
	v.boots++
	label := fmt.Sprintf("%02d-boot", v.boots)
	if _, err := os.Stat(v.StateDisk); err == nil {
		if err := copyFile(v.StateDisk, filepath.Join(v.Dir, "steps", label+"-state-before.img")); err != nil {
			return nil, err
		}
	}
	console, err := os.Create(filepath.Join(v.Dir, label+".console"))
	if err != nil {
		return nil, err
	}
	launched, err := v.launched()
	if err != nil {
		console.Close()
		return nil, fmt.Errorf("launch image of %s: %w", v.Name, err)
	}
	// Each event with the host's time of arrival, for timelines (svsm-e2e qualify).
	timeline, err := os.Create(filepath.Join(v.Dir, label+".events.jsonl"))
	if err != nil {
		console.Close()
		return nil, err
	}
	var tmu sync.Mutex
	onEvent := func(e protocol.Event) {
		if line, err := json.Marshal(TimedEvent{Time: time.Now().UTC(), Event: e}); err == nil {
			tmu.Lock()
			_, _ = timeline.Write(append(line, '\n'))
			tmu.Unlock()
		}
		if o.OnEvent != nil {
			o.OnEvent(e)
		}
	}
	closeFiles := func() {
		console.Close()
		tmu.Lock()
		timeline.Close()
		tmu.Unlock()
	}
	g := GuestOptions{HostJSON: v.HostJSON, StateDisk: v.StateDisk, DataDisk: v.DataDisk, RecoveryFile: v.RecoveryFile,
		Kernel: launched.kernel, Initrd: launched.initrd, Cmdline: launched.cmdline, UEFITemplate: v.Template, Actions: o.Actions,
		Console: console, Timeout: o.Timeout, OnEvent: onEvent, CrashAfter: o.CrashAfter, CrashAt: o.CrashAt, AttestTimeout: o.AttestTimeout}
	if o.NoRecovery {
		g.RecoveryFile = ""
	}
	// A VM's guest draws from its own kernel; only the process backend's guest takes a seed.
	if v.stack.opts.Seeded && v.stack.backend.Name() == "process" {
		g.TestSeed = strconv.FormatUint(detrand.Derive(v.stack.opts.Seed, fmt.Sprintf("guest/%s#%d", v.Name, v.boots)), 10)
	}
	var ctl *control
	if o.Control {
		g.ControlSocket = v.stack.Host.RunPath(fmt.Sprintf("ctl-%s-%d", v.Name, v.boots))
		if ctl, err = listenControl(g.ControlSocket); err != nil {
			closeFiles()
			return nil, err
		}
	}
	inst, err := v.stack.backend.Start(ctx, v, g)
	if err != nil {
		closeFiles()
		if ctl != nil {
			ctl.close()
		}
		return nil, err
	}
	go func() {
		_, _ = inst.Wait(context.WithoutCancel(ctx))
		closeFiles()
		if ctl != nil {
			ctl.close()
		}
	}()
	return &Running{Instance: inst, ctl: ctl}, nil
}

// TimedEvent is a guest event with the host's time of arrival: one line of a boot's
// NN-boot.events.jsonl in the VM's directory.
type TimedEvent struct {
	Time  time.Time      `json:"t"`
	Event protocol.Event `json:"event"`
}

// Reboot ends the VM's running boot, if any (Stop), and boots it again with a new boot
// request unless o.NoPrime.
func (v *VM) Reboot(ctx context.Context, running *Running, o BootOptions) (*GuestRun, error) {
	if running != nil {
		if _, err := running.Stop(ctx); err != nil {
			return nil, fmt.Errorf("stop %s: %w", v.Name, err)
		}
	}
	return v.Boot(ctx, o)
}

// Boot starts the VM and waits for the boot to end.
func (v *VM) Boot(ctx context.Context, o BootOptions) (*GuestRun, error) {
	inst, err := v.Start(ctx, o)
	if err != nil {
		return nil, err
	}
	return inst.Wait(ctx)
}

// Console returns the console file of the n-th boot (1-based; 0 = the latest).
func (v *VM) Console(n int) (string, error) {
	if n == 0 {
		n = v.boots
	}
	b, err := os.ReadFile(filepath.Join(v.Dir, fmt.Sprintf("%02d-boot.console", n)))
	return string(b), err
}

// Snapshot copies the state disk aside under label (the host's backup).
func (v *VM) Snapshot(label string) error { return copyFile(v.StateDisk, v.SnapshotPath(label)) }

// SnapshotPath is where Snapshot(label) keeps its copy.
func (v *VM) SnapshotPath(label string) string {
	return filepath.Join(v.Dir, "steps", "snapshot-"+label+".img")
}

// Restore puts a snapshot back as the state disk (a rollback by the host).
func (v *VM) Restore(label string) error { return v.LoadState(v.SnapshotPath(label)) }

// LoadState replaces the state disk with a copy of the file at path (any VM's disk).
func (v *VM) LoadState(path string) error { return copyFile(path, v.StateDisk) }

// Corrupt XORs mask into the state disk at offset.
func (v *VM) Corrupt(offset int64, mask byte) error {
	f, err := os.OpenFile(v.StateDisk, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, offset); err != nil {
		return fmt.Errorf("corrupt %s at %#x: %w", v.StateDisk, offset, err)
	}
	b[0] ^= mask
	if _, err := f.WriteAt(b, offset); err != nil {
		return err
	}
	return f.Sync()
}

// ZeroRange overwrites n bytes at offset with zeros.
func (v *VM) ZeroRange(offset int64, n int) error {
	f, err := os.OpenFile(v.StateDisk, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, n), offset); err != nil {
		return err
	}
	return f.Sync()
}

// Truncate cuts the state disk to size bytes.
func (v *VM) Truncate(size int64) error { return os.Truncate(v.StateDisk, size) }

// StateDiskSize is the state disk's current size.
func (v *VM) StateDiskSize() (int64, error) {
	fi, err := os.Stat(v.StateDisk)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// SetKernel replaces the kernel the firmware loads (an OS update or a tampered image).
func (v *VM) SetKernel(data []byte) error { return os.WriteFile(v.Kernel, data, 0o644) }

// KernelHash is the SHA-256 of the current kernel file.
func (v *VM) KernelHash() ([32]byte, error) {
	b, err := os.ReadFile(v.Kernel)
	if err != nil {
		return [32]byte{}, err
	}
	return sha256.Sum256(b), nil
}

// WriteSignedUpdate prepares a signed update of a Secure Boot policy variable in the VM's
// directory and returns the uefi-set action for it.
func (v *VM) WriteSignedUpdate(file, name string, sigs []uefivars.Signature, ts time.Time, appendWrite bool, signer *uefivars.Key) (string, error) {
	if v.Keys == nil {
		return "", errors.New("VM has no Secure Boot keys")
	}
	path := filepath.Join(v.Dir, file)
	if err := v.Keys.WriteUpdate(path, name, sigs, ts, appendWrite, signer); err != nil {
		return "", err
	}
	return "uefi-set=" + path, nil
}

// WriteUpdate stores an arbitrary variable update and returns the uefi-set action for it.
func (v *VM) WriteUpdate(file string, u uefivars.Update) (string, error) {
	b, err := json.Marshal(u)
	if err != nil {
		return "", err
	}
	path := filepath.Join(v.Dir, file)
	return "uefi-set=" + path, os.WriteFile(path, b, 0o644)
}

// Relaunch makes the host launch this VM differently at fakesnp (another image, policy, TCB
// or chip) while the verifier's registration stays as it was.
func (v *VM) Relaunch(ctx context.Context, change func(*fakesnp.LaunchSpec)) error {
	hd, err := hex.DecodeString(v.hj.HostData)
	if err != nil {
		return err
	}
	meas, err := hex.DecodeString(v.hj.Measurement)
	if err != nil {
		return err
	}
	v.boots++ // the relaunch gets its own name and socket
	spec := fakesnp.LaunchSpec{Name: fmt.Sprintf("%s-relaunch%d", v.Name, v.boots), Chip: v.hj.Chip, Measurement: meas,
		HostData: hd, Socket: v.stack.Host.RunPath(fmt.Sprintf("snp-%s-r%d.sock", v.Name, v.boots))}
	change(&spec)
	info, err := v.stack.Host.SNP.AddLaunch(ctx, spec)
	if err != nil {
		return err
	}
	hj := *v.hj
	hj.SNPSocket, hj.Launch, hj.Chip = info.Socket, spec.Name, spec.Chip
	hj.Measurement = hex.EncodeToString(spec.Measurement)
	v.hj = &hj
	return WriteHostJSON(v.HostJSON, &hj)
}

// SetFaults changes fakesnp's fault knobs for the VM's current launch.
func (v *VM) SetFaults(ctx context.Context, f fakesnp.Faults) error {
	return v.stack.Host.SNP.SetFaults(ctx, v.hj.Launch, f)
}

// Clone makes a second VM from v as a host would copy it: same registration and launch,
// copies of both disks, its own directory.
func (s *Stack) Clone(v *VM, name string) (*VM, error) {
	c := *v
	c.Name, c.Dir, c.boots = name, filepath.Join(s.opts.WorkDir, "vms", name), 0
	if err := os.MkdirAll(filepath.Join(c.Dir, "steps"), 0o755); err != nil {
		return nil, err
	}
	c.HostJSON = filepath.Join(c.Dir, "host.json")
	if err := WriteHostJSON(c.HostJSON, c.hj); err != nil {
		return nil, err
	}
	c.StateDisk = filepath.Join(c.Dir, "state.img")
	if err := copyFile(v.StateDisk, c.StateDisk); err != nil {
		return nil, fmt.Errorf("clone state disk: %w", err)
	}
	if v.DataDisk != "" {
		c.DataDisk = filepath.Join(c.Dir, "data.img")
		if err := copyFile(v.DataDisk, c.DataDisk); err != nil {
			return nil, fmt.Errorf("clone data disk: %w", err)
		}
	}
	s.mu.Lock()
	s.vms = append(s.vms, &c)
	s.mu.Unlock()
	return &c, nil
}

// SwapStateDisks exchanges two VMs' state disks.
func (s *Stack) SwapStateDisks(a, b *VM) error {
	tmp := a.StateDisk + ".swap"
	if err := os.Rename(a.StateDisk, tmp); err != nil {
		return err
	}
	if err := os.Rename(b.StateDisk, a.StateDisk); err != nil {
		return err
	}
	return os.Rename(tmp, b.StateDisk)
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o600)
}

// SNPSocket is the §4 channel of the VM's current launch.
func (v *VM) SNPSocket() string { return v.hj.SNPSocket }

// StateHeaders is the host's view of the state disk: both slot headers, read without a key.
func (v *VM) StateHeaders() ([statestore.SlotCount]statestore.HeaderInfo, error) {
	f, err := os.Open(v.StateDisk)
	if err != nil {
		return [statestore.SlotCount]statestore.HeaderInfo{}, err
	}
	defer f.Close()
	return statestore.InspectHeaders(f)
}
