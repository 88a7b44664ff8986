// Package verifier is svsm-e2e's relying party and key broker: a KBS 0.4.0 "RCAR" server
// (auth → attest → resource) that verifies SEV-SNP evidence for real (session nonce, REPORT_DATA
// binding, VCEK chain and signature, per-VM policy) and releases a VM's state key at most once
// per primed boot request, with the freshness payload and confirmation endpoint of the
// svsm-e2e extension. State lives in an embedded bbolt database; every decision is audited.
package verifier

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
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
	"strings"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/google/go-sev-guest/verify/trust"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// Options configures a Verifier.
type Options struct {
	// DataDir holds verifier.db and admin.token.
	DataDir string
	// KDSBaseURL replaces https://kdsintf.amd.com (e.g. fakesnp's URL).
	KDSBaseURL string
	// TrustedRootsPEM is a KDS cert_chain (ASK then ARK). Empty: AMD's genuine roots.
	TrustedRootsPEM []byte
	// SessionTTL bounds how long an auth session lives (default 5 min).
	SessionTTL time.Duration
	// MaxSessions bounds concurrent sessions (default 10000).
	MaxSessions int
	Logger      *slog.Logger
}

// Verifier is the running service.
type Verifier struct {
	opts       Options
	log        *slog.Logger
	store      *Store
	check      *checker
	tokenKey   *ecdsa.PrivateKey
	adminToken string

	mu       sync.Mutex
	sessions map[string]*session
}

type session struct {
	id      string
	nonce   string
	created time.Time
	// Set by a successful attest.
	vm  string
	key *protocol.ECPublicKey
}

// New opens the database, the admin token and the token-signing key.
func New(opts Options) (*Verifier, error) {
	if opts.DataDir == "" {
		return nil, errors.New("verifier: DataDir is required")
	}
	if opts.SessionTTL == 0 {
		opts.SessionTTL = 5 * time.Minute
	}
	if opts.MaxSessions == 0 {
		opts.MaxSessions = 10000
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := os.MkdirAll(opts.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("verifier data dir: %w", err)
	}
	v := &Verifier{opts: opts, log: opts.Logger, sessions: map[string]*session{}}
	v.check = &checker{getter: newKDSGetter(opts.KDSBaseURL)}
	if len(opts.TrustedRootsPEM) > 0 {
		root := trust.AMDRootCertsProduct("Milan")
		if err := root.FromKDSCertBytes(opts.TrustedRootsPEM); err != nil {
			return nil, fmt.Errorf("verifier: trusted roots: %w", err)
		}
		if root.ProductCerts.Ark == nil || root.ProductCerts.Ask == nil {
			return nil, errors.New("verifier: trusted roots: need ASK and ARK certificates")
		}
		v.check.roots = map[string][]*trust.AMDRootCerts{"Milan": {root}}
	}
	tok, err := loadOrCreateToken(filepath.Join(opts.DataDir, "admin.token"))
	if err != nil {
		return nil, err
	}
	v.adminToken = tok
	if v.store, err = OpenStore(filepath.Join(opts.DataDir, "verifier.db")); err != nil {
		return nil, err
	}
	if v.tokenKey, err = v.loadTokenKey(); err != nil {
		v.store.Close()
		return nil, err
	}
	return v, nil
}

// Close closes the database.
func (v *Verifier) Close() error { return v.store.Close() }

// Store exposes the database (audit reads in tests and the CLI).
func (v *Verifier) Store() *Store { return v.store }

// AdminTokenPath is where the admin bearer token is kept.
func (v *Verifier) AdminTokenPath() string { return filepath.Join(v.opts.DataDir, "admin.token") }

func loadOrCreateToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		t := strings.TrimSpace(string(b))
		if len(t) < 32 {
			return "", fmt.Errorf("admin token %s is too short", path)
		}
		return t, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("read admin token: %w", err)
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", err
	}
	t := hex.EncodeToString(raw)
	if err := os.WriteFile(path, []byte(t+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("write admin token: %w", err)
	}
	return t, nil
}

func (v *Verifier) loadTokenKey() (*ecdsa.PrivateKey, error) {
	var key *ecdsa.PrivateKey
	err := v.store.Update(func(tx *Tx) error {
		if der := tx.Meta("token_key"); der != nil {
			k, err := x509.ParseECPrivateKey(der)
			if err != nil {
				return fmt.Errorf("token key: %w", err)
			}
			key = k
			return nil
		}
		k, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
		if err != nil {
			return err
		}
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			return err
		}
		key = k
		return tx.PutMeta("token_key", der)
	})
	return key, err
}

// KBSHandler serves the KBS protocol and the confirmation extension.
func (v *Verifier) KBSHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+protocol.KBSPathAuth, v.handleAuth)
	mux.HandleFunc("POST "+protocol.KBSPathAttest, v.handleAttest)
	mux.HandleFunc("GET "+protocol.KBSPathResource+"{repo}/{type}/{tag}", v.handleResource)
	mux.HandleFunc("POST "+protocol.KBSPathConfirm, v.handleConfirm)
	return mux
}

// problem writes an RFC 7807 error.
func problem(w http.ResponseWriter, status int, name, detail string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(&protocol.ProblemDetails{
		Type: protocol.ProblemTypeBase + name, Title: name, Status: status, Detail: detail,
	})
}

func readJSON(r *http.Request, v any) error {
	body, err := io.ReadAll(io.LimitReader(r.Body, protocol.MaxFrameSize+1))
	if err != nil {
		return fmt.Errorf("read body: %w", err)
	}
	if len(body) > protocol.MaxFrameSize {
		return fmt.Errorf("body exceeds %d bytes", protocol.MaxFrameSize)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("invalid JSON: %w", err)
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// audit commits one audit event on its own (for decisions that change nothing else).
func (v *Verifier) audit(e AuditEvent) {
	if err := v.store.Update(func(tx *Tx) error { return tx.Audit(e) }); err != nil {
		v.log.Error("audit write failed", "err", err, "event", e.Event)
	}
	v.log.Info("decision", "event", e.Event, "outcome", e.Outcome, "vm", e.VM, "session", e.Session, "reason", e.Reason)
}

func (v *Verifier) newSession() (*session, error) {
	idb := make([]byte, 16)
	nonce := make([]byte, 32)
	if _, err := rand.Read(idb); err != nil {
		return nil, err
	}
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	s := &session{id: hex.EncodeToString(idb), nonce: base64.StdEncoding.EncodeToString(nonce), created: time.Now()}
	v.mu.Lock()
	defer v.mu.Unlock()
	for id, old := range v.sessions {
		if time.Since(old.created) > v.opts.SessionTTL {
			delete(v.sessions, id)
		}
	}
	if len(v.sessions) >= v.opts.MaxSessions {
		return nil, errors.New("too many sessions")
	}
	v.sessions[s.id] = s
	return s, nil
}

func (v *Verifier) session(r *http.Request) *session {
	c, err := r.Cookie(protocol.KBSSessionCookie)
	if err != nil {
		return nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	s := v.sessions[c.Value]
	if s == nil || time.Since(s.created) > v.opts.SessionTTL {
		return nil
	}
	return s
}

func (v *Verifier) handleAuth(w http.ResponseWriter, r *http.Request) {
	var req protocol.KBSRequest
	if err := readJSON(r, &req); err != nil {
		problem(w, http.StatusBadRequest, "InvalidRequest", err.Error())
		return
	}
	if req.Version != protocol.KBSVersion {
		v.audit(AuditEvent{Event: "auth", Outcome: Deny, Reason: fmt.Sprintf("version: %q, want %s", req.Version, protocol.KBSVersion)})
		problem(w, http.StatusBadRequest, "ProtocolVersion", fmt.Sprintf("version %q, this server speaks %s", req.Version, protocol.KBSVersion))
		return
	}
	if req.Tee != protocol.TeeSNP {
		v.audit(AuditEvent{Event: "auth", Outcome: Deny, Reason: fmt.Sprintf("tee: %q, want %q", req.Tee, protocol.TeeSNP)})
		problem(w, http.StatusBadRequest, "UnsupportedTee", fmt.Sprintf("tee %q, want %q", req.Tee, protocol.TeeSNP))
		return
	}
	s, err := v.newSession()
	if err != nil {
		problem(w, http.StatusServiceUnavailable, "SessionLimit", err.Error())
		return
	}
	http.SetCookie(w, &http.Cookie{Name: protocol.KBSSessionCookie, Value: s.id, Path: "/kbs", HttpOnly: true, MaxAge: int(v.opts.SessionTTL.Seconds())})
	writeJSON(w, http.StatusOK, protocol.KBSChallenge{Nonce: s.nonce, ExtraParams: ""})
}

func (v *Verifier) handleAttest(w http.ResponseWriter, r *http.Request) {
	s := v.session(r)
	if s == nil {
		problem(w, http.StatusUnauthorized, "UnAuthenticated", "no valid kbs-session-id cookie; POST /kbs/v0/auth first")
		return
	}
	deny := func(status int, vm string, ref *Refusal) {
		v.audit(AuditEvent{Event: "attest", Outcome: Deny, VM: vm, Session: s.id, Reason: ref.Error()})
		problem(w, status, "AttestationFailed", ref.Error())
	}
	var att protocol.KBSAttestation
	if err := readJSON(r, &att); err != nil {
		deny(http.StatusBadRequest, "", refuse("body", "%v", err))
		return
	}
	if att.RuntimeData.Nonce != s.nonce {
		deny(http.StatusUnauthorized, "", refuse("nonce", "runtime-data nonce is not this session's nonce"))
		return
	}
	key, err := att.RuntimeData.TeePubKey.ECPublicKey()
	if err != nil {
		deny(http.StatusBadRequest, "", refuse("tee-pubkey", "%v", err))
		return
	}
	if _, err := key.ECDH(); err != nil {
		deny(http.StatusBadRequest, "", refuse("tee-pubkey", "%v", err))
		return
	}
	raw, err := base64.StdEncoding.DecodeString(att.TeeEvidence.PrimaryEvidence.SnpReport)
	if err != nil || len(raw) != protocol.ReportSize {
		deny(http.StatusBadRequest, "", refuse("snp-report", "want standard base64 of %d bytes (got %d bytes, err %v)", protocol.ReportSize, len(raw), err))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 20*time.Second)
	defer cancel()
	evidence, err := v.check.verifyReport(ctx, raw)
	if err != nil {
		deny(http.StatusUnauthorized, "", refuse("signature", "%v", err))
		return
	}
	nonce, _ := base64.StdEncoding.DecodeString(s.nonce)
	if ref := checkBinding(evidence.GetReport(), key, nonce); ref != nil {
		deny(http.StatusUnauthorized, "", ref)
		return
	}
	vm, ref := v.identify(evidence.GetReport().GetHostData(), evidence.GetReport().GetMeasurement())
	if ref != nil {
		deny(http.StatusForbidden, "", ref)
		return
	}
	if err := checkPolicy(vm, evidence); err != nil {
		var rf *Refusal
		if !errors.As(err, &rf) {
			rf = refuse("policy", "%v", err)
		}
		deny(http.StatusForbidden, vm.Name, rf)
		return
	}
	token, err := v.issueToken(vm.Name, s.id, att.RuntimeData.TeePubKey)
	if err != nil {
		problem(w, http.StatusInternalServerError, "Internal", err.Error())
		return
	}
	v.mu.Lock()
	s.vm, s.key = vm.Name, &key
	v.mu.Unlock()
	v.audit(AuditEvent{Event: "attest", Outcome: Allow, VM: vm.Name, Session: s.id})
	writeJSON(w, http.StatusOK, protocol.KBSAttestResponse{Token: token})
}

// identify finds the registered VM a report belongs to: by HOST_DATA when some VM pins it,
// otherwise by measurement.
func (v *Verifier) identify(hostData, measurement []byte) (*VM, *Refusal) {
	var vms []*VM
	if err := v.store.View(func(tx *Tx) error {
		var err error
		vms, err = tx.VMs()
		return err
	}); err != nil {
		return nil, refuse("database", "%v", err)
	}
	var byHost, byMeas []*VM
	for _, vm := range vms {
		if len(vm.HostData) > 0 {
			if string(vm.HostData) == string(hostData) {
				byHost = append(byHost, vm)
			}
			continue
		}
		for _, m := range vm.Measurements {
			if string(m) == string(measurement) {
				byMeas = append(byMeas, vm)
				break
			}
		}
	}
	switch {
	case len(byHost) == 1:
		return byHost[0], nil
	case len(byHost) > 1:
		return nil, refuse("host_data", "%x matches %d registered VMs", hostData, len(byHost))
	case len(byMeas) == 1:
		return byMeas[0], nil
	case len(byMeas) > 1:
		return nil, refuse("measurement", "%x matches %d registered VMs; pin HOST_DATA to tell them apart", measurement, len(byMeas))
	}
	return nil, refuse("identity", "no registered VM matches HOST_DATA %x and MEASUREMENT %x", hostData, measurement)
}

type tokenClaims struct {
	jwt.Claims
	VM        string             `json:"vm"`
	TeePubKey protocol.TeePubKey `json:"tee-pubkey"`
}

func (v *Verifier) issueToken(vm, sid string, key protocol.TeePubKey) (string, error) {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES384, Key: v.tokenKey}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return "", err
	}
	now := time.Now()
	c := tokenClaims{
		Claims: jwt.Claims{Issuer: "svsm-verifier", Subject: vm, ID: sid, IssuedAt: jwt.NewNumericDate(now), Expiry: jwt.NewNumericDate(now.Add(v.opts.SessionTTL))},
		VM:     vm, TeePubKey: key,
	}
	return jwt.Signed(signer).Claims(c).Serialize()
}

func (v *Verifier) parseToken(raw string) (*tokenClaims, error) {
	tok, err := jwt.ParseSigned(raw, []jose.SignatureAlgorithm{jose.ES384})
	if err != nil {
		return nil, err
	}
	var c tokenClaims
	if err := tok.Claims(&v.tokenKey.PublicKey, &c); err != nil {
		return nil, err
	}
	if err := c.Claims.ValidateWithLeeway(jwt.Expected{Issuer: "svsm-verifier", Time: time.Now()}, 0); err != nil {
		return nil, err
	}
	return &c, nil
}

// handleResource releases the attested VM's secret, consuming its primed boot request.
func (v *Verifier) handleResource(w http.ResponseWriter, r *http.Request) {
	var vmName, sid string
	var key protocol.ECPublicKey
	if s := v.session(r); s != nil {
		v.mu.Lock()
		if s.key != nil {
			vmName, key, sid = s.vm, *s.key, s.id
		}
		v.mu.Unlock()
	} else if auth := r.Header.Get("Authorization"); strings.HasPrefix(auth, "Bearer ") {
		c, err := v.parseToken(strings.TrimPrefix(auth, "Bearer "))
		if err != nil {
			v.audit(AuditEvent{Event: "release", Outcome: Deny, Reason: "token: " + err.Error()})
			problem(w, http.StatusUnauthorized, "TokenInvalid", err.Error())
			return
		}
		k, err := c.TeePubKey.ECPublicKey()
		if err != nil {
			problem(w, http.StatusUnauthorized, "TokenInvalid", err.Error())
			return
		}
		vmName, key, sid = c.VM, k, c.ID
	}
	if vmName == "" {
		v.audit(AuditEvent{Event: "release", Outcome: Deny, Reason: "session: no attested session or token"})
		problem(w, http.StatusUnauthorized, "UnAuthenticated", "no attested session or token")
		return
	}
	path := r.PathValue("repo") + "/" + r.PathValue("type") + "/" + r.PathValue("tag")
	// "vm/<name>/state-key" names the VM explicitly; the upstream default path means "the
	// attested VM's state key".
	if r.PathValue("repo") == "vm" && r.PathValue("type") != vmName {
		v.audit(AuditEvent{Event: "release", Outcome: Deny, VM: vmName, Session: sid, Reason: fmt.Sprintf("resource %s names another VM", path)})
		problem(w, http.StatusForbidden, "PolicyDeny", fmt.Sprintf("session attested vm %s, resource %s names another", vmName, path))
		return
	}
	jwe, ref, err := v.release(vmName, sid, key)
	switch {
	case err != nil:
		problem(w, http.StatusInternalServerError, "Internal", err.Error())
	case ref != nil:
		problem(w, http.StatusForbidden, "PolicyDeny", ref.Error())
	default:
		writeJSON(w, http.StatusOK, jwe)
	}
}

// release decides and commits, in one durable transaction, the consumption of the boot
// request, the boot record and the audit event; only then is the JWE returned.
func (v *Verifier) release(vmName, sid string, key protocol.ECPublicKey) (*protocol.FlattenedJWE, *Refusal, error) {
	bootID := make([]byte, protocol.BootIDSize)
	confirmKey := make([]byte, 32)
	if _, err := rand.Read(bootID); err != nil {
		return nil, nil, err
	}
	if _, err := rand.Read(confirmKey); err != nil {
		return nil, nil, err
	}
	var out *protocol.FlattenedJWE
	var ref *Refusal
	err := v.store.Update(func(tx *Tx) error {
		vm, err := tx.VM(vmName)
		if err != nil {
			return err
		}
		if !vm.Primed {
			ref = refuse("boot_request", "no primed boot request for vm %s (already released %d times; a clone or replay?)", vm.Name, vm.Releases)
			return tx.Audit(AuditEvent{Event: "release", Outcome: Deny, VM: vm.Name, Session: sid, Reason: ref.Error()})
		}
		var secret []byte
		boot := &Boot{ID: hex.EncodeToString(bootID), VM: vm.Name, Expected: vm.Counter, Next: vm.Counter + 1, ConfirmKey: confirmKey, Released: tx.now}
		switch vm.SecretMode {
		case protocol.SecretModeRaw:
			secret = append([]byte(nil), vm.StateKey...)
		case protocol.SecretModeV1:
			p := protocol.SecretPayloadV1{WriteThrough: vm.WriteThrough, ExpectedCounter: boot.Expected, NextCounter: boot.Next}
			copy(p.StateKey[:], vm.StateKey)
			copy(p.BootID[:], bootID)
			copy(p.ConfirmKey[:], confirmKey)
			copy(p.VMID[:], vm.ID)
			secret, _ = p.MarshalBinary()
		default:
			return fmt.Errorf("vm %s: unknown secret mode %q", vm.Name, vm.SecretMode)
		}
		out, err = protocol.EncryptSecret(key, secret)
		if err != nil {
			return err
		}
		vm.Primed = false
		vm.LastBoot = boot.ID
		vm.Releases++
		if err := tx.PutVM(vm); err != nil {
			return err
		}
		if err := tx.PutBoot(boot); err != nil {
			return err
		}
		c := boot.Expected
		return tx.Audit(AuditEvent{Event: "release", Outcome: Allow, VM: vm.Name, Session: sid, BootID: boot.ID, Counter: &c})
	})
	if err != nil {
		return nil, nil, fmt.Errorf("release for vm %s: %w", vmName, err)
	}
	if ref != nil {
		v.log.Info("decision", "event", "release", "outcome", Deny, "vm", vmName, "reason", ref.Error())
		return nil, ref, nil
	}
	v.log.Info("decision", "event", "release", "outcome", Allow, "vm", vmName, "session", sid)
	return out, nil, nil
}

// handleConfirm records that a boot's state durably holds a counter (PROTOCOLS.md §3).
func (v *Verifier) handleConfirm(w http.ResponseWriter, r *http.Request) {
	var req protocol.ConfirmRequest
	if err := readJSON(r, &req); err != nil {
		problem(w, http.StatusBadRequest, "InvalidRequest", err.Error())
		return
	}
	if err := req.Validate(); err != nil {
		problem(w, http.StatusBadRequest, "InvalidRequest", err.Error())
		return
	}
	resp, err := v.Confirm(&req)
	if err != nil {
		problem(w, http.StatusInternalServerError, "Internal", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// Confirm applies the confirmation rules: the boot must be the VM's latest release, the MAC
// must verify, and the counter must be the confirmed one (idempotent repeat) or one more.
// One more is accepted once per boot by default, and any number of times, one step at a
// time, in write-through mode.
func (v *Verifier) Confirm(req *protocol.ConfirmRequest) (*protocol.ConfirmResponse, error) {
	id := hex.EncodeToString(req.BootID)
	resp := &protocol.ConfirmResponse{}
	err := v.store.Update(func(tx *Tx) error {
		deny := func(vm string, counter uint64, format string, args ...any) error {
			resp.Success, resp.Reason, resp.Counter = false, fmt.Sprintf(format, args...), counter
			c := req.Counter
			return tx.Audit(AuditEvent{Event: "confirm", Outcome: Deny, VM: vm, BootID: id, Counter: &c, Reason: resp.Reason})
		}
		boot, err := tx.Boot(id)
		if errors.Is(err, ErrNotFound) {
			return deny("", 0, "unknown boot id")
		} else if err != nil {
			return err
		}
		if err := req.Verify(boot.ConfirmKey); err != nil {
			return deny(boot.VM, 0, "mac does not verify")
		}
		vm, err := tx.VM(boot.VM)
		if err != nil {
			return err
		}
		if vm.LastBoot != id {
			return deny(vm.Name, vm.Counter, "boot %s was superseded by a later release", id)
		}
		switch {
		case req.Counter == vm.Counter && boot.Confirmed >= boot.Next && boot.Confirmed == req.Counter:
			resp.Success, resp.Counter = true, vm.Counter // idempotent repeat
			return nil
		case req.Counter == vm.Counter+1 && (req.Counter == boot.Next || (vm.WriteThrough && boot.Confirmed >= boot.Next)):
			vm.Counter = req.Counter
			boot.Confirmed = req.Counter
			if err := tx.PutVM(vm); err != nil {
				return err
			}
			if err := tx.PutBoot(boot); err != nil {
				return err
			}
			resp.Success, resp.Counter = true, vm.Counter
			c := req.Counter
			return tx.Audit(AuditEvent{Event: "confirm", Outcome: Allow, VM: vm.Name, BootID: id, Counter: &c})
		default:
			return deny(vm.Name, vm.Counter, "counter %d is neither the confirmed counter %d nor the next step", req.Counter, vm.Counter)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("confirm boot %s: %w", id, err)
	}
	v.log.Info("decision", "event", "confirm", "success", resp.Success, "boot", id, "counter", req.Counter, "reason", resp.Reason)
	return resp, nil
}

// Serve runs h on ln until ctx ends.
func Serve(ctx context.Context, ln net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 60 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
