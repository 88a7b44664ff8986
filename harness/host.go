// Package harness is the Go API that starts a simulated confidential-VM stack and plays the
// malicious host against it. This file runs the host side: fakesnp, svsm-verifier and
// svsm-proxy as real child processes on real sockets, wired as PROTOCOLS.md §6 describes.
package harness

import (
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/internal/admintoken"
	"github.com/svsm-e2e/svsm-e2e/internal/atomicfile"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
	"github.com/svsm-e2e/svsm-e2e/internal/detrand"
	"github.com/svsm-e2e/svsm-e2e/internal/postgres"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// Binaries names the executables the host side runs.
type Binaries struct {
	FakeSNP, Verifier, Proxy string
	// Guest is svsm-guest; empty when not found (the host side runs without it).
	Guest string
}

// FindBinaries looks in dir (if set), then beside the running executable, then in PATH.
func FindBinaries(dir string) (Binaries, error) {
	var dirs []string
	if dir != "" {
		dirs = append(dirs, dir)
	}
	if exe, err := os.Executable(); err == nil {
		dirs = append(dirs, filepath.Dir(exe))
	}
	find := func(name string) (string, error) {
		for _, d := range dirs {
			p := filepath.Join(d, name)
			if st, err := os.Stat(p); err == nil && !st.IsDir() {
				return p, nil
			}
		}
		p, err := exec.LookPath(name)
		if err != nil {
			return "", fmt.Errorf("binary %s not found in %v or PATH (run `make build`)", name, dirs)
		}
		return p, nil
	}
	var b Binaries
	var err error
	if b.FakeSNP, err = find("fakesnp"); err != nil {
		return b, err
	}
	if b.Verifier, err = find("svsm-verifier"); err != nil {
		return b, err
	}
	if b.Proxy, err = find("svsm-proxy"); err != nil {
		return b, err
	}
	b.Guest, _ = find("svsm-guest")
	return b, nil
}

// HostOptions configures StartHost.
type HostOptions struct {
	WorkDir  string
	Binaries Binaries
	// ReadyTimeout bounds each component's start (default 60 s: a fresh fake chain takes a
	// couple of seconds of RSA-4096 key generation).
	ReadyTimeout time.Duration
	Logger       *slog.Logger
	// CADir, if set, is a fake AMD chain (fakesnp's ca directory) copied in before fakesnp
	// starts, so many hosts can share one RSA-4096 key generation.
	CADir string
	// VerifierArgs are extra `svsm-verifier serve` flags (e.g. --max-sessions for a flood test).
	VerifierArgs []string
	// VerifierEnv is extra environment for the verifiers (e.g. GOMAXPROCS=1 for a benchmark).
	VerifierEnv []string
	// GenuineAMD makes the verifier trust AMD's genuine roots and fetch VCEKs from AMD's KDS
	// (the hardware leg: reports signed by a real AMD-SP). fakesnp still runs, unused.
	GenuineAMD bool
	// Seeded gives fakesnp and every start of the verifier a --test-seed derived from
	// TestSeed and the start's number, so a run replays their draws.
	Seeded   bool
	TestSeed uint64
	// Postgres keeps the verifier's state in a PostgreSQL server the host starts (from the
	// distribution's packages, in a temporary directory) instead of bbolt.
	Postgres bool
	// Replicas is how many verifiers run (default 1); more than one needs Postgres. The
	// proxy spreads sessions over all of them.
	Replicas int
}

// Host is a running host side.
type Host struct {
	opts        HostOptions
	FakeSNP     *Proc
	Verifier    *Proc
	Proxy       *Proc
	FakeSNPURL  string
	VerifierURL string
	AdminURL    string
	ProxySocket string
	TokenFile   string
	Admin       *verifier.AdminClient
	SNP         *fakesnp.Client
	log         *slog.Logger
	runDir      string
	ownRunDir   bool
	// proxyVerifierURL, when set, is where svsm-proxy sends KBS traffic instead of the
	// verifier (a tap on the host's network).
	proxyVerifierURL string
	// verifierCrash and proxyCrash are --crash-at values for the next (re)start.
	verifierCrash, proxyCrash string
	// starts counts each component's starts, naming its derived test seed.
	starts map[string]int
	// ProxyMetricsURL is svsm-proxy's Prometheus endpoint.
	ProxyMetricsURL string
	// pg is the PostgreSQL server of a Postgres host.
	pg *postgres.Server
	// Replicas are the verifiers after the first (Verifier), and ReplicaURLs their KBS URLs.
	Replicas    []*Proc
	ReplicaURLs []string
}

// seedArgs is a component's --test-seed for this start, when the host is seeded.
func (h *Host) seedArgs(component string) []string {
	if !h.opts.Seeded {
		return nil
	}
	if h.starts == nil {
		h.starts = map[string]int{}
	}
	h.starts[component]++
	seed := detrand.Derive(h.opts.TestSeed, fmt.Sprintf("%s#%d", component, h.starts[component]))
	return []string{"--test-seed", strconv.FormatUint(seed, 10)}
}

// RestartVerifierCrashingAt restarts the verifier so that it dies at the registered crash
// point spec ("" restarts it normally).
func (h *Host) RestartVerifierCrashingAt(ctx context.Context, spec string) error {
	h.verifierCrash = spec
	return h.RestartVerifier(ctx)
}

// RestartProxyCrashingAt restarts svsm-proxy so that it dies at spec ("" for normally).
func (h *Host) RestartProxyCrashingAt(ctx context.Context, spec string) error {
	h.proxyCrash = spec
	return h.RestartProxy(ctx)
}

// RunPath names a socket of this host. Sockets live in WorkDir/run unless that path could
// exceed the unix socket limit (108 bytes), then in a short private directory under /tmp.
func (h *Host) RunPath(name string) string { return filepath.Join(h.runDir, name) }

// Path joins parts under the host's work directory.
func (h *Host) Path(parts ...string) string { return h.path(parts...) }

func (h *Host) path(parts ...string) string {
	return filepath.Join(append([]string{h.opts.WorkDir}, parts...)...)
}

// StartHost starts fakesnp, then the verifier (trusting fakesnp's chain, fetching VCEKs from
// it), then the proxy. On error everything started is stopped.
func StartHost(ctx context.Context, opts HostOptions) (h *Host, err error) {
	if opts.WorkDir == "" {
		return nil, errors.New("harness: WorkDir is required")
	}
	if opts.ReadyTimeout == 0 {
		opts.ReadyTimeout = 60 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := os.MkdirAll(opts.WorkDir, 0o755); err != nil {
		return nil, err
	}
	started := &Host{opts: opts, log: opts.Logger, runDir: filepath.Join(opts.WorkDir, "run")}
	if len(started.runDir)+len("/snp-.sock")+64 > 107 {
		d, err := os.MkdirTemp("", "se2e-")
		if err != nil {
			return nil, err
		}
		started.runDir, started.ownRunDir = d, true
	} else if err := os.MkdirAll(started.runDir, 0o755); err != nil {
		return nil, err
	}
	h = started
	defer func() {
		if err != nil {
			_ = started.Stop() // the named result is nil by now
		}
	}()
	if opts.Replicas > 1 && !opts.Postgres {
		return nil, errors.New("harness: verifier replicas share a PostgreSQL database: set Postgres")
	}
	if opts.Postgres {
		if h.pg, err = postgres.Start(ctx, postgres.Options{}); err != nil {
			return nil, err
		}
	}
	if err := h.startFakeSNP(ctx); err != nil {
		return nil, err
	}
	if err := h.StartVerifier(ctx); err != nil {
		return nil, err
	}
	for i := 1; i < opts.Replicas; i++ {
		if err := h.startReplica(ctx, i); err != nil {
			return nil, err
		}
	}
	if err := h.startProxy(ctx); err != nil {
		return nil, err
	}
	return h, nil
}

// launch starts one component and waits, bounded by ReadyTimeout, for each address file
// it writes once listening. The files are removed first so a stale one is never read.
func (h *Host) launch(ctx context.Context, name, bin string, args, env []string, addrFiles ...string) (*Proc, []string, error) {
	for _, f := range addrFiles {
		if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
			return nil, nil, fmt.Errorf("%s run dir: %w", name, err)
		}
		_ = os.Remove(f)
	}
	p, err := StartProcEnv(name, bin, args, env, h.path("logs", name+".log"))
	if err != nil {
		return nil, nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, h.opts.ReadyTimeout)
	defer cancel()
	addrs := make([]string, len(addrFiles))
	for i, f := range addrFiles {
		if addrs[i], err = p.waitReady(rctx, f); err != nil {
			return p, nil, err
		}
	}
	return p, addrs, nil
}

func (h *Host) startFakeSNP(ctx context.Context) error {
	if h.opts.CADir != "" {
		if _, err := os.Stat(h.path("fakesnp", "ca")); errors.Is(err, os.ErrNotExist) {
			if err := os.CopyFS(h.path("fakesnp", "ca"), os.DirFS(h.opts.CADir)); err != nil {
				return fmt.Errorf("copy fake AMD chain: %w", err)
			}
		}
	}
	p, addrs, err := h.launch(ctx, "fakesnp", h.opts.Binaries.FakeSNP,
		append([]string{"serve", "--state-dir", h.path("fakesnp"), "--socket-dir", h.runDir, "--listen", "127.0.0.1:0", "--addr-file", h.path("run", "fakesnp.addr")}, h.seedArgs("fakesnp")...),
		nil, h.path("run", "fakesnp.addr"))
	h.FakeSNP = p
	if err != nil {
		return err
	}
	h.FakeSNPURL = "http://" + addrs[0]
	tok, err := admintoken.Read(h.path("fakesnp", "admin.token"))
	if err != nil {
		return fmt.Errorf("fakesnp: %w", err)
	}
	h.SNP = &fakesnp.Client{BaseURL: h.FakeSNPURL, Token: tok}
	chain, err := h.SNP.RootsPEM(ctx) // ASK, ASVK, ARK: VCEK- and VLEK-signed reports verify
	if err != nil {
		return err
	}
	if err := os.WriteFile(h.path("fakesnp-roots.pem"), chain, 0o644); err != nil {
		return fmt.Errorf("write fakesnp roots: %w", err)
	}
	return nil
}

// StartVerifier starts the verifier on its data directory. A restart (after KillVerifier or
// a Stop) reuses the first start's addresses and admin token, so the proxy and every client
// held by users of the harness keep working.
func (h *Host) StartVerifier(ctx context.Context) error {
	addrFile, adminFile := h.path("run", "verifier.addr"), h.path("run", "verifier-admin.addr")
	listen, adminListen := "127.0.0.1:0", "127.0.0.1:0"
	if h.VerifierURL != "" {
		listen, adminListen = strings.TrimPrefix(h.VerifierURL, "http://"), strings.TrimPrefix(h.AdminURL, "http://")
	}
	args := []string{"serve", "--data-dir", h.path("verifier"), "--listen", listen, "--admin-listen", adminListen,
		"--addr-file", addrFile, "--admin-addr-file", adminFile}
	if !h.opts.GenuineAMD {
		args = append(args, "--kds-url", h.FakeSNPURL, "--trusted-roots", h.path("fakesnp-roots.pem"))
	}
	args = append(args, h.opts.VerifierArgs...)
	args = append(args, h.seedArgs("verifier")...)
	args = append(args, h.databaseArgs(0)...)
	if h.verifierCrash != "" {
		args = append(args, "--crash-at", h.verifierCrash)
	}
	p, addrs, err := h.launch(ctx, "svsm-verifier", h.opts.Binaries.Verifier, args, h.opts.VerifierEnv, addrFile, adminFile)
	if p != nil {
		h.Verifier = p
	}
	if err != nil {
		return err
	}
	kbsURL, adminURL := "http://"+addrs[0], "http://"+addrs[1]
	if h.Admin != nil {
		if kbsURL != h.VerifierURL || adminURL != h.AdminURL {
			return fmt.Errorf("restarted verifier moved from %s/%s to %s/%s", h.VerifierURL, h.AdminURL, kbsURL, adminURL)
		}
		return nil
	}
	h.VerifierURL, h.AdminURL = kbsURL, adminURL
	h.TokenFile = h.path("verifier", "admin.token")
	tok, err := os.ReadFile(h.TokenFile)
	if err != nil {
		return fmt.Errorf("verifier admin token: %w", err)
	}
	// Scenarios and benchmarks call the admin API from several goroutines at once: keep a
	// connection for each rather than net/http's default two.
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 32
	h.Admin = &verifier.AdminClient{BaseURL: h.AdminURL, Token: strings.TrimSpace(string(tok)),
		HTTP: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
	return nil
}

// databaseArgs are replica i's flags for the shared database (none without Postgres).
func (h *Host) databaseArgs(i int) []string {
	if h.pg == nil {
		return nil
	}
	return []string{"--database-url", h.pg.URL, "--instance", fmt.Sprintf("replica-%d", i)}
}

// startReplica starts verifier replica i (from 1) on the shared database, with its own data
// directory (admin token) and addresses.
func (h *Host) startReplica(ctx context.Context, i int) error {
	name := fmt.Sprintf("svsm-verifier-%d", i)
	addrFile, adminFile := h.path("run", name+".addr"), h.path("run", name+"-admin.addr")
	args := []string{"serve", "--data-dir", h.path(fmt.Sprintf("verifier-%d", i)), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
		"--addr-file", addrFile, "--admin-addr-file", adminFile, "--kds-url", h.FakeSNPURL, "--trusted-roots", h.path("fakesnp-roots.pem")}
	args = append(args, h.opts.VerifierArgs...)
	args = append(args, h.seedArgs(fmt.Sprintf("verifier-%d", i))...)
	args = append(args, h.databaseArgs(i)...)
	p, addrs, err := h.launch(ctx, name, h.opts.Binaries.Verifier, args, h.opts.VerifierEnv, addrFile, adminFile)
	if p != nil {
		h.Replicas = append(h.Replicas, p)
	}
	if err != nil {
		return err
	}
	h.ReplicaURLs = append(h.ReplicaURLs, "http://"+addrs[0])
	return nil
}

// KillVerifier SIGKILLs the verifier (a crash, not a shutdown).
func (h *Host) KillVerifier() { h.Verifier.Kill() }

// RestartVerifier stops (or has lost) the verifier and starts it again on the same database
// and addresses.
func (h *Host) RestartVerifier(ctx context.Context) error {
	_ = h.Verifier.Stop(5 * time.Second)
	return h.StartVerifier(ctx)
}

func crashArgs(spec string) []string {
	if spec == "" {
		return nil
	}
	return []string{"--crash-at", spec}
}

// KillProxy kills svsm-proxy with SIGKILL (a crash, mid-message if a guest is talking).
func (h *Host) KillProxy() { h.Proxy.Kill() }

// RestartProxy starts svsm-proxy again on the same socket.
func (h *Host) RestartProxy(ctx context.Context) error {
	_ = h.Proxy.Stop(5 * time.Second)
	return h.startProxy(ctx)
}

func (h *Host) startProxy(ctx context.Context) error {
	h.ProxySocket = h.RunPath("proxy.sock")
	addrFile := h.path("run", "proxy.addr")
	verifierURL := strings.Join(append([]string{h.VerifierURL}, h.ReplicaURLs...), ",")
	if h.proxyVerifierURL != "" {
		verifierURL = h.proxyVerifierURL
	}
	metricsFile := h.path("run", "proxy-metrics.addr")
	listen := "127.0.0.1:0"
	if h.ProxyMetricsURL != "" { // a restart keeps its address
		listen = strings.TrimSuffix(strings.TrimPrefix(h.ProxyMetricsURL, "http://"), "/metrics")
	}
	p, addrs, err := h.launch(ctx, "svsm-proxy", h.opts.Binaries.Proxy,
		append([]string{"--listen-unix", h.ProxySocket, "--addr-file", addrFile, "--verifier-url", verifierURL, "--step-timeout", "30s", "--persistent",
			"--metrics-listen", listen, "--metrics-addr-file", metricsFile},
			crashArgs(h.proxyCrash)...), nil, addrFile, metricsFile)
	h.Proxy = p
	if err == nil {
		h.ProxyMetricsURL = "http://" + addrs[1] + "/metrics"
	}
	return err
}

// MetricsURLs are the Prometheus endpoints of the host's services, by name.
func (h *Host) MetricsURLs() map[string]string {
	return map[string]string{"fakesnp": h.FakeSNPURL + "/metrics", "svsm-verifier": h.AdminURL + "/metrics", "svsm-proxy": h.ProxyMetricsURL}
}

// Stop stops every component (SIGTERM, then SIGKILL after a grace period).
func (h *Host) Stop() error {
	var errs []error
	for _, p := range append([]*Proc{h.Proxy, h.Verifier, h.FakeSNP}, h.Replicas...) {
		if p != nil {
			if err := p.Stop(5 * time.Second); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if h.pg != nil {
		// Its log belongs to the artifact bundle; its data goes with it.
		if b, err := os.ReadFile(h.pg.Log()); err == nil {
			_ = os.WriteFile(h.path("logs", "postgres.log"), b, 0o644)
		}
		errs = append(errs, h.pg.Stop())
	}
	if h.ownRunDir {
		_ = os.RemoveAll(h.runDir)
	}
	return errors.Join(errs...)
}

// VMSetup describes one VM to launch and register.
type VMSetup struct {
	Name        string
	Measurement []byte // 48 bytes; default DefaultMeasurement()
	HostData    []byte // 32 bytes; default SHA-256 of the name
	SecretMode  string // raw or v1 (default v1)
	Chip        string // default chip0
	Policy      uint64
	Faults      fakesnp.Faults
	// Spec overrides policy fields of the registration (Name, Measurements, HostData and
	// SecretMode are filled from above).
	Spec verifier.VMSpec
	// Prime primes one boot request after registering.
	Prime bool
}

// DefaultMeasurement is the launch digest `host up` uses when none is given: SHA-384 of a
// fixed label, standing for "some launched image" until an IGVM is built.
func DefaultMeasurement() []byte {
	d := sha512.Sum384([]byte("svsm-e2e default launch"))
	return d[:]
}

// AddVM launches a VM at fakesnp (its §4 channel) and registers it at the verifier.
func (h *Host) AddVM(ctx context.Context, s VMSetup) (*protocol.HostJSON, error) {
	if len(s.Measurement) == 0 {
		s.Measurement = DefaultMeasurement()
	}
	if len(s.HostData) == 0 {
		d := sha256.Sum256([]byte(s.Name))
		s.HostData = d[:]
	}
	if s.SecretMode == "" {
		s.SecretMode = protocol.SecretModeV1
	}
	if s.Chip == "" {
		s.Chip = "chip0"
	}
	info, err := h.SNP.AddLaunch(ctx, fakesnp.LaunchSpec{Name: s.Name, Chip: s.Chip, Measurement: s.Measurement, HostData: s.HostData, Policy: s.Policy, Faults: s.Faults,
		Socket: h.RunPath("snp-" + s.Name + ".sock")})
	if err != nil {
		return nil, err
	}
	spec := s.Spec
	spec.Name, spec.Measurements, spec.HostData, spec.SecretMode = s.Name, []protocol.HexBytes{s.Measurement}, s.HostData, s.SecretMode
	if _, err := h.Admin.Register(ctx, spec); err != nil {
		return nil, err
	}
	if s.Prime {
		if _, err := h.Admin.Prime(ctx, s.Name); err != nil {
			return nil, err
		}
	}
	return &protocol.HostJSON{
		ProxySocket: h.ProxySocket, SNPSocket: info.Socket, VerifierURL: h.VerifierURL, AdminURL: h.AdminURL,
		AdminTokenFile: h.TokenFile, VM: s.Name, Measurement: hex.EncodeToString(s.Measurement),
		HostData: hex.EncodeToString(s.HostData), SecretMode: s.SecretMode, FakeSNPURL: h.FakeSNPURL, FakeSNPTokenFile: h.path("fakesnp", "admin.token"), Launch: s.Name, Chip: s.Chip,
	}, nil
}

// WriteHostJSON writes hj to path atomically.
func WriteHostJSON(path string, hj *protocol.HostJSON) error {
	b, err := json.MarshalIndent(hj, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(b, '\n'), 0o644)
}

func waitAddrFile(ctx context.Context, path string) (string, error) {
	return daemon.WaitAddrFile(ctx, path)
}
