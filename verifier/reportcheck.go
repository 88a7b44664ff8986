package verifier

import (
	"context"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"strings"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/go-sev-guest/verify"
	"github.com/google/go-sev-guest/verify/trust"
)

// ReportCheckOptions configures CheckReport, the offline verifier behind
// `svsm-verifier verify-report`.
type ReportCheckOptions struct {
	Report []byte // the 1184-byte report (or a raw quote whose first 1184 bytes are one)
	Certs  []byte // optional: an extended report's certificate table (VCEK or VLEK, ASK, ARK)
	// RootsPEM is a KDS cert_chain (ASK, ARK) to trust; nil means AMD's genuine roots.
	RootsPEM []byte
	// Offline forbids any fetch: the endorsement key must come from Certs.
	Offline bool
	// KDSBaseURL replaces https://kdsintf.amd.com for fetches (e.g. fakesnp).
	KDSBaseURL string
	// CheckCRL fetches the product CRL (not with Offline).
	CheckCRL bool
	Now      time.Time
}

// CheckResult is one line of the verdict.
type CheckResult struct {
	Check  string
	OK     bool
	Info   bool // a reported value, not a pass/fail check
	Detail string
}

func (r CheckResult) String() string {
	switch {
	case r.Info:
		return fmt.Sprintf("info %-15s %s", r.Check, r.Detail)
	case r.OK:
		return fmt.Sprintf("ok   %-15s %s", r.Check, r.Detail)
	}
	return fmt.Sprintf("FAIL %-15s %s", r.Check, r.Detail)
}

// CheckReport verifies a report file step by step and says what each step found. It stops
// at the first failed check whose result the later ones depend on. The verdict is good when
// every non-info result is OK.
func CheckReport(ctx context.Context, o ReportCheckOptions) []CheckResult {
	var out []CheckResult
	add := func(check string, ok bool, format string, a ...any) bool {
		out = append(out, CheckResult{Check: check, OK: ok, Detail: fmt.Sprintf(format, a...)})
		return ok
	}
	info := func(check, format string, a ...any) {
		out = append(out, CheckResult{Check: check, Info: true, Detail: fmt.Sprintf(format, a...)})
	}
	if o.Now.IsZero() {
		o.Now = time.Now()
	}
	if len(o.Report) < abi.ReportSize {
		add("report", false, "%d bytes, want %d", len(o.Report), abi.ReportSize)
		return out
	}
	report, err := abi.ReportToProto(o.Report[:abi.ReportSize])
	if !add("report", err == nil, "%s", errOr(err, fmt.Sprintf("version %d, VMPL %d", reportVersion(o.Report), report.GetVmpl()))) {
		return out
	}
	signer, err := abi.ParseSignerInfo(report.GetSignerInfo())
	if !add("signer", err == nil, "%s", errOr(err, signer.SigningKey.String())) {
		return out
	}
	c := &checker{getter: newKDSGetter(o.KDSBaseURL, KDSOptions{})}
	var roots *trust.AMDRootCerts
	if len(o.RootsPEM) > 0 {
		r, product, err := parseTrustedRoots(o.RootsPEM)
		if !add("roots", err == nil, "%s", errOr(err, fmt.Sprintf("%s (ARK %q)", product, cnOf(r)))) {
			return out
		}
		roots, c.rootProduct = r, product
		c.roots = map[string][]*trust.AMDRootCerts{product: {r}}
	}
	product := c.productLine(report)
	if roots == nil {
		r, err := trust.GetDefaultRootCerts(product)
		if !add("roots", err == nil, "%s", errOr(err, "AMD's genuine "+product+" roots")) {
			return out
		}
		roots = r
	}
	info("product", "%s", product)

	// The endorsement key: from the certificate table, else the KDS.
	ica := roots.ProductCerts.Ask
	if signer.SigningKey == abi.VlekReportSigner {
		ica = roots.ProductCerts.Asvk
	}
	if ica == nil {
		add("roots", false, "the roots hold no %s intermediate (ASK for VCEK, ASVK for VLEK)", signer.SigningKey)
		return out
	}
	chain := &spb.CertificateChain{AskCert: ica.Raw, ArkCert: roots.ProductCerts.Ark.Raw, Extras: map[string][]byte{}}
	var ek []byte
	switch {
	case len(o.Certs) > 0:
		var table abi.CertTable
		if err := table.Unmarshal(o.Certs); !add("endorsement-key", err == nil, "%s", errOr(err, "from the certificate table")) {
			return out
		}
		given := table.Proto()
		chain.VcekCert, chain.VlekCert = given.GetVcekCert(), given.GetVlekCert()
		ek = chain.VcekCert
		if signer.SigningKey == abi.VlekReportSigner {
			ek = chain.VlekCert
		}
		if len(ek) == 0 {
			add("endorsement-key", false, "the table has no %s certificate", signer.SigningKey)
			return out
		}
	case o.Offline:
		add("endorsement-key", false, "--offline and no --certs: nothing to verify the signature with")
		return out
	case signer.SigningKey != abi.VcekReportSigner:
		add("endorsement-key", false, "a %s-signed report needs --certs (a VLEK is never on the KDS)", signer.SigningKey)
		return out
	default:
		url := kds.VCEKCertURL(product, report.GetChipId(), kds.TCBVersion(report.GetReportedTcb()))
		b, err := c.getter.GetContext(ctx, url)
		if !add("endorsement-key", err == nil, "%s", errOr(err, "VCEK from the KDS")) {
			return out
		}
		chain.VcekCert, ek = b, b
	}
	cert, err := x509.ParseCertificate(ek)
	if err != nil {
		add("certificate", false, "%v", err)
		return out
	}
	add("certificate", true, "%s %q", signer.SigningKey, cert.Subject.CommonName)
	err = verify.SnpProtoReportSignature(report, cert)
	add("signature", err == nil, "%s", errOr(err, "ECDSA P-384 over bytes 0x000..0x29F verifies with the endorsement key"))
	opts := &verify.Options{Getter: c.getter, Now: o.Now, DisableCertFetching: true, CheckRevocations: o.CheckCRL && !o.Offline,
		TrustedRoots: map[string][]*trust.AMDRootCerts{product: {roots}}}
	err = verify.SnpAttestationContext(ctx, &spb.Attestation{Report: report, CertificateChain: chain}, opts)
	what := "endorsement key → ASK → ARK, validity, TCB and chip id extensions"
	if opts.CheckRevocations {
		what += ", CRL"
	}
	add("chain", err == nil, "%s", errOr(err, what))
	if o.CheckCRL && o.Offline {
		add("crl", false, "--check-crl needs the network; not checked with --offline")
	}
	tcb := kds.DecomposeTCBVersion(kds.TCBVersion(report.GetReportedTcb()))
	info("measurement", "%s", hex.EncodeToString(report.GetMeasurement()))
	info("host_data", "%s", hex.EncodeToString(report.GetHostData()))
	info("report_data", "%s", hex.EncodeToString(report.GetReportData()))
	info("policy", "%#x", report.GetPolicy())
	info("reported_tcb", "bl=%d tee=%d snp=%d ucode=%d", tcb.BlSpl, tcb.TeeSpl, tcb.SnpSpl, tcb.UcodeSpl)
	info("chip_id", "%s", hex.EncodeToString(report.GetChipId()))
	return out
}

// Good reports whether every check passed.
func Good(rs []CheckResult) bool {
	for _, r := range rs {
		if !r.Info && !r.OK {
			return false
		}
	}
	return len(rs) > 0
}

func errOr(err error, ok string) string {
	if err != nil {
		return strings.ReplaceAll(err.Error(), "\n", " ")
	}
	return ok
}

func cnOf(r *trust.AMDRootCerts) string {
	if r == nil || r.ProductCerts == nil || r.ProductCerts.Ark == nil {
		return ""
	}
	return r.ProductCerts.Ark.Subject.CommonName
}

func reportVersion(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}
