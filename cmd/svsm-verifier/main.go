// Command svsm-verifier is the relying party and key broker: a KBS 0.4.0 server with real
// SEV-SNP verification, boot requests (clone protection), a boot counter with confirmation
// (rollback protection), an audit trail, and a token-protected admin API and CLI.
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-sev-guest/kds"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/svsm-e2e/svsm-e2e/internal/crashpoint"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
	"github.com/svsm-e2e/svsm-e2e/internal/detrand"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

func main() {
	err := newRoot().Execute()
	var ue usageErr
	switch {
	case err == nil:
	case errors.As(err, &errChecksFailed{}):
		os.Exit(1) // verify-report printed its verdict
	case errors.As(err, &ue):
		fmt.Fprintln(os.Stderr, "svsm-verifier:", ue.error)
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "svsm-verifier:", err)
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	root := &cobra.Command{Use: "svsm-verifier", Short: "KBS 0.4.0 verifier and key broker for COCONUT-SVSM state", SilenceUsage: true, SilenceErrors: true}
	root.AddCommand(serveCmd(), vmCmd(), auditCmd(), verifyReportCmd())
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageErr{err} })
	return root
}

func serveCmd() *cobra.Command {
	var opts verifier.Options
	var listen, adminListen, addrFile, adminAddrFile, rootsFile, logFormat, logLevel, crashAt, testSeed, cpuProfile string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve the KBS protocol and the admin API",
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts.Logger = daemon.Logger("svsm-verifier", logFormat, logLevel)
			if rootsFile != "" {
				b, err := os.ReadFile(rootsFile)
				if err != nil {
					return fmt.Errorf("trusted roots: %w", err)
				}
				opts.TrustedRootsPEM = b
			}
			if seed, ok, err := detrand.ParseSeed(testSeed); err != nil {
				return usageErr{err}
			} else if ok {
				// Predictable keys are for a fake AMD chain only: trusting the genuine roots
				// means real guests, and their secrets must not follow from a number.
				if rootsFile == "" {
					return usageErr{errors.New("--test-seed is refused with AMD's genuine roots; it needs --trusted-roots of a test chain")}
				}
				if err := detrand.Install(seed, "verifier"); err != nil {
					return err
				}
				opts.Logger.Warn("test seed in use: every key, nonce and boot id follows from it", "test_seed", seed)
			}
			crash, err := crashpoint.New(crashAt, crashpoint.KillSelf)
			if err != nil {
				return err
			}
			opts.Crash = crash
			v, err := verifier.New(opts)
			if err != nil {
				return err
			}
			defer v.Close()
			if cpuProfile != "" {
				f, err := os.Create(cpuProfile)
				if err != nil {
					return fmt.Errorf("cpu profile: %w", err)
				}
				if err := pprof.StartCPUProfile(f); err != nil {
					return fmt.Errorf("cpu profile: %w", err)
				}
				defer func() { pprof.StopCPUProfile(); f.Close() }() // on SIGTERM/SIGINT, after serving
			}
			ctx, stop := daemon.SignalContext()
			defer stop()
			kbsLn, err := daemon.Listen(listen, addrFile)
			if err != nil {
				return err
			}
			adminLn, err := daemon.Listen(adminListen, adminAddrFile)
			if err != nil {
				return err
			}
			roots := "genuine AMD"
			if rootsFile != "" {
				roots = rootsFile
			}
			opts.Logger.Info("svsm-verifier serving", "kbs", kbsLn.Addr().String(), "admin", adminLn.Addr().String(), "trusted_roots", roots, "kds", opts.KDSBaseURL, "admin_token_file", v.AdminTokenPath())
			var g errgroup.Group
			g.Go(func() error { return verifier.Serve(ctx, kbsLn, v.KBSHandler()) })
			g.Go(func() error { return verifier.Serve(ctx, adminLn, v.AdminHandler()) })
			return g.Wait()
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.DataDir, "data-dir", "", "directory for admin.token and, without --database-url, verifier.db (required)")
	f.StringVar(&opts.Instance, "instance", "", "this replica's name, recorded on each audit row it writes")
	f.StringVar(&opts.DatabaseURL, "database-url", "", "keep the state in PostgreSQL (postgres://… or key=value form) instead of DATA_DIR/verifier.db; replicas share one database")
	f.StringVar(&listen, "listen", "127.0.0.1:8080", "KBS address")
	f.StringVar(&adminListen, "admin-listen", "127.0.0.1:8081", "admin API address")
	f.StringVar(&addrFile, "addr-file", "", "write the bound KBS address here")
	f.StringVar(&adminAddrFile, "admin-addr-file", "", "write the bound admin address here")
	f.StringVar(&opts.KDSBaseURL, "kds-url", "", "base URL replacing https://kdsintf.amd.com for VCEK fetches (e.g. fakesnp)")
	f.StringVar(&rootsFile, "trusted-roots", "", "PEM cert_chain (ASK, ARK) to trust instead of AMD's genuine roots")
	f.DurationVar(&opts.SessionTTL, "session-ttl", 5*time.Minute, "how long a KBS session lives")
	f.IntVar(&opts.MaxSessions, "max-sessions", 10000, "session table size; when full, spent then unattested sessions are evicted, never attested ones")
	f.DurationVar(&opts.AuditWindow, "audit-window", 10*time.Second, "identical refusals within this window are audited as one row with a count")
	f.IntVar(&opts.KDS.MaxConcurrent, "kds-concurrency", 4, "simultaneous KDS certificate fetches")
	f.DurationVar(&opts.KDS.NegativeTTL, "kds-negative-ttl", time.Minute, "how long a KDS 'no such certificate' answer is remembered")
	f.DurationVar(&opts.KDS.OutageTTL, "kds-outage-ttl", 5*time.Second, "how long an unreachable KDS is remembered before it is tried again")
	f.BoolVar(&opts.CheckCRL, "check-crl", false, "fetch the product CRL from the KDS and refuse a revoked ASK")
	f.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of the whole run to this file (for `make bench`)")
	f.StringVar(&testSeed, "test-seed", "", detrand.FlagHelp+"; needs --trusted-roots")
	f.StringVar(&crashAt, "crash-at", "", "fault injection: die at a registered point NAME[#n] (verifier/...; svsm-e2e crash-points lists them)")
	f.StringVar(&logFormat, "log-format", "text", "text or json")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	_ = cmd.MarkFlagRequired("data-dir")
	return cmd
}

type adminFlags struct {
	url, tokenFile string
}

func (a *adminFlags) add(cmd *cobra.Command) {
	cmd.PersistentFlags().StringVar(&a.url, "admin-url", "http://127.0.0.1:8081", "admin API base URL")
	cmd.PersistentFlags().StringVar(&a.tokenFile, "token-file", "", "file holding the admin bearer token (the server's DATA_DIR/admin.token)")
}

func (a *adminFlags) client() (*verifier.AdminClient, error) {
	if a.tokenFile == "" {
		return nil, errors.New("--token-file is required")
	}
	b, err := os.ReadFile(a.tokenFile)
	if err != nil {
		return nil, fmt.Errorf("admin token: %w", err)
	}
	return &verifier.AdminClient{BaseURL: strings.TrimSuffix(a.url, "/"), Token: strings.TrimSpace(string(b))}, nil
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func ctx30() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

// parseTCB parses "bl,tee,snp,ucode".
func parseTCB(s string) (*kds.TCBParts, error) {
	parts := strings.Split(s, ",")
	if len(parts) != 4 {
		return nil, fmt.Errorf("min TCB %q: want bl,tee,snp,ucode", s)
	}
	var v [4]uint8
	for i, p := range parts {
		n, err := strconv.ParseUint(strings.TrimSpace(p), 10, 8)
		if err != nil {
			return nil, fmt.Errorf("min TCB %q: %w", s, err)
		}
		v[i] = uint8(n)
	}
	return &kds.TCBParts{BlSpl: v[0], TeeSpl: v[1], SnpSpl: v[2], UcodeSpl: v[3]}, nil
}

func vmCmd() *cobra.Command {
	var a adminFlags
	cmd := &cobra.Command{Use: "vm", Short: "Register, show and prime VMs through the admin API"}
	a.add(cmd)

	var spec verifier.VMSpec
	var measurements, chipIDs []string
	var hostData, minTCB string
	register := &cobra.Command{
		Use:   "register NAME",
		Short: "Register a VM with its reference measurements and policy",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec.Name = args[0]
			for _, m := range measurements {
				b, err := hex.DecodeString(m)
				if err != nil {
					return fmt.Errorf("--measurement %q: %w", m, err)
				}
				spec.Measurements = append(spec.Measurements, b)
			}
			for _, c := range chipIDs {
				b, err := hex.DecodeString(c)
				if err != nil {
					return fmt.Errorf("--chip-id %q: %w", c, err)
				}
				spec.ChipIDs = append(spec.ChipIDs, b)
			}
			if hostData != "" {
				b, err := hex.DecodeString(hostData)
				if err != nil {
					return fmt.Errorf("--host-data: %w", err)
				}
				spec.HostData = b
			}
			if minTCB != "" {
				t, err := parseTCB(minTCB)
				if err != nil {
					return err
				}
				spec.MinTCB = t
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			ctx, cancel := ctx30()
			defer cancel()
			view, err := c.Register(ctx, spec)
			if err != nil {
				return err
			}
			return printJSON(view)
		},
	}
	rf := register.Flags()
	rf.StringSliceVar(&measurements, "measurement", nil, "allowed launch digest, 96 hex digits (repeatable)")
	rf.StringVar(&hostData, "host-data", "", "HOST_DATA to pin, 64 hex digits")
	rf.StringSliceVar(&chipIDs, "chip-id", nil, "allowed CHIP_ID, 128 hex digits (repeatable)")
	rf.BoolVar(&spec.AllowDebug, "allow-debug", false, "accept a guest policy with debugging allowed")
	rf.BoolVar(&spec.AllowMigrateMA, "allow-migrate-ma", false, "accept a guest policy with a migration agent")
	rf.StringVar(&minTCB, "min-tcb", "", "minimum reported TCB as bl,tee,snp,ucode")
	rf.StringVar(&spec.SecretMode, "secret-mode", protocol.SecretModeV1, "raw (32-byte state key, upstream) or v1 (with freshness data)")
	rf.BoolVar(&spec.WriteThrough, "write-through", false, "guest confirms every runtime state write (v1)")
	_ = register.MarkFlagRequired("measurement")

	show := vmViewCmd(&a, "show NAME", "Show a VM (never its key)", (*verifier.AdminClient).Show)
	prime := vmViewCmd(&a, "prime NAME", "Allow exactly one more key release (one boot)", (*verifier.AdminClient).Prime)
	var allowed []string
	setMeasurements := vmViewCmd(&a, "set-measurements NAME --measurement HEX...", "Replace the allowed launch digests (approve a new launch image)",
		func(c *verifier.AdminClient, ctx context.Context, name string) (*verifier.VMView, error) {
			var ms []protocol.HexBytes
			for _, m := range allowed {
				b, err := hex.DecodeString(m)
				if err != nil {
					return nil, fmt.Errorf("--measurement %q: %w", m, err)
				}
				ms = append(ms, b)
			}
			return c.SetMeasurements(ctx, name, ms)
		})
	setMeasurements.Flags().StringSliceVar(&allowed, "measurement", nil, "allowed launch digest, 96 hex digits (repeatable); svsm-e2e measure FILE.igvm prints one")
	_ = setMeasurements.MarkFlagRequired("measurement")
	cmd.AddCommand(register, show, prime, setMeasurements)
	return cmd
}

// vmViewCmd is a one-argument admin command that prints the VM view call returns.
func vmViewCmd(a *adminFlags, use, short string, call func(*verifier.AdminClient, context.Context, string) (*verifier.VMView, error)) *cobra.Command {
	return &cobra.Command{
		Use: use, Short: short, Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			ctx, cancel := ctx30()
			defer cancel()
			view, err := call(c, ctx, args[0])
			if err != nil {
				return err
			}
			return printJSON(view)
		},
	}
}

func auditCmd() *cobra.Command {
	var a adminFlags
	var vm string
	var since uint64
	cmd := &cobra.Command{
		Use: "audit", Short: "Print the audit trail as JSON lines",
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			ctx, cancel := ctx30()
			defer cancel()
			evs, err := c.Audit(ctx, vm, since)
			if err != nil {
				return err
			}
			enc := json.NewEncoder(os.Stdout)
			for _, e := range evs {
				if err := enc.Encode(e); err != nil {
					return err
				}
			}
			return nil
		},
	}
	a.add(cmd)
	cmd.Flags().StringVar(&vm, "vm", "", "only this VM")
	cmd.Flags().Uint64Var(&since, "since", 0, "only events after this sequence number")
	return cmd
}
