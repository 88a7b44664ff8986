// Package fakesnp simulates the one part of an SEV-SNP machine we cannot have: the AMD Secure
// Processor. It owns a fake ARK → ASK → VCEK chain (persisted), a registry of launched VMs
// (measurement, policy, HOST_DATA, chip, TCB), one §4 guest-request channel per launch that
// answers MSG_REPORT_REQ with signed reports, and the AMD KDS endpoints a verifier fetches
// certificates from. The harness-as-host can choose what to launch, never sign a report.
package fakesnp

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/svsm-e2e/svsm-e2e/internal/admintoken"
	"github.com/svsm-e2e/svsm-e2e/internal/atomicfile"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// Options configures a Server.
type Options struct {
	// StateDir holds the CA (ca/), chip secrets (chips/) and the launch registry.
	StateDir string
	// RSABits for a newly created CA (default 4096).
	RSABits int
	// IdleTimeout closes a guest channel with no request for this long (default 10 min).
	IdleTimeout time.Duration
	// SocketDir is the one directory launch sockets may live in (default StateDir/launches).
	// A launch names its socket by file name; an absolute path must be in this directory.
	SocketDir string
	Logger    *slog.Logger
}

// Server is a running simulated AMD-SP.
type Server struct {
	opts  Options
	log   *slog.Logger
	ca    *CA
	token string // admin API bearer token (StateDir/admin.token)
	// revokeASK makes the served CRL list the ASK (an admin fault: a revoked intermediate).
	revokeASK bool
	mu        sync.Mutex
	chips     map[string]*Chip
	launches  map[string]*launch
	wg        sync.WaitGroup
	closed    bool
	// kdsRequests counts KDS requests (metrics).
	kdsRequests *prometheus.CounterVec
}

type launch struct {
	spec     LaunchSpec
	chip     *Chip
	reportID [32]byte
	ln       net.Listener
	conns    map[net.Conn]struct{}
	served   uint64 // reports signed on this channel
}

// New loads or creates the CA and re-opens every persisted launch.
func New(opts Options) (*Server, error) {
	if opts.StateDir == "" {
		return nil, errors.New("fakesnp: StateDir is required")
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = 10 * time.Minute
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.SocketDir == "" {
		opts.SocketDir = filepath.Join(opts.StateDir, "launches")
	}
	opts.SocketDir = filepath.Clean(opts.SocketDir)
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("fakesnp: %w", err)
	}
	token, err := admintoken.LoadOrCreate(filepath.Join(opts.StateDir, "admin.token"))
	if err != nil {
		return nil, fmt.Errorf("fakesnp: %w", err)
	}
	ca, err := LoadOrCreateCA(CAOptions{Dir: filepath.Join(opts.StateDir, "ca"), RSABits: opts.RSABits})
	if err != nil {
		return nil, fmt.Errorf("fakesnp: %w", err)
	}
	s := &Server{opts: opts, log: opts.Logger, ca: ca, token: token, chips: map[string]*Chip{}, launches: map[string]*launch{},
		kdsRequests: newKDSRequests()}
	specs, err := s.loadRegistry()
	if err != nil {
		return nil, err
	}
	for _, spec := range specs {
		if _, err := s.AddLaunch(spec); err != nil {
			s.Close()
			return nil, fmt.Errorf("fakesnp: reopen launch %s: %w", spec.Name, err)
		}
	}
	return s, nil
}

// CA exposes the public chain (for tests and the `fakesnp ca` command).
func (s *Server) CA() *CA { return s.ca }

func (s *Server) chip(name string) (*Chip, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.chipLocked(name)
}

func (s *Server) chipLocked(name string) (*Chip, error) {
	if c, ok := s.chips[name]; ok {
		return c, nil
	}
	c, err := loadOrCreateChip(s.opts.StateDir, name)
	if err != nil {
		return nil, err
	}
	s.chips[name] = c
	return c, nil
}

// CRLSettings chooses what the served CRL revokes.
type CRLSettings struct {
	RevokeASK bool `json:"revoke_ask"`
}

// ChipInfo is what the admin API reports about a chip.
type ChipInfo struct {
	Name   string   `json:"name"`
	ChipID HexBytes `json:"chip_id"`
}

// LaunchInfo is what the admin API reports about a launch.
type LaunchInfo struct {
	LaunchSpec
	ChipID  HexBytes `json:"chip_id"`
	Reports uint64   `json:"reports"`
}

// AddLaunch registers a launch and opens its guest-request channel.
func (s *Server) AddLaunch(spec LaunchSpec) (*LaunchInfo, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errors.New("fakesnp: closed")
	}
	if _, ok := s.launches[spec.Name]; ok {
		return nil, fmt.Errorf("launch %s already exists", spec.Name)
	}
	chip, err := s.chipLocked(spec.Chip)
	if err != nil {
		return nil, err
	}
	sock, err := s.socketPath(spec)
	if err != nil {
		return nil, err
	}
	spec.Socket = sock
	if err := os.MkdirAll(s.opts.SocketDir, 0o700); err != nil {
		return nil, fmt.Errorf("launch %s: %w", spec.Name, err)
	}
	if err := removeSocket(sock); err != nil { // a stale socket from a previous run, nothing else
		return nil, fmt.Errorf("launch %s: %w", spec.Name, err)
	}
	ln, err := net.Listen("unix", spec.Socket)
	if err != nil {
		return nil, fmt.Errorf("launch %s: listen: %w", spec.Name, err)
	}
	l := &launch{spec: spec, chip: chip, ln: ln, conns: map[net.Conn]struct{}{}}
	if _, err := rand.Read(l.reportID[:]); err != nil {
		ln.Close()
		return nil, err
	}
	s.launches[spec.Name] = l
	if err := s.saveRegistryLocked(); err != nil {
		delete(s.launches, spec.Name)
		ln.Close()
		return nil, err
	}
	s.wg.Add(1)
	go s.acceptLoop(l)
	s.log.Info("launch added", "launch", spec.Name, "chip", spec.Chip, "measurement", hex.EncodeToString(spec.Measurement), "socket", spec.Socket)
	return s.infoLocked(l), nil
}

func (s *Server) infoLocked(l *launch) *LaunchInfo {
	return &LaunchInfo{LaunchSpec: l.spec, ChipID: HexBytes(l.chip.ID[:]), Reports: l.served}
}

// Launch returns one launch's description.
func (s *Server) Launch(name string) (*LaunchInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.launches[name]
	if !ok {
		return nil, fmt.Errorf("launch %s: %w", name, os.ErrNotExist)
	}
	return s.infoLocked(l), nil
}

// SetFaults replaces a launch's fault knobs.
func (s *Server) SetFaults(name string, f Faults) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.launches[name]
	if !ok {
		return fmt.Errorf("launch %s: %w", name, os.ErrNotExist)
	}
	l.spec.Faults = f
	return s.saveRegistryLocked()
}

// socketPath confines a launch's socket to the socket directory: a caller of the admin API
// names a file there, never a path elsewhere on the machine.
func (s *Server) socketPath(spec LaunchSpec) (string, error) {
	name := spec.Socket
	switch {
	case name == "":
		name = spec.Name + ".sock"
	case filepath.IsAbs(name):
		if filepath.Dir(filepath.Clean(name)) != s.opts.SocketDir {
			return "", fmt.Errorf("launch %s: socket %s is outside fakesnp's socket directory %s", spec.Name, name, s.opts.SocketDir)
		}
		name = filepath.Base(name)
	}
	if !socketNameRE.MatchString(name) {
		return "", fmt.Errorf("launch %s: socket name %q: want a file name matching %s", spec.Name, name, socketNameRE)
	}
	return filepath.Join(s.opts.SocketDir, name), nil
}

var socketNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\.sock$`)

// removeSocket removes path if it is a unix socket; anything else there is an error, and a
// missing file is fine. fakesnp never removes what is not a socket.
func removeSocket(path string) error {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return err
	case fi.Mode().Type() != os.ModeSocket:
		return fmt.Errorf("%s exists and is not a socket: refusing to replace it", path)
	}
	return os.Remove(path)
}

// LaunchCerts is the certificate table the host would configure for a launch's extended
// reports (SNP_SET_EXT_CONFIG): the endorsement key that signs its reports at the current TCB
// (its VLEK, or its chip's VCEK), the ASVK or ASK, and the ARK, indexed by AMD's GUIDs.
func (s *Server) LaunchCerts(name string) ([]byte, error) {
	s.mu.Lock()
	l, ok := s.launches[name]
	var spec LaunchSpec
	var chip *Chip
	if ok {
		spec, chip = l.spec, l.chip
	}
	s.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("launch %s: %w", name, os.ErrNotExist)
	}
	tcb, err := kds.ComposeTCBParts(*spec.TCB)
	if err != nil {
		return nil, err
	}
	table := &abi.CertTable{}
	add := func(guid string, der []byte) {
		table.Entries = append(table.Entries, abi.CertTableEntry{GUID: uuid.MustParse(guid), RawCert: der})
	}
	if spec.VLEK {
		_, cert, err := s.ca.VLEK(tcb)
		if err != nil {
			return nil, err
		}
		add(abi.VlekGUID, cert.Raw)
		add(abi.AskGUID, s.ca.Asvk.Raw)
	} else {
		_, cert, err := s.ca.VCEK(chip, tcb)
		if err != nil {
			return nil, err
		}
		add(abi.VcekGUID, cert.Raw)
		add(abi.AskGUID, s.ca.Ask.Raw)
	}
	add(abi.ArkGUID, s.ca.Ark.Raw)
	return table.Marshal(), nil
}

// RemoveLaunch closes a launch's channel and forgets it.
func (s *Server) RemoveLaunch(name string) error {
	s.mu.Lock()
	l, ok := s.launches[name]
	if ok {
		delete(s.launches, name)
		l.ln.Close()
		for c := range l.conns {
			c.Close()
		}
	}
	err := s.saveRegistryLocked()
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("launch %s: %w", name, os.ErrNotExist)
	}
	if rerr := removeSocket(l.spec.Socket); rerr != nil {
		s.log.Warn("launch socket not removed", "launch", name, "err", rerr)
	}
	return err
}

// Close stops every channel and waits for their goroutines.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for _, l := range s.launches {
		l.ln.Close()
		for c := range l.conns {
			c.Close()
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Server) registryPath() string { return filepath.Join(s.opts.StateDir, "launches.json") }

func (s *Server) loadRegistry() ([]LaunchSpec, error) {
	b, err := os.ReadFile(s.registryPath())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("fakesnp: read launch registry: %w", err)
	}
	var specs []LaunchSpec
	if err := json.Unmarshal(b, &specs); err != nil {
		return nil, fmt.Errorf("fakesnp: launch registry %s: %w", s.registryPath(), err)
	}
	return specs, nil
}

func (s *Server) saveRegistryLocked() error {
	specs := make([]LaunchSpec, 0, len(s.launches))
	for _, l := range s.launches {
		specs = append(specs, l.spec)
	}
	sort.Slice(specs, func(i, j int) bool { return specs[i].Name < specs[j].Name })
	b, _ := json.MarshalIndent(specs, "", "  ")
	return atomicfile.Write(s.registryPath(), b, 0o600)
}

func (s *Server) acceptLoop(l *launch) {
	defer s.wg.Done()
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		l.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveConn(l, c)
			s.mu.Lock()
			delete(l.conns, c)
			s.mu.Unlock()
			c.Close()
		}()
	}
}

// serveConn answers any number of MSG_REPORT_REQ frames. A frame longer than a request is
// refused by closing the connection (we cannot resync after skipping an unbounded length); a
// short or malformed one gets STATUS 0x16 and the connection stays up.
func (s *Server) serveConn(l *launch, c net.Conn) {
	log := s.log.With("launch", l.spec.Name)
	for {
		_ = c.SetReadDeadline(time.Now().Add(s.opts.IdleTimeout))
		body, err := protocol.ReadFrame(c, protocol.ReportReqSize)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				log.Warn("guest channel closed", "err", err)
			}
			return
		}
		var rsp protocol.ReportResponse
		var req protocol.ReportRequest
		if err := req.UnmarshalBinary(body); err != nil {
			log.Warn("bad MSG_REPORT_REQ", "err", err)
			rsp.Status = protocol.StatusInvalidParams
		} else {
			s.mu.Lock()
			snapshot := *l // faults may change concurrently
			s.mu.Unlock()
			rsp.Report, rsp.Status = s.buildReport(&snapshot, &req)
			if rsp.Status == protocol.StatusSuccess {
				s.mu.Lock()
				l.served++
				s.mu.Unlock()
			}
			log.Info("report request", "vmpl", req.VMPL, "status", rsp.Status)
		}
		out, err := rsp.MarshalBinary()
		if err != nil {
			log.Error("encode MSG_REPORT_RSP", "err", err)
			return
		}
		_ = c.SetWriteDeadline(time.Now().Add(30 * time.Second))
		if err := protocol.WriteFrame(c, out); err != nil {
			log.Warn("write MSG_REPORT_RSP", "err", err)
			return
		}
	}
}

// Handler serves the KDS endpoints and the admin API.
//
//	GET  /vcek/v1/{product}/cert_chain
//	GET  /vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..
//	GET  /admin/v1/launches              POST /admin/v1/launches (LaunchSpec)
//	GET  /admin/v1/launches/{name}       DELETE /admin/v1/launches/{name}
//	PUT  /admin/v1/launches/{name}/faults (Faults)
//	POST /admin/v1/chips/{name}          (creates the chip if needed, returns ChipInfo)
//	GET  /vcek/v1/{product}/crl          the ARK-signed CRL; PUT /admin/v1/crl (CRLSettings)
//
// The KDS endpoints are public, as AMD's are; the admin API needs the bearer token in
// StateDir/admin.token, like the verifier's: whoever may launch VMs and set faults is the
// owner, not anybody who can reach the port.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /vcek/v1/{product}/{hwid}", s.countKDS("vcek", s.handleKDS))
	mux.Handle("GET /metrics", s.metricsHandler())
	mux.HandleFunc("GET /vlek/v1/{product}/cert_chain", s.countKDS("vlek", func(w http.ResponseWriter, r *http.Request) {
		if p := r.PathValue("product"); p != ProductLine {
			http.Error(w, fmt.Sprintf("unknown product %q", p), http.StatusNotFound)
			return
		}
		w.Header().Set("Content-Type", "application/x-pem-file")
		w.Write(s.ca.VLEKChainPEM())
	}))
	admin := http.NewServeMux()
	mux.Handle("/admin/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !admintoken.Valid(r, s.token) {
			httpError(w, http.StatusUnauthorized, errors.New("missing or wrong admin bearer token (fakesnp's state dir, admin.token)"))
			return
		}
		admin.ServeHTTP(w, r)
	}))
	admin.HandleFunc("GET /admin/v1/launches", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		out := []*LaunchInfo{}
		for _, l := range s.launches {
			out = append(out, s.infoLocked(l))
		}
		s.mu.Unlock()
		sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
		writeJSON(w, http.StatusOK, out)
	})
	admin.HandleFunc("POST /admin/v1/launches", func(w http.ResponseWriter, r *http.Request) {
		var spec LaunchSpec
		if err := decodeBody(r, &spec); err != nil {
			httpError(w, http.StatusBadRequest, err)
			return
		}
		info, err := s.AddLaunch(spec)
		if err != nil {
			httpError(w, http.StatusBadRequest, err)
			return
		}
		writeJSON(w, http.StatusCreated, info)
	})
	admin.HandleFunc("GET /admin/v1/launches/{name}", func(w http.ResponseWriter, r *http.Request) {
		info, err := s.Launch(r.PathValue("name"))
		if err != nil {
			httpError(w, http.StatusNotFound, err)
			return
		}
		writeJSON(w, http.StatusOK, info)
	})
	admin.HandleFunc("DELETE /admin/v1/launches/{name}", func(w http.ResponseWriter, r *http.Request) {
		if err := s.RemoveLaunch(r.PathValue("name")); err != nil {
			httpError(w, http.StatusNotFound, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	admin.HandleFunc("PUT /admin/v1/launches/{name}/faults", func(w http.ResponseWriter, r *http.Request) {
		var f Faults
		if err := decodeBody(r, &f); err != nil {
			httpError(w, http.StatusBadRequest, err)
			return
		}
		if err := s.SetFaults(r.PathValue("name"), f); err != nil {
			httpError(w, http.StatusNotFound, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	admin.HandleFunc("GET /admin/v1/launches/{name}/certs", func(w http.ResponseWriter, r *http.Request) {
		certs, err := s.LaunchCerts(r.PathValue("name"))
		if err != nil {
			httpError(w, http.StatusNotFound, err)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(certs)
	})
	admin.HandleFunc("PUT /admin/v1/crl", func(w http.ResponseWriter, r *http.Request) {
		var c CRLSettings
		if err := decodeBody(r, &c); err != nil {
			httpError(w, http.StatusBadRequest, err)
			return
		}
		s.mu.Lock()
		s.revokeASK = c.RevokeASK
		s.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	})
	admin.HandleFunc("POST /admin/v1/chips/{name}", func(w http.ResponseWriter, r *http.Request) {
		c, err := s.chip(r.PathValue("name"))
		if err != nil {
			httpError(w, http.StatusBadRequest, err)
			return
		}
		writeJSON(w, http.StatusOK, ChipInfo{Name: c.Name, ChipID: HexBytes(c.ID[:])})
	})
	return mux
}

func (s *Server) handleKDS(w http.ResponseWriter, r *http.Request) {
	if p := r.PathValue("product"); p != ProductLine {
		http.Error(w, fmt.Sprintf("unknown product %q", p), http.StatusNotFound)
		return
	}
	hwid := r.PathValue("hwid")
	if hwid == "crl" {
		s.mu.Lock()
		revoke := s.revokeASK
		s.mu.Unlock()
		der, err := s.ca.CRL(revoke)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/pkix-crl")
		w.Write(der)
		return
	}
	if hwid == "cert_chain" {
		w.Header().Set("Content-Type", "application/x-pem-file")
		w.Write(s.ca.CertChainPEM())
		return
	}
	id, err := hex.DecodeString(hwid)
	if err != nil || len(id) != 64 {
		http.Error(w, "hwid must be 64 bytes of hex", http.StatusBadRequest)
		return
	}
	q := r.URL.Query()
	spl := func(name string) (uint8, error) {
		v, err := strconv.ParseUint(q.Get(name), 10, 8)
		if err != nil {
			return 0, fmt.Errorf("query %s: %w", name, err)
		}
		return uint8(v), nil
	}
	var parts kds.TCBParts
	var errs []string
	for name, dst := range map[string]*uint8{"blSPL": &parts.BlSpl, "teeSPL": &parts.TeeSpl, "snpSPL": &parts.SnpSpl, "ucodeSPL": &parts.UcodeSpl} {
		v, err := spl(name)
		if err != nil {
			errs = append(errs, err.Error())
		}
		*dst = v
	}
	if len(errs) > 0 {
		sort.Strings(errs)
		http.Error(w, strings.Join(errs, "; "), http.StatusBadRequest)
		return
	}
	tcb, err := kds.ComposeTCBParts(parts)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var chip *Chip
	s.mu.Lock()
	for _, c := range s.chips {
		if string(c.ID[:]) == string(id) {
			chip = c
		}
	}
	s.mu.Unlock()
	if chip == nil {
		http.Error(w, "unknown hwid", http.StatusNotFound)
		return
	}
	_, cert, err := s.ca.VCEK(chip, tcb)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/pkix-cert")
	w.Write(cert.Raw)
}

func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("request body: %w", err)
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func httpError(w http.ResponseWriter, status int, err error) {
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

// ServeHTTP runs the KDS/admin HTTP server on ln until ctx ends.
func (s *Server) ServeHTTP(ctx context.Context, ln net.Listener) error {
	return daemon.ServeHTTP(ctx, ln, s.Handler())
}
