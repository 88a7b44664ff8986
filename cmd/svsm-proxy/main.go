// Command svsm-proxy is the host-side attestation proxy between a COCONUT-SVSM guest
// (upstream protocol 0.1.0 over a unix socket / serial port, or vsock) and a KBS 0.4.0
// verifier. See PROTOCOLS.md §1–§3.
package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/mdlayher/vsock"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/svsm-e2e/svsm-e2e/internal/crashpoint"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
	"github.com/svsm-e2e/svsm-e2e/proxy"
)

func main() {
	var opts proxy.Options
	var unixPath, addrFile, logFormat, logLevel, crashAt, metricsListen, metricsAddrFile string
	var vsockPort uint32
	cmd := &cobra.Command{
		Use:          "svsm-proxy",
		Short:        "Attestation proxy: SVSM (aproxy protocol 0.1.0) ⇄ verifier (KBS 0.4.0)",
		SilenceUsage: true, SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := daemon.Logger("svsm-proxy", logFormat, logLevel)
			opts.Logger = log
			crash, err := crashpoint.New(crashAt, crashpoint.KillSelf)
			if err != nil {
				return err
			}
			opts.Crash = crash
			p, err := proxy.New(opts)
			if err != nil {
				return err
			}
			if unixPath == "" && vsockPort == 0 {
				return errors.New("give --listen-unix PATH and/or --vsock-port PORT")
			}
			ctx, stop := daemon.SignalContext()
			defer stop()
			var lns []net.Listener
			if unixPath != "" {
				ln, err := daemon.Listen("unix:"+unixPath, addrFile)
				if err != nil {
					return err
				}
				lns = append(lns, ln)
			}
			if vsockPort != 0 {
				ln, err := vsock.Listen(vsockPort, nil)
				if err != nil {
					return fmt.Errorf("vsock port %d (this host may lack /dev/vhost-vsock or the vsock module): %w", vsockPort, err)
				}
				lns = append(lns, ln)
			}
			log.Info("svsm-proxy serving", "unix", unixPath, "vsock_port", vsockPort, "verifier", opts.VerifierURL, "resource", opts.ResourcePath)
			var g errgroup.Group
			for _, ln := range lns {
				g.Go(func() error { return p.Serve(ctx, ln) })
			}
			if metricsListen != "" {
				mln, err := daemon.Listen(metricsListen, metricsAddrFile)
				if err != nil {
					return fmt.Errorf("metrics: %w", err)
				}
				mux := http.NewServeMux()
				mux.Handle("GET /metrics", p.MetricsHandler())
				g.Go(func() error { return daemon.ServeHTTP(ctx, mln, mux) })
			}
			return g.Wait()
		},
	}
	f := cmd.Flags()
	f.StringVar(&unixPath, "listen-unix", "", "unix socket to listen on for guest connections")
	f.Uint32Var(&vsockPort, "vsock-port", 0, "also listen on this vsock port (upstream uses 1995), where the host has vsock")
	f.StringVar(&addrFile, "addr-file", "", "write the unix socket path here once listening")
	f.StringVar(&opts.VerifierURL, "verifier-url", "", "KBS base URL of the verifier (required); several, comma-separated, are replicas on one database: each session goes to the next")
	f.StringVar(&opts.ResourcePath, "resource-path", "default/sample/test", "repository/type/tag of the secret")
	f.DurationVar(&opts.StepTimeout, "step-timeout", 60*time.Second, "bound on each guest read and each verifier round trip")
	f.BoolVar(&opts.Persistent, "persistent", false, "serve session after session on one connection (serial ports wired to unix sockets)")
	f.IntVar(&opts.MaxConns, "max-conns", 256, "maximum concurrent guest connections")
	f.StringVar(&crashAt, "crash-at", "", "fault injection: die at a registered point NAME[#n][:torn] (proxy/...)")
	f.StringVar(&metricsListen, "metrics-listen", "", "serve Prometheus metrics at http://ADDR/metrics (host:port)")
	f.StringVar(&metricsAddrFile, "metrics-addr-file", "", "write the bound metrics address here")
	f.StringVar(&logFormat, "log-format", "text", "text or json")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	_ = cmd.MarkFlagRequired("verifier-url")
	if err := cmd.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "svsm-proxy:", err)
		os.Exit(1)
	}
}
