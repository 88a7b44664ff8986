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
	var backend, workdir, binDir string
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the main job with readable progress: boot, reboot, rollback and clone refused",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch backend {
			case "process":
			case "qemu":
				return errors.New("backend qemu: not implemented yet (the QEMU backend is tracked as its own issue); use BACKEND=process")
			default:
				return fmt.Errorf("--backend %q: want process or qemu", backend)
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
			ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
			defer cancel()
			return runDemo(ctx, workdir, bins)
		},
	}
	cmd.Flags().StringVar(&backend, "backend", "process", "process (embedded) or qemu")
	cmd.Flags().StringVar(&workdir, "workdir", "demo-work", "scratch directory (wiped first)")
	cmd.Flags().StringVar(&binDir, "bin-dir", "", "where the server binaries are (default: beside svsm-e2e, then PATH)")
	return cmd
}

func runDemo(ctx context.Context, workdir string, bins harness.Binaries) (err error) {
	d := &demo{}
	fmt.Println("svsm-e2e demo — backend: process (every box is a real process on a real socket)")
	fmt.Println()
	var h *harness.Host
	defer func() {
		if h != nil {
			_ = h.Stop()
		}
		fmt.Println()
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "LAYER\tSTEP\tOUTCOME\tDETAIL")
		for _, r := range d.rows {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r[0], r[1], r[2], r[3])
		}
		tw.Flush()
		fmt.Println()
		fmt.Printf("Guest consoles: %s   host logs: %s\n", filepath.Join(workdir, "vm"), filepath.Join(workdir, "logs"))
	}()
	if bins.Guest == "" {
		return errors.New("svsm-guest binary not found (run `make build`)")
	}
	if err := d.step("host", "start fakesnp, svsm-verifier, svsm-proxy", func() (string, error) {
		var err error
		h, err = harness.StartHost(ctx, harness.HostOptions{WorkDir: workdir, Binaries: bins, Logger: daemon.Logger("demo", "text", "error")})
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("verifier %s, proxy %s", h.VerifierURL, h.ProxySocket), nil
	}); err != nil {
		return err
	}
	vmDir := filepath.Join(workdir, "vm")
	g := harness.GuestOptions{
		HostJSON: filepath.Join(vmDir, "host.json"), StateDisk: filepath.Join(vmDir, "state.img"),
		DataDisk: filepath.Join(vmDir, "data.img"), RecoveryFile: filepath.Join(vmDir, "recovery-passphrase"),
		UEFITemplate: filepath.Join(vmDir, "uefi-template.json"), Cmdline: "console=ttyS0 root=/dev/mapper/svsm-data",
	}
	if err := d.step("host", "launch VM 'demo', register it (secret v1), make a LUKS2 data disk and Secure Boot keys", func() (string, error) {
		hj, err := h.AddVM(ctx, harness.VMSetup{Name: "demo"})
		if err != nil {
			return "", err
		}
		if err := os.MkdirAll(vmDir, 0o755); err != nil {
			return "", err
		}
		if err := harness.WriteHostJSON(g.HostJSON, hj); err != nil {
			return "", err
		}
		recovery := []byte("demo recovery passphrase")
		if err := os.WriteFile(g.RecoveryFile, recovery, 0o600); err != nil {
			return "", err
		}
		if err := harness.NewDataDisk(ctx, g.DataDisk, 20, recovery, false); err != nil {
			return "", err
		}
		keys, err := harness.NewSecureBootKeys()
		if err != nil {
			return "", err
		}
		if err := keys.WriteTemplate(g.UEFITemplate); err != nil {
			return "", err
		}
		return "measurement " + hj.Measurement[:16] + "…, LUKS2 recovery keyslot only", nil
	}); err != nil {
		return err
	}
	console := func(name string) (*os.File, error) {
		return os.Create(filepath.Join(vmDir, name+".console"))
	}
	boot := func(name string, prime bool, disk string, actions ...string) (*harness.GuestRun, error) {
		if prime {
			if _, err := h.Admin.Prime(ctx, "demo"); err != nil {
				return nil, err
			}
		}
		c, err := console(name)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		o := g
		o.Console, o.Actions = c, actions
		if disk != "" {
			o.StateDisk = disk
		}
		return harness.RunGuest(ctx, bins.Guest, o)
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
				if ev.String("action") == "nv-increment" {
					parts = append(parts, fmt.Sprintf("NV counter %s", ev.Fields["nv_counter"]))
				}
			case "failed":
				parts = append(parts, fmt.Sprintf("FAILED CLOSED at %s layer: %s", ev.Layer, ev.Reason))
			}
		}
		return strings.Join(parts, "; ")
	}
	var ek string
	if err := d.step("guest", "boot 1 (first boot): attest, manufacture vTPM, enroll keys, seal LUKS key", func() (string, error) {
		r, err := boot("boot1", true, "", "nv-increment")
		if err != nil {
			return "", err
		}
		if r.ExitCode != 0 {
			return "", fmt.Errorf("boot failed: %s", summary(r))
		}
		if ev, ok := r.Find("tpm-manufactured"); ok {
			ek = ev.String("ek_hash")
		}
		return summary(r), nil
	}); err != nil {
		return err
	}
	saved := filepath.Join(vmDir, "state-after-boot1.img")
	if err := d.step("host", "snapshot the state disk (for the rollback attack later)", func() (string, error) {
		b, err := os.ReadFile(g.StateDisk)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("%d bytes copied", len(b)), os.WriteFile(saved, b, 0o600)
	}); err != nil {
		return err
	}
	if err := d.step("guest", "boot 2 (reboot): restore vTPM from encrypted state, unseal LUKS key", func() (string, error) {
		r, err := boot("boot2", true, "", "nv-increment")
		if err != nil {
			return "", err
		}
		if r.ExitCode != 0 {
			return "", fmt.Errorf("boot failed: %s", summary(r))
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
		old := filepath.Join(vmDir, "rolled-back.img")
		b, err := os.ReadFile(saved)
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(old, b, 0o600); err != nil {
			return "", err
		}
		r, err := boot("rollback", true, old)
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
		clone := filepath.Join(vmDir, "clone-state.img")
		b, err := os.ReadFile(g.StateDisk)
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(clone, b, 0o600); err != nil {
			return "", err
		}
		// The owner primed one boot for the rollback attempt above, which consumed it.
		r, err := boot("clone", false, clone)
		if err != nil {
			return "", err
		}
		if r.ExitCode == 0 || r.Last().Reason != "attestation-failed" {
			return "", fmt.Errorf("clone was not refused: %s", summary(r))
		}
		evs, err := h.Admin.Audit(ctx, "demo", 0)
		if err != nil || len(evs) == 0 {
			return "", fmt.Errorf("audit: %v", err)
		}
		last := evs[len(evs)-1]
		return "no key released; verifier audit: " + last.Event + " " + last.Outcome + " — " + strings.SplitN(last.Reason, " (", 2)[0], nil
	})
}
