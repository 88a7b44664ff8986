package harness_test

import (
	"context"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/harness"
)

// BenchmarkCoconutAttest measures a real COCONUT-SVSM boot from QEMU's start to the end of
// its init, attestation through our proxy and verifier included (s/boot), on the coconut
// profile the environment selects (SVSM_E2E_COCONUT_PROFILE, default coconut-nocc with TCG).
func BenchmarkCoconutAttest(b *testing.B) {
	o, reason := harness.FindCoconut("..")
	if reason != "" {
		b.Skip(reason)
	}
	ctx := context.Background()
	s, err := harness.NewStack(ctx, harness.StackOptions{WorkDir: b.TempDir(), Binaries: bins, CADir: sharedCA(b)})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	v, err := s.NewCoconutVM(ctx, "bench", o)
	if err != nil {
		b.Fatal(err)
	}
	var total time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		run, err := v.Boot(ctx, harness.CoconutBootOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if run.Outcome != "init-done" || !run.Has(harness.MarkerAttested) {
			b.Fatalf("boot %d: %s, reached %v", i, run.Outcome, run.Reached())
		}
		total += run.Duration
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "s/boot")
}
