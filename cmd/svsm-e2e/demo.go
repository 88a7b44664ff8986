package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
	"github.com/svsm-e2e/svsm-e2e/qemu"
)

// demo walks the stack step by step and prints what each layer saw.
type demo struct {
	rows [][4]string
}

func (d *demo) step(layer, what string, f func() (string, error)) error {
	fmt.Printf("▶ [%-8s] %s\n", layer, what)
	out, err := f()
	outcome := "ok"
	if err != nil {
		outcome = "FAILED"
		out = err.Error()
	}
	fmt.Printf("  %s: %s\n", outcome, out)
	d.rows = append(d.rows, [4]string{layer, what, outcome, out})
	return err
}

func demoCmd() *cobra.Command {
	var backend, workdir, binDir, qemuBin, profile, igvmFile string
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the main job with readable progress: boot, reboot, rollback and clone refused",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch backend {
			case "process", "qemu", "coconut":
			default:
				return fmt.Errorf("--backend %q: want process, qemu or coconut", backend)
			}
			workdir, _ = filepath.Abs(workdir)
			if err := os.RemoveAll(workdir); err != nil {
				return err
			}
			bins, err := harness.FindBinaries(binDir)
			if err != nil {
				return err
			}
			ctx, stop := daemon.SignalContext()
			defer stop()
			ctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
			defer cancel()
			if backend == "coconut" {
				o, reason := harness.FindCoconut(".")
				if qemuBin != "" {
					o.QEMU = qemuBin
				}
				if igvmFile != "" {
					o.IGVM = igvmFile
				}
				if profile != "" {
					o.Profile = qemu.Profile(profile)
				}
				if qemuBin != "" || igvmFile != "" || profile != "" {
					o, reason = harness.CheckCoconut(o)
				}
				if reason != "" {
					return fmt.Errorf("the coconut backend cannot run here: %s", reason)
				}
				return runCoconutDemo(ctx, workdir, bins, o)
			}
			if qemuBin == "" {
				qemuBin = os.Getenv(harness.EnvQEMU)
			}
			return runDemo(ctx, workdir, bins, backend, harness.QEMUOptions{Binary: qemuBin, Profile: qemu.Profile(profile)})
		},
	}
	cmd.Flags().StringVar(&backend, "backend", "process", "process (embedded), qemu, or coconut (upstream's real SVSM; see README)")
	cmd.Flags().StringVar(&workdir, "workdir", "demo-work", "scratch directory (wiped first)")
	cmd.Flags().StringVar(&binDir, "bin-dir", "", "where the server binaries are (default: beside svsm-e2e, then PATH)")
	cmd.Flags().StringVar(&qemuBin, "qemu", "", "QEMU binary (qemu and coconut backends)")
	cmd.Flags().StringVar(&profile, "profile", "", "machine profile: microvm or q35 (qemu backend), coconut-nocc or coconut (coconut backend)")
	cmd.Flags().StringVar(&igvmFile, "igvm", "", "coconut backend: the COCONUT-SVSM IGVM to boot")
	return cmd
}

// startStack is every demo's first host step: fakesnp, svsm-verifier and svsm-proxy as
// processes, seed 1, errors only in the log.
func (d *demo) startStack(ctx context.Context, o harness.StackOptions) (*harness.Stack, error) {
	o.Seed, o.Logger = 1, daemon.Logger("demo", "text", "error")
	var s *harness.Stack
	err := d.step("host", "start fakesnp, svsm-verifier, svsm-proxy", func() (string, error) {
		var err error
		if s, err = harness.NewStack(ctx, o); err != nil {
			return "", err
		}
		return fmt.Sprintf("verifier %s, proxy %s", s.Host.VerifierURL, s.ProxySocket()), nil
	})
	return s, err
}

// table prints the summary of the steps taken.
func (d *demo) table(workdir string) {
	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYER\tSTEP\tOUTCOME\tDETAIL")
	for _, r := range d.rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r[0], r[1], r[2], r[3])
	}
	tw.Flush()
	fmt.Println()
	fmt.Printf("Everything (consoles, host logs, verifier audit): %s\n", workdir)
}

// runCoconutDemo boots upstream's real COCONUT-SVSM against our host side: it attests for
// real, then a clone without a boot request is refused.
func runCoconutDemo(ctx context.Context, workdir string, bins harness.Binaries, o harness.CoconutOptions) error {
	d := &demo{}
	fmt.Printf("svsm-e2e demo — backend: coconut (upstream's COCONUT-SVSM, profile %s)\n\n", o.Profile)
	fmt.Printf("QEMU %s\nIGVM %s\n\n", o.QEMU, o.IGVM)
	var s *harness.Stack
	defer func() {
		if s != nil {
			_ = s.CollectArtifacts(context.WithoutCancel(ctx))
			_ = s.Close()
		}
		d.table(workdir)
	}()
	var err error
	if s, err = d.startStack(ctx, harness.StackOptions{WorkDir: workdir, Binaries: bins}); err != nil {
		return err
	}
	var v *harness.CoconutVM
	if err := d.step("host", "measure the SVSM's IGVM with our code, launch it at fakesnp, register it (raw secret)", func() (string, error) {
		var err error
		v, err = s.NewCoconutVM(ctx, "svsm", o)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("launch digest %x…", v.Measurement[:8]), nil
	}); err != nil {
		return err
	}
	lines := func(r *harness.CoconutRun, markers ...string) string {
		var out []string
		for _, m := range markers {
			if l := r.Line(m); l != "" {
				out = append(out, l)
			}
		}
		return strings.Join(out, " | ")
	}
	if err := d.step("svsm", "boot the real SVSM with a primed boot request", func() (string, error) {
		r, err := v.Boot(ctx, harness.CoconutBootOptions{})
		if err != nil {
			return "", err
		}
		if !r.Has(harness.MarkerAttested) {
			return "", fmt.Errorf("no attestation (%s): %s", r.Outcome, lines(r, harness.MarkerPanic, "unwrap"))
		}
		return fmt.Sprintf("%s (%.1f s)", lines(r, harness.MarkerReport, harness.MarkerAttested, harness.MarkerInitDone), r.Duration.Seconds()), nil
	}); err != nil {
		return err
	}
	return d.step("attack", "clone: a second real SVSM without a new boot request", func() (string, error) {
		r, err := v.Boot(ctx, harness.CoconutBootOptions{NoPrime: true})
		if err != nil {
			return "", err
		}
		if r.Has(harness.MarkerAttested) {
			return "", errors.New("the clone got the key")
		}
		evs, err := s.Audit(ctx, v.Registration)
		if err != nil || len(evs) == 0 {
			return "", fmt.Errorf("audit: %v", err)
		}
		last := evs[len(evs)-1]
		return fmt.Sprintf("refused; verifier audit: %s %s — %s; the SVSM: %s", last.Event, last.Outcome,
			strings.SplitN(last.Reason, " (", 2)[0], lines(r, "unwrap()")), nil
	})
}

func runDemo(ctx context.Context, workdir string, bins harness.Binaries, backendName string, qo harness.QEMUOptions) (err error) {
	d := &demo{}
	fmt.Printf("svsm-e2e demo — backend: %s (every box is a real process on a real socket)\n\n", backendName)
	var backend harness.Backend
	bootActions := []string{"nv-increment"}
	if backendName == "qemu" {
		if err := d.step("host", "probe QEMU and build the guest image (kernel from apt, initramfs with svsm-guest as /init)", func() (string, error) {
			qo.Guest = bins.Guest
			q, err := harness.NewQEMUBackend(ctx, qo)
			if err != nil {
				return "", err
			}
			backend = q
			return q.Caps.Binary + ": " + q.Choice.Reason + "; image " + q.Image.Hash, nil
		}); err != nil {
			return err
		}
		bootActions = append(bootActions, "data-write=written through dm-crypt", "data-read")
	}
	var s *harness.Stack
	defer func() {
		if s != nil {
			_ = s.CollectArtifacts(context.WithoutCancel(ctx))
			_ = s.Close()
		}
		d.table(workdir)
	}()
	if bins.Guest == "" {
		return errors.New("svsm-guest binary not found (run `make build`)")
	}
	if s, err = d.startStack(ctx, harness.StackOptions{WorkDir: workdir, Binaries: bins, Backend: backend}); err != nil {
		return err
	}
	var vm *harness.VM
	if err := d.step("host", "build the IGVM launch image, launch VM 'demo', register its digest, make a LUKS2 disk and Secure Boot keys", func() (string, error) {
		var err error
		vm, err = s.NewVM(ctx, harness.VMOptions{Name: "demo"})
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("launch digest %x…; LUKS2 disk with a recovery keyslot only; PK/KEK/db template", vm.Measurement[:8]), nil
	}); err != nil {
		return err
	}
	summary := func(r *harness.GuestRun) string {
		var parts []string
		for _, ev := range r.Events {
			switch ev.Event {
			case "attested":
				parts = append(parts, fmt.Sprintf("attested (state must hold %s)", ev.Fields["expected_counter"]))
			case "tpm-manufactured", "tpm-restored":
				parts = append(parts, ev.Event+" EK "+ev.String("ek_hash")[:12]+"…")
			case "confirmed":
				parts = append(parts, fmt.Sprintf("counter %s confirmed", ev.Fields["counter"]))
			case "measured":
				parts = append(parts, fmt.Sprintf("measured boot (Secure Boot %v)", ev.Fields["secure_boot"]))
			case "fde-enrolled":
				parts = append(parts, "LUKS key sealed to PCRs 4,7,8,9")
			case "fde-unlocked":
				parts = append(parts, "LUKS unlocked by "+ev.String("method"))
			case "action":
				switch ev.String("action") {
				case "nv-increment":
					parts = append(parts, fmt.Sprintf("NV counter %s", ev.Fields["nv_counter"]))
				case "data-read":
					parts = append(parts, fmt.Sprintf("data disk reads %q", ev.String("data")))
				}
			case "failed":
				parts = append(parts, fmt.Sprintf("FAILED CLOSED at %s layer: %s", ev.Layer, ev.Reason))
			}
		}
		return strings.Join(parts, "; ")
	}
	bootOK := func(r *harness.GuestRun, err error) (*harness.GuestRun, error) {
		if err != nil {
			return nil, err
		}
		if r.ExitCode != 0 {
			return nil, fmt.Errorf("boot failed: %s", summary(r))
		}
		return r, nil
	}
	var ek string
	if err := d.step("guest", "boot 1 (first boot): attest, manufacture vTPM, enroll keys, seal LUKS key", func() (string, error) {
		r, err := bootOK(vm.Boot(ctx, harness.BootOptions{Actions: bootActions}))
		if err != nil {
			return "", err
		}
		if ev, ok := r.Find("tpm-manufactured"); ok {
			ek = ev.String("ek_hash")
		}
		return summary(r), nil
	}); err != nil {
		return err
	}
	if err := d.step("host", "snapshot the state disk (for the rollback attack later)", func() (string, error) {
		return "kept as " + vm.SnapshotPath("after-boot1"), vm.Snapshot("after-boot1")
	}); err != nil {
		return err
	}
	if err := d.step("guest", "boot 2 (reboot): restore vTPM from encrypted state, unseal LUKS key", func() (string, error) {
		r, err := bootOK(vm.Boot(ctx, harness.BootOptions{Actions: bootActions}))
		if err != nil {
			return "", err
		}
		if ev, ok := r.Find("tpm-restored"); !ok || ev.String("ek_hash") != ek {
			return "", errors.New("vTPM identity not restored")
		}
		if ev, ok := r.Find("fde-unlocked"); !ok || ev.String("method") != "tpm" {
			return "", errors.New("LUKS key did not unseal")
		}
		return summary(r) + "; same EK", nil
	}); err != nil {
		return err
	}
	if err := d.step("attack", "rollback: host boots the state disk saved after boot 1", func() (string, error) {
		if err := vm.Snapshot("current"); err != nil {
			return "", err
		}
		if err := vm.Restore("after-boot1"); err != nil {
			return "", err
		}
		defer func() { _ = vm.Restore("current") }()
		r, err := vm.Boot(ctx, harness.BootOptions{})
		if err != nil {
			return "", err
		}
		if last := r.Last(); r.ExitCode == 0 || last.Reason != "stale-state" {
			return "", fmt.Errorf("rollback was not refused: %s", summary(r))
		}
		return "refused by the guest: " + r.Last().String("detail"), nil
	}); err != nil {
		return err
	}
	return d.step("attack", "clone: host starts a copy of the VM without a new boot request", func() (string, error) {
		clone, err := s.Clone(vm, "demo-clone")
		if err != nil {
			return "", err
		}
		// The owner primed one boot for the rollback attempt above, which consumed it.
		r, err := clone.Boot(ctx, harness.BootOptions{NoPrime: true})
		if err != nil {
			return "", err
		}
		if r.ExitCode == 0 || r.Last().Reason != "attestation-failed" {
			return "", fmt.Errorf("clone was not refused: %s", summary(r))
		}
		evs, err := s.Audit(ctx, vm.Registration)
		if err != nil || len(evs) == 0 {
			return "", fmt.Errorf("audit: %v", err)
		}
		last := evs[len(evs)-1]
		return "no key released; verifier audit: " + last.Event + " " + last.Outcome + " — " + strings.SplitN(last.Reason, " (", 2)[0], nil
	})
}
