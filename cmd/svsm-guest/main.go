// Command svsm-guest is the simulated confidential VM (PROTOCOLS.md §7): it boots once —
// SVSM attestation and state, vTPM, UEFI variables, measured boot, FDE — runs workload
// actions, and powers off, printing one "SVSM-E2E-EVENT {json}" line per step on stdout.
// Exit status: 0 booted and shut down cleanly; 1 failed closed (the last event names the
// reason); 2 usage error.
package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/svsm-e2e/svsm-e2e/guest"
	"github.com/svsm-e2e/svsm-e2e/guestos"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
	"github.com/svsm-e2e/svsm-e2e/internal/detrand"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm/vtpm"
)

const (
	exitFailed = 1
	exitUsage  = 2
)

func main() {
	if os.Getpid() == 1 {
		guest.RunInit() // the /init of a QEMU guest: settings come from the config disk
	}
	root := &cobra.Command{
		Use:          "svsm-guest",
		Short:        "Simulated SVSM guest: attestation, encrypted state, vTPM, UEFI variables, measured boot, FDE",
		SilenceUsage: true, SilenceErrors: true,
	}
	root.AddCommand(runCmd())
	if err := root.Execute(); err != nil {
		var f *guest.Failure
		if errors.As(err, &f) {
			fmt.Fprintln(os.Stderr, "svsm-guest: failed closed:", err)
			os.Exit(exitFailed)
		}
		fmt.Fprintln(os.Stderr, "svsm-guest:", err)
		os.Exit(exitUsage)
	}
}

func runCmd() *cobra.Command {
	var hostJSON, then, recoveryFile, controlSocket, testSeed string
	cfg := guest.Config{Out: os.Stdout}
	cmd := &cobra.Command{
		Use:   "run --host-json FILE --state-disk FILE [--data-disk FILE] [--then ACTIONS]",
		Short: "Boot once against a host side, run ACTIONS, power off",
		Long: `Boot the simulated VM once against the host side described by host.json (svsm-e2e host up),
run the workload actions and power off. A state disk that does not exist or is all zeros is a
first boot. Events go to stdout, one per line: SVSM-E2E-EVENT {"event":..,"layer":..}.

` + guestos.ActionHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if hostJSON == "" || cfg.StateDisk == "" {
				return errors.New("--host-json and --state-disk are required")
			}
			hj, err := protocol.ReadHostJSON(hostJSON)
			if err != nil {
				return err
			}
			cfg.ProxySocket, cfg.SNPSocket = hj.ProxySocket, hj.SNPSocket
			if cfg.Actions, err = guestos.ParseActions(then); err != nil {
				return err
			}
			if recoveryFile != "" {
				b, err := os.ReadFile(recoveryFile)
				if err != nil {
					return fmt.Errorf("recovery passphrase: %w", err)
				}
				cfg.RecoveryPassphrase = []byte(strings.TrimRight(string(b), "\r\n"))
			}
			if controlSocket != "" {
				c, err := net.DialTimeout("unix", controlSocket, 10*time.Second)
				if err != nil {
					return fmt.Errorf("control channel: %w", err)
				}
				defer c.Close()
				cfg.Control = c
			}
			if seed, ok, err := detrand.ParseSeed(testSeed); err != nil {
				return err
			} else if ok {
				// Process-wide, before anything draws: crypto/rand and the vTPM's C entropy.
				if err := detrand.Install(seed, "guest"); err != nil {
					return err
				}
				if err := vtpm.SetSeed(detrand.Key(seed, "vtpm")); err != nil {
					return err
				}
			}
			ctx, stop := daemon.SignalContext()
			defer stop()
			_, err = guest.Run(ctx, cfg)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&hostJSON, "host-json", "", "host.json written by svsm-e2e host up (PROTOCOLS.md §6)")
	f.StringVar(&cfg.StateDisk, "state-disk", "", "state disk image (created on first boot)")
	f.StringVar(&cfg.DataDisk, "data-disk", "", "LUKS2 data disk image to unlock")
	f.StringVar(&then, "then", "", "comma-separated workload actions (listed above)")
	f.StringVar(&recoveryFile, "recovery-passphrase-file", "", "LUKS recovery passphrase (what a user would type)")
	f.StringVar(&cfg.Kernel, "kernel", "", "kernel file the firmware measures (default: this executable)")
	f.StringVar(&cfg.Initrd, "initrd", "", "initrd file the firmware measures")
	f.StringVar(&cfg.Cmdline, "cmdline", "console=ttyS0", "kernel command line the firmware measures")
	f.StringVar(&cfg.UEFITemplate, "uefi-template", "", "JSON variable updates enrolled on first boot (Secure Boot keys)")
	f.DurationVar(&cfg.AttestTimeout, "attest-timeout", 60*time.Second, "bound on attestation and each confirmation")
	f.StringVar(&controlSocket, "control-socket", "", "unix socket of the control channel: one action per line after --then (poweroff/reboot ends)")
	f.StringVar(&cfg.CrashAfter, "crash-after", "", "fault injection: SIGKILL itself right after the event EVENT[=WHY|ACTION]")
	f.StringVar(&testSeed, "test-seed", "", detrand.FlagHelp)
	f.StringVar(&cfg.CrashAt, "crash-at", "", "fault injection: cut the power at a registered write point NAME[#n][:torn] (svsm-e2e crash-points lists them)")
	return cmd
}
