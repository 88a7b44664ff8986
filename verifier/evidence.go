package verifier

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/go-sev-guest/validate"
	"github.com/google/go-sev-guest/verify"
	"github.com/google/go-sev-guest/verify/trust"
	"golang.org/x/sync/singleflight"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// amdKDSBase is where go-sev-guest builds certificate URLs; our getter rewrites it.
const amdKDSBase = "https://kdsintf.amd.com"

// KDSOptions bounds what a report can make the verifier fetch.
type KDSOptions struct {
	// MaxConcurrent bounds simultaneous KDS fetches (default 4); more callers wait their turn.
	MaxConcurrent int
	// NegativeTTL is how long a "no such certificate" answer is remembered (default 60 s).
	NegativeTTL time.Duration
	// OutageTTL is how long an unreachable KDS is remembered before it is tried again
	// (default 5 s): a flood during an outage costs one fetch per OutageTTL per URL.
	OutageTTL time.Duration
	// Timeout bounds one fetch (default 10 s).
	Timeout time.Duration
}

// kdsGetter fetches KDS URLs from a configurable base. VCEK certificates are immutable per
// (chip, TCB), so successful answers are kept for good; failures are kept for a short TTL,
// concurrent fetches of one URL are merged, and fetches overall are bounded in concurrency:
// a host choosing chip ids and TCBs at will cannot turn the verifier into a KDS load generator.
type kdsGetter struct {
	base   string
	opts   KDSOptions
	client *http.Client
	sem    chan struct{}
	flight singleflight.Group
	mu     sync.Mutex
	cache  map[string][]byte
	neg    map[string]kdsFailure
	// Fetches counts requests actually sent to the KDS (tests and metrics); hits and
	// negHits count answers from the cache and from the remembered failures.
	fetches, hits, negHits atomic.Uint64
}

type kdsFailure struct {
	err   *KDSError
	until time.Time
}

// KDSError is a failed certificate fetch. Unavailable means the KDS could not answer (network,
// timeout, 5xx): the report may be fine, so the refusal says kds-unavailable, not signature.
type KDSError struct {
	URL         string
	Status      int
	Unavailable bool
	Err         error
}

func (e *KDSError) Error() string {
	if e.Status != 0 {
		return fmt.Sprintf("kds get %s: HTTP %d: %v", e.URL, e.Status, e.Err)
	}
	return fmt.Sprintf("kds get %s: %v", e.URL, e.Err)
}

func (e *KDSError) Unwrap() error { return e.Err }

func newKDSGetter(base string, o KDSOptions) *kdsGetter {
	if o.MaxConcurrent <= 0 {
		o.MaxConcurrent = 4
	}
	if o.NegativeTTL <= 0 {
		o.NegativeTTL = time.Minute
	}
	if o.OutageTTL <= 0 {
		o.OutageTTL = 5 * time.Second
	}
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	return &kdsGetter{base: strings.TrimSuffix(base, "/"), opts: o, client: &http.Client{Timeout: o.Timeout},
		sem: make(chan struct{}, o.MaxConcurrent), cache: map[string][]byte{}, neg: map[string]kdsFailure{}}
}

func (g *kdsGetter) Get(url string) ([]byte, error) { return g.GetContext(context.Background(), url) }

func (g *kdsGetter) GetContext(ctx context.Context, url string) ([]byte, error) {
	if g.base != "" && strings.HasPrefix(url, amdKDSBase) {
		url = g.base + strings.TrimPrefix(url, amdKDSBase)
	}
	g.mu.Lock()
	if b, ok := g.cache[url]; ok {
		g.mu.Unlock()
		g.hits.Add(1)
		return b, nil
	}
	if f, ok := g.neg[url]; ok {
		if time.Now().Before(f.until) {
			g.mu.Unlock()
			g.negHits.Add(1)
			return nil, f.err
		}
		delete(g.neg, url)
	}
	g.mu.Unlock()
	v, err, _ := g.flight.Do(url, func() (any, error) { return g.fetch(ctx, url) })
	if err != nil {
		return nil, err
	}
	return v.([]byte), nil
}

func (g *kdsGetter) fetch(ctx context.Context, url string) ([]byte, error) {
	select {
	case g.sem <- struct{}{}:
		defer func() { <-g.sem }()
	case <-ctx.Done():
		return nil, &KDSError{URL: url, Unavailable: true, Err: fmt.Errorf("waiting for a KDS fetch slot: %w", ctx.Err())}
	}
	fail := func(e *KDSError) ([]byte, error) {
		ttl := g.opts.NegativeTTL
		if e.Unavailable {
			ttl = g.opts.OutageTTL
		}
		g.mu.Lock()
		g.neg[url] = kdsFailure{err: e, until: time.Now().Add(ttl)}
		g.mu.Unlock()
		return nil, e
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, &KDSError{URL: url, Err: err}
	}
	g.fetches.Add(1)
	resp, err := g.client.Do(req)
	if err != nil {
		return fail(&KDSError{URL: url, Unavailable: true, Err: err})
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return fail(&KDSError{URL: url, Unavailable: true, Err: err})
	}
	if resp.StatusCode != http.StatusOK {
		return fail(&KDSError{URL: url, Status: resp.StatusCode, Unavailable: resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests,
			Err: errors.New(string(bytes.TrimSpace(body)))})
	}
	g.mu.Lock()
	g.cache[url] = body
	g.mu.Unlock()
	return body, nil
}

// checker verifies SNP evidence: chain and signature, then per-VM policy.
type checker struct {
	getter      *kdsGetter
	roots       map[string][]*trust.AMDRootCerts // nil: genuine AMD roots embedded in go-sev-guest
	rootProduct string                           // product line of the configured roots, if any
	checkCRL    bool
	chains      chainCache
}

// chainCache remembers endorsement keys (VCEK or VLEK certificates) whose chain to the
// trusted roots go-sev-guest has verified: checking the chain is two RSA-4096 signatures
// and parsing three certificates, the same for every report of a chip and TCB. A report
// signed by a remembered key gets its own signature checked, and the key's validity period
// re-checked, but not the chain again. Without CRL checks only (a CRL can change).
type chainCache struct {
	mu     sync.Mutex
	m      map[chainKey]chainEntry
	hits   atomic.Uint64 // reports checked against a remembered chain
	misses atomic.Uint64 // chains verified in full
}

// chainKey: the signing-key kind, the report's product line and the certificate's bytes.
type chainKey struct {
	signer  abi.ReportSigner
	product string
	der     [32]byte
}

type chainEntry struct {
	cert  *x509.Certificate
	until time.Time // re-verified in full after this
}

// Bounds of the chain cache: entries live chainTTL, and it is emptied when it holds
// maxChains (one per chip and TCB in use; a flood of fresh certificates cannot grow it).
const (
	chainTTL  = 10 * time.Minute
	maxChains = 4096
)

func (c *chainCache) get(k chainKey, now time.Time) *x509.Certificate {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[k]
	if !ok || now.After(e.until) || now.After(e.cert.NotAfter) || now.Before(e.cert.NotBefore) {
		return nil
	}
	return e.cert
}

func (c *chainCache) put(k chainKey, cert *x509.Certificate, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= maxChains {
		c.m = map[chainKey]chainEntry{}
	}
	c.m[k] = chainEntry{cert: cert, until: now.Add(chainTTL)}
}

// FieldKDSUnavailable names a refusal because the KDS could not be reached: the report was
// not judged, and the guest may try again.
const FieldKDSUnavailable = "kds-unavailable"

// verifyReport checks the report's VCEK (or VLEK) chain and signature. certs, when the guest
// sent one, is the extended report's certificate table: its VCEK or VLEK is used as is (the
// chain to the trusted roots is still checked), so verification needs no KDS. It returns the
// parsed report and its attestation for policy validation.
func (c *checker) verifyReport(ctx context.Context, raw, certs []byte) (*spb.Attestation, *Refusal) {
	report, err := abi.ReportToProto(raw)
	if err != nil {
		return nil, refuse("snp-report", "report format: %v", err)
	}
	att := &spb.Attestation{Report: report, CertificateChain: &spb.CertificateChain{Extras: map[string][]byte{}}}
	if len(certs) > 0 {
		var table abi.CertTable
		if err := table.Unmarshal(certs); err != nil {
			return nil, refuse("certs-buf", "certificate table: %v", err)
		}
		given := table.Proto()
		// Only the endorsement key comes from the guest; ASK and ARK are the trusted roots'.
		att.CertificateChain.VcekCert, att.CertificateChain.VlekCert = given.GetVcekCert(), given.GetVlekCert()
		if len(given.GetVcekCert()) == 0 && len(given.GetVlekCert()) == 0 {
			return nil, refuse("certs-buf", "certificate table holds neither a VCEK nor a VLEK")
		}
	}
	if rs := c.roots[c.productLine(report)]; len(rs) > 0 {
		// Pre-fill the configured roots so only the endorsement key is fetched.
		// The chain's ASK slot holds the AS[V]K of the report's signer (go-sev-guest's use).
		pc := rs[0].ProductCerts
		att.CertificateChain.ArkCert = pc.Ark.Raw
		ica := pc.Ask
		if info, err := abi.ParseSignerInfo(report.GetSignerInfo()); err == nil && info.SigningKey == abi.VlekReportSigner {
			ica = pc.Asvk
		}
		if ica != nil {
			att.CertificateChain.AskCert = ica.Raw
		}
	}
	if info, err := abi.ParseSignerInfo(report.GetSignerInfo()); err == nil && info.SigningKey == abi.VcekReportSigner && len(att.CertificateChain.VcekCert) == 0 {
		// Fetch the VCEK ourselves, so that an unreachable KDS is told apart from a bad report.
		url := kds.VCEKCertURL(c.productLine(report), report.GetChipId(), kds.TCBVersion(report.GetReportedTcb()))
		vcek, err := c.getter.GetContext(ctx, url)
		var ke *KDSError
		switch {
		case errors.As(err, &ke) && ke.Unavailable:
			return nil, refuse(FieldKDSUnavailable, "%v", err)
		case err != nil:
			return nil, refuse("vcek", "no VCEK for this CHIP_ID and REPORTED_TCB: %v", err)
		}
		att.CertificateChain.VcekCert = vcek
	}
	now := time.Now()
	var key chainKey
	var ek []byte
	if info, err := abi.ParseSignerInfo(report.GetSignerInfo()); err == nil {
		ek = att.CertificateChain.GetVcekCert()
		if info.SigningKey == abi.VlekReportSigner {
			ek = att.CertificateChain.GetVlekCert()
		}
		key = chainKey{signer: info.SigningKey, product: c.productLine(report), der: sha256.Sum256(ek)}
	}
	if cert := c.chains.get(key, now); cert != nil && len(ek) > 0 && !c.checkCRL {
		c.chains.hits.Add(1)
		if err := verify.SnpReportSignature(raw, cert); err != nil {
			return nil, refuse("signature", "report signature: %v", err)
		}
		return att, nil
	}
	c.chains.misses.Add(1)
	opts := &verify.Options{Getter: c.getter, Now: now, TrustedRoots: c.roots, CheckRevocations: c.checkCRL}
	if err := verify.SnpAttestationContext(ctx, att, opts); err != nil {
		var ke *KDSError
		if errors.As(err, &ke) && ke.Unavailable {
			return nil, refuse(FieldKDSUnavailable, "%v", err)
		}
		return nil, refuse("signature", "report signature or VCEK chain: %v", err)
	}
	if cert, err := x509.ParseCertificate(ek); err == nil && len(ek) > 0 {
		c.chains.put(key, cert, now)
	}
	return att, nil
}

// checkReportDataRaw checks REPORT_DATA of a raw report before anything else is done with it.
func checkReportDataRaw(raw []byte, key protocol.ECPublicKey, nonce []byte) *Refusal {
	want, err := protocol.ReportData(protocol.DefaultParams(), key, nonce)
	if err != nil {
		return refuse("tee-pubkey", "%v", err)
	}
	if !bytes.Equal(want[:], raw[0x50:0x90]) {
		return refuse("report_data", "does not bind the session nonce and the presented key")
	}
	return nil
}

// productLine is the report's AMD product line: from its CPUID family/model/stepping (report
// version 3 and later), else the product of the configured roots, else Milan (go-sev-guest's
// default for reports that do not say).
func (c *checker) productLine(r *spb.Report) string {
	if fms := r.GetCpuid1EaxFms(); fms != 0 {
		if p := kds.ProductLineFromFms(fms); p != "" && p != "Unknown" {
			return p
		}
	}
	if c.rootProduct != "" {
		return c.rootProduct
	}
	return "Milan"
}

// parseTrustedRoots reads the roots to trust: PEM certificates, a KDS cert_chain (ASK then
// ARK) optionally with the VLEK chain's ASVK, in any order. Each is known by its common name,
// as AMD names them: "ARK-<product>", "SEV-<product>" (ASK), "SEV-VLEK-<product>" (ASVK); the
// product line comes from the ARK.
func parseTrustedRoots(data []byte) (*trust.AMDRootCerts, string, error) {
	pc := &trust.ProductCerts{}
	for rest := data; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			return nil, "", fmt.Errorf("PEM block %q is not a certificate", blk.Type)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, "", err
		}
		switch cn := c.Subject.CommonName; {
		case strings.HasPrefix(cn, "ARK-"):
			pc.Ark = c
		case strings.HasPrefix(cn, "SEV-VLEK-"):
			pc.Asvk = c
		case strings.HasPrefix(cn, "SEV-"):
			pc.Ask = c
		default:
			return nil, "", fmt.Errorf("certificate %q is neither an ARK, an ASK nor an ASVK", cn)
		}
	}
	if pc.Ark == nil || (pc.Ask == nil && pc.Asvk == nil) {
		return nil, "", errors.New("need the ARK and an ASK or ASVK")
	}
	product := strings.TrimPrefix(pc.Ark.Subject.CommonName, "ARK-")
	if product == "" {
		return nil, "", errors.New("the ARK's common name does not name a product line")
	}
	root := trust.AMDRootCertsProduct(product)
	root.ProductCerts = pc
	return root, product, nil
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

// policyInputs is what checkPolicy reads of a VM's record: its answer for one evidence is a
// function of these alone, so a release whose VM still has the inputs its attestation was
// checked with need not check again (go-sev-guest's validator parses the VCEK certificate
// each time: 3 % of the verifier's CPU per boot).
type policyInputs struct {
	name           string
	measurements   []HexBytes
	hostData       HexBytes
	chipIDs        []HexBytes
	allowDebug     bool
	allowMigrateMA bool
	minTCB         *kds.TCBParts
}

// policyOf copies vm's policy inputs (the copy does not change with the record).
func policyOf(vm *VM) policyInputs {
	p := policyInputs{name: vm.Name, hostData: bytes.Clone(vm.HostData), allowDebug: vm.AllowDebug, allowMigrateMA: vm.AllowMigrateMA}
	for _, m := range vm.Measurements {
		p.measurements = append(p.measurements, bytes.Clone(m))
	}
	for _, c := range vm.ChipIDs {
		p.chipIDs = append(p.chipIDs, bytes.Clone(c))
	}
	if vm.MinTCB != nil {
		t := *vm.MinTCB
		p.minTCB = &t
	}
	return p
}

// equal reports whether p and q are the same inputs (lists in the same order).
func (p policyInputs) equal(q policyInputs) bool {
	sameList := func(a, b []HexBytes) bool {
		return slices.EqualFunc(a, b, func(x, y HexBytes) bool { return bytes.Equal(x, y) })
	}
	return p.name == q.name && sameList(p.measurements, q.measurements) && bytes.Equal(p.hostData, q.hostData) &&
		sameList(p.chipIDs, q.chipIDs) && p.allowDebug == q.allowDebug && p.allowMigrateMA == q.allowMigrateMA &&
		(p.minTCB == nil) == (q.minTCB == nil) && (p.minTCB == nil || *p.minTCB == *q.minTCB)
}

// checkPolicy applies a VM's registered policy to verified evidence.
func checkPolicy(vm policyInputs, att *spb.Attestation) error {
	r := att.GetReport()
	allowed := false
	for _, m := range vm.measurements {
		if bytes.Equal(m, r.GetMeasurement()) {
			allowed = true
		}
	}
	if !allowed {
		return refuse("measurement", "%s is not in the allow-list of vm %s", hex.EncodeToString(r.GetMeasurement()), vm.name)
	}
	if r.GetVmpl() != 0 {
		return refuse("vmpl", "report VMPL is %d, want 0", r.GetVmpl())
	}
	pol, err := abi.ParseSnpPolicy(r.GetPolicy())
	if err != nil {
		return refuse("policy", "%v", err)
	}
	if pol.Debug && !vm.allowDebug {
		return refuse("policy.debug", "guest policy %#x allows debugging", r.GetPolicy())
	}
	if pol.MigrateMA && !vm.allowMigrateMA {
		return refuse("policy.migrate_ma", "guest policy %#x allows a migration agent", r.GetPolicy())
	}
	if len(vm.chipIDs) > 0 {
		ok := false
		for _, id := range vm.chipIDs {
			if bytes.Equal(id, r.GetChipId()) {
				ok = true
			}
		}
		if !ok {
			return refuse("chip_id", "%s is not pinned for vm %s", hex.EncodeToString(r.GetChipId()[:8])+"…", vm.name)
		}
	}
	if len(vm.hostData) > 0 && !bytes.Equal(vm.hostData, r.GetHostData()) {
		return refuse("host_data", "%s, want %s", hex.EncodeToString(r.GetHostData()), hex.EncodeToString(vm.hostData))
	}
	if vm.minTCB != nil {
		got := kds.DecomposeTCBVersion(kds.TCBVersion(r.GetReportedTcb()))
		m := *vm.minTCB
		if got.BlSpl < m.BlSpl || got.TeeSpl < m.TeeSpl || got.SnpSpl < m.SnpSpl || got.UcodeSpl < m.UcodeSpl {
			return refuse("reported_tcb", "bl=%d tee=%d snp=%d ucode=%d is below the minimum bl=%d tee=%d snp=%d ucode=%d",
				got.BlSpl, got.TeeSpl, got.SnpSpl, got.UcodeSpl, m.BlSpl, m.TeeSpl, m.SnpSpl, m.UcodeSpl)
		}
	}
	// go-sev-guest's validator re-checks the same policy plus the TCB consistency between the
	// report and its VCEK, and CHIP_ID against the VCEK's HWID.
	vmpl := 0
	opts := &validate.Options{
		GuestPolicy: abi.SnpPolicy{Debug: vm.allowDebug, MigrateMA: vm.allowMigrateMA, SMT: true},
		VMPL:        &vmpl,
		Measurement: r.GetMeasurement(),
	}
	if vm.minTCB != nil {
		opts.MinimumTCB = *vm.minTCB
	}
	if len(vm.hostData) > 0 {
		opts.HostData = vm.hostData
	}
	if err := validate.SnpAttestation(att, opts); err != nil {
		return refuse("report", "%v", err)
	}
	return nil
}
