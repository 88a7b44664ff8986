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

// BenchmarkIdentify compares finding the VM an attestation names among many registered VMs
// through the identity index (what identify does) with reading every VM record (what it did
// before the index), on bbolt.
func BenchmarkIdentify(b *testing.B) {
	for _, n := range []int{10, 1000, 10000} {
		st, err := OpenBoltStore(filepath.Join(b.TempDir(), "v.db"))
		if err != nil {
			b.Fatal(err)
		}
		ctx := context.Background()
		err = st.Update(ctx, func(tx Tx) error {
			for i := range n {
				vm := &VM{VMSpec: VMSpec{Name: fmt.Sprintf("vm%05d", i), HostData: HexBytes(fmt.Sprintf("%032d", i)),
					Measurements: []HexBytes{HexBytes(fmt.Sprintf("%048d", i))}}, StateKey: make([]byte, 32)}
				if err := tx.PutVM(vm); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		want := []byte(fmt.Sprintf("%032d", n/2))
		b.Run(fmt.Sprintf("index/vms=%d", n), func(b *testing.B) {
			for b.Loop() {
				err := st.View(ctx, func(tx Tx) error {
					vms, err := tx.IdentifiedVMs(identityKey(identityHostData, want))
					if err == nil && len(vms) != 1 {
						err = fmt.Errorf("found %d VMs", len(vms))
					}
					return err
				})
				if err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("scan/vms=%d", n), func(b *testing.B) {
			for b.Loop() {
				err := st.View(ctx, func(tx Tx) error {
					vms, err := tx.VMs()
					found := 0
					for _, vm := range vms {
						if string(vm.HostData) == string(want) {
							found++
						}
					}
					if err == nil && found != 1 {
						err = fmt.Errorf("found %d VMs", found)
					}
					return err
				})
				if err != nil {
					b.Fatal(err)
				}
			}
		})
		st.Close()
	}
}
