package verifier

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/go-sev-guest/validate"
	"github.com/google/go-sev-guest/verify"
	"github.com/google/go-sev-guest/verify/trust"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// amdKDSBase is where go-sev-guest builds certificate URLs; our getter rewrites it.
const amdKDSBase = "https://kdsintf.amd.com"

// kdsGetter fetches KDS URLs from a configurable base and caches successful answers. VCEK
// certificates are immutable per (chip, TCB), so caching them is safe and keeps the KDS off
// the hot path.
type kdsGetter struct {
	base   string
	client *http.Client
	mu     sync.Mutex
	cache  map[string][]byte
}

func newKDSGetter(base string) *kdsGetter {
	return &kdsGetter{base: strings.TrimSuffix(base, "/"), client: &http.Client{Timeout: 10 * time.Second}, cache: map[string][]byte{}}
}

func (g *kdsGetter) Get(url string) ([]byte, error) { return g.GetContext(context.Background(), url) }

func (g *kdsGetter) GetContext(ctx context.Context, url string) ([]byte, error) {
	if g.base != "" && strings.HasPrefix(url, amdKDSBase) {
		url = g.base + strings.TrimPrefix(url, amdKDSBase)
	}
	g.mu.Lock()
	if b, ok := g.cache[url]; ok {
		g.mu.Unlock()
		return b, nil
	}
	g.mu.Unlock()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := g.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("kds get %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("kds get %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("kds get %s: HTTP %d: %s", url, resp.StatusCode, bytes.TrimSpace(body))
	}
	g.mu.Lock()
	g.cache[url] = body
	g.mu.Unlock()
	return body, nil
}

// checker verifies SNP evidence: chain and signature, then per-VM policy.
type checker struct {
	getter *kdsGetter
	roots  map[string][]*trust.AMDRootCerts // nil: genuine AMD roots embedded in go-sev-guest
}

// verifyReport checks the report's VCEK chain and signature. It returns the parsed report
// and its VCEK-backed attestation for policy validation.
func (c *checker) verifyReport(ctx context.Context, raw []byte) (*spb.Attestation, error) {
	report, err := abi.ReportToProto(raw)
	if err != nil {
		return nil, fmt.Errorf("report format: %w", err)
	}
	att := &spb.Attestation{Report: report, CertificateChain: &spb.CertificateChain{Extras: map[string][]byte{}}}
	if rs := c.roots[productLine(report)]; len(rs) > 0 {
		// Pre-fill the configured ARK/ASK so only the VCEK is fetched.
		att.CertificateChain.ArkCert = rs[0].ProductCerts.Ark.Raw
		att.CertificateChain.AskCert = rs[0].ProductCerts.Ask.Raw
	}
	opts := &verify.Options{Getter: c.getter, Now: time.Now(), TrustedRoots: c.roots}
	if err := verify.SnpAttestationContext(ctx, att, opts); err != nil {
		return nil, fmt.Errorf("report signature or VCEK chain: %w", err)
	}
	return att, nil
}

// productLine is the report's AMD product line (v3 reports carry CPUID family/model).
func productLine(r *spb.Report) string {
	if fms := r.GetCpuid1EaxFms(); fms != 0 {
		return kds.ProductLineFromFms(fms)
	}
	return "Milan"
}

// Refusal is a policy or verification failure with a reason that names the field.
type Refusal struct {
	Field  string
	Reason string
}

func (r *Refusal) Error() string { return r.Field + ": " + r.Reason }

func refuse(field, format string, args ...any) *Refusal {
	return &Refusal{Field: field, Reason: fmt.Sprintf(format, args...)}
}

// checkPolicy applies a VM's registered policy to verified evidence.
func checkPolicy(vm *VM, att *spb.Attestation) error {
	r := att.GetReport()
	allowed := false
	for _, m := range vm.Measurements {
		if bytes.Equal(m, r.GetMeasurement()) {
			allowed = true
		}
	}
	if !allowed {
		return refuse("measurement", "%s is not in the allow-list of vm %s", hex.EncodeToString(r.GetMeasurement()), vm.Name)
	}
	if r.GetVmpl() != 0 {
		return refuse("vmpl", "report VMPL is %d, want 0", r.GetVmpl())
	}
	pol, err := abi.ParseSnpPolicy(r.GetPolicy())
	if err != nil {
		return refuse("policy", "%v", err)
	}
	if pol.Debug && !vm.AllowDebug {
		return refuse("policy.debug", "guest policy %#x allows debugging", r.GetPolicy())
	}
	if pol.MigrateMA && !vm.AllowMigrateMA {
		return refuse("policy.migrate_ma", "guest policy %#x allows a migration agent", r.GetPolicy())
	}
	if len(vm.ChipIDs) > 0 {
		ok := false
		for _, id := range vm.ChipIDs {
			if bytes.Equal(id, r.GetChipId()) {
				ok = true
			}
		}
		if !ok {
			return refuse("chip_id", "%s is not pinned for vm %s", hex.EncodeToString(r.GetChipId()[:8])+"…", vm.Name)
		}
	}
	if len(vm.HostData) > 0 && !bytes.Equal(vm.HostData, r.GetHostData()) {
		return refuse("host_data", "%s, want %s", hex.EncodeToString(r.GetHostData()), hex.EncodeToString(vm.HostData))
	}
	if vm.MinTCB != nil {
		got := kds.DecomposeTCBVersion(kds.TCBVersion(r.GetReportedTcb()))
		m := *vm.MinTCB
		if got.BlSpl < m.BlSpl || got.TeeSpl < m.TeeSpl || got.SnpSpl < m.SnpSpl || got.UcodeSpl < m.UcodeSpl {
			return refuse("reported_tcb", "bl=%d tee=%d snp=%d ucode=%d is below the minimum bl=%d tee=%d snp=%d ucode=%d",
				got.BlSpl, got.TeeSpl, got.SnpSpl, got.UcodeSpl, m.BlSpl, m.TeeSpl, m.SnpSpl, m.UcodeSpl)
		}
	}
	// go-sev-guest's validator re-checks the same policy plus the TCB consistency between the
	// report and its VCEK, and CHIP_ID against the VCEK's HWID.
	vmpl := 0
	opts := &validate.Options{
		GuestPolicy: abi.SnpPolicy{Debug: vm.AllowDebug, MigrateMA: vm.AllowMigrateMA, SMT: true},
		VMPL:        &vmpl,
		Measurement: r.GetMeasurement(),
	}
	if vm.MinTCB != nil {
		opts.MinimumTCB = *vm.MinTCB
	}
	if len(vm.HostData) > 0 {
		opts.HostData = vm.HostData
	}
	if err := validate.SnpAttestation(att, opts); err != nil {
		return refuse("report", "%v", err)
	}
	return nil
}

// checkBinding checks REPORT_DATA = SHA-512(x ‖ y ‖ nonce).
func checkBinding(r *spb.Report, key protocol.ECPublicKey, nonce []byte) *Refusal {
	want, err := protocol.ReportData(protocol.DefaultParams(), key, nonce)
	if err != nil {
		return refuse("tee-pubkey", "%v", err)
	}
	if !bytes.Equal(want[:], r.GetReportData()) {
		return refuse("report_data", "does not bind the session nonce and the presented key")
	}
	return nil
}
