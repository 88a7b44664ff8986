package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/qemu"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

func hostCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "host", Short: "Run or drive a host side (fakesnp + verifier + proxy)"}
	cmd.AddCommand(hostUpCmd(), hostPrimeCmd())
	return cmd
}

func decodeHexFlag(name, s string, size int) ([]byte, error) {
	if s == "" {
		return nil, nil
	}
	b, err := hex.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("--%s: %w", name, err)
	}
	if len(b) != size {
		return nil, fmt.Errorf("--%s: %d bytes, want %d (%d hex digits)", name, len(b), size, 2*size)
	}
	return b, nil
}

func hostUpCmd() *cobra.Command {
	var workdir, vm, measurement, hostData, secretMode, binDir, igvmFile, qemuBin, profile string
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Start fakesnp, svsm-verifier and svsm-proxy; register the VM; prime one boot; write DIR/host.json",
		Long: `Starts the host side of the stack and runs until SIGINT/SIGTERM, then stops all three.
A guest attests through proxy_socket (PROTOCOLS.md §1) and gets reports from snp_socket (§4),
both listed in DIR/host.json. With --secret-mode raw the released secret is exactly the 32-byte
state key, as upstream COCONUT-SVSM expects.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			meas, err := decodeHexFlag("measurement", measurement, 48)
			if err != nil {
				return err
			}
			if igvmFile != "" {
				if measurement != "" {
					return errors.New("give --measurement or --igvm, not both")
				}
				if meas, err = igvmDigest(igvmFile); err != nil {
					return err
				}
			}
			hd, err := decodeHexFlag("host-data", hostData, 32)
			if err != nil {
				return err
			}
			if secretMode != protocol.SecretModeRaw && secretMode != protocol.SecretModeV1 {
				return fmt.Errorf("--secret-mode %q: want raw or v1", secretMode)
			}
			if workdir, err = filepath.Abs(workdir); err != nil {
				return err
			}
			bins, err := harness.FindBinaries(binDir)
			if err != nil {
				return err
			}
			ctx, stop := daemon.SignalContext()
			defer stop()
			log := daemon.Logger("svsm-e2e", "text", "warn")
			h, err := harness.StartHost(ctx, harness.HostOptions{WorkDir: workdir, Binaries: bins, Logger: log})
			if err != nil {
				return err
			}
			defer func() {
				fmt.Println("svsm-e2e host: stopping fakesnp, svsm-verifier, svsm-proxy")
				if err := h.Stop(); err != nil {
					fmt.Fprintln(os.Stderr, "svsm-e2e host:", err)
				}
			}()
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			hj, err := h.AddVM(sctx, harness.VMSetup{Name: vm, Measurement: meas, HostData: hd, SecretMode: secretMode, Prime: true})
			if err != nil {
				return err
			}
			path := filepath.Join(workdir, "host.json")
			if err := harness.WriteHostJSON(path, hj); err != nil {
				return err
			}
			fmt.Printf("svsm-e2e host: up; one boot request primed for vm %q\n", hj.VM)
			for _, kv := range [][2]string{
				{"host.json", path}, {"proxy_socket", hj.ProxySocket}, {"snp_socket", hj.SNPSocket},
				{"verifier_url", hj.VerifierURL}, {"admin_url", hj.AdminURL}, {"admin_token_file", hj.AdminTokenFile},
				{"measurement", hj.Measurement}, {"host_data", hj.HostData}, {"secret_mode", hj.SecretMode},
				{"logs", filepath.Join(workdir, "logs")},
			} {
				fmt.Printf("  %-17s %s\n", kv[0], kv[1])
			}
			if profile != "" {
				// The user's SVSM, wired to this host as launch_guest.sh would run it.
				if igvmFile == "" {
					return errors.New("--profile needs --igvm (the SVSM to launch)")
				}
				o := harness.CoconutOptions{QEMU: qemuBin, IGVM: igvmFile, Profile: qemu.Profile(profile)}
				if o.QEMU == "" {
					o.QEMU = qemu.DefaultBinary
				}
				if o.Profile != qemu.Coconut && o.Profile != qemu.CoconutNoCC {
					return fmt.Errorf("--profile %q: want coconut (SEV-SNP host) or coconut-nocc", profile)
				}
				caps, err := qemu.Probe(ctx, o.QEMU)
				if err != nil {
					return err
				}
				if _, err := caps.Choose(o.Profile); err != nil {
					fmt.Printf("  %-17s %v\n", "qemu (warning)", err)
				}
				args, err := harness.CoconutLaunch(o, filepath.Join(workdir, "com1.log"), hj.ProxySocket, hj.SNPSocket).Args()
				if err != nil {
					return err
				}
				fmt.Printf("  %-17s %s %s\n", "launch", caps.Binary, strings.Join(args, " "))
			}
			fmt.Println("svsm-e2e host: running until SIGINT/SIGTERM")
			select {
			case <-ctx.Done():
			case <-h.FakeSNP.Done():
				return fmt.Errorf("fakesnp exited; see %s", h.FakeSNP.LogPath)
			case <-h.Verifier.Done():
				return fmt.Errorf("svsm-verifier exited; see %s", h.Verifier.LogPath)
			case <-h.Proxy.Done():
				return fmt.Errorf("svsm-proxy exited; see %s", h.Proxy.LogPath)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&workdir, "workdir", "", "directory for state, sockets, logs and host.json (required)")
	f.StringVar(&vm, "vm", "vm0", "VM name")
	f.StringVar(&measurement, "measurement", "", "launch digest, 96 hex digits (default: SHA-384 of \"svsm-e2e default launch\")")
	f.StringVar(&igvmFile, "igvm", "", "IGVM launch image: its SNP launch digest becomes the measurement")
	f.StringVar(&hostData, "host-data", "", "HOST_DATA, 64 hex digits (default: SHA-256 of the VM name)")
	f.StringVar(&secretMode, "secret-mode", protocol.SecretModeV1, "raw (32-byte state key) or v1 (with freshness data)")
	f.StringVar(&binDir, "bin-dir", "", "where fakesnp, svsm-verifier and svsm-proxy are (default: beside svsm-e2e, then PATH)")
	f.StringVar(&profile, "profile", "", "with --igvm: print the QEMU command that attaches that SVSM (coconut: SEV-SNP host; coconut-nocc: TCG, report on COM4)")
	f.StringVar(&qemuBin, "qemu", "", "QEMU binary for --profile (default qemu-system-x86_64)")
	_ = cmd.MarkFlagRequired("workdir")
	return cmd
}

func hostPrimeCmd() *cobra.Command {
	var workdir string
	cmd := &cobra.Command{
		Use:   "prime",
		Short: "Prime the next boot request for the VM in DIR/host.json",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			hj, err := protocol.ReadHostJSON(filepath.Join(workdir, "host.json"))
			if err != nil {
				return err
			}
			tok, err := os.ReadFile(hj.AdminTokenFile)
			if err != nil {
				return fmt.Errorf("admin token: %w", err)
			}
			c := &verifier.AdminClient{BaseURL: hj.AdminURL, Token: strings.TrimSpace(string(tok))}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			view, err := c.Prime(ctx, hj.VM)
			if err != nil {
				return err
			}
			fmt.Printf("svsm-e2e host: boot request primed for vm %q (counter %d, releases so far %d)\n", view.Name, view.Counter, view.Releases)
			return nil
		},
	}
	cmd.Flags().StringVar(&workdir, "workdir", "", "the directory given to host up (required)")
	_ = cmd.MarkFlagRequired("workdir")
	return cmd
}
