package verifier

import (
	"context"
	"fmt"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// cpuNow is this process's user+system CPU time.
func cpuNow() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkBoltReleaseTx measures one durable release transaction on bbolt (read the VM,
// write it, a boot record and an audit row, commit with fdatasync), one at a time: the
// process's CPU per commit (cpu-us/op) is what the verifier's capacity pays per write.
func BenchmarkBoltReleaseTx(b *testing.B) {
	st, err := OpenBoltStore(filepath.Join(b.TempDir(), "v.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	if err := st.Update(ctx, func(tx Tx) error { return tx.PutVM(&VM{VMSpec: VMSpec{Name: "vm"}, StateKey: make([]byte, 32)}) }); err != nil {
		b.Fatal(err)
	}
	c0 := cpuNow()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		err := st.Update(ctx, func(tx Tx) error {
			vm, err := tx.VM("vm")
			if err != nil {
				return err
			}
			vm.Releases++
			if err := tx.PutVM(vm); err != nil {
				return err
			}
			if err := tx.PutBoot(&Boot{ID: fmt.Sprintf("%032x", i), VM: "vm"}); err != nil {
				return err
			}
			return tx.Audit(AuditEvent{Event: "release", Outcome: Allow, VM: "vm"})
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64((cpuNow()-c0).Microseconds())/float64(b.N), "cpu-us/op")
}
