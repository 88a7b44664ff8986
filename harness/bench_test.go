package harness_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/svsm-e2e/svsm-e2e/harness"
)

// BenchmarkAttestRelease measures one full boot attestation through the real processes:
// prime, §4 report, §1 through the proxy, KBS auth/attest/resource with SNP verification,
// durable release, JWE unwrap in the guest.
func BenchmarkAttestRelease(b *testing.B) {
	h := startHost(b)
	ctx := context.Background()
	hj, err := h.AddVM(ctx, harness.VMSetup{Name: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	for i := 0; b.Loop(); i++ {
		if _, err := h.Admin.Prime(ctx, "bench"); err != nil {
			b.Fatal(err)
		}
		if _, err := harness.Attest(ctx, hj); err != nil {
			b.Fatal(fmt.Errorf("boot %d: %w", i, err))
		}
	}
}
