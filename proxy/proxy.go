// Package proxy is the host-side attestation proxy: it speaks upstream COCONUT-SVSM's
// length-prefixed JSON protocol to the guest (PROTOCOLS.md §1) and the KBS 0.4.0 protocol to
// the verifier (§2), and passes svsm-e2e's confirmation extension (§3) through. It is
// untrusted by design: it never sees a plaintext secret, only the JWE wrapped to the guest.
package proxy

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/svsm-e2e/svsm-e2e/internal/crashpoint"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// Options configures a Proxy.
type Options struct {
	// VerifierURL is the KBS base URL, e.g. http://127.0.0.1:8080. Several, separated by
	// commas, are replicas sharing one database: each session goes to the next in turn and
	// stays with it (a KBS session lives in the replica that opened it).
	VerifierURL string
	// ResourcePath is repository/type/tag of the secret; default "default/sample/test".
	ResourcePath string
	// StepTimeout bounds each read from the guest and each verifier round trip (default 60 s).
	StepTimeout time.Duration
	// MaxConns bounds concurrent guest connections (default 256).
	MaxConns int
	// Persistent serves any number of sessions, one after another, on one connection: a
	// serial port wired to a unix socket stays open for the VM's life, while the guest runs
	// an attestation and then confirmations. Without it, the proxy reads until the guest
	// closes after one session, as upstream aproxy does. Between sessions the connection may
	// stay idle without limit; within a session every step is bounded.
	Persistent bool
	// Crash marks the answer frames at their registered crash points (fault injection).
	Crash  *crashpoint.Injector
	Logger *slog.Logger
}

// Stats counts what the proxy saw; the harness asserts on them.
type Stats struct {
	Connections  atomic.Uint64
	Attested     atomic.Uint64 // success responses written
	Refused      atomic.Uint64 // failure responses written
	Confirms     atomic.Uint64
	BadInput     atomic.Uint64 // connections dropped for malformed or oversized input
	VerifierErrs atomic.Uint64
}

// Proxy serves guest connections.
type Proxy struct {
	opts      Options
	verifiers []string
	next      atomic.Uint64 // the replica of the next session
	log       *slog.Logger
	sem       chan struct{}
	Stats     Stats
	wg        sync.WaitGroup
	// verifierSeconds times round trips to the verifier (MetricsHandler).
	verifierSeconds *prometheus.HistogramVec
	// transport holds the keep-alive connections to the verifiers, shared by every session.
	transport *http.Transport
}

// New validates options.
func New(opts Options) (*Proxy, error) {
	if opts.VerifierURL == "" {
		return nil, errors.New("proxy: VerifierURL is required")
	}
	var verifiers []string
	for _, u := range strings.Split(opts.VerifierURL, ",") {
		if u = strings.TrimSuffix(strings.TrimSpace(u), "/"); u == "" {
			return nil, fmt.Errorf("proxy: empty URL in verifier list %q", opts.VerifierURL)
		}
		verifiers = append(verifiers, u)
	}
	if opts.ResourcePath == "" {
		opts.ResourcePath = protocol.DefaultResourcePath
	}
	if n := len(strings.Split(opts.ResourcePath, "/")); n != 3 {
		return nil, fmt.Errorf("proxy: resource path %q must be repository/type/tag", opts.ResourcePath)
	}
	if opts.StepTimeout == 0 {
		opts.StepTimeout = 60 * time.Second
	}
	if opts.MaxConns == 0 {
		opts.MaxConns = 256
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	// net/http's default transport keeps two idle connections per verifier: with more guests
	// attesting at once, every other request opened a TCP connection and the verifier
	// accepted it. Keep as many as guests may be served at once.
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = opts.MaxConns
	tr.MaxIdleConns = opts.MaxConns * len(verifiers)
	return &Proxy{opts: opts, verifiers: verifiers, log: opts.Logger, sem: make(chan struct{}, opts.MaxConns),
		verifierSeconds: newVerifierSeconds(), transport: tr}, nil
}

// Serve accepts connections on ln until ctx ends, then waits for open ones to finish (each is
// bounded by StepTimeout per step).
func (p *Proxy) Serve(ctx context.Context, ln net.Listener) error {
	defer p.transport.CloseIdleConnections()
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	var tempDelay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				p.wg.Wait()
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
				time.Sleep(tempDelay)
				continue
			}
			p.wg.Wait()
			return fmt.Errorf("proxy accept: %w", err)
		}
		tempDelay = 0
		select {
		case p.sem <- struct{}{}:
		default:
			p.log.Warn("connection limit reached, dropping guest connection", "max", p.opts.MaxConns)
			c.Close()
			continue
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer func() { <-p.sem }()
			defer c.Close()
			p.Stats.Connections.Add(1)
			if err := p.ServeConn(ctx, c); err != nil {
				p.log.Warn("guest connection ended with error", "err", err)
			}
		}()
	}
}

type conn struct {
	p        *Proxy
	rw       net.Conn
	http     *http.Client
	verifier string // this session's replica
}

func (c *conn) read() ([]byte, error) {
	_ = c.rw.SetReadDeadline(time.Now().Add(c.p.opts.StepTimeout))
	return protocol.ReadFrame(c.rw, protocol.MaxFrameSize)
}

func (c *conn) write(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_ = c.rw.SetWriteDeadline(time.Now().Add(c.p.opts.StepTimeout))
	return protocol.WriteFrame(c.rw, b)
}

// writeAnswer writes an answer frame through the crash point name: a power cut there leaves
// half the frame on the wire.
func (c *conn) writeAnswer(name string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	var frame bytes.Buffer
	_ = protocol.WriteFrame(&frame, b)
	_ = c.rw.SetWriteDeadline(time.Now().Add(c.p.opts.StepTimeout))
	_, err = c.p.opts.Crash.Write(name, frame.Bytes(), 0, func(p []byte, _ int64) (int, error) { return c.rw.Write(p) })
	return err
}

// ServeConn runs one guest connection to completion.
func (p *Proxy) ServeConn(ctx context.Context, rw net.Conn) error {
	for first := true; ; first = false {
		err := p.serveSession(ctx, rw, first)
		if errors.Is(err, errIdleClose) {
			return nil
		}
		if err != nil || !p.opts.Persistent {
			return err
		}
	}
}

var errIdleClose = errors.New("connection closed between sessions")

func (p *Proxy) serveSession(ctx context.Context, rw net.Conn, first bool) error {
	jar, _ := cookiejar.New(nil) // one jar per session: sessions never mix
	c := &conn{p: p, rw: rw, http: &http.Client{Transport: p.transport, Jar: jar, Timeout: p.opts.StepTimeout}}
	var body []byte
	var err error
	if !p.opts.Persistent {
		body, err = c.read()
	} else {
		// A serial peer (QEMU's COM3) connects when the VM starts; the SVSM speaks only after
		// its own boot, which under some hosts takes minutes, and between sessions the VM
		// decides when. So the first message of a session has no deadline, as upstream aproxy
		// waits; everything after it is bounded.
		_ = rw.SetReadDeadline(time.Time{})
		body, err = protocol.ReadFrame(rw, protocol.MaxFrameSize)
		if !first && errors.Is(err, io.EOF) {
			return errIdleClose // the VM went away between sessions: a normal end
		}
	}
	if err != nil {
		p.Stats.BadInput.Add(1)
		return fmt.Errorf("read negotiation request: %w", err)
	}
	neg, err := protocol.DecodeNegotiationRequest(body)
	if err != nil {
		p.Stats.BadInput.Add(1)
		return err
	}
	// A session that has begun takes the next replica (a connection closed while idle takes
	// none, so replicas alternate session by session).
	c.verifier = p.verifiers[(p.next.Add(1)-1)%uint64(len(p.verifiers))]
	if neg.Version == protocol.VersionConfirm {
		return c.confirm(ctx, neg.Confirm)
	}
	return c.attest(ctx)
}

func (c *conn) attest(ctx context.Context) error {
	p := c.p
	var chal protocol.KBSChallenge
	if err := c.post(ctx, protocol.KBSPathAuth, protocol.KBSRequest{Version: protocol.KBSVersion, Tee: protocol.TeeSNP, ExtraParams: protocol.EmptyExtraParams}, &chal); err != nil {
		p.Stats.VerifierErrs.Add(1)
		// The guest has not been answered yet; it expects a negotiation response. We cannot
		// give one without a nonce, so close: the SVSM fails closed.
		return fmt.Errorf("kbs auth: %w", err)
	}
	nonce, err := base64.StdEncoding.DecodeString(chal.Nonce)
	if err != nil || len(nonce) == 0 || len(nonce) > protocol.NonceMaxSize {
		p.Stats.VerifierErrs.Add(1)
		return fmt.Errorf("kbs auth: bad nonce %q", chal.Nonce)
	}
	if err := c.write(protocol.NegotiationResponse{Challenge: nonce, Params: protocol.DefaultParams()}); err != nil {
		return fmt.Errorf("write negotiation response: %w", err)
	}
	body, err := c.read()
	if err != nil {
		p.Stats.BadInput.Add(1)
		return fmt.Errorf("read attestation request: %w", err)
	}
	req, err := protocol.DecodeAttestationRequest(body)
	if err != nil {
		p.Stats.BadInput.Add(1)
		c.refuse()
		return err
	}
	// The KBS session id ties this connection's log lines to the verifier's decisions,
	// and those to the guest's boot id.
	session := c.sessionID()
	resp, err := c.kbsAttestAndFetch(ctx, chal.Nonce, req)
	if err != nil {
		p.log.Info("attestation refused", "session", session, "err", err)
		c.refuse()
		return c.drain()
	}
	if err := c.writeAnswer("proxy/attest/mid-frame", resp); err != nil {
		return fmt.Errorf("write attestation response: %w", err)
	}
	p.Stats.Attested.Add(1)
	p.log.Info("attestation succeeded, secret forwarded wrapped", "session", session, "verifier", c.verifier)
	return c.drain()
}

func (c *conn) refuse() {
	c.p.Stats.Refused.Add(1)
	if err := c.write(protocol.FailureResponse()); err != nil {
		c.p.log.Warn("write failure response", "err", err)
	}
}

// drain reads until the guest closes, as upstream does, bounded by the step timeout.
func (c *conn) drain() error {
	if c.p.opts.Persistent {
		return nil // the next session follows on the same connection
	}
	_ = c.rw.SetReadDeadline(time.Now().Add(c.p.opts.StepTimeout))
	_, _ = io.Copy(io.Discard, io.LimitReader(c.rw, protocol.MaxFrameSize))
	return nil
}

func (c *conn) kbsAttestAndFetch(ctx context.Context, nonce string, req *protocol.AttestationRequest) (*protocol.AttestationResponse, error) {
	att := protocol.KBSAttestation{
		RuntimeData: protocol.RuntimeData{Nonce: nonce, TeePubKey: protocol.TeePubKeyFrom(req.Key)},
		TeeEvidence: protocol.TeeEvidence{PrimaryEvidence: protocol.PrimaryEvidence{SnpReport: base64.StdEncoding.EncodeToString(req.Evidence.Snp.Report)}},
	}
	if len(req.Evidence.Snp.CertsBuf) > 0 { // the extended report's certificates, as aproxy forwards them
		cb := base64.StdEncoding.EncodeToString(req.Evidence.Snp.CertsBuf)
		att.TeeEvidence.PrimaryEvidence.CertsBuf = &cb
	}
	var tok protocol.KBSAttestResponse
	if err := c.post(ctx, protocol.KBSPathAttest, att, &tok); err != nil {
		return nil, fmt.Errorf("kbs attest: %w", err)
	}
	var jwe protocol.FlattenedJWE
	if err := c.get(ctx, protocol.KBSPathResource+c.p.opts.ResourcePath, &jwe); err != nil {
		return nil, fmt.Errorf("kbs resource: %w", err)
	}
	dec, ct, err := protocol.DecryptionFromJWE(&jwe)
	if err != nil {
		c.p.Stats.VerifierErrs.Add(1)
		return nil, err
	}
	t := tok.Token
	return &protocol.AttestationResponse{Success: true, Secret: ct, Decryption: dec, Token: &protocol.Token{Jwt: &t}}, nil
}

func (c *conn) confirm(ctx context.Context, req *protocol.ConfirmRequest) error {
	c.p.Stats.Confirms.Add(1)
	// The verifier's answer is authenticated for the guest: forward it as it came. Only when
	// there is none does the proxy speak, and the guest cannot take that for a confirmation.
	var resp json.RawMessage
	if err := c.post(ctx, protocol.KBSPathConfirm, req, &resp); err != nil {
		c.p.Stats.VerifierErrs.Add(1)
		b, _ := json.Marshal(protocol.UnauthenticatedAnswer(req, "proxy: verifier gave no answer: "+err.Error()))
		resp = b
	}
	if err := c.writeAnswer("proxy/confirm/mid-frame", resp); err != nil {
		return fmt.Errorf("write confirm response: %w", err)
	}
	c.p.log.Info("confirmation forwarded", "boot", hex.EncodeToString(req.BootID), "counter", req.Counter, "answer_bytes", len(resp), "verifier", c.verifier)
	return c.drain()
}

// sessionID is the KBS session cookie the verifier set at auth ("" when none).
func (c *conn) sessionID() string {
	u, err := url.Parse(c.verifier + protocol.KBSPathAttest) // the cookie's path is the KBS's
	if err != nil {
		return ""
	}
	for _, ck := range c.http.Jar.Cookies(u) {
		if ck.Name == protocol.KBSSessionCookie {
			return ck.Value
		}
	}
	return ""
}

func (c *conn) post(ctx context.Context, path string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.verifier+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	return c.do(req, out)
}

func (c *conn) get(ctx context.Context, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.verifier+path, nil)
	if err != nil {
		return err
	}
	return c.do(req, out)
}

func (c *conn) do(req *http.Request, out any) error {
	start := time.Now()
	defer func() {
		c.p.verifierSeconds.WithLabelValues(kbsRoute(req.URL.Path)).Observe(time.Since(start).Seconds())
	}()
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, protocol.MaxFrameSize))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var pd protocol.ProblemDetails
		if json.Unmarshal(raw, &pd) == nil && pd.Detail != "" {
			return &pd
		}
		return fmt.Errorf("HTTP %d: %s", resp.StatusCode, bytes.TrimSpace(raw))
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("decode %s response: %w", req.URL.Path, err)
	}
	return nil
}
