package harness_test

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/qemu"
)

// BenchmarkBootToUnlocked measures, per backend, profile and accelerator, the time from
// starting a boot to the guest's fde-unlocked event (attestation, state, vTPM, measured
// boot, LUKS unlock). It reports s/boot; `make bench` runs it.
func BenchmarkBootToUnlocked(b *testing.B) {
	type variant struct {
		name    string
		profile qemu.Profile // "" = process backend
		binary  string
		kernel  bool // -kernel even where igvm-cfg exists
	}
	variants := []variant{{"process", "", "", false}, {"qemu-microvm", qemu.Microvm, "", false}, {"qemu-q35", qemu.Q35, "", false}}
	if shared := "../../shared/tools/qemu-igvm/bin/qemu-system-x86_64"; fileExists(shared) {
		// The same profile and QEMU, booted from the IGVM launch image vs from -kernel.
		variants = append(variants, variant{"qemu-q35-igvm", qemu.Q35, shared, false}, variant{"qemu-q35-kernel-same-qemu", qemu.Q35, shared, true})
	}
	for _, v := range variants {
		b.Run(v.name, func(b *testing.B) {
			ctx := context.Background()
			var backend harness.Backend
			if v.profile != "" {
				q, err := harness.NewQEMUBackend(ctx, harness.QEMUOptions{Guest: bins.Guest, Profile: v.profile, Binary: v.binary, KernelBoot: v.kernel})
				if err != nil {
					b.Fatalf("qemu backend: %v", err)
				}
				backend = q
				b.Logf("%s", q.Choice.Reason)
			}
			s, err := harness.NewStack(ctx, harness.StackOptions{WorkDir: b.TempDir(), Binaries: bins, CADir: sharedCA(b), Backend: backend})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			vm, err := s.NewVM(ctx, harness.VMOptions{Name: "bench"})
			if err != nil {
				b.Fatal(err)
			}
			var total time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				start := time.Now()
				inst, err := vm.Start(ctx, harness.BootOptions{})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := inst.WaitForEvent(ctx, 3*time.Minute, func(e protocol.Event) bool { return e.Event == "fde-unlocked" }); err != nil {
					b.Fatal(err)
				}
				total += time.Since(start)
				b.StopTimer()
				if run, err := inst.Wait(ctx); err != nil || run.ExitCode != 0 {
					b.Fatalf("boot %d: %v %+v", i, err, run.Last())
				}
				b.StartTimer()
			}
			b.ReportMetric(total.Seconds()/float64(b.N), "s/boot-to-unlocked")
			fmt.Printf("%s: %.2f s from start to LUKS unlocked (mean of %d)\n", v.name, total.Seconds()/float64(b.N), b.N)
		})
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
