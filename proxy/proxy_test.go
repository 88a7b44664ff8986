package proxy

import (
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// fakeKBS records what the proxy sent; it is a stand-in for the verifier's HTTP surface only.
type fakeKBS struct {
	mu          sync.Mutex
	authCookies []string // cookie header seen on each auth
	n           int
	paths       []string
	refuse      bool
}

func (f *fakeKBS) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /kbs/v0/auth", func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.authCookies = append(f.authCookies, r.Header.Get("Cookie"))
		f.n++
		id := fmt.Sprint(f.n)
		f.mu.Unlock()
		http.SetCookie(w, &http.Cookie{Name: protocol.KBSSessionCookie, Value: id, Path: "/"})
		json.NewEncoder(w).Encode(protocol.KBSChallenge{Nonce: base64.StdEncoding.EncodeToString([]byte("nonce-" + id))})
	})
	mux.HandleFunc("POST /kbs/v0/attest", func(w http.ResponseWriter, r *http.Request) {
		var a protocol.KBSAttestation
		json.NewDecoder(r.Body).Decode(&a)
		f.mu.Lock()
		refuse := f.refuse
		f.mu.Unlock()
		if refuse {
			w.WriteHeader(http.StatusUnauthorized)
			json.NewEncoder(w).Encode(protocol.ProblemDetails{Type: "x", Detail: "nonce: no"})
			return
		}
		json.NewEncoder(w).Encode(protocol.KBSAttestResponse{Token: "tok"})
	})
	mux.HandleFunc("GET /kbs/v0/resource/{a}/{b}/{c}", func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.paths = append(f.paths, r.URL.Path)
		f.mu.Unlock()
		// Encrypt to a key we made up: the proxy cannot tell, and must forward it wrapped.
		k, _ := ecdh.P521().GenerateKey(rand.Reader)
		jwe, _ := protocol.EncryptSecret(protocol.ECPublicKeyFromECDH(k.PublicKey()), []byte("secret"))
		json.NewEncoder(w).Encode(jwe)
	})
	return mux
}

func runGuest(t *testing.T, sock string) (*protocol.NegotiationResponse, *protocol.AttestationResponse) {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return runSession(t, c)
}

// runSession plays one attestation session on an open connection.
func runSession(t *testing.T, c net.Conn) (*protocol.NegotiationResponse, *protocol.AttestationResponse) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	b, _ := json.Marshal(protocol.NegotiationRequest{Version: protocol.VersionAttest, Tee: protocol.TeeSNP})
	protocol.WriteFrame(c, b)
	raw, err := protocol.ReadFrame(c, 0)
	if err != nil {
		t.Fatal(err)
	}
	neg, err := protocol.DecodeNegotiationResponse(raw)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := ecdh.P521().GenerateKey(rand.Reader)
	req := protocol.AttestationRequest{Tee: "snp", Evidence: protocol.Evidence{Snp: &protocol.SnpEvidence{Report: make([]byte, protocol.ReportSize)}},
		Challenge: neg.Challenge, Key: protocol.ECPublicKeyFromECDH(k.PublicKey())}
	b, _ = json.Marshal(req)
	protocol.WriteFrame(c, b)
	raw, err = protocol.ReadFrame(c, 0)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := protocol.DecodeAttestationResponse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return neg, resp
}

func TestProxySessionsAndMapping(t *testing.T) {
	kbs := &fakeKBS{}
	srv := httptest.NewServer(kbs.handler())
	defer srv.Close()
	p, err := New(Options{VerifierURL: srv.URL, ResourcePath: "vm/a/state-key", StepTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	sock := t.TempDir() + "/p.sock"
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- p.Serve(ctx, ln) }()

	neg, resp := runGuest(t, sock)
	if string(neg.Challenge) != "nonce-1" || len(neg.Params) != 2 || neg.Params[0] != protocol.ParamEcPublicKeyBytes {
		t.Fatalf("negotiation = %+v", neg)
	}
	if !resp.Success || resp.Token == nil || *resp.Token.Jwt != "tok" || len(resp.Decryption.AAD) == 0 {
		t.Fatalf("response = %+v", resp)
	}
	_, resp2 := runGuest(t, sock)
	if !resp2.Success {
		t.Fatal("second connection failed")
	}
	kbs.mu.Lock()
	kbs.refuse = true
	kbs.mu.Unlock()
	_, resp3 := runGuest(t, sock)
	if resp3.Success || resp3.Secret != nil {
		t.Fatalf("refusal = %+v", resp3)
	}
	kbs.mu.Lock()
	if len(kbs.authCookies) != 3 || kbs.authCookies[1] != "" || kbs.authCookies[2] != "" {
		t.Errorf("auth cookies %q: each guest connection must start a fresh session", kbs.authCookies)
	}
	if kbs.paths[0] != "/kbs/v0/resource/vm/a/state-key" {
		t.Errorf("resource path %q", kbs.paths[0])
	}
	kbs.mu.Unlock()
	if p.Stats.Attested.Load() != 2 || p.Stats.Refused.Load() != 1 {
		t.Errorf("stats attested=%d refused=%d", p.Stats.Attested.Load(), p.Stats.Refused.Load())
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestProxyOptions(t *testing.T) {
	if _, err := New(Options{}); err == nil {
		t.Error("missing verifier URL accepted")
	}
	if _, err := New(Options{VerifierURL: "http://x", ResourcePath: "a/b"}); err == nil {
		t.Error("two-part resource path accepted")
	}
}

func TestProxyPersistentSessions(t *testing.T) {
	kbs := &fakeKBS{}
	srv := httptest.NewServer(kbs.handler())
	defer srv.Close()
	p, err := New(Options{VerifierURL: srv.URL, StepTimeout: 5 * time.Second, Persistent: true})
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- p.ServeConn(context.Background(), b) }()
	for i := 1; i <= 3; i++ {
		neg, resp := runSession(t, a)
		if string(neg.Challenge) != fmt.Sprintf("nonce-%d", i) || !resp.Success {
			t.Fatalf("session %d: %+v %+v", i, neg, resp)
		}
	}
	a.Close()
	if err := <-done; err != nil {
		t.Fatalf("close between sessions is a normal end: %v", err)
	}
	kbs.mu.Lock()
	defer kbs.mu.Unlock()
	for i, c := range kbs.authCookies {
		if c != "" {
			t.Errorf("session %d reused cookie %q: each session needs a fresh KBS session", i+1, c)
		}
	}
}

// TestProxyBoundsAHostilePeer: a guest that stops mid-frame is dropped after StepTimeout, and
// beyond MaxConns a connection is closed at once, so stalled peers cannot hold the proxy.
func TestProxyBoundsAHostilePeer(t *testing.T) {
	srv := httptest.NewServer((&fakeKBS{}).handler())
	defer srv.Close()
	p, err := New(Options{VerifierURL: srv.URL, StepTimeout: time.Second, MaxConns: 1})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- p.Serve(ctx, ln) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	dial := func() net.Conn {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c
	}
	// closedWithin reads until the proxy closes c and says how long it took.
	closedWithin := func(c net.Conn) time.Duration {
		start := time.Now()
		var b [16]byte
		for {
			if _, err := c.Read(b[:]); err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					t.Fatal("the proxy kept a stalled connection open for 10 s")
				}
				return time.Since(start)
			}
		}
	}
	stalled := dial()
	defer stalled.Close()
	stalled.Write([]byte{40, 0, 0}) // three bytes of a frame header, then nothing
	for start := time.Now(); p.Stats.Connections.Load() == 0; time.Sleep(5 * time.Millisecond) {
		if time.Since(start) > 10*time.Second {
			t.Fatal("the proxy never took the first connection")
		}
	}
	second := dial() // over the limit while the first one is held
	defer second.Close()
	if d := closedWithin(second); d > 600*time.Millisecond {
		t.Errorf("a connection over MaxConns was held %v", d)
	}
	if d := closedWithin(stalled); d > 5*time.Second {
		t.Errorf("a stalled connection was held %v with StepTimeout 1s", d)
	}
	if got := p.Stats.Connections.Load(); got != 1 {
		t.Errorf("%d connections served, want 1 (the second was over the limit)", got)
	}
	// The slot is freed just after the close: a well-behaved guest is then served.
	neg, _ := json.Marshal(protocol.NegotiationRequest{Version: protocol.VersionAttest, Tee: protocol.TeeSNP})
	for try := 0; ; try++ {
		c := dial()
		protocol.WriteFrame(c, neg)
		_, err := protocol.ReadFrame(c, 0)
		c.Close()
		if err == nil {
			break
		}
		if try == 100 {
			t.Fatalf("no guest served after the stalled one: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestProxySpreadsSessionsOverReplicas: with two verifier URLs, sessions alternate between
// them, and every request of one session (auth, attest, resource) goes to the same replica.
func TestProxySpreadsSessionsOverReplicas(t *testing.T) {
	kbs := []*fakeKBS{{}, {}}
	var urls []string
	for _, k := range kbs {
		srv := httptest.NewServer(k.handler())
		defer srv.Close()
		urls = append(urls, srv.URL)
	}
	p, err := New(Options{VerifierURL: strings.Join(urls, ",") + "/", StepTimeout: 5 * time.Second, Persistent: true})
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- p.ServeConn(context.Background(), b) }()
	for i := range 4 {
		if _, resp := runSession(t, a); !resp.Success {
			t.Fatalf("session %d refused", i+1)
		}
	}
	a.Close()
	<-done
	for i, k := range kbs {
		k.mu.Lock()
		auths, resources := len(k.authCookies), len(k.paths)
		k.mu.Unlock()
		if auths != 2 || resources != 2 {
			t.Errorf("replica %d served %d auths and %d resources, want 2 each (whole sessions, in turn)", i, auths, resources)
		}
	}
	if _, err := New(Options{VerifierURL: urls[0] + ",,"}); err == nil {
		t.Error("an empty replica URL was accepted")
	}
}
