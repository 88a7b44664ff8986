package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// QMPFacts is what QEMU says about itself over QMP (no help text is parsed).
type QMPFacts struct {
	Version string
	// Types is every QOM type (qom-list-types): machines end in "-machine", objects such as
	// igvm-cfg and sev-snp-guest, devices.
	Types map[string]bool
	// Q35Type is the q35 machine's QOM type (from query-machines' alias), and Q35Props its
	// properties (qom-list-properties), where the COCONUT fork adds x-svsm-virtio-mmio.
	Q35Type  string
	Q35Props map[string]bool
	// SchemaIGVM: query-qmp-schema knows igvm-cfg as an object type.
	SchemaIGVM bool
}

// ProbeQMP starts bin with no machine, asks it over QMP what it is and can do, and stops it.
// Every step is bounded; QEMU is killed whatever happens.
func ProbeQMP(ctx context.Context, bin string) (*QMPFacts, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	dir, err := os.MkdirTemp("", "svsm-e2e-qmp-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "qmp.sock")
	p, err := StartArgs(bin, []string{"-machine", "none", "-nodefaults", "-nographic", "-S", "-qmp", "unix:" + sock + ",server=on,wait=off"})
	if err != nil {
		return nil, err
	}
	defer p.Kill()
	var c net.Conn
	for {
		if c, err = net.Dial("unix", sock); err == nil {
			break
		}
		select {
		case <-p.Done():
			return nil, fmt.Errorf("%s exited before QMP was up: %s", bin, strings.TrimSpace(p.Stderr()))
		case <-ctx.Done():
			return nil, fmt.Errorf("%s: QMP not up: %w", bin, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	q := &rawQMP{r: bufio.NewReaderSize(c, 64<<10), w: c}
	if _, err := q.next(); err != nil { // greeting
		return nil, fmt.Errorf("QMP greeting: %w", err)
	}
	if err := q.do("qmp_capabilities", nil, nil); err != nil {
		return nil, err
	}
	f := &QMPFacts{Types: map[string]bool{}, Q35Props: map[string]bool{}}
	var ver struct {
		Qemu struct{ Major, Minor, Micro int } `json:"qemu"`
	}
	if err := q.do("query-version", nil, &ver); err != nil {
		return nil, err
	}
	f.Version = fmt.Sprintf("%d.%d.%d", ver.Qemu.Major, ver.Qemu.Minor, ver.Qemu.Micro)
	var types []struct {
		Name string `json:"name"`
	}
	if err := q.do("qom-list-types", map[string]any{"abstract": false}, &types); err != nil {
		return nil, err
	}
	for _, t := range types {
		f.Types[t.Name] = true
	}
	var machines []struct {
		Name  string `json:"name"`
		Alias string `json:"alias"`
	}
	if err := q.do("query-machines", nil, &machines); err != nil {
		return nil, err
	}
	for _, m := range machines {
		if m.Alias == "q35" {
			f.Q35Type = m.Name + "-machine"
		}
	}
	if f.Q35Type != "" {
		var props []struct {
			Name string `json:"name"`
		}
		if err := q.do("qom-list-properties", map[string]any{"typename": f.Q35Type}, &props); err != nil {
			return nil, err
		}
		for _, pr := range props {
			f.Q35Props[pr.Name] = true
		}
	}
	var schema json.RawMessage
	if err := q.do("query-qmp-schema", nil, &schema); err != nil {
		return nil, err
	}
	f.SchemaIGVM = strings.Contains(string(schema), `"igvm-cfg"`)
	_ = q.do("quit", nil, nil)
	return f, nil
}

// rawQMP is a minimal line-oriented QMP client for the probe: some answers (the schema) are
// far larger than go-qemu's monitor can read (ENVIRONMENT.md), and the probe needs no events.
type rawQMP struct {
	r *bufio.Reader
	w net.Conn
}

// MaxQMPReply bounds one QMP reply line.
const MaxQMPReply = 32 << 20

func (q *rawQMP) next() (map[string]json.RawMessage, error) {
	var line []byte
	for {
		chunk, isPrefix, err := q.r.ReadLine()
		if err != nil {
			return nil, err
		}
		line = append(line, chunk...)
		if len(line) > MaxQMPReply {
			return nil, fmt.Errorf("QMP reply longer than %d bytes", MaxQMPReply)
		}
		if !isPrefix {
			break
		}
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(line, &m); err != nil {
		return nil, fmt.Errorf("QMP reply: %w", err)
	}
	return m, nil
}

func (q *rawQMP) do(cmd string, args map[string]any, out any) error {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	if _, err := q.w.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		m, err := q.next()
		if err != nil {
			if cmd == "quit" {
				return nil
			}
			return fmt.Errorf("QMP %s: %w", cmd, err)
		}
		if _, isEvent := m["event"]; isEvent {
			continue
		}
		if e, ok := m["error"]; ok {
			return fmt.Errorf("QMP %s: %s", cmd, e)
		}
		ret, ok := m["return"]
		if !ok {
			return errors.New("QMP " + cmd + ": reply without return")
		}
		if out != nil {
			return json.Unmarshal(ret, out)
		}
		return nil
	}
}

// SNPHost reports whether this host's KVM offers SEV-SNP (/sys/module/kvm_amd/parameters/sev_snp).
func SNPHost() (bool, string) {
	b, err := os.ReadFile("/sys/module/kvm_amd/parameters/sev_snp")
	if err != nil {
		return false, "no SEV-SNP host support (kvm_amd's sev_snp parameter is absent: not an AMD SNP host)"
	}
	if v := strings.TrimSpace(string(b)); v != "Y" && v != "1" {
		return false, "kvm_amd's sev_snp is " + v + ": SEV-SNP is off on this host"
	}
	return true, "kvm_amd sev_snp=Y"
}
