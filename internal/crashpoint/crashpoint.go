// Package crashpoint names every durable write of the stack — in the guest, the verifier and
// the proxy — in one registry, and cuts the power at one of them on request
// (`--crash-at NAME[#n][:torn]`). The registry is the list the crash suite enumerates: a write
// at a point it does not know is a bug (Injector.At panics), so no durable write can escape
// the suite by being forgotten here.
package crashpoint

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// KillSelf cuts a process's power: SIGKILL to itself, no flush, no clean-up.
func KillSelf() {
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {}
}

// Point is one place where state becomes durable (or is about to), and where a power cut
// tests the protocol's crash windows.
type Point struct {
	Name      string
	Component string // guest, verifier, proxy
	What      string
	// Tearable points are disk writes that can also be torn: a prefix of the write, rounded
	// down to 512-byte sectors, reaches the disk before the power goes.
	Tearable bool
}

// The registry. Names are component/operation/phase; the guest's state writes carry the
// reason the SVSM writes them.
var registry = func() map[string]Point {
	m := map[string]Point{}
	add := func(p Point) { m[p.Name] = p }
	for _, why := range []string{"first-boot", "advance", "mirror", "tpm-nv", "uefi-var", "power-off"} {
		add(Point{"guest/state/" + why + "/before", "guest", "a state slot write (" + why + ") is about to start", false})
		add(Point{"guest/state/" + why + "/write", "guest", "the state slot write (" + why + ") itself: cut mid-write with :torn, or before the sync", true})
		add(Point{"guest/state/" + why + "/synced", "guest", "the state slot (" + why + ") is synced, not yet reported", false})
	}
	for _, why := range []string{"advance", "tpm-nv", "uefi-var", "power-off"} {
		add(Point{"guest/confirm/" + why + "/sent", "guest", "the confirmation of a " + why + " write is sent, no answer read yet", false})
		add(Point{"guest/confirm/" + why + "/answered", "guest", "the verifier's authenticated answer to a " + why + " confirmation is in, not yet acted on", false})
	}
	for _, step := range []string{"add-keyslot", "import-token", "kill-old-keyslot"} {
		add(Point{"guest/luks/" + step + "/done", "guest", "a LUKS2 (re-)seal step finished: " + step, false})
	}
	for _, tx := range []string{"release", "confirm", "prime"} {
		add(Point{"verifier/" + tx + "/before-commit", "verifier", "the " + tx + " transaction is built, not committed", false})
		add(Point{"verifier/" + tx + "/after-commit", "verifier", "the " + tx + " transaction is committed (fsynced), no response sent", false})
	}
	add(Point{"proxy/attest/mid-frame", "proxy", "the attestation answer frame to the guest: cut before it, or in its middle with :torn", true})
	add(Point{"proxy/confirm/mid-frame", "proxy", "the confirmation answer frame to the guest: cut before it, or in its middle with :torn", true})
	return m
}()

// All returns every point, sorted by name.
func All() []Point {
	out := make([]Point, 0, len(registry))
	for _, p := range registry {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Of returns the points of one component.
func Of(component string) []Point {
	var out []Point
	for _, p := range All() {
		if p.Component == component {
			out = append(out, p)
		}
	}
	return out
}

// Known reports whether name is a registered point.
func Known(name string) bool {
	_, ok := registry[name]
	return ok
}

// Spec is a parsed --crash-at value: NAME, its N-th hit (from 1), and whether to tear the
// write instead of cutting before it.
type Spec struct {
	Name string
	N    int
	Torn bool
}

func (s Spec) String() string {
	out := s.Name
	if s.N > 1 {
		out += "#" + strconv.Itoa(s.N)
	}
	if s.Torn {
		out += ":torn"
	}
	return out
}

// Parse reads NAME[#n][:torn]; the name must be registered, :torn only on a tearable point.
func Parse(s string) (Spec, error) {
	sp := Spec{N: 1}
	if rest, ok := strings.CutSuffix(s, ":torn"); ok {
		s, sp.Torn = rest, true
	}
	name, n, hasN := strings.Cut(s, "#")
	if hasN {
		v, err := strconv.Atoi(n)
		if err != nil || v < 1 {
			return sp, fmt.Errorf("crash point %q: #%s is not a hit count from 1", s, n)
		}
		sp.N = v
	}
	p, ok := registry[name]
	if !ok {
		return sp, fmt.Errorf("crash point %q is not registered (svsm-e2e crash-points lists them)", name)
	}
	if sp.Torn && !p.Tearable {
		return sp, fmt.Errorf("crash point %q cannot be torn: it is not a disk write", name)
	}
	sp.Name = name
	return sp, nil
}

// Injector is a component's view of the registry for one run: it counts hits and cuts the
// power at the chosen one. The zero Injector (and nil) never crashes but still refuses
// unregistered points.
type Injector struct {
	spec  *Spec
	crash func()
	mu    sync.Mutex
	hits  map[string]int
}

// New returns an injector for spec ("" for none); crash must not return (it kills the
// process the way a power cut would).
func New(spec string, crash func()) (*Injector, error) {
	in := &Injector{crash: crash, hits: map[string]int{}}
	if spec == "" {
		return in, nil
	}
	sp, err := Parse(spec)
	if err != nil {
		return nil, err
	}
	in.spec = &sp
	return in, nil
}

// hit counts a hit on name and reports whether it is the chosen one.
func (in *Injector) hit(name string) (*Spec, bool) {
	if !Known(name) {
		panic(fmt.Sprintf("crashpoint: durable write at unregistered point %q: add it to the registry", name))
	}
	if in == nil {
		return nil, false
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.hits == nil {
		in.hits = map[string]int{}
	}
	in.hits[name]++
	if in.spec == nil || in.spec.Name != name || in.hits[name] != in.spec.N {
		return nil, false
	}
	return in.spec, true
}

// At marks point name: the power goes here if it is the chosen one (not :torn).
func (in *Injector) At(name string) {
	if sp, ok := in.hit(name); ok && !sp.Torn {
		in.crash()
	}
}

// Write marks the write point name around a disk write: it cuts the power before the write,
// or (:torn) after writing a sector-aligned prefix of p at off. write is the real write.
func (in *Injector) Write(name string, p []byte, off int64, write func([]byte, int64) (int, error)) (int, error) {
	sp, ok := in.hit(name)
	if !ok {
		return write(p, off)
	}
	if sp.Torn {
		keep := (len(p) / 2) &^ 511
		if keep == 0 && len(p) > 1 {
			keep = len(p) / 2
		}
		_, _ = write(p[:keep], off)
	}
	in.crash()
	return 0, fmt.Errorf("crashpoint: %s: power cut", name) // unreachable with a real crash
}

// Hits returns how often each point was reached (for tests).
func (in *Injector) Hits() map[string]int {
	in.mu.Lock()
	defer in.mu.Unlock()
	out := map[string]int{}
	for k, v := range in.hits {
		out[k] = v
	}
	return out
}
