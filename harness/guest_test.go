package harness_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm/uefivars"
	"github.com/svsm-e2e/svsm-e2e/svsm/vtpm"
)

// The guest on the process backend through the Stack API, as `go test` checks it; the
// Ginkgo suite in scenarios/ covers each scenario family in depth.

func newStack(t *testing.T) *harness.Stack {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := harness.NewStack(ctx, harness.StackOptions{WorkDir: t.TempDir(), Binaries: bins, CADir: sharedCA(t), Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func boot(t *testing.T, vm *harness.VM, o harness.BootOptions) *harness.GuestRun {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	run, err := vm.Boot(ctx, o)
	if err != nil {
		t.Fatalf("boot %s: %v", vm.Name, err)
	}
	return run
}

func wantOK(t *testing.T, run *harness.GuestRun) {
	t.Helper()
	if run.ExitCode != 0 {
		t.Fatalf("boot failed (exit %d): last event %+v\n%s%s", run.ExitCode, run.Last(), run.Stdout, run.Stderr)
	}
}

func wantFailed(t *testing.T, run *harness.GuestRun, layer, reason string) protocol.Event {
	t.Helper()
	last := run.Last()
	if run.ExitCode != 1 || last.Event != "failed" || last.Layer != layer || last.Reason != reason {
		t.Fatalf("want failure %s/%s with exit 1, got exit %d, last %+v\n%s", layer, reason, run.ExitCode, last, run.Stdout)
	}
	return last
}

func event(t *testing.T, run *harness.GuestRun, name string) protocol.Event {
	t.Helper()
	ev, ok := run.Find(name)
	if !ok {
		t.Fatalf("no %q event\n%s", name, run.Stdout)
	}
	return ev
}

func action(t *testing.T, run *harness.GuestRun, name string) protocol.Event {
	t.Helper()
	ev, ok := run.Action(name, 0)
	if !ok {
		t.Fatalf("no result for action %s\n%s", name, run.Stdout)
	}
	return ev
}

func uintField(t *testing.T, ev protocol.Event, k string) uint64 {
	t.Helper()
	v, err := ev.Uint(k)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func counter(t *testing.T, vm *harness.VM) uint64 {
	t.Helper()
	v, err := vm.View(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return v.Counter
}

// TestGuestLifecycle is issue 3's acceptance path: first boot manufactures; the second
// restores identity, NV counter and a UEFI variable and unseals the LUKS key; a Secure Boot
// db change fails the PCR policy until re-sealed; an old state disk is refused; a changed
// command line or kernel fails the policy with recovery as the way in.
func TestGuestLifecycle(t *testing.T) {
	s := newStack(t)
	ctx := context.Background()
	vm, err := s.NewVM(ctx, harness.VMOptions{Name: "life"})
	must(t, err)

	vendor := uefivars.MustGUID("5356534d-4532-4545-8000-0000000000aa")
	setVar, err := vm.WriteUpdate("bootorder.json", uefivars.Update{GUID: vendor, Name: "BootOrder",
		Attributes: uefivars.NonVolatile | uefivars.BootserviceAccess | uefivars.RuntimeAccess, Payload: []byte{1, 0, 2, 0}})
	must(t, err)
	getVar := "uefi-get=" + vendor.String() + "/BootOrder"

	// Boot 1: first boot.
	run := boot(t, vm, harness.BootOptions{Actions: []string{"nv-increment", setVar, getVar}})
	wantOK(t, run)
	if ev := event(t, run, "state-opened"); ev.Fields["first_boot"] != true {
		t.Fatalf("boot 1 not a first boot: %+v", ev)
	}
	ek := event(t, run, "tpm-manufactured").String("ek_hash")
	if len(ek) != 64 {
		t.Fatalf("ek_hash %q", ek)
	}
	if c := uintField(t, event(t, run, "confirmed"), "counter"); c != 1 || counter(t, vm) != 1 {
		t.Fatalf("confirmed %d, verifier counter %d; want 1", c, counter(t, vm))
	}
	if ev := event(t, run, "measured"); ev.Fields["secure_boot"] != true {
		t.Fatalf("template enrolled, Secure Boot off: %+v", ev)
	}
	event(t, run, "fde-enrolled")
	if ev := event(t, run, "fde-unlocked"); ev.String("method") != "tpm" {
		t.Fatalf("first unlock %+v", ev)
	}
	if uintField(t, action(t, run, "nv-increment"), "nv_counter") != 1 {
		t.Fatal("nv-increment")
	}
	if ev := action(t, run, "uefi-set"); ev.String("status") != "EFI_SUCCESS" {
		t.Fatalf("set BootOrder %+v", ev)
	}
	varSum := sha256.Sum256([]byte{1, 0, 2, 0})
	must(t, vm.Snapshot("after-boot1"))

	// Boot 2: everything comes back.
	run = boot(t, vm, harness.BootOptions{Actions: []string{"nv-increment", getVar}})
	wantOK(t, run)
	if got := event(t, run, "tpm-restored").String("ek_hash"); got != ek {
		t.Fatalf("EK changed across reboot: %s -> %s", ek, got)
	}
	if ev := event(t, run, "fde-unlocked"); ev.String("method") != "tpm" {
		t.Fatalf("second unlock %+v, want the sealed key to unseal", ev)
	}
	if _, ok := run.Find("fde-enrolled"); ok {
		t.Fatal("enrolled again on the second boot")
	}
	if uintField(t, action(t, run, "nv-increment"), "nv_counter") != 2 {
		t.Fatal("NV counter not kept")
	}
	if ev := action(t, run, "uefi-get"); ev.String("sha256") != hex.EncodeToString(varSum[:]) {
		t.Fatalf("UEFI variable not kept: %+v", ev)
	}

	// A Secure Boot db change moves PCR 7: recovery unlocks, the OS re-seals, then the TPM
	// unseals again.
	dbUpdate, err := vm.WriteSignedUpdate("db-append.json", "db", []uefivars.Signature{harness.HashSignature(sha256.Sum256([]byte("an app")))},
		harness.EnrollmentEpoch.Add(time.Hour), true, vm.Keys.KEK)
	must(t, err)
	wantOK(t, boot(t, vm, harness.BootOptions{Actions: []string{dbUpdate}}))
	run = boot(t, vm, harness.BootOptions{Actions: []string{"uefi-get=db", "fde-reseal"}})
	wantOK(t, run)
	event(t, run, "fde-policy-failed")
	if ev := event(t, run, "fde-unlocked"); ev.String("method") != "recovery" {
		t.Fatalf("unlock after db change %+v", ev)
	}
	if uintField(t, action(t, run, "uefi-get"), "entries") != 2 {
		t.Fatal("db append not kept")
	}
	run = boot(t, vm, harness.BootOptions{})
	wantOK(t, run)
	if ev := event(t, run, "fde-unlocked"); ev.String("method") != "tpm" {
		t.Fatalf("unlock after reseal %+v", ev)
	}

	// Rollback across boots: the host restores the state disk from after boot 1.
	must(t, vm.Snapshot("current"))
	must(t, vm.Restore("after-boot1"))
	run = boot(t, vm, harness.BootOptions{})
	ev := wantFailed(t, run, "svsm", "stale-state")
	if _, ok := run.Find("measured"); ok {
		t.Fatal("firmware ran on stale state")
	}
	if !strings.Contains(ev.String("detail"), "counter 1, the verifier expects 5") {
		t.Fatalf("detail %q", ev.String("detail"))
	}
	if counter(t, vm) != 5 {
		t.Fatalf("verifier counter moved to %d on a refused boot, want 5", counter(t, vm))
	}
	must(t, vm.Restore("current"))

	// A changed command line (approved by the owner as an update): policy fails, recovery
	// unlocks; a changed kernel with nobody to type the recovery passphrase stays locked.
	vm.Cmdline += " init=/bin/sh"
	must(t, vm.UpdateLaunch(ctx, true))
	run = boot(t, vm, harness.BootOptions{})
	wantOK(t, run)
	if ev := event(t, run, "fde-policy-failed"); !strings.Contains(ev.Reason, "policy") {
		t.Fatalf("policy failure reason %q", ev.Reason)
	}
	if ev := event(t, run, "fde-unlocked"); ev.String("method") != "recovery" {
		t.Fatalf("unlock after policy failure %+v", ev)
	}
	must(t, vm.SetKernel([]byte("a different kernel")))
	must(t, vm.UpdateLaunch(ctx, true))
	run = boot(t, vm, harness.BootOptions{NoRecovery: true})
	wantFailed(t, run, "os", "fde-locked")
	event(t, run, "fde-policy-failed")
}

// TestGuestWorkloadOverControlChannel drives runtime actions one at a time.
func TestGuestWorkloadOverControlChannel(t *testing.T) {
	s := newStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	vm, err := s.NewVM(ctx, harness.VMOptions{Name: "ctl", DataDiskMiB: -1, NoSecureBoot: true})
	must(t, err)
	r, err := vm.Start(ctx, harness.BootOptions{Control: true})
	must(t, err)
	for i := 1; i <= 3; i++ {
		ev, err := r.Command(ctx, "nv-increment", 30*time.Second)
		must(t, err)
		if uintField(t, ev, "nv_counter") != uint64(i) || uintField(t, ev, "seq") != uint64(i) {
			t.Fatalf("command %d: %+v", i, ev)
		}
	}
	if ev, err := r.Command(ctx, "no-such-action", 30*time.Second); err != nil || ev.Fields["ok"] != false {
		t.Fatalf("unknown command: %+v %v", ev, err)
	}
	// Reboot: a clean power-off through the channel, then a new boot that sees the counter.
	run, err := vm.Reboot(ctx, r, harness.BootOptions{Actions: []string{"nv-read"}})
	must(t, err)
	wantOK(t, run)
	if uintField(t, action(t, run, "nv-read"), "nv_counter") != 3 {
		t.Fatalf("after reboot: %+v", action(t, run, "nv-read"))
	}
	// The console of each boot is kept: the first holds the control commands' results.
	con, err := vm.Console(1)
	must(t, err)
	if strings.Count(con, `"action":"nv-increment"`) != 3 {
		t.Fatalf("boot 1 console:\n%s", con)
	}
}

// TestGuestBinaryNVBridge checks the shipped svsm-guest itself: the simulator's s_NV in the
// binary must have the size the NV bridge copies.
func TestGuestBinaryNVBridge(t *testing.T) {
	if err := vtpm.CheckBinary(bins.Guest); err != nil {
		t.Fatal(err)
	}
}
