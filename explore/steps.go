// Package explore drives random sequences of host actions against a real stack (fakesnp,
// svsm-verifier, svsm-proxy and svsm-guest processes) and checks every step against a
// reference model of what the guest and the verifier may accept. A violation is shrunk to a
// minimal sequence and printed as one replayable line and as a ready Ginkgo spec.
package explore

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"

	"github.com/svsm-e2e/svsm-e2e/internal/crashpoint"
)

// A Step is one host action. Its text form is the op, then its argument after a space
// ("snapshot a", "corrupt 4242"); a sequence joins steps with ";".
type Step struct {
	Op  string
	Arg string
}

func (s Step) String() string {
	if s.Arg == "" {
		return s.Op
	}
	return s.Op + " " + s.Arg
}

// Ops the explorer knows, with what each does as the host.
var opDocs = map[string]string{
	"boot":             "prime a boot request and boot the VM (it reads and rewrites its NV data)",
	"boot-unprimed":    "boot the VM without priming",
	"prime":            "prime a boot request, boot nothing",
	"snapshot":         "copy the VM's state disk aside under a label (a or b)",
	"restore":          "put a labelled copy back as the state disk (a rollback if it is old)",
	"recover":          "put back the host's backup of the disk after the last good boot (what an honest host does)",
	"wipe":             "zero the whole state disk",
	"corrupt":          "flip one byte of the state disk at an offset",
	"clone":            "copy the disk into a second instance; prime once; boot both and keep the winner's disk: at once (no argument: a race, served in the scheduler's order), or in order (after: the clone starts once the original has attested or failed; before: the other way round)",
	"swap":             "put another registered VM's state disk (booted once on first use) in place of this VM's",
	"restart-verifier": "kill -9 the verifier and start it again on its database",
	"restart-proxy":    "kill -9 the proxy and start it again",
	"crash":            "prime and boot, cutting the power at a registered guest write point (NAME or NAME:torn)",
	"mitm":             "prime and boot with a channel attacked: the confirmation (" + strings.Join(confirmKindNames(), ", ") + "; KIND@N attacks only the boot's N-th confirmation, N > 1 being write-through runtime writes) or the attestation (" + strings.Join(attestKindNames(), ", ") + "), or delayed (" + strings.Join(benignKindNames(), ", ") + ", which must not refuse)",
	"crash-service":    "restart the verifier or proxy to die at a registered point (NAME or NAME:torn), prime and boot, then restart it normally",
	"relaunch":         "launch the VM differently at fakesnp (" + strings.Join(relaunchKinds, ", ") + "); original launches it as registered again",
}

// relaunchKinds: other image (measurement), debug policy, reports signed by another chip, a
// platform TCB below the registered minimum, reports altered on their way from the AMD-SP
// (the host on the report channel), or back to the registered launch.
var relaunchKinds = []string{"measurement", "debug", "other-chip", "tcb", "flipped-report", "original"}

// cloneOrders: "" races the two instances; after and before order them.
var cloneOrders = []string{"", "after", "before"}

// crashPrefixes are the guest write points a default-mode VM without Secure Boot or LUKS
// passes on an ordinary boot (the others need another VM kind; the crash suite covers them).
var crashPrefixes = []string{"guest/state/advance/", "guest/state/mirror/", "guest/state/tpm-nv/", "guest/state/power-off/", "guest/confirm/advance/"}

// crashPoints lists the explorer's guest crash specs, torn variants included.
func crashPoints() []string {
	var out []string
	for _, p := range crashpoint.Of("guest") {
		for _, pre := range crashPrefixes {
			if strings.HasPrefix(p.Name, pre) {
				out = append(out, p.Name)
				if p.Tearable {
					out = append(out, p.Name+":torn")
				}
			}
		}
	}
	return out
}

// serviceCrashPoints lists every verifier and proxy crash spec, torn variants included.
func serviceCrashPoints() []string {
	var out []string
	for _, c := range []string{"verifier", "proxy"} {
		for _, p := range crashpoint.Of(c) {
			out = append(out, p.Name)
			if p.Tearable {
				out = append(out, p.Name+":torn")
			}
		}
	}
	return out
}

// Ops lists the known ops with their description, sorted by name.
func Ops() []string {
	out := make([]string, 0, len(opDocs))
	for op, doc := range opDocs {
		out = append(out, fmt.Sprintf("%-16s %s", op, doc))
	}
	slices.Sort(out)
	return out
}

// MaxSteps bounds a sequence (a replay line is untrusted input).
const MaxSteps = 1000

// Parse reads a sequence in the form Format writes.
func Parse(line string) ([]Step, error) {
	var out []Step
	for _, part := range strings.Split(line, ";") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		if len(out) == MaxSteps {
			return nil, fmt.Errorf("explore: more than %d steps", MaxSteps)
		}
		op, arg, _ := strings.Cut(part, " ")
		s := Step{Op: op, Arg: strings.TrimSpace(arg)}
		if err := s.check(); err != nil {
			return nil, fmt.Errorf("explore: step %d %q: %w", len(out)+1, part, err)
		}
		out = append(out, s)
	}
	if len(out) == 0 {
		return nil, errors.New("explore: empty sequence")
	}
	return out, nil
}

func (s Step) check() error {
	if _, ok := opDocs[s.Op]; !ok {
		return fmt.Errorf("unknown op (known: %s)", strings.Join(opNames(), ", "))
	}
	switch s.Op {
	case "snapshot", "restore":
		if s.Arg != "a" && s.Arg != "b" {
			return errors.New("the label is a or b")
		}
	case "corrupt":
		if _, err := strconv.ParseUint(s.Arg, 10, 31); err != nil {
			return fmt.Errorf("the offset: %w", err)
		}
	case "crash":
		if !slices.Contains(crashPoints(), s.Arg) {
			return fmt.Errorf("not a crash point of the explorer's VM (svsm-e2e crash-points; prefixes %s)", strings.Join(crashPrefixes, " "))
		}
	case "mitm":
		if _, _, err := parseMITM(s.Arg); err != nil {
			return err
		}
	case "clone":
		if !slices.Contains(cloneOrders, s.Arg) {
			return errors.New("the order is after, before, or none (a race)")
		}
	case "crash-service":
		if !slices.Contains(serviceCrashPoints(), s.Arg) {
			return errors.New("not a verifier or proxy crash point (svsm-e2e crash-points)")
		}
	case "relaunch":
		if !slices.Contains(relaunchKinds, s.Arg) {
			return fmt.Errorf("the launch is one of %s", strings.Join(relaunchKinds, ", "))
		}
	default:
		if s.Arg != "" {
			return errors.New("takes no argument")
		}
	}
	return nil
}

func opNames() []string { return slices.Sorted(maps.Keys(opDocs)) }

// Format writes a sequence as one line.
func Format(steps []Step) string {
	parts := make([]string, len(steps))
	for i, s := range steps {
		parts[i] = s.String()
	}
	return strings.Join(parts, ";")
}

// weights make honest boots common (the model needs good states to attack) and attacks
// frequent enough that most sequences contain several.
var weights = []struct {
	op string
	w  int
}{
	{"boot", 30}, {"boot-unprimed", 5}, {"prime", 4}, {"snapshot", 14}, {"restore", 12},
	{"recover", 5}, {"wipe", 2}, {"corrupt", 4}, {"clone", 7}, {"swap", 2}, {"restart-verifier", 4}, {"restart-proxy", 3},
	{"crash", 8}, {"mitm", 8}, {"relaunch", 4}, {"crash-service", 5},
}

// Generate draws n steps from r. The first step is a boot (the VM's first boot). The draw is
// steered towards sequences that can break something: a restore names a label already
// snapshotted, and a disk the host has just tampered with is usually booted next.
func Generate(r *rand.Rand, n int) []Step {
	total := 0
	for _, w := range weights {
		total += w.w
	}
	out := []Step{{Op: "boot"}}
	var labels []string
	tampered := false
	for len(out) < n {
		var op string
		if tampered && r.IntN(3) < 2 {
			op = []string{"boot", "boot", "clone", "boot-unprimed"}[r.IntN(4)]
		} else {
			x := r.IntN(total)
			for _, w := range weights {
				if x < w.w {
					op = w.op
					break
				}
				x -= w.w
			}
		}
		s := Step{Op: op}
		switch op {
		case "snapshot":
			s.Arg = []string{"a", "b"}[r.IntN(2)]
			if !slices.Contains(labels, s.Arg) {
				labels = append(labels, s.Arg)
			}
		case "restore":
			if len(labels) == 0 {
				s = Step{Op: "snapshot", Arg: "a"}
				labels = append(labels, "a")
				break
			}
			s.Arg = labels[r.IntN(len(labels))]
		case "corrupt":
			s.Arg = strconv.Itoa(r.IntN(1 << 20))
		case "crash":
			points := crashPoints()
			s.Arg = points[r.IntN(len(points))]
		case "mitm":
			kinds := mitmKindNames()
			s.Arg = kinds[r.IntN(len(kinds))]
			if _, ok := confirmKinds[s.Arg]; ok && r.IntN(3) == 0 {
				s.Arg += "@" + strconv.Itoa(2+r.IntN(2)) // a runtime write's confirmation (write-through)
			}
		case "clone":
			// Mostly ordered, so that a generated sequence replays bit for bit; one in four races.
			s.Arg = []string{"after", "before", "after", ""}[r.IntN(4)]
		case "crash-service":
			points := serviceCrashPoints()
			s.Arg = points[r.IntN(len(points))]
		case "relaunch":
			// Half the relaunches go back to the registered launch, so bad launches end.
			s.Arg = "original"
			if r.IntN(2) == 0 {
				s.Arg = relaunchKinds[r.IntN(len(relaunchKinds)-1)]
			}
		}
		switch s.Op {
		case "restore", "wipe", "corrupt", "recover", "crash", "mitm", "relaunch", "crash-service", "swap":
			tampered = true
		case "boot", "boot-unprimed", "clone":
			tampered = false
		}
		out = append(out, s)
	}
	return out
}
