package qualify

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"github.com/svsm-e2e/svsm-e2e/qemu"
)

// ReportFormat names this report's layout (report.json readers check it).
const ReportFormat = "svsm-e2e qualification report, format 1"

// CollectEnv describes the machine and the tools: the commit of the source tree at root
// (with "+dirty" for uncommitted changes), Go, the host kernel, the CPU and memory, the QEMU
// the QEMU backend would run and what its probe chose, and the guest kernel in imageCache.
// What cannot be found says why.
func CollectEnv(ctx context.Context, root, qemuBin, imageCache string) Environment {
	e := Environment{GoVersion: runtime.Version(), ReportFormat: ReportFormat, Seeds: map[string]string{}}
	if out, err := exec.CommandContext(ctx, "git", "-C", root, "rev-parse", "HEAD").Output(); err == nil {
		e.Commit = strings.TrimSpace(string(out))
		if st, err := exec.CommandContext(ctx, "git", "-C", root, "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(st) > 0 {
			e.Commit += "+dirty"
		}
	} else {
		e.Commit = "unknown (not a git checkout: " + err.Error() + ")"
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		e.HostKernel = strings.TrimSpace(string(b))
	}
	e.Machine = fmt.Sprintf("%d CPUs, %s memory", runtime.NumCPU(), memTotal())
	caps, err := qemu.Probe(ctx, qemuBin)
	if err != nil {
		e.QEMU = "not usable: " + err.Error()
	} else {
		e.QEMU = caps.Binary + " (" + caps.Version + ")"
		if ch, err := caps.Choose(""); err == nil {
			e.Accelerator = fmt.Sprintf("%s on %s: %s", ch.Accel, ch.Profile, ch.Reason)
		} else {
			e.Accelerator = err.Error()
		}
	}
	if vs, _ := filepath.Glob(filepath.Join(imageCache, "vmlinux-*")); len(vs) > 0 {
		sort.Strings(vs)
		e.GuestKernel = strings.TrimPrefix(filepath.Base(vs[len(vs)-1]), "vmlinux-") + " (Debian, " + imageCache + ")"
	} else {
		e.GuestKernel = "no guest image built yet in " + imageCache + " (make images)"
	}
	return e
}

func memTotal() string {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}
