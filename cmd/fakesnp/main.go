// Command fakesnp is the simulated AMD Secure Processor: it signs SNP reports for registered
// launches over one guest-request channel each, and serves the fake VCEK chain at AMD KDS URL
// shapes. See PROTOCOLS.md §4.
package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
	"github.com/svsm-e2e/svsm-e2e/internal/detrand"
)

func main() {
	if err := newRoot().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "fakesnp:", err)
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	root := &cobra.Command{Use: "fakesnp", Short: "Simulated AMD-SP: signs SNP reports, serves a fake KDS", SilenceUsage: true, SilenceErrors: true}
	var stateDir, socketDir, listen, addrFile, logFormat, logLevel, testSeed string
	var rsaBits int
	serve := &cobra.Command{
		Use:   "serve",
		Short: "Run the KDS/admin HTTP server and every registered launch's report channel",
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := daemon.Logger("fakesnp", logFormat, logLevel)
			// fakesnp is a test tool: its chip secrets and signatures may follow from a seed.
			if seed, ok, err := detrand.ParseSeed(testSeed); err != nil {
				return err
			} else if ok {
				if err := detrand.Install(seed, "fakesnp"); err != nil {
					return err
				}
				log.Warn("test seed in use: chip secrets, report ids and signatures follow from it", "test_seed", seed)
			}
			ctx, stop := daemon.SignalContext()
			defer stop()
			s, err := fakesnp.New(fakesnp.Options{StateDir: stateDir, SocketDir: socketDir, RSABits: rsaBits, Logger: log})
			if err != nil {
				return err
			}
			defer s.Close()
			ln, err := daemon.Listen(listen, addrFile)
			if err != nil {
				return err
			}
			log.Info("fakesnp serving", "addr", ln.Addr().String(), "state_dir", stateDir,
				"admin_token_file", filepath.Join(stateDir, "admin.token"))
			return s.ServeHTTP(ctx, ln)
		},
	}
	serve.Flags().StringVar(&stateDir, "state-dir", "", "directory for the fake AMD chain, chip secrets and launch registry (required)")
	serve.Flags().StringVar(&socketDir, "socket-dir", "", "the only directory launch sockets may be created in (default STATE_DIR/launches)")
	serve.Flags().StringVar(&listen, "listen", "127.0.0.1:0", "HTTP address (host:port or unix:/path) for the KDS and admin API")
	serve.Flags().StringVar(&addrFile, "addr-file", "", "write the bound address here once listening")
	serve.Flags().IntVar(&rsaBits, "rsa-bits", 4096, "ARK/ASK key size when creating a new chain")
	serve.Flags().StringVar(&testSeed, "test-seed", "", detrand.FlagHelp)
	serve.Flags().StringVar(&logFormat, "log-format", "text", "text or json")
	serve.Flags().StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	_ = serve.MarkFlagRequired("state-dir")

	ca := &cobra.Command{
		Use:   "cert-chain",
		Short: "Create the fake chain if missing and print it (ASK then ARK, PEM): the roots a verifier should trust",
		RunE: func(cmd *cobra.Command, _ []string) error {
			if stateDir == "" {
				return errors.New("--state-dir is required")
			}
			c, err := fakesnp.LoadOrCreateCA(fakesnp.CAOptions{Dir: filepath.Join(stateDir, "ca"), RSABits: rsaBits})
			if err != nil {
				return err
			}
			_, err = os.Stdout.Write(c.CertChainPEM())
			return err
		},
	}
	ca.Flags().StringVar(&stateDir, "state-dir", "", "fakesnp state directory (required)")
	ca.Flags().IntVar(&rsaBits, "rsa-bits", 4096, "ARK/ASK key size when creating a new chain")
	root.AddCommand(serve, ca)
	return root
}
