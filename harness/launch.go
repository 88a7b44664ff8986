package harness

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"

	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/igvm"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// LaunchInputs are the files and command line a backend puts into a VM's launch image.
type LaunchInputs struct {
	Kernel, Initrd string
	Cmdline        string
}

// launchInputs asks the backend what the VM launches: the stand-in kernel and initrd files
// and the VM's command line for the process backend; the built vmlinux, initramfs and the
// full kernel command line for QEMU.
func (v *VM) launchInputs() LaunchInputs {
	if q, ok := v.stack.backend.(*QEMUBackend); ok {
		return LaunchInputs{Kernel: q.Image.Kernel.Vmlinux, Initrd: q.Image.Initramfs, Cmdline: q.Cmdline(v.Cmdline)}
	}
	return LaunchInputs{Kernel: v.Kernel, Initrd: v.Initrd, Cmdline: v.Cmdline}
}

// buildLaunch writes the VM's IGVM launch image from its current inputs and returns its SNP
// launch digest.
func (v *VM) buildLaunch() ([]byte, error) {
	in := v.launchInputs()
	k, err := os.ReadFile(in.Kernel)
	if err != nil {
		return nil, err
	}
	var initrd []byte
	if in.Initrd != "" {
		if initrd, err = os.ReadFile(in.Initrd); err != nil {
			return nil, err
		}
	}
	// Every QEMU image carries the native platform and the KVM-valid SNP boot path, whether
	// this QEMU boots it through igvm-cfg or takes the kernel file through -kernel.
	_, native := v.stack.backend.(*QEMUBackend)
	f, err := igvm.BuildLaunch(&igvm.Launch{Kernel: k, Initrd: initrd, Cmdline: in.Cmdline, Policy: fakesnp.DefaultPolicy, Native: native})
	if err != nil {
		return nil, err
	}
	// A digest no KVM launch reproduces would make every verifier decision about it moot.
	if err := igvm.CheckKVM(f); err != nil {
		return nil, fmt.Errorf("launch image %s: %w", v.LaunchImage, err)
	}
	raw, err := f.Marshal()
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(v.LaunchImage, raw, 0o644); err != nil {
		return nil, err
	}
	return v.measureLaunch(f)
}

func (v *VM) measureLaunch(f *igvm.File) ([]byte, error) {
	m, err := igvm.MeasureSNP(f, igvm.MeasureOptions{})
	if err != nil {
		return nil, err
	}
	v.Measurement = m.Digest[:]
	v.launchCache = nil
	return v.Measurement, nil
}

type launchedFiles struct {
	kernel, initrd, cmdline string
}

// launched extracts kernel, initrd and command line from the launch image, so what a boot
// runs is what was measured. Where the bytes equal the backend's input files those files are
// used as they are (no copy of a large kernel); otherwise the extracted bytes are written
// under launched/.
func (v *VM) launched() (*launchedFiles, error) {
	if v.launchCache != nil {
		return v.launchCache, nil
	}
	raw, err := os.ReadFile(v.LaunchImage)
	if err != nil {
		return nil, err
	}
	f, err := igvm.Parse(raw)
	if err != nil {
		return nil, err
	}
	l, err := igvm.ExtractLaunch(f)
	if err != nil {
		return nil, err
	}
	in := v.launchInputs()
	dir := filepath.Join(v.Dir, "launched")
	pick := func(name, input string, data []byte) (string, error) {
		if input != "" {
			if b, err := os.ReadFile(input); err == nil && sha256.Sum256(b) == sha256.Sum256(data) {
				return input, nil
			}
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", err
		}
		p := filepath.Join(dir, name)
		return p, os.WriteFile(p, data, 0o644)
	}
	out := &launchedFiles{cmdline: l.Cmdline}
	if out.kernel, err = pick("kernel", in.Kernel, l.Kernel); err != nil {
		return nil, err
	}
	if len(l.Initrd) > 0 || in.Initrd != "" {
		if out.initrd, err = pick("initrd", in.Initrd, l.Initrd); err != nil {
			return nil, err
		}
	}
	if q, ok := v.stack.backend.(*QEMUBackend); ok {
		// The QEMU backend adds its own base to the VM's command line; the image holds the
		// full one, so hand QEMU the VM's part back.
		base := q.Cmdline("")
		if !bytes.HasPrefix([]byte(l.Cmdline), []byte(base)) {
			return nil, fmt.Errorf("launch image command line %q does not start with the QEMU base %q", l.Cmdline, base)
		}
		out.cmdline = l.Cmdline[len(base):]
	}
	v.launchCache = out
	return out, nil
}

// UpdateLaunch rebuilds the launch image after a change of kernel, initrd or command line
// (an OS update) and makes the host launch it. With approve the owner also replaces the
// verifier's allow-list with the new digest; without, the verifier still expects the old one.
func (v *VM) UpdateLaunch(ctx context.Context, approve bool) error {
	m, err := v.buildLaunch()
	if err != nil {
		return err
	}
	if approve {
		if _, err := v.stack.Host.Admin.SetMeasurements(ctx, v.Registration, []protocol.HexBytes{m}); err != nil {
			return fmt.Errorf("approve new launch digest: %w", err)
		}
	}
	return v.Relaunch(ctx, func(l *fakesnp.LaunchSpec) { l.Measurement = m })
}

// TamperLaunch flips one byte of the launched kernel inside the IGVM file (the host
// launching a modified image) and relaunches; the verifier is not told.
func (v *VM) TamperLaunch(ctx context.Context, kernelOffset int) error {
	raw, err := os.ReadFile(v.LaunchImage)
	if err != nil {
		return err
	}
	f, err := igvm.Parse(raw)
	if err != nil {
		return err
	}
	gpa := uint64(igvm.KernelGPA) + uint64(kernelOffset)&^(igvm.PageSize4K-1)
	done := false
	for i, h := range f.Headers {
		if p, ok := h.(igvm.PageData); ok && p.GPA == gpa && len(p.Data) > kernelOffset%igvm.PageSize4K {
			p.Data = bytes.Clone(p.Data)
			p.Data[kernelOffset%igvm.PageSize4K] ^= 0x01
			f.Headers[i] = p
			done = true
		}
	}
	if !done {
		return fmt.Errorf("no kernel byte at offset %d in %s", kernelOffset, v.LaunchImage)
	}
	out, err := f.Marshal()
	if err != nil {
		return err
	}
	if err := os.WriteFile(v.LaunchImage, out, 0o644); err != nil {
		return err
	}
	m, err := v.measureLaunch(f)
	if err != nil {
		return err
	}
	return v.Relaunch(ctx, func(l *fakesnp.LaunchSpec) { l.Measurement = m })
}
