package verifier

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestKDSGetterBoundsFetches: concurrent asks for one URL make one fetch; a "no such
// certificate" answer is remembered; fetches overall never exceed the concurrency bound; an
// unreachable KDS is reported as unavailable, not as an answer.
func TestKDSGetterBoundsFetches(t *testing.T) {
	var hits, inFlight, maxInFlight atomic.Int64
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			m := maxInFlight.Load()
			if n <= m || maxInFlight.CompareAndSwap(m, n) {
				break
			}
		}
		time.Sleep(20 * time.Millisecond)
		if r.URL.Path == "/vcek/v1/Milan/known" {
			w.Write([]byte("cert"))
			return
		}
		http.Error(w, "unknown hwid", http.StatusNotFound)
	}))
	defer ts.Close()
	g := newKDSGetter(ts.URL, KDSOptions{MaxConcurrent: 2, NegativeTTL: time.Hour})
	ctx := context.Background()
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = g.GetContext(ctx, amdKDSBase+"/vcek/v1/Milan/unknown")
		}()
	}
	wg.Wait()
	if h := hits.Load(); h != 1 {
		t.Fatalf("20 concurrent asks for one missing certificate made %d fetches, want 1", h)
	}
	_, err := g.GetContext(ctx, amdKDSBase+"/vcek/v1/Milan/unknown")
	var ke *KDSError
	if !errors.As(err, &ke) || ke.Status != 404 || ke.Unavailable {
		t.Fatalf("cached negative answer = %v", err)
	}
	if h := hits.Load(); h != 1 {
		t.Fatalf("a remembered 404 was fetched again (%d fetches)", h)
	}
	// Many different URLs (an attacker's chip ids): bounded concurrency.
	for i := range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = g.GetContext(ctx, amdKDSBase+"/vcek/v1/Milan/chip"+string(rune('a'+i)))
		}()
	}
	wg.Wait()
	if m := maxInFlight.Load(); m > 2 {
		t.Fatalf("%d fetches in flight, bound is 2", m)
	}
	if b, err := g.GetContext(ctx, amdKDSBase+"/vcek/v1/Milan/known"); err != nil || string(b) != "cert" {
		t.Fatalf("known: %q %v", b, err)
	}
	ts.Close()
	down := newKDSGetter(ts.URL, KDSOptions{})
	if _, err := down.GetContext(ctx, amdKDSBase+"/vcek/v1/Milan/x"); !errors.As(err, &ke) || !ke.Unavailable {
		t.Fatalf("KDS down = %v, want unavailable", err)
	}
}
