package harness

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"
)

// BackupVerifier copies the verifier's database aside under label, the way an operator's
// backup would (the verifier is stopped for the copy, then started again).
func (h *Host) BackupVerifier(ctx context.Context, label string) error {
	if err := h.Verifier.Stop(5 * time.Second); err != nil {
		return fmt.Errorf("stop verifier for backup: %w", err)
	}
	if err := copyFile(h.path("verifier", "verifier.db"), h.path("verifier-backup-"+label+".db")); err != nil {
		return fmt.Errorf("back up verifier database: %w", err)
	}
	return h.StartVerifier(ctx)
}

// RestoreVerifier puts back the database saved by BackupVerifier(label): the verifier's record
// goes back in time (its counters, boot requests and boots), as after a restore from backup.
func (h *Host) RestoreVerifier(ctx context.Context, label string) error {
	if err := h.Verifier.Stop(5 * time.Second); err != nil {
		return fmt.Errorf("stop verifier for restore: %w", err)
	}
	if err := copyFile(h.path("verifier-backup-"+label+".db"), h.path("verifier", "verifier.db")); err != nil {
		return fmt.Errorf("restore verifier database: %w", err)
	}
	return h.StartVerifier(ctx)
}

// KBSExchange is one request the proxy sent the verifier, as the host saw it on the wire.
type KBSExchange struct {
	Method, Path string
	Cookie       string // the kbs-session-id the request carried
	Auth         string // its Authorization header
	Body         []byte
	Status       int
	Response     []byte
}

// KBSTap sits between svsm-proxy and the verifier (the host's network) and records every
// exchange: the session cookies, tokens and bodies a malicious host could keep and replay.
type KBSTap struct {
	srv   *http.Server
	ln    net.Listener
	URL   string
	mu    sync.Mutex
	seen  []KBSExchange
	limit int
}

// TapKBS starts a tap in front of the verifier and restarts svsm-proxy to use it.
func (h *Host) TapKBS(ctx context.Context) (*KBSTap, error) {
	target, err := url.Parse(h.VerifierURL)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	t := &KBSTap{ln: ln, URL: "http://" + ln.Addr().String(), limit: 10000}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.ModifyResponse = func(resp *http.Response) error {
		body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		if err != nil {
			return err
		}
		resp.Body = io.NopCloser(bytes.NewReader(body))
		req := resp.Request
		ex := KBSExchange{Method: req.Method, Path: req.URL.Path, Auth: req.Header.Get("Authorization"), Status: resp.StatusCode, Response: body}
		if c, err := req.Cookie("kbs-session-id"); err == nil {
			ex.Cookie = c.Value
		}
		if b, ok := req.Context().Value(tapBodyKey{}).(*[]byte); ok {
			ex.Body = *b
		}
		t.mu.Lock()
		if len(t.seen) < t.limit {
			t.seen = append(t.seen, ex)
		}
		t.mu.Unlock()
		return nil
	}
	t.srv = &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		r = r.WithContext(context.WithValue(r.Context(), tapBodyKey{}, &body))
		rp.ServeHTTP(w, r)
	})}
	go func() { _ = t.srv.Serve(ln) }()
	h.proxyVerifierURL = t.URL
	if err := h.RestartProxy(ctx); err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

type tapBodyKey struct{}

// Exchanges returns what the tap saw so far.
func (t *KBSTap) Exchanges() []KBSExchange {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]KBSExchange(nil), t.seen...)
}

// Last returns the last exchange whose path starts with prefix.
func (t *KBSTap) Last(prefix string) (KBSExchange, bool) {
	ex := t.Exchanges()
	for i := len(ex) - 1; i >= 0; i-- {
		if strings.HasPrefix(ex[i].Path, prefix) {
			return ex[i], true
		}
	}
	return KBSExchange{}, false
}

// Close stops the tap.
func (t *KBSTap) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = t.srv.Shutdown(ctx)
}

// Replay sends one request to the verifier itself (not through the tap), as the host would
// with what it kept: method, path, cookie, Authorization and body. It returns the status and
// the response body.
func (h *Host) Replay(ctx context.Context, ex KBSExchange) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, ex.Method, h.VerifierURL+ex.Path, bytes.NewReader(ex.Body))
	if err != nil {
		return 0, nil, err
	}
	if ex.Cookie != "" {
		req.AddCookie(&http.Cookie{Name: "kbs-session-id", Value: ex.Cookie})
	}
	if ex.Auth != "" {
		req.Header.Set("Authorization", ex.Auth)
	}
	if len(ex.Body) > 0 {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, b, err
}
