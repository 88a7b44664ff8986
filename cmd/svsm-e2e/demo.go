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
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm/attest"
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
		Short: "Run the main job with readable progress: host side up, attest, release once, clone refused",
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
		fmt.Println("Not shown yet: the guest's encrypted state, vTPM, UEFI variables and LUKS unlock, and the")
		fmt.Println("guest-side rollback refusal; they arrive with svsm-guest (see README, \"Status\").")
		fmt.Printf("Logs: %s\n", filepath.Join(workdir, "logs"))
	}()
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
	var hj *protocol.HostJSON
	if err := d.step("host", "launch VM 'demo', register it (secret v1), prime boot 1", func() (string, error) {
		var err error
		hj, err = h.AddVM(ctx, harness.VMSetup{Name: "demo", Prime: true})
		if err != nil {
			return "", err
		}
		return "measurement " + hj.Measurement[:16] + "…", nil
	}); err != nil {
		return err
	}
	boot := func() (*protocol.SecretPayloadV1, error) {
		actx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		res, err := harness.Attest(actx, hj)
		if err != nil {
			return nil, err
		}
		var p protocol.SecretPayloadV1
		if err := p.UnmarshalBinary(res.Secret); err != nil {
			return nil, err
		}
		return &p, nil
	}
	confirm := func(p *protocol.SecretPayloadV1, counter uint64) (*protocol.ConfirmResponse, error) {
		return harness.Confirm(ctx, hj, p.ConfirmKey[:], p.BootID[:], counter)
	}
	var p1 *protocol.SecretPayloadV1
	if err := d.step("svsm", "boot 1: attest through the proxy (P-521 key bound in REPORT_DATA)", func() (string, error) {
		var err error
		p1, err = boot()
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("secret unwrapped; state must hold counter %d, advance to %d", p1.ExpectedCounter, p1.NextCounter), nil
	}); err != nil {
		return err
	}
	if err := d.step("svsm", "boot 1: confirm the advanced counter (protocol 0.2.0)", func() (string, error) {
		r, err := confirm(p1, p1.NextCounter)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("verifier counter now %d", r.Counter), nil
	}); err != nil {
		return err
	}
	if err := d.step("attack", "clone: a second instance attests without a new boot request", func() (string, error) {
		_, err := boot()
		if !errors.Is(err, attest.ErrRefused) {
			return "", fmt.Errorf("clone was not refused: %v", err)
		}
		evs, err := h.Admin.Audit(ctx, "demo", 0)
		if err != nil || len(evs) == 0 {
			return "", fmt.Errorf("audit: %v", err)
		}
		last := evs[len(evs)-1]
		return "refused; verifier audit: " + last.Event + " " + last.Outcome + " — " + strings.SplitN(last.Reason, " (", 2)[0], nil
	}); err != nil {
		return err
	}
	var p2 *protocol.SecretPayloadV1
	if err := d.step("host", "owner primes boot 2; svsm attests again", func() (string, error) {
		if _, err := h.Admin.Prime(ctx, "demo"); err != nil {
			return "", err
		}
		var err error
		p2, err = boot()
		if err != nil {
			return "", err
		}
		if p2.StateKey != p1.StateKey {
			return "", errors.New("state key changed between boots")
		}
		return fmt.Sprintf("same state key; state must now hold counter %d", p2.ExpectedCounter), nil
	}); err != nil {
		return err
	}
	return d.step("attack", "replay: boot 1's confirmation key tries to move the counter", func() (string, error) {
		_, err := confirm(p1, p2.NextCounter)
		if err == nil {
			return "", errors.New("stale confirmation accepted")
		}
		return "refused: " + strings.TrimPrefix(err.Error(), "attestation confirm: refused: "), nil
	})
}
