// Package verifier is svsm-e2e's relying party and key broker: a KBS 0.4.0 "RCAR" server
// (auth → attest → resource) that verifies SEV-SNP evidence for real (session nonce, REPORT_DATA
// binding, VCEK chain and signature, per-VM policy) and releases a VM's state key at most once
// per primed boot request, with the freshness payload and confirmation endpoint of the
// svsm-e2e extension. State lives in an embedded bbolt database, or in PostgreSQL shared by
// any number of replicas; every decision is audited in the transaction that makes it.
package verifier

import (
	"bytes"
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
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/go-sev-guest/verify/trust"

	"github.com/svsm-e2e/svsm-e2e/internal/admintoken"
	"github.com/svsm-e2e/svsm-e2e/internal/crashpoint"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// Options configures a Verifier.
type Options struct {
	// DataDir holds admin.token, and verifier.db unless DatabaseURL is set.
	DataDir string
	// DatabaseURL, if set, keeps the state in PostgreSQL (a pgx connection string) instead
	// of DataDir/verifier.db: several replicas may share it, each with its own DataDir.
	DatabaseURL string
	// Instance names this replica in the audit ("instance"); empty: not recorded.
	Instance string
	// KDSBaseURL replaces https://kdsintf.amd.com (e.g. fakesnp's URL).
	KDSBaseURL string
	// TrustedRootsPEM is a KDS cert_chain (ASK then ARK). Empty: AMD's genuine roots.
	TrustedRootsPEM []byte
	// SessionTTL bounds how long an auth session lives (default 5 min).
	SessionTTL time.Duration
	// MaxSessions bounds concurrent sessions (default 10000). When the table is full, a new
	// /auth evicts spent and then unattested sessions (oldest first), never an attested one:
	// unauthenticated callers cannot starve guests that proved themselves.
	MaxSessions int
	// AuditWindow is how long identical refusals are folded into one audit row (default 10 s).
	AuditWindow time.Duration
	// KDS bounds certificate fetches (zero values: defaults, see KDSOptions).
	KDS KDSOptions
	// CheckCRL fetches the product's CRL (from the KDS base) and refuses a chain whose ASK it
	// revokes, or a CRL not signed by the trusted ARK.
	CheckCRL bool
	// Crash marks each decision's transaction at its registered crash points (fault
	// injection: before and after the commit).
	Crash  *crashpoint.Injector
	Logger *slog.Logger
}

// storeOpenTimeout bounds opening the store and loading the token key at start.
const storeOpenTimeout = 30 * time.Second

// Verifier is the running service.
type Verifier struct {
	opts       Options
	log        *slog.Logger
	store      Store
	metrics    *metrics
	check      *checker
	tokenKey   *ecdsa.PrivateKey
	adminToken string

	auditLog *auditLog

	mu       sync.Mutex
	sessions map[string]*session
	// byAge holds the sessions in the order they were created, evicted ones included until
	// they would have expired, so that expiry looks only at the oldest (a scan of the whole
	// table on each /auth cost 3 % of the verifier's CPU at 2,000 live sessions).
	byAge []*session
}

// sessionState is where a KBS session is in its one-shot life: one attestation per nonce,
// one release per session.
type sessionState int

const (
	sessionFresh     sessionState = iota // nonce issued, no attestation yet
	sessionAttesting                     // /attest running: the nonce is spent
	sessionAttested                      // evidence verified: one release may follow
	sessionSpent                         // attestation refused or release done: worth nothing
)

type session struct {
	id      string
	nonce   string
	created time.Time
	state   sessionState
	// Set by a successful attest.
	vm       string
	key      *protocol.ECPublicKey
	evidence *spb.Attestation
	policy   policyInputs // the VM's, as the evidence passed them
	// bootRequest is the VM's pending boot request when the evidence was verified (0: none).
	bootRequest uint64
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
	if opts.AuditWindow == 0 {
		opts.AuditWindow = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := os.MkdirAll(opts.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("verifier data dir: %w", err)
	}
	v := &Verifier{opts: opts, log: opts.Logger, sessions: map[string]*session{}}
	v.check = &checker{getter: newKDSGetter(opts.KDSBaseURL, opts.KDS), checkCRL: opts.CheckCRL}
	if len(opts.TrustedRootsPEM) > 0 {
		roots, product, err := parseTrustedRoots(opts.TrustedRootsPEM)
		if err != nil {
			return nil, fmt.Errorf("verifier: trusted roots: %w", err)
		}
		v.check.roots = map[string][]*trust.AMDRootCerts{product: {roots}}
		v.check.rootProduct = product
	}
	tok, err := admintoken.LoadOrCreate(filepath.Join(opts.DataDir, "admin.token"))
	if err != nil {
		return nil, err
	}
	v.adminToken = tok
	octx, cancel := context.WithTimeout(context.Background(), storeOpenTimeout)
	defer cancel()
	if opts.DatabaseURL != "" {
		v.store, err = OpenPostgresStore(octx, opts.DatabaseURL)
	} else {
		v.store, err = OpenBoltStore(filepath.Join(opts.DataDir, "verifier.db"))
	}
	if err != nil {
		return nil, err
	}
	if opts.Instance != "" {
		v.store = instanceStore{v.store, opts.Instance}
	}
	v.metrics = newMetrics(v)
	v.store = meteredStore{v.store, v.metrics}
	if v.tokenKey, err = v.loadTokenKey(octx); err != nil {
		v.store.Close()
		return nil, err
	}
	v.auditLog = newAuditLog(v.store, opts.AuditWindow, func(err error) { v.log.Error("audit write failed", "err", err) })
	return v, nil
}

// Close writes pending audit counts and closes the database.
func (v *Verifier) Close() error {
	v.auditLog.close()
	return v.store.Close()
}

// AuditEvents returns audit rows after since (pending coalesced counts are written first).
func (v *Verifier) AuditEvents(ctx context.Context, vm string, since uint64, limit int) ([]AuditEvent, error) {
	v.auditLog.sync()
	return v.store.AuditEvents(ctx, vm, since, limit)
}

// Store exposes the database (audit reads in tests and the CLI).
func (v *Verifier) Store() Store { return v.store }

// AdminTokenPath is where the admin bearer token is kept.
func (v *Verifier) AdminTokenPath() string { return filepath.Join(v.opts.DataDir, "admin.token") }

func (v *Verifier) loadTokenKey(ctx context.Context) (*ecdsa.PrivateKey, error) {
	var key *ecdsa.PrivateKey
	err := v.store.Update(ctx, func(tx Tx) error {
		der, err := tx.Meta("token_key")
		if err != nil {
			return err
		}
		if der != nil {
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
		if der, err = x509.MarshalECPrivateKey(k); err != nil {
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
	mux.HandleFunc("POST "+protocol.KBSPathAuth, v.metrics.observe("auth", v.handleAuth))
	mux.HandleFunc("POST "+protocol.KBSPathAttest, v.metrics.observe("attest", v.handleAttest))
	mux.HandleFunc("GET "+protocol.KBSPathResource+"{repo}/{type}/{tag}", v.metrics.observe("resource", v.handleResource))
	mux.HandleFunc("POST "+protocol.KBSPathConfirm, v.metrics.observe("confirm", v.handleConfirm))
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

// audit records a decision that changes nothing else; identical refusals are coalesced.
func (v *Verifier) audit(e AuditEvent) {
	v.auditLog.record(e)
	v.logDecision(e)
}

func (v *Verifier) logDecision(e AuditEvent) {
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
	s := &session{id: hex.EncodeToString(idb), nonce: base64.StdEncoding.EncodeToString(nonce)}
	v.mu.Lock()
	defer v.mu.Unlock()
	s.created = time.Now() // under the lock: byAge stays in creation order
	v.expireLocked(s.created)
	if len(v.sessions) >= v.opts.MaxSessions && !v.evictLocked() {
		return nil, fmt.Errorf("too many sessions: %d attested sessions await their release", len(v.sessions))
	}
	v.sessions[s.id] = s
	v.byAge = append(v.byAge, s)
	return s, nil
}

// expireLocked drops the sessions older than the TTL, oldest first, and keeps byAge from
// growing past twice the table's bound with sessions evicted before their time.
func (v *Verifier) expireLocked(now time.Time) {
	n := 0
	for n < len(v.byAge) && now.Sub(v.byAge[n].created) > v.opts.SessionTTL {
		if old := v.byAge[n]; v.sessions[old.id] == old {
			delete(v.sessions, old.id)
		}
		v.byAge[n] = nil
		n++
	}
	v.byAge = v.byAge[n:]
	if len(v.byAge) > 2*v.opts.MaxSessions {
		live := make([]*session, 0, len(v.sessions))
		for _, s := range v.byAge {
			if v.sessions[s.id] == s {
				live = append(live, s)
			}
		}
		v.byAge = live
	}
}

// evictLocked drops the oldest spent session, else the oldest unattested one. Attested
// sessions are never evicted: only a guest with verified evidence has one.
func (v *Verifier) evictLocked() bool {
	for _, st := range []sessionState{sessionSpent, sessionFresh} {
		var victim *session
		for _, s := range v.sessions {
			if s.state == st && (victim == nil || s.created.Before(victim.created)) {
				victim = s
			}
		}
		if victim != nil {
			delete(v.sessions, victim.id)
			return true
		}
	}
	return false
}

// lookupLocked finds a live session by id.
func (v *Verifier) lookupLocked(id string) *session {
	s := v.sessions[id]
	if s == nil || time.Since(s.created) > v.opts.SessionTTL {
		return nil
	}
	return s
}

func (v *Verifier) sessionID(r *http.Request) string {
	c, err := r.Cookie(protocol.KBSSessionCookie)
	if err != nil {
		return ""
	}
	return c.Value
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
	writeJSON(w, http.StatusOK, protocol.KBSChallenge{Nonce: s.nonce, ExtraParams: protocol.EmptyExtraParams})
}

func (v *Verifier) handleAttest(w http.ResponseWriter, r *http.Request) {
	// One attestation per nonce: the first /attest on a session spends it, whatever follows.
	v.mu.Lock()
	s := v.lookupLocked(v.sessionID(r))
	var state sessionState
	if s != nil {
		state = s.state
		if state == sessionFresh {
			s.state = sessionAttesting
		}
	}
	v.mu.Unlock()
	if s == nil {
		problem(w, http.StatusUnauthorized, "UnAuthenticated", "no valid kbs-session-id cookie; POST /kbs/v0/auth first")
		return
	}
	if state != sessionFresh {
		ref := refuse("nonce", "this session's nonce was already used for an attestation (one attestation per nonce)")
		v.audit(AuditEvent{Event: "attest", Outcome: Deny, VM: s.vm, Session: s.id, Reason: ref.Error()})
		problem(w, http.StatusUnauthorized, "AttestationFailed", ref.Error())
		return
	}
	attested := false
	defer func() {
		if !attested {
			v.mu.Lock()
			s.state = sessionSpent
			v.mu.Unlock()
		}
	}()
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
	// REPORT_DATA first: a report that does not bind this session's nonce and the presented
	// key is refused before it can make us fetch a certificate.
	nonce, _ := base64.StdEncoding.DecodeString(s.nonce)
	if ref := checkReportDataRaw(raw, key, nonce); ref != nil {
		deny(http.StatusUnauthorized, "", ref)
		return
	}
	var certs []byte
	if cb := att.TeeEvidence.PrimaryEvidence.CertsBuf; cb != nil && *cb != "" {
		if certs, err = base64.StdEncoding.DecodeString(*cb); err != nil || len(certs) > maxCertsBuf {
			deny(http.StatusBadRequest, "", refuse("certs-buf", "want standard base64 of at most %d bytes (got %d bytes, err %v)", maxCertsBuf, len(certs), err))
			return
		}
	}
	ctx, cancel := context.WithTimeout(r.Context(), 20*time.Second)
	defer cancel()
	evidence, ref := v.check.verifyReport(ctx, raw, certs)
	if ref != nil {
		status := http.StatusUnauthorized
		if ref.Field == FieldKDSUnavailable {
			status = http.StatusServiceUnavailable
		}
		deny(status, "", ref)
		return
	}
	vm, ref := v.identify(ctx, evidence.GetReport().GetHostData(), evidence.GetReport().GetMeasurement())
	if ref != nil {
		deny(http.StatusForbidden, "", ref)
		return
	}
	policy := policyOf(vm)
	if err := checkPolicy(policy, evidence); err != nil {
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
	var bootRequest uint64
	if vm.Primed {
		bootRequest = vm.BootRequest
	}
	v.mu.Lock()
	s.vm, s.key, s.evidence, s.policy, s.bootRequest, s.state = vm.Name, &key, evidence, policy, bootRequest, sessionAttested
	attested = true
	v.mu.Unlock()
	// Written with the session's release (auditLog.hold): no commit of its own.
	allowed := AuditEvent{Event: "attest", Outcome: Allow, VM: vm.Name, Session: s.id}
	v.auditLog.hold(allowed)
	v.logDecision(allowed)
	writeJSON(w, http.StatusOK, protocol.KBSAttestResponse{Token: token})
}

// maxCertsBuf bounds an extended report's certificate table (a few DER certificates).
const maxCertsBuf = 64 << 10

// identify finds the registered VM a report belongs to: by HOST_DATA when some VM pins it,
// otherwise by measurement.
func (v *Verifier) identify(ctx context.Context, hostData, measurement []byte) (*VM, *Refusal) {
	// The candidates come from the identity index; the rules below are checked on the
	// records themselves.
	var candidates []*VM
	if err := v.store.View(ctx, func(tx Tx) error {
		h, err := tx.IdentifiedVMs(identityKey(identityHostData, hostData))
		if err != nil {
			return err
		}
		m, err := tx.IdentifiedVMs(identityKey(identityMeasurement, measurement))
		candidates = append(h, m...)
		return err
	}); err != nil {
		return nil, refuse("database", "%v", err)
	}
	// A VM is indexed under its HOST_DATA or under its measurements, never both: no VM is a
	// candidate twice.
	var byHost, byMeas []*VM
	for _, vm := range candidates {
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

// handleResource releases the attested VM's secret, consuming its primed boot request. A
// session (by cookie, or by the token issued to it) gets one resource request: the session is
// spent by it, whatever the outcome.
func (v *Verifier) handleResource(w http.ResponseWriter, r *http.Request) {
	sid, via := v.sessionID(r), "cookie"
	var tokenKey *protocol.ECPublicKey
	if sid == "" {
		if auth := r.Header.Get("Authorization"); strings.HasPrefix(auth, "Bearer ") {
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
			sid, via, tokenKey = c.ID, "token", &k
		}
	}
	v.mu.Lock()
	s := v.lookupLocked(sid)
	var grant session
	if s != nil {
		grant = *s
		if s.state == sessionAttested {
			s.state = sessionSpent // one release per session, allowed or not
		}
	}
	v.mu.Unlock()
	if s == nil || grant.state != sessionAttested {
		reason := "session: no attested session or token"
		if s != nil {
			reason = fmt.Sprintf("session: %s %s is spent (one attestation per nonce, one release per session)", via, sid)
		}
		v.audit(AuditEvent{Event: "release", Outcome: Deny, VM: grant.vm, Session: sid, Reason: reason})
		problem(w, http.StatusUnauthorized, "UnAuthenticated", reason)
		return
	}
	if tokenKey != nil && (!bytes.Equal(tokenKey.X, grant.key.X) || !bytes.Equal(tokenKey.Y, grant.key.Y)) {
		ref := refuse("token", "token's tee-pubkey is not the key its session attested")
		v.audit(AuditEvent{Event: "release", Outcome: Deny, VM: grant.vm, Session: sid, Reason: ref.Error()})
		problem(w, http.StatusUnauthorized, "TokenInvalid", ref.Error())
		return
	}
	path := r.PathValue("repo") + "/" + r.PathValue("type") + "/" + r.PathValue("tag")
	// "vm/<name>/state-key" names the VM explicitly; the upstream default path means "the
	// attested VM's state key".
	if r.PathValue("repo") == "vm" && r.PathValue("type") != grant.vm {
		v.audit(AuditEvent{Event: "release", Outcome: Deny, VM: grant.vm, Session: sid, Reason: fmt.Sprintf("resource %s names another VM", path)})
		problem(w, http.StatusForbidden, "PolicyDeny", fmt.Sprintf("session attested vm %s, resource %s names another", grant.vm, path))
		return
	}
	gate := func(vm *VM) *Refusal {
		if grant.bootRequest == 0 || grant.bootRequest != vm.BootRequest {
			return refuse("boot_request", "the evidence was verified before boot request %d of vm %s was primed; attest again", vm.BootRequest, vm.Name)
		}
		// The policy in force now, not at attestation: a withdrawn measurement is refused at
		// once. The evidence passed the very same inputs at attestation when they are unchanged.
		if now := policyOf(vm); !now.equal(grant.policy) {
			if err := checkPolicy(now, grant.evidence); err != nil {
				var rf *Refusal
				if !errors.As(err, &rf) {
					rf = refuse("policy", "%v", err)
				}
				return rf
			}
		}
		return nil
	}
	jwe, ref, err := v.release(r.Context(), grant.vm, sid, *grant.key, gate)
	switch {
	case err != nil:
		problem(w, http.StatusInternalServerError, "Internal", err.Error())
	case ref != nil:
		problem(w, http.StatusForbidden, "PolicyDeny", ref.Error())
	default:
		writeJSON(w, http.StatusOK, jwe)
	}
}

// releaseGate re-checks, inside the release transaction, what the session's evidence is still
// good for under the VM's current record.
type releaseGate func(vm *VM) *Refusal

// release decides and commits, in one durable transaction, the consumption of the boot
// request, the boot record and the audit event; only then is the JWE returned.
func (v *Verifier) release(ctx context.Context, vmName, sid string, key protocol.ECPublicKey, gate releaseGate) (*protocol.FlattenedJWE, *Refusal, error) {
	bootID := make([]byte, protocol.BootIDSize)
	confirmKey := make([]byte, 32)
	if _, err := rand.Read(bootID); err != nil {
		return nil, nil, err
	}
	if _, err := rand.Read(confirmKey); err != nil {
		return nil, nil, err
	}
	// The guest's key must work before the request is spent on it; the JWE itself is made
	// after the commit, outside the database's write lock (an ECDH is milliseconds).
	if _, err := key.ECDH(); err != nil {
		ref := refuse("tee-pubkey", "not a P-521 point: %v", err)
		v.audit(AuditEvent{Event: "release", Outcome: Deny, VM: vmName, Session: sid, Reason: ref.Error()})
		return nil, ref, nil
	}
	var secret []byte
	var ref *Refusal
	held := v.auditLog.take(sid) // the session's attestation, audited in this commit
	err := v.store.Update(ctx, func(tx Tx) error {
		secret, ref = nil, nil
		for _, e := range held {
			if err := tx.Audit(e); err != nil {
				return err
			}
		}
		vm, err := tx.VM(vmName)
		if err != nil {
			return err
		}
		if !vm.Primed {
			ref = refuse("boot_request", "no primed boot request for vm %s (already released %d times; a clone or replay?)", vm.Name, vm.Releases)
			return tx.Audit(AuditEvent{Event: "release", Outcome: Deny, VM: vm.Name, Session: sid, Reason: ref.Error()})
		}
		if ref = gate(vm); ref != nil {
			return tx.Audit(AuditEvent{Event: "release", Outcome: Deny, VM: vm.Name, Session: sid, Reason: ref.Error()})
		}
		boot := &Boot{ID: hex.EncodeToString(bootID), VM: vm.Name, Expected: vm.Counter, Next: vm.Counter + 1, ConfirmKey: confirmKey, Released: tx.Now()}
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
		if err := tx.Audit(AuditEvent{Event: "release", Outcome: Allow, VM: vm.Name, Session: sid, BootID: boot.ID, Counter: &c}); err != nil {
			return err
		}
		v.opts.Crash.At("verifier/release/before-commit")
		return nil
	})
	if err != nil {
		v.auditLog.unhold(held)
		return nil, nil, fmt.Errorf("release for vm %s: %w", vmName, err)
	}
	if ref == nil {
		v.opts.Crash.At("verifier/release/after-commit")
	}
	if ref != nil {
		v.log.Info("decision", "event", "release", "outcome", Deny, "vm", vmName, "reason", ref.Error())
		return nil, ref, nil
	}
	out, err := protocol.EncryptSecret(key, secret)
	if err != nil {
		// The key was checked above; only a failing random source gets here. The request is
		// spent, as when an answer is lost after the commit.
		return nil, nil, fmt.Errorf("release for vm %s: seal the secret: %w", vmName, err)
	}
	v.log.Info("decision", "event", "release", "outcome", Allow, "vm", vmName, "session", sid, "boot", hex.EncodeToString(bootID))
	return out, nil, nil
}

// handleConfirm records that a boot's state durably holds a counter (PROTOCOLS.md §3). The
// answer is the protocol message the guest checks: 200 for every answer, success or not.
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
	resp, err := v.Confirm(r.Context(), &req)
	if err != nil {
		problem(w, http.StatusInternalServerError, "Internal", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// Confirm applies the confirmation rules: the boot must be the VM's latest release, the MAC
// must verify, and the counter must be the confirmed one (idempotent repeat) or one more.
// One more is accepted once per boot by default, and any number of times, one step at a
// time, in write-through mode. Every answer to a known boot is authenticated with the boot's
// answer key and bound to the request it answers.
func (v *Verifier) Confirm(ctx context.Context, req *protocol.ConfirmRequest) (*protocol.ConfirmResponse, error) {
	id := hex.EncodeToString(req.BootID)
	var resp *protocol.ConfirmResponse
	err := v.store.Update(ctx, func(tx Tx) error {
		c := req.Counter
		boot, err := tx.Boot(id)
		if errors.Is(err, ErrNotFound) {
			resp = protocol.UnauthenticatedAnswer(req, "unknown boot id")
			return tx.Audit(AuditEvent{Event: "confirm", Outcome: Deny, BootID: id, Counter: &c, Reason: resp.Reason})
		} else if err != nil {
			return err
		}
		keys, err := protocol.DeriveConfirmKeys(boot.ConfirmKey)
		if err != nil {
			return err
		}
		deny := func(vm string, counter uint64, format string, args ...any) error {
			resp = protocol.NewConfirmAnswer(keys, req, false, counter, fmt.Sprintf(format, args...))
			return tx.Audit(AuditEvent{Event: "confirm", Outcome: Deny, VM: vm, BootID: id, Counter: &c, Reason: resp.Reason})
		}
		if err := req.Verify(keys); err != nil {
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
			resp = protocol.NewConfirmAnswer(keys, req, true, vm.Counter, "") // idempotent repeat
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
			resp = protocol.NewConfirmAnswer(keys, req, true, vm.Counter, "")
			if err := tx.Audit(AuditEvent{Event: "confirm", Outcome: Allow, VM: vm.Name, BootID: id, Counter: &c}); err != nil {
				return err
			}
			v.opts.Crash.At("verifier/confirm/before-commit")
			return nil
		default:
			return deny(vm.Name, vm.Counter, "counter %d is neither the confirmed counter %d nor the next step", req.Counter, vm.Counter)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("confirm boot %s: %w", id, err)
	}
	if resp.Success {
		v.opts.Crash.At("verifier/confirm/after-commit")
	}
	v.log.Info("decision", "event", "confirm", "success", resp.Success, "boot", id, "counter", req.Counter, "reason", resp.Reason)
	return resp, nil
}

// Serve runs h on ln until ctx ends (daemon.ServeHTTP: bounded requests, graceful stop).
func Serve(ctx context.Context, ln net.Listener, h http.Handler) error {
	return daemon.ServeHTTP(ctx, ln, h)
}
