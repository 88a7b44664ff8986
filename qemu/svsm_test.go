package qemu

import (
	"strings"
	"testing"
)

// TestSVSMLaunchGolden: the argv of upstream's launch_guest.sh (f4bc4bcd) for the two modes
// the suite uses; a change here changes what a real SVSM gets.
func TestSVSMLaunchGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		l    SVSMLaunch
		want string
	}{
		{"--nocc --tcg --aproxy, COM4 report (the shared tools)",
			SVSMLaunch{IGVM: "/i/svsm.igvm", Accel: TCG, MemoryMiB: 2048, CPUs: 2, Console: "/v/com1.log", Proxy: "/r/proxy.sock", Report: "/r/snp.sock"},
			"-cpu max,smep=on -machine q35,memory-backend=mem0,igvm-cfg=igvm0,accel=tcg -object memory-backend-ram,size=2048M,id=mem0,prealloc=false" +
				" -object igvm-cfg,id=igvm0,file=/i/svsm.igvm -smp 2 -no-reboot -nic none -nographic -vga none -monitor none" +
				" -serial file:/v/com1.log -serial null -serial unix:/r/proxy.sock -serial unix:/r/snp.sock"},
		{"sev on KVM with a state disk (an SNP host)",
			SVSMLaunch{IGVM: "/i/svsm.igvm", CC: true, CBitPos: 51, Console: "/v/com1.log", Proxy: "/r/proxy.sock", StateDisk: "/v/state.img", QMP: "/r/qmp.sock"},
			"-cpu EPYC-v4 -machine q35,memory-backend=mem0,igvm-cfg=igvm0,accel=kvm,confidential-guest-support=cgs0,x-svsm-virtio-mmio=on" +
				" -object memory-backend-memfd,size=8192M,id=mem0,share=true,prealloc=false,reserve=false -object igvm-cfg,id=igvm0,file=/i/svsm.igvm" +
				" -object sev-snp-guest,id=cgs0,cbitpos=51,reduced-phys-bits=1 -smp 4 -no-reboot -nic none -nographic -vga none -monitor none" +
				" -serial file:/v/com1.log -serial null -serial unix:/r/proxy.sock -serial null" +
				" -global virtio-mmio.force-legacy=false -drive file=/v/state.img,format=raw,if=none,id=svsm_storage,cache=none -device virtio-blk-device,drive=svsm_storage" +
				" -qmp unix:/r/qmp.sock,server=on,wait=off"},
	} {
		args, err := tc.l.Args()
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(args, " "); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.name, got, tc.want)
		}
	}
	if _, err := (&SVSMLaunch{IGVM: "/a,b"}).Args(); err == nil {
		t.Error("comma in a path accepted")
	}
	if pos, ok := CBitPos(); ok {
		t.Logf("this CPU reports SEV with the C-bit at %d", pos)
	} else if _, err := (&SVSMLaunch{IGVM: "/i", CC: true}).Args(); err == nil {
		t.Error("an SNP launch without SEV on the CPU and no C-bit given was built")
	}
}
