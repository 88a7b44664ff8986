package harness_test

import (
	"context"
	"encoding/hex"

	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// TestVerifierKill9UnderLoad boots several VMs in a loop while the verifier is SIGKILLed and
// restarted on the same database. Whatever a guest received must be in the database, no boot
// id may be released twice, and the counter must equal what guests saw confirmed.
func TestVerifierKill9UnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test")
	}
	h := startHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const vms, boots = 3, 40
	type seen struct {
		bootIDs   map[string]uint64 // boot id -> expected counter in the payload
		confirmed uint64
	}
	results := make([]*seen, vms)
	for i := range vms {
		if _, err := h.AddVM(ctx, harness.VMSetup{Name: fmt.Sprintf("load%d", i)}); err != nil {
			t.Fatal(err)
		}
		results[i] = &seen{bootIDs: map[string]uint64{}}
	}
	retry := func(f func() error) error {
		var err error
		for range 200 {
			if err = f(); err == nil {
				return nil
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			time.Sleep(25 * time.Millisecond)
		}
		return err
	}
	var wg sync.WaitGroup
	errs := make(chan error, vms)
	loadDone := make(chan struct{})
	for i := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := fmt.Sprintf("load%d", i)
			hj := &protocol.HostJSON{ProxySocket: h.ProxySocket, SNPSocket: h.RunPath("snp-" + name + ".sock")}
			for got := 0; got < boots; {
				if err := retry(func() error { _, err := h.Admin.Prime(ctx, name); return err }); err != nil {
					errs <- fmt.Errorf("%s prime: %w", name, err)
					return
				}
				res, err := guest(ctx, hj)
				if err != nil {
					continue // verifier down or response lost: the boot fails closed; re-prime
				}
				var p protocol.SecretPayloadV1
				if err := p.UnmarshalBinary(res.Secret); err != nil {
					errs <- err
					return
				}
				id := hex.EncodeToString(p.BootID[:])
				if _, dup := results[i].bootIDs[id]; dup {
					errs <- fmt.Errorf("%s: boot id %s released twice", name, id)
					return
				}
				results[i].bootIDs[id] = p.ExpectedCounter
				if p.ExpectedCounter != results[i].confirmed {
					errs <- fmt.Errorf("%s: release expects counter %d, guests confirmed %d", name, p.ExpectedCounter, results[i].confirmed)
					return
				}
				err = retry(func() error {
					cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
					defer cancel()
					_, err := harness.Confirm(cctx, hj, p.ConfirmKey[:], p.BootID[:], p.NextCounter)
					return err
				})
				if err != nil {
					errs <- fmt.Errorf("%s confirm: %w", name, err)
					return
				}
				results[i].confirmed = p.NextCounter
				got++
			}
		}()
	}
	go func() { wg.Wait(); close(loadDone) }()
	kills := 0
	for stop := false; !stop; {
		select {
		case <-loadDone:
			stop = true
		case <-time.After(time.Duration(60+kills*37%120) * time.Millisecond):
			h.KillVerifier()
			kills++
			if err := h.StartVerifier(ctx); err != nil {
				t.Fatalf("restart %d: %v", kills, err)
			}
		}
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if kills < 3 {
		t.Fatalf("only %d kills happened; the test proved nothing", kills)
	}
	t.Logf("%d verifier kills during %d boots", kills, vms*boots)
	for i := range vms {
		name := fmt.Sprintf("load%d", i)
		view, err := h.Admin.Show(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if view.Counter != results[i].confirmed || view.Counter != boots {
			t.Errorf("%s: verifier counter %d, guests confirmed %d, want %d", name, view.Counter, results[i].confirmed, boots)
		}
		evs, err := h.Admin.Audit(ctx, name, 0)
		if err != nil {
			t.Fatal(err)
		}
		released := map[string]int{}
		for _, e := range evs {
			if e.Event == "release" && e.Outcome == "allow" {
				released[e.BootID]++
			}
		}
		if uint64(len(released)) != view.Releases {
			t.Errorf("%s: %d distinct released boot ids in audit, %d releases recorded", name, len(released), view.Releases)
		}
		for id, n := range released {
			if n != 1 {
				t.Errorf("%s: boot %s released %d times", name, id, n)
			}
		}
		for id := range results[i].bootIDs {
			if released[id] != 1 {
				t.Errorf("%s: guest received boot %s that the database does not record", name, id)
			}
		}
	}
}
