package qemu

import (
	"strings"
	"testing"
)

func sample(p Profile) *Machine {
	return &Machine{
		Profile: p, Accel: TCG, MemoryMiB: 512, Kernel: "/img/vmlinux", Initrd: "/img/initramfs.cpio",
		Cmdline: "console=ttyS0 quiet", Console: "/run/con.sock", QMP: "/run/qmp.sock",
		Disks: []Disk{{ID: "state", Path: "/vm/state.img", Serial: "svsm-state", SVSM: true},
			{ID: "config", Path: "/vm/config.img", Serial: "svsm-config", ReadOnly: true}},
		Ports: []Port{{Name: "svsm.proxy", Socket: "/run/proxy.sock"}},
		RNG:   true,
	}
}

// Golden command lines: a change here changes what every QEMU run gets.
func TestGoldenCommandLines(t *testing.T) {
	common := "-nodefaults -no-user-config -nographic -no-reboot -m 512 -smp 1 "
	tail := func(bus, state string) string {
		return " -qmp unix:/run/qmp.sock,server=on,wait=off -chardev socket,id=console,path=/run/con.sock -serial chardev:console" +
			" -device virtio-serial-" + bus + ",id=vser0 -chardev socket,id=port0,path=/run/proxy.sock -device virtserialport,bus=vser0.0,chardev=port0,name=svsm.proxy" +
			" -drive file=/vm/state.img,format=raw,if=none,id=state,cache=directsync -device " + state + ",drive=state,serial=svsm-state" +
			" -drive file=/vm/config.img,format=raw,if=none,id=config,readonly=on -device virtio-blk-" + bus + ",drive=config,serial=svsm-config" +
			" -device virtio-rng-" + bus
	}
	kernel := " -kernel /img/vmlinux -initrd /img/initramfs.cpio -append console=ttyS0 quiet"
	for _, tc := range []struct {
		m    *Machine
		want string
	}{
		{sample(Microvm), common + "-accel tcg -cpu max,erms=off,fsrm=off -machine microvm,acpi=on" + kernel + tail("device", "virtio-blk-device")},
		{sample(Q35), common + "-accel tcg -cpu max,erms=off,fsrm=off -machine q35" + kernel + tail("pci", "virtio-blk-pci")},
	} {
		args, err := tc.m.Args()
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(args, " "); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.m.Profile, got, tc.want)
		}
	}
}

func TestArgsRefuseUnsafeInput(t *testing.T) {
	for name, m := range map[string]*Machine{
		"comma in path":                   {Kernel: "/a,b"},
		"no kernel":                       {},
		"coconut is not a kernel profile": {Profile: Coconut, Kernel: "/k"},
		"bad profile":                     {Kernel: "/k", Profile: "pc"},
		"comma in serial":                 {Kernel: "/k", Disks: []Disk{{ID: "d", Path: "/d", Serial: "a,b"}}},
	} {
		if _, err := m.Args(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
