package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// errChecksFailed makes the command exit 1 after printing its verdict (no extra message).
type errChecksFailed struct{}

func (errChecksFailed) Error() string { return "" }

func verifyReportCmd() *cobra.Command {
	var reportFile, certsFile, roots, kdsURL string
	var offline, checkCRL bool
	cmd := &cobra.Command{
		Use:   "verify-report --report FILE [--certs FILE] [--roots amd|FILE] [--offline]",
		Short: "Verify an SNP report file: one line per check, exit 0 only if every check passed",
		Long: `Verify an SNP attestation report the way the verifier does, without a server: the report's
format and signer, the endorsement key (VCEK or VLEK from --certs, an extended report's
certificate table, or the VCEK from the KDS unless --offline), its chain to the trusted roots
(AMD's genuine roots, or a KDS cert_chain PEM given with --roots), and the report signature.
Prints one line per check ("ok", "FAIL" or "info") and exits 0 when every check passed, 1 when
one failed, 2 on a usage error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o := verifier.ReportCheckOptions{Offline: offline, KDSBaseURL: kdsURL, CheckCRL: checkCRL}
			var err error
			if o.Report, err = readBounded(reportFile, 64<<10); err != nil {
				return usageErr{fmt.Errorf("--report: %w", err)}
			}
			if certsFile != "" {
				if o.Certs, err = readBounded(certsFile, 64<<10); err != nil {
					return usageErr{fmt.Errorf("--certs: %w", err)}
				}
			}
			if roots != "amd" {
				if o.RootsPEM, err = readBounded(roots, 64<<10); err != nil {
					return usageErr{fmt.Errorf("--roots: %w", err)}
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			rs := verifier.CheckReport(ctx, o)
			for _, r := range rs {
				fmt.Fprintln(cmd.OutOrStdout(), r)
			}
			if !verifier.Good(rs) {
				return errChecksFailed{}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&reportFile, "report", "", "the report (1184 bytes, binary)")
	f.StringVar(&certsFile, "certs", "", "an extended report's certificate table (binary, GUID-indexed)")
	f.StringVar(&roots, "roots", "amd", "amd (genuine AMD roots) or a PEM file with the KDS cert_chain (ASK, ARK)")
	f.BoolVar(&offline, "offline", false, "fetch nothing: the endorsement key must come from --certs")
	f.StringVar(&kdsURL, "kds-url", "", "base URL replacing https://kdsintf.amd.com (e.g. fakesnp)")
	f.BoolVar(&checkCRL, "check-crl", false, "also fetch the product CRL and check the ASK against it")
	_ = cmd.MarkFlagRequired("report")
	return cmd
}

// usageErr exits 2.
type usageErr struct{ error }

func readBounded(path string, max int64) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if st.Size() > max {
		return nil, fmt.Errorf("%s is %d bytes, more than %d", path, st.Size(), max)
	}
	return os.ReadFile(path)
}
