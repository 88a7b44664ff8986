package harness_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/images"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/qemu"
)

// BenchmarkBootToUnlocked measures, per backend, profile and accelerator, the time from
// starting a boot to the guest's fde-unlocked event (attestation, state, vTPM, measured
// boot, LUKS unlock). It reports s/boot; `make bench` runs it.
func BenchmarkBootToUnlocked(b *testing.B) {
	type variant struct {
		name    string
		profile qemu.Profile // "" = process backend
		binary  string
		kernel  bool // -kernel even where igvm-cfg exists
	}

	variants := []variant{{"process", "", "", false}, {"qemu-microvm", qemu.Microvm, "", false}, {"qemu-q35", qemu.Q35, "", false}}
	if shared := "../../shared/tools/qemu-igvm/bin/qemu-system-x86_64"; fileExists(shared) {
		// The same profile and QEMU, booted from the IGVM launch image vs from -kernel.
		variants = append(variants, variant{"qemu-q35-igvm", qemu.Q35, shared, false}, variant{"qemu-q35-kernel-same-qemu", qemu.Q35, shared, true})
	}
	for _, v := range variants {
		b.Run(v.name, func(b *testing.B) {
			ctx := context.Background()
			var backend harness.Backend
			var qb *harness.QEMUBackend
			if v.profile != "" {
				q, err := harness.NewQEMUBackend(ctx, harness.QEMUOptions{Guest: bins.Guest, Profile: v.profile, Binary: v.binary, KernelBoot: v.kernel})
				if err != nil {
					b.Fatalf("qemu backend: %v", err)
				}
				backend, qb = q, q
				b.Logf("%s", q.Choice.Reason)
			}
			s, err := harness.NewStack(ctx, harness.StackOptions{WorkDir: b.TempDir(), Binaries: bins, CADir: sharedCA(b), Backend: backend})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			vm, err := s.NewVM(ctx, harness.VMOptions{Name: "bench"})
			if err != nil {
				b.Fatal(err)
			}
			// One boot: its time from start to fde-unlocked and its phases.
			boot := func(i int) (time.Duration, map[string]time.Duration) {
				start := time.Now()
				inst, err := vm.Start(ctx, harness.BootOptions{})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := inst.WaitForEvent(ctx, 3*time.Minute, func(e protocol.Event) bool { return e.Event == "fde-unlocked" }); err != nil {
					b.Fatal(err)
				}
				took := time.Since(start)
				b.StopTimer()
				defer b.StartTimer()
				run, err := inst.Wait(ctx)
				if err != nil || run.ExitCode != 0 {
					b.Fatalf("boot %d: %v %+v", i, err, run.Last())
				}
				return took, bootPhases(start, run, qb != nil)
			}
			phaseLine := func(phases map[string]time.Duration, n int) string {
				var parts []string
				for _, ph := range phaseOrder {
					parts = append(parts, fmt.Sprintf("%s %.2f s", ph, phases[ph].Seconds()/float64(n)))
				}
				if up, ok := phases[guestClockAtStart]; ok {
					parts = append(parts, fmt.Sprintf("(%s %.2f s)", guestClockAtStart, up.Seconds()/float64(n)))
				}
				return strings.Join(parts, ", ")
			}
			// The bare twin boots -kernel; a VM booted from its IGVM image has none. Its boots
			// alternate with the VM's, so that both see the machine at the same speed (it
			// drifts by several percent within minutes on a shared host).
			bareInitrd := ""
			if qb != nil && !qb.IGVMBoot {
				var err error
				if bareInitrd, err = buildBareInitrd(ctx, b.TempDir()); err != nil {
					b.Fatal(err)
				}
			}
			var bare time.Duration
			bareOnce := func() {
				if bareInitrd == "" {
					return
				}
				b.StopTimer()
				defer b.StartTimer()
				d, err := bareBoot(ctx, qb, bareInitrd)
				if err != nil {
					b.Fatalf("bare boot: %v", err)
				}
				bare += d
			}
			// The first boot provisions (manufactures the vTPM, enrolls Secure Boot keys and
			// the LUKS TPM keyslot): reported apart from the boots every later start costs.
			first, firstPhases := boot(0)
			var total time.Duration
			phases := map[string]time.Duration{}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				took, ph := boot(i + 1)
				total += took
				for name, d := range ph {
					phases[name] += d
				}
				bareOnce()
			}
			mean := total.Seconds() / float64(b.N)
			b.ReportMetric(mean, "s/boot-to-unlocked")
			fmt.Printf("%s: %.2f s from start to LUKS unlocked (mean of %d boots after the first; the first, which provisions, %.2f s)\n", v.name, mean, b.N, first.Seconds())
			fmt.Printf("%s: phases (the first to the host's receipt of the first event, the others by the guest's clock): %s; first boot: %s\n", v.name, phaseLine(phases, b.N), phaseLine(firstPhases, 1))
			if bareInitrd != "" {
				bareMean := bare.Seconds() / float64(b.N)
				b.ReportMetric(mean/bareMean, "x-bare-boot")
				b.ReportMetric(first.Seconds()/bareMean, "x-bare-boot-first")
				fmt.Printf("%s: a bare boot of the same kernel and profile (%d vCPUs) with a trivial init takes %.2f s (mean of %d, each after one of the VM's): boot-to-unlocked is %.2f× it (target 1.5), the first boot %.2f×\n",
					v.name, qb.CPUs(), bareMean, b.N, mean/bareMean, first.Seconds()/bareMean)
			}
		})
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// phaseOrder names a boot's phases, each ending at an event (bootPhases); "guest clock at
// boot-start" is not a phase but the guest's uptime at its first event (in a VM: its kernel,
// /init and the drivers, the part of the first phase the guest itself saw).
var phaseOrder = []string{"kernel+initramfs", "attestation", "state", "vTPM+UEFI", "measured boot", "LUKS unlock"}

// guestClockAtStart keys the guest's uptime at its first event in bootPhases' map.
const guestClockAtStart = "guest clock at boot-start"

// bootPhases splits a boot into phases ending at its events: the first event (boot-start:
// the kernel and the initramfs are up), attested, state-opened, measured (vTPM and UEFI
// variables loaded before it), fde-unlocked. The first phase runs from start to the host's
// receipt of the first event; the others are measured with the guest's own clock (each
// event's uptime: the console's delay to the host left out), the host's receipt times when
// an event has none. In a VM (vm), the guest's uptime at its first event is reported too.
func bootPhases(start time.Time, run *harness.GuestRun, vm bool) map[string]time.Duration {
	ends := []string{"boot-start", "attested", "state-opened", "uefi-vars-loaded", "measured", "fde-unlocked"}
	out := map[string]time.Duration{}
	prev, prevUp, prevHasUp := start, time.Duration(0), false
	for i, ev := range ends {
		for j, e := range run.Events {
			if e.Event != ev || j >= len(run.Arrived) {
				continue
			}
			up, hasUp := e.Uptime()
			switch {
			case i > 0 && hasUp && prevHasUp:
				out[phaseOrder[i]] = up - prevUp
			default:
				out[phaseOrder[i]] = run.Arrived[j].Sub(prev)
			}
			if i == 0 && vm && hasUp {
				out[guestClockAtStart] = up
			}
			prev, prevUp, prevHasUp = run.Arrived[j], up, hasUp
			break
		}
	}
	return out
}

// buildBareInitrd writes, in dir, the initramfs of a bare boot: a trivial static init that
// prints a marker and powers off.
func buildBareInitrd(ctx context.Context, dir string) (string, error) {
	src := filepath.Join(dir, "init.go")
	if err := os.WriteFile(src, []byte(bareInit), 0o644); err != nil {
		return "", err
	}
	initBin := filepath.Join(dir, "init")
	build := exec.CommandContext(ctx, "go", "build", "-o", initBin, src)
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the trivial init: %v\n%s", err, out)
	}
	initData, err := os.ReadFile(initBin)
	if err != nil {
		return "", err
	}
	var buf bytes.Buffer
	c := images.NewCPIO(&buf)
	c.Dir("dev")
	c.CharDev("dev/console", 0o600, 5, 1)
	c.File("init", 0o755, initData)
	if err := c.Close(); err != nil {
		return "", err
	}
	initrd := filepath.Join(dir, "bare.cpio")
	return initrd, os.WriteFile(initrd, buf.Bytes(), 0o644)
}

// bareBoot boots the QEMU backend's kernel, on its profile and accelerator, with the bare
// initramfs (buildBareInitrd), and returns the time from starting QEMU to the init's marker
// (the floor under any guest on this machine).
func bareBoot(ctx context.Context, q *harness.QEMUBackend, initrd string) (time.Duration, error) {
	sock, err := os.MkdirTemp("", "bare-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(sock)
	con := filepath.Join(sock, "con")
	ln, err := net.Listen("unix", con)
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	m := &qemu.Machine{Profile: q.Choice.Profile, Accel: q.Choice.Accel, CPUs: q.CPUs(), Kernel: q.Image.Kernel.Vmlinux, Initrd: initrd,
		Cmdline: q.Cmdline(""), Console: con, QMP: filepath.Join(sock, "qmp")}
	start := time.Now()
	p, err := qemu.Start(q.Caps.Binary, m)
	if err != nil {
		return 0, err
	}
	defer p.Kill()
	marked := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			marked <- err
			return
		}
		defer c.Close()
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			if strings.Contains(sc.Text(), bareMarker) {
				marked <- nil
				return
			}
		}
		marked <- fmt.Errorf("console closed without %q", bareMarker)
	}()
	select {
	case err := <-marked:
		if err != nil {
			return 0, err
		}
		return time.Since(start), nil
	case <-time.After(3 * time.Minute):
		return 0, errors.New("no marker within 3 minutes")
	}
}

const bareMarker = "SVSM-E2E-BARE-INIT-UP"

// bareInit is the trivial init: a static Go program, like svsm-guest, that does nothing.
const bareInit = `package main

import (
	"fmt"
	"syscall"
)

func main() {
	fmt.Println("` + bareMarker + `")
	syscall.Sync()
	_ = syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}
`
