package proxy

import (
	"net/http"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// MetricsHandler serves the proxy's Prometheus series: its Stats as counters, the
// connections in flight, and the verifier round trips by KBS path.
func (p *Proxy) MetricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	counter := func(name, help string, f func() uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return float64(f()) })
	}
	reg.MustRegister(p.verifierSeconds,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		counter("svsm_proxy_connections_total", "Guest connections accepted.", p.Stats.Connections.Load),
		counter("svsm_proxy_attestations_total", "Attestation sessions answered with a release.", p.Stats.Attested.Load),
		counter("svsm_proxy_refusals_total", "Attestation sessions answered with a refusal.", p.Stats.Refused.Load),
		counter("svsm_proxy_confirmations_total", "Confirmations forwarded.", p.Stats.Confirms.Load),
		counter("svsm_proxy_bad_input_total", "Guest connections dropped for malformed or oversized input.", p.Stats.BadInput.Load),
		counter("svsm_proxy_verifier_errors_total", "Verifier round trips that failed (no answer, or not one the proxy could use).", p.Stats.VerifierErrs.Load),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "svsm_proxy_connections_open", Help: "Guest connections being served."},
			func() float64 { return float64(len(p.sem)) }),
	)
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

func newVerifierSeconds() *prometheus.HistogramVec {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "svsm_proxy_verifier_seconds",
		Help:    "Round trips to the verifier by KBS path (auth, attest, resource, confirm).",
		Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10},
	}, []string{"path"})
	for _, path := range []string{"auth", "attest", "resource", "confirm"} {
		h.WithLabelValues(path)
	}
	return h
}

// kbsRoute names a KBS path for a metric label.
func kbsRoute(path string) string {
	switch {
	case strings.HasSuffix(path, protocol.KBSPathAuth):
		return "auth"
	case strings.HasSuffix(path, protocol.KBSPathAttest):
		return "attest"
	case strings.Contains(path, protocol.KBSPathResource):
		return "resource"
	case strings.HasSuffix(path, protocol.KBSPathConfirm):
		return "confirm"
	}
	return "other"
}
