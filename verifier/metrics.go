package verifier

import (
	"context"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the verifier's Prometheus series. Labels never carry VM names, boot ids or
// other per-guest values: their number stays bounded whatever the guests send.
type metrics struct {
	reg       *prometheus.Registry
	decisions *prometheus.CounterVec
	latency   *prometheus.HistogramVec
}

func newMetrics(v *Verifier) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.decisions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "svsm_verifier_decisions_total",
		Help: "Committed decisions by event (auth, attest, release, confirm, prime, register, policy), outcome (allow, deny) and refusal field (the part of the reason before the colon).",
	}, []string{"event", "outcome", "reason"})
	m.latency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "svsm_verifier_request_seconds",
		Help:    "KBS and confirmation requests by route, from the request to the answer (database commit included).",
		Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5},
	}, []string{"route"})
	for _, r := range []string{"auth", "attest", "resource", "confirm"} {
		m.latency.WithLabelValues(r) // every route is exported from the start, at zero
	}
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
	}
	counter := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, f)
	}
	m.reg.MustRegister(m.decisions, m.latency,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		gauge("svsm_verifier_sessions", "KBS sessions held in memory (fresh, attested or spent, until they expire or are evicted).", func() float64 {
			v.mu.Lock()
			defer v.mu.Unlock()
			return float64(len(v.sessions))
		}),
		counter("svsm_verifier_kds_fetches_total", "Requests sent to the KDS.", func() float64 { return float64(v.check.getter.fetches.Load()) }),
		counter("svsm_verifier_kds_cache_hits_total", "KDS answers served from the cache.", func() float64 { return float64(v.check.getter.hits.Load()) }),
		counter("svsm_verifier_kds_negative_hits_total", "KDS failures served from the remembered failures (not found, outage).", func() float64 { return float64(v.check.getter.negHits.Load()) }),
		counter("svsm_verifier_chain_cache_hits_total", "Reports checked against a remembered VCEK/VLEK chain.", func() float64 { return float64(v.check.chains.hits.Load()) }),
		counter("svsm_verifier_chain_verifications_total", "VCEK/VLEK chains verified in full.", func() float64 { return float64(v.check.chains.misses.Load()) }),
	)
	return m
}

// observe times a KBS route.
func (m *metrics) observe(route string, h http.HandlerFunc) http.HandlerFunc {
	o := m.latency.WithLabelValues(route)
	return func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		h(w, r)
		o.Observe(time.Since(start).Seconds())
	}
}

// counted counts each decision once its transaction has committed (a transaction that is
// rolled back or retried counts nothing).
func (m *metrics) counted(evs []AuditEvent) {
	for _, e := range evs {
		reason := ""
		if e.Reason != "" {
			reason, _, _ = strings.Cut(e.Reason, ":")
			if len(reason) > 40 || strings.ContainsAny(reason, " \t") {
				reason = "other" // a free-form reason: keep the label set small
			}
		}
		n := 1.0
		if e.Repeats > 0 {
			n = float64(e.Repeats) // a coalesced row stands for that many further decisions
		}
		m.decisions.WithLabelValues(e.Event, e.Outcome, reason).Add(n)
	}
}

// Handler serves the series in Prometheus' text format.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// meteredStore feeds every committed audit row to the metrics.
type meteredStore struct {
	Store
	m *metrics
}

func (s meteredStore) Update(ctx context.Context, fn func(Tx) error) error {
	var evs []AuditEvent
	err := s.Store.Update(ctx, func(tx Tx) error {
		evs = evs[:0] // a retried attempt starts afresh
		return fn(auditTap{tx, &evs})
	})
	if err == nil {
		s.m.counted(evs)
	}
	return err
}

type auditTap struct {
	Tx
	evs *[]AuditEvent
}

func (t auditTap) Audit(e AuditEvent) error {
	*t.evs = append(*t.evs, e)
	return t.Tx.Audit(e)
}
