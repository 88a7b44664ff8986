package qemu

import (
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
	fork := &Capabilities{Version: "QEMU 10 (coconut)", Machines: map[string]bool{"q35": true},
		Objects: map[string]bool{"igvm-cfg": true, "sev-snp-guest": true}, Devices: map[string]bool{}, KVM: true, KVMReason: "ok"}
	if c, err := fork.Choose(""); err != nil || c.Profile != Q35 || c.Accel != KVM {
		t.Fatalf("no microvm: %+v %v", c, err)
	}
	if c, err := fork.Choose(Coconut); err != nil || c.Profile != Coconut {
		t.Fatalf("fork coconut: %+v %v", c, err)
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
}
