package qemu

import (
	"os"
	"strings"
	"testing"
)

func TestChoose(t *testing.T) {
	stock := &Capabilities{Version: "QEMU emulator version 7.2.22", Machines: map[string]bool{"microvm": true, "q35": true},
		Objects: map[string]bool{}, Devices: map[string]bool{"virtio-blk-device": true}, KVMReason: "kvm_pvm"}
	c, err := stock.Choose("")
	if err != nil || c.Profile != Microvm || c.Accel != TCG || !strings.Contains(c.Reason, "TCG because kvm_pvm") {
		t.Fatalf("stock: %+v %v", c, err)
	}
	if _, err := stock.Choose(Coconut); err == nil {
		t.Fatal("coconut chosen without igvm-cfg")
	}
	if c, _ := stock.Choose(Q35); c.Profile != Q35 {
		t.Fatalf("forced q35: %+v", c)
	}
	fork := &Capabilities{Version: "QEMU 11 (coconut)", Machines: map[string]bool{"q35": true},
		Objects: map[string]bool{"igvm-cfg": true, "sev-snp-guest": true}, Devices: map[string]bool{}, KVM: true, KVMReason: "ok",
		SVSMVirtioMMIO: true, SNPHost: true}
	if c, err := fork.Choose(""); err != nil || c.Profile != Q35 || c.Accel != KVM {
		t.Fatalf("no microvm: %+v %v", c, err)
	}
	if c, err := fork.Choose(Coconut); err != nil || c.Profile != Coconut {
		t.Fatalf("fork coconut: %+v %v", c, err)
	}
	// The shared tools' QEMU: igvm-cfg and sev-snp-guest, no COCONUT fork, no SNP host.
	shared := &Capabilities{Version: "QEMU 10.2.2", Machines: map[string]bool{"q35": true},
		Objects: map[string]bool{"igvm-cfg": true, "sev-snp-guest": true}, KVMReason: "kvm_pvm", SNPHostReason: "not an AMD SNP host"}
	_, err = shared.Choose(Coconut)
	if err == nil || !strings.Contains(err.Error(), "x-svsm-virtio-mmio") || !strings.Contains(err.Error(), "not an AMD SNP host") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("coconut on the shared QEMU: %v (want one line naming what is missing)", err)
	}
	if c, err := shared.Choose(CoconutNoCC); err != nil || c.Profile != CoconutNoCC || c.Accel != TCG {
		t.Fatalf("coconut-nocc on the shared QEMU: %+v %v", c, err)
	}
	if _, err := stock.Choose(CoconutNoCC); err == nil {
		t.Fatal("coconut-nocc chosen without igvm-cfg")
	}
}

// TestProbeLocalQEMU runs the probe against the installed QEMU (make test installs it).
func TestProbeLocalQEMU(t *testing.T) {
	c, err := Probe(t.Context(), "")
	if err != nil {
		t.Fatalf("probe: %v (the QEMU backend needs Debian's qemu-system-x86)", err)
	}
	if !c.Machines["q35"] || c.Version == "" {
		t.Fatalf("probe found %+v", c)
	}
	choice, err := c.Choose("")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(choice.Reason, c.Version) || strings.Contains(choice.Reason, "\n") {
		t.Fatalf("the reason must be one line naming the QEMU: %q", choice.Reason)
	}
	t.Log(choice.Reason)
	if _, err := c.Choose(Coconut); err != nil {
		t.Log("coconut: ", err)
	}
}

// TestProbeSharedQEMU probes the IGVM-capable QEMU beside the project, when it is there.
func TestProbeSharedQEMU(t *testing.T) {
	bin := "../../shared/tools/qemu-igvm/bin/qemu-system-x86_64"
	if _, err := os.Stat(bin); err != nil {
		t.Skip("no ../shared/tools/qemu-igvm on this machine")
	}
	c, err := Probe(t.Context(), bin)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Objects["igvm-cfg"] || !c.Machines["q35"] {
		t.Fatalf("the shared QEMU has igvm-cfg and q35: %+v", c)
	}
	if ch, err := c.Choose(CoconutNoCC); err != nil {
		t.Fatal(err)
	} else {
		t.Log(ch.Reason)
	}
}
