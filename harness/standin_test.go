package harness_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/igvm"
	"github.com/svsm-e2e/svsm-e2e/qemu"
	"github.com/svsm-e2e/svsm-e2e/svsm/attest"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// The hardware leg (label hardware) runs a user's SVSM on an SEV-SNP host with the coconut
// profile. No such host is here, so this test checks the wiring with a stand-in QEMU: this
// test binary, re-executed, checks the argv launch_guest.sh would give, then plays the SVSM
// over the very sockets the argv names (COM3 to the proxy; its report comes from fakesnp, as
// a real SVSM's would come from the AMD-SP) and prints upstream's console markers on COM1.
const (
	envStandIn     = "SVSM_E2E_QEMU_STANDIN"      // "attest" or "hang"
	envStandInSNP  = "SVSM_E2E_QEMU_STANDIN_SNP"  // the report source standing in for the AMD-SP
	envStandInWant = "SVSM_E2E_QEMU_STANDIN_WANT" // "|"-separated argv pieces that must be there
)

func standInQEMU(args []string) int {
	var serials []string
	var machine string
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "-serial":
			serials = append(serials, args[i+1])
		case "-machine":
			machine = args[i+1]
		}
	}
	joined := strings.Join(args, " ")
	if len(serials) != 4 || !strings.HasPrefix(serials[0], "file:") || !strings.HasPrefix(serials[2], "unix:") {
		fmt.Fprintf(os.Stderr, "stand-in: want COM1 file:, COM2, COM3 unix:, COM4; got %v\n", serials)
		return 2
	}
	console, err := os.OpenFile(strings.TrimPrefix(serials[0], "file:"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 2
	}
	defer console.Close()
	say := func(l string) { fmt.Fprintln(console, l); _ = console.Sync() }
	for _, w := range strings.Split(os.Getenv(envStandInWant), "|") {
		if w != "" && !strings.Contains(joined, w) {
			say("[stand-in] argv lacks " + w)
			return 3
		}
	}
	if !strings.Contains(machine, "igvm-cfg=igvm0") {
		say("[stand-in] no igvm-cfg on the machine")
		return 3
	}
	say("[SVSM] COCONUT Secure Virtual Machine Service Module (stand-in)")
	if os.Getenv(envStandIn) == "hang" {
		select {} // a guest that never gets anywhere; the harness's bound must stop it
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	px, err := net.Dial("unix", strings.TrimPrefix(serials[2], "unix:"))
	if err != nil {
		say("[SVSM] ERROR: Panic on CPU[0]! COM3: " + err.Error())
		select {}
	}
	snp, err := net.Dial("unix", os.Getenv(envStandInSNP))
	if err != nil {
		say("[SVSM] ERROR: Panic on CPU[0]! report source: " + err.Error())
		select {}
	}
	if _, err := attest.Attest(ctx, px, attest.NewChannelQuoteProvider(snp, 10*time.Second)); err != nil {
		say("[SVSM] ERROR: Panic on CPU[0]! attestation: " + err.Error())
		select {}
	}
	say("[SVSM] attestation successful")
	say("[SVSM] VTPM: TPM 2.0 Reference Implementation initialized")
	say("[init] Terminating task init, exit_code 0")
	select {} // neither the end of init nor a panic exits QEMU
}

// standInIGVM writes a small SNP IGVM file for the stand-in to be launched with.
func standInIGVM(t *testing.T) string {
	f, err := igvm.BuildLaunch(&igvm.Launch{Kernel: []byte("stand-in kernel"), Cmdline: "console=ttyS0"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := f.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "svsm.igvm")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestHardwareLegWiring: the coconut profile's launch (SEV-SNP argv, COM3 to the proxy, a
// state disk on virtio-mmio), the console parsing, the verifier's record, and the boot bound.
func TestHardwareLegWiring(t *testing.T) {
	ctx := context.Background()
	s, err := harness.NewStack(ctx, harness.StackOptions{WorkDir: t.TempDir(), Binaries: bins, CADir: sharedCA(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	o := harness.CoconutOptions{QEMU: os.Args[0], IGVM: standInIGVM(t), Profile: qemu.Coconut, CBitPos: 51, Timeout: 20 * time.Second}
	v, err := s.NewCoconutVM(ctx, "hw", o)
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(t.TempDir(), "state.img")
	if err := os.WriteFile(state, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	v.SetStateDisk(state)
	hj := v.HostJSON()
	t.Setenv(envStandIn, "attest")
	t.Setenv(envStandInSNP, hj.SNPSocket)
	t.Setenv(envStandInWant, strings.Join([]string{
		"-cpu EPYC-v4", "confidential-guest-support=cgs0", "x-svsm-virtio-mmio=on", "accel=kvm",
		"memory-backend-memfd,size=2048M,id=mem0,share=true,prealloc=false,reserve=false",
		"sev-snp-guest,id=cgs0,cbitpos=51,reduced-phys-bits=1",
		"-serial unix:" + hj.ProxySocket, "-global virtio-mmio.force-legacy=false",
		"id=svsm_storage,cache=none -device virtio-blk-device,drive=svsm_storage",
	}, "|"))
	run, err := v.Boot(ctx, harness.CoconutBootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if run.Outcome != "init-done" || !run.Has(harness.MarkerAttested) {
		t.Fatalf("stand-in boot: %s, reached %v\n%s", run.Outcome, run.Reached(), run.Console)
	}
	evs, err := s.Audit(ctx, v.Registration)
	if err != nil {
		t.Fatal(err)
	}
	var released bool
	for _, e := range evs {
		released = released || (e.Event == "release" && e.Outcome == verifier.Allow)
	}
	if !released {
		t.Fatalf("the verifier released nothing: %+v", evs)
	}
	// A clone without a boot request: the stand-in's attestation is refused.
	run, err = v.Boot(ctx, harness.CoconutBootOptions{NoPrime: true})
	if err != nil || run.Outcome != "panic" || run.Has(harness.MarkerAttested) {
		t.Fatalf("clone: %v %s\n%s", err, run.Outcome, run.Console)
	}
	// A guest that never gets anywhere is stopped at the bound.
	t.Setenv(envStandIn, "hang")
	start := time.Now()
	run, err = v.Boot(ctx, harness.CoconutBootOptions{Timeout: 2 * time.Second})
	if err != nil || run.Outcome != "timeout" || time.Since(start) > 10*time.Second {
		t.Fatalf("hang: %v %s after %s", err, run.Outcome, time.Since(start))
	}
}
