package fakesnp

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metricsHandler serves fakesnp's Prometheus series at GET /metrics (public, like the KDS
// endpoints: counts only, no chip or launch names).
func (s *Server) metricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(s.kdsRequests,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "svsm_fakesnp_reports_total", Help: "Attestation reports signed, over the launches registered now."},
			func() float64 {
				s.mu.Lock()
				defer s.mu.Unlock()
				var n uint64
				for _, l := range s.launches {
					n += l.served
				}
				return float64(n)
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "svsm_fakesnp_launches", Help: "Launches registered (report channels open)."},
			func() float64 {
				s.mu.Lock()
				defer s.mu.Unlock()
				return float64(len(s.launches))
			}),
	)
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

func newKDSRequests() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "svsm_fakesnp_kds_requests_total",
		Help: "KDS requests by kind (vcek, cert_chain, crl, vlek) and HTTP status.",
	}, []string{"kind", "status"})
}

// statusRecorder remembers the status a handler wrote.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

// countKDS counts a KDS request of kind by the status it was answered with.
func (s *Server) countKDS(kind string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		h(rec, r)
		k := kind
		if hw := r.PathValue("hwid"); kind == "vcek" && (hw == "crl" || hw == "cert_chain") {
			k = hw
		}
		s.kdsRequests.WithLabelValues(k, http.StatusText(rec.status)).Inc()
	}
}
