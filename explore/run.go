package explore

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/internal/detrand"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// Options say where and with what a sequence runs.
type Options struct {
	Binaries harness.Binaries
	// CADir is a pre-generated fake AMD chain shared by the runs (optional; saves key generation).
	CADir string
	// WorkRoot holds one directory per run; a run's directory is its artifact bundle and is
	// removed unless it found a violation or Keep is set.
	WorkRoot string
	Keep     bool
	// BootTimeout bounds one boot (default 60 s; QEMU under TCG needs more).
	BootTimeout time.Duration
	// Backend runs the VMs (default: svsm-guest as a process).
	Backend harness.Backend
	// WriteThrough runs the VM in write-through mode: every runtime write is confirmed, so
	// the default mode's rollback within a boot is not tolerated by the model.
	WriteThrough bool
	// Seed is the run's test seed: every process's keys, nonces, boot ids and vTPM follow
	// from it (process backend; a VM's guest draws from its own kernel), so a replay with
	// the same seed leaves the same events and disk bytes (Result.Digests).
	Seed   uint64
	Logger *slog.Logger
}

// The invariants, as named in a Violation.
const (
	RuleStale       = "older-state-accepted" // a boot ran on state older than the last confirmed one
	RuleLost        = "confirmed-data-lost"  // a boot ran without data a confirmed boot wrote
	RuleTwoKeys     = "two-instances-one-request"
	RuleUnprimed    = "boot-without-request" // a boot ran though the owner approved none
	RuleReleases    = "more-releases-than-requests"
	RuleBrick       = "honest-boot-refused"    // the last good state, primed, did not boot
	RuleNoReason    = "refusal-without-reason" // a boot ended without a failed event with layer and reason
	RuleCounterBack = "verifier-counter-went-back"
	RuleAttackTaken = "attacked-answer-taken" // the guest ran on an attestation or confirmation the host forged, replayed or cut
	RuleNoAudit     = "refusal-without-audit" // the verifier refused a release and its audit does not say so
	RuleWrongLaunch = "wrong-launch-accepted" // a VM launched other than registered ran
)

// Violation is an invariant a step broke.
type Violation struct {
	Step   int // 1-based index into the sequence
	Rule   string
	Detail string
}

func (v *Violation) Error() string {
	return fmt.Sprintf("step %d: %s: %s", v.Step, v.Rule, v.Detail)
}

// Result is what one run of a sequence did.
type Result struct {
	Steps     []Step
	Log       []string // one line per step: the action and what each layer answered
	Violation *Violation
	Dir       string // the run's artifact bundle (kept when Violation != nil or Options.Keep)
	// WriteThrough: the run's VM was in write-through mode (a replay needs the same).
	WriteThrough bool
	// Seed is the run's test seed (Options.Seed): a replay with it redraws the same bytes.
	Seed uint64
	// Digests has one entry per step run: SHA-256 of the events of the step's boots and of
	// the VM's state disk after it. Two runs of one sequence and seed agree on every entry,
	// except after a clone race, whose winner is the scheduler's choice.
	Digests []string
}

// Digest is one hash over every step's digest: what to compare between two runs.
func (r *Result) Digest() string {
	h := sha256.New()
	for _, d := range r.Digests {
		h.Write([]byte(d))
	}
	return hex.EncodeToString(h.Sum(nil))
}

// model is what the guest and verifier may accept, from the host's actions alone.
type model struct {
	// accept is the NV data a boot may read: what the last successful boot wrote ("" before
	// the first), or after a power cut the old or the new value of an unreported write.
	accept []string
	// limited is data a boot may also read under a documented limitation: in default
	// (non-write-through) mode, what a boot writes is not confirmed by itself, so a copy of
	// the disk from the start of the last boot that ran (or from a boot that advanced the
	// same counter and then failed) still matches the verifier's counter. A boot that reads
	// it is logged as a known limitation, not a violation.
	limited []string
	// gen counts the boots that may have advanced the state (ran, crashed, or were attacked
	// after the advance): a disk copy from an older generation may rightly be refused.
	gen      int
	disk     image
	snaps    map[string]image
	backup   image // the host's copy of the disk after the last good boot
	pending  bool  // a boot request is primed and unused
	primes   uint64
	counter  uint64 // verifier counter seen after the last step
	nextData int
	// badLaunch names how the VM is launched other than registered ("" = as registered).
	badLaunch string
}

// image is what a state disk holds, as the model knows it.
type image struct {
	gen     int  // the generation of the state on it
	damaged bool // wiped or corrupted since
}

// Run runs steps on a fresh stack and checks each against the model. An error is a failure
// of the machinery (a process would not start), not a finding.
func Run(ctx context.Context, o Options, steps []Step) (_ *Result, runErr error) {
	if o.BootTimeout == 0 {
		o.BootTimeout = 60 * time.Second
	}
	if err := os.MkdirAll(o.WorkRoot, 0o755); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(o.WorkRoot, "run-")
	if err != nil {
		return nil, err
	}
	res := &Result{Steps: steps, Dir: dir, WriteThrough: o.WriteThrough, Seed: o.Seed}
	logger := o.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s, err := harness.NewStack(ctx, harness.StackOptions{WorkDir: dir, Binaries: o.Binaries, CADir: o.CADir, Logger: logger, Backend: o.Backend,
		Seed: o.Seed, Seeded: true})
	if err != nil {
		return nil, fmt.Errorf("explore: start stack: %w", err)
	}
	defer func() {
		// A violation collected its artifacts already; a failure of the machinery keeps the
		// run's bundle too (it is what tells why).
		keep := o.Keep || runErr != nil
		if runErr != nil {
			runErr = fmt.Errorf("%w (the run's bundle: %s)", runErr, dir)
		}
		if keep && res.Violation == nil {
			_ = s.CollectArtifacts(context.WithoutCancel(ctx))
		}
		_ = s.Close()
		if res.Violation == nil && !keep {
			_ = os.RemoveAll(dir)
		}
	}()
	// The registration pins the platform's TCB, so a relaunch below it must be refused.
	minTCB := fakesnp.DefaultTCB
	vm, err := s.NewVM(ctx, harness.VMOptions{Name: "vm", DataDiskMiB: -1, NoSecureBoot: true, WriteThrough: o.WriteThrough,
		Spec: verifier.VMSpec{MinTCB: &minTCB}})
	if err != nil {
		return nil, fmt.Errorf("explore: new VM: %w", err)
	}
	hostKey, err := hostKey(o.Seed)
	if err != nil {
		return nil, err
	}
	mitm, err := startConfirmMITM(s.Host.RunPath("explore-mitm.sock"), s.ProxySocket(), hostKey)
	if err != nil {
		return nil, fmt.Errorf("explore: MITM: %w", err)
	}
	defer mitm.m.Close()
	if err := vm.SetProxySocket(mitm.m.Path()); err != nil {
		return nil, err
	}
	r := &runner{o: o, s: s, vm: vm, mitm: mitm, m: model{accept: []string{""}, snaps: map[string]image{}}, res: res}
	for i, st := range steps {
		r.step = i + 1
		r.runs = nil
		line, v, err := r.do(ctx, st)
		res.Log = append(res.Log, fmt.Sprintf("%3d %-18s %s", i+1, st, line))
		if err != nil {
			return res, fmt.Errorf("explore: step %d (%s): %w", i+1, st, err)
		}
		d, err := r.digest()
		if err != nil {
			return res, fmt.Errorf("explore: step %d (%s): digest: %w", i+1, st, err)
		}
		res.Digests = append(res.Digests, d)
		if v == nil {
			v, err = r.checkVerifier(ctx)
			if err != nil {
				return res, fmt.Errorf("explore: step %d (%s): %w", i+1, st, err)
			}
		}
		if v != nil {
			v.Step = i + 1
			res.Violation = v
			_ = s.CollectArtifacts(context.WithoutCancel(ctx))
			return res, nil
		}
	}
	return res, nil
}

// hostKey is the P-521 key the host puts in an attestation request (mitm attest-key), drawn
// from the run's seed.
func hostKey(seed uint64) (protocol.ECPublicKey, error) {
	b := make([]byte, 66)
	if _, err := io.ReadFull(detrand.New(seed, "explore/host-key"), b); err != nil {
		return protocol.ECPublicKey{}, err
	}
	b[0] = 0 // below the group order
	k, err := ecdh.P521().NewPrivateKey(b)
	if err != nil {
		return protocol.ECPublicKey{}, fmt.Errorf("explore: host key: %w", err)
	}
	pub := k.PublicKey().Bytes() // 0x04 || X || Y
	return protocol.ECPublicKey{X: pub[1:67], Y: pub[67:]}, nil
}

type runner struct {
	// serviceCrash: the current step crashes the verifier or proxy on purpose, so a refusal
	// is expected and the dying service may not have audited it.
	serviceCrash bool
	o            Options
	s            *harness.Stack
	vm           *harness.VM
	mitm         *confirmMITM
	m            model
	res          *Result
	step         int
	runs         []*harness.GuestRun // the boots of the current step, for its digest
	other        *harness.VM         // the VM whose disk swap puts in (made on first use)
}

// digest hashes what the current step's boots printed (every event, in order, and how each
// ended) and the VM's state disk as it is now. The run's own directories, which events name
// (the state disk's path), are written as $RUN and $SOCK: they are temporary names, not
// draws of the run.
func (r *runner) digest() (string, error) {
	h := sha256.New()
	sock := filepath.Clean(r.s.Host.RunPath(""))
	for _, run := range r.runs {
		for _, ev := range run.Events {
			// The guest's clock is no draw of the run: replays differ there only.
			ev.Fields = maps.Clone(ev.Fields)
			delete(ev.Fields, protocol.EventUptimeField)
			b, err := json.Marshal(ev)
			if err != nil {
				return "", err
			}
			b = bytes.ReplaceAll(b, []byte(sock), []byte("$SOCK"))
			b = bytes.ReplaceAll(b, []byte(r.res.Dir), []byte("$RUN"))
			h.Write(b)
			h.Write([]byte{'\n'})
		}
		fmt.Fprintf(h, "exit %d\n", run.ExitCode)
	}
	f, err := os.Open(r.vm.StateDisk)
	switch {
	case errors.Is(err, os.ErrNotExist):
		h.Write([]byte("no state disk"))
	case err != nil:
		return "", err
	default:
		defer f.Close()
		if _, err := io.Copy(h, f); err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func (r *runner) do(ctx context.Context, st Step) (string, *Violation, error) {
	m := &r.m
	switch st.Op {
	case "snapshot", "wipe", "corrupt", "clone":
		// Before the first boot there may be no state disk, or an empty one, to act on.
		if fi, err := os.Stat(r.vm.StateDisk); errors.Is(err, os.ErrNotExist) || (err == nil && fi.Size() == 0) {
			return "no state disk yet: nothing done", nil, nil
		}
	}
	switch st.Op {
	case "prime":
		if err := r.prime(ctx); err != nil {
			return "", nil, err
		}
		return "primed", nil, nil
	case "boot", "boot-unprimed":
		if st.Op == "boot" {
			if err := r.prime(ctx); err != nil {
				return "", nil, err
			}
		}
		return r.boot(ctx, harness.BootOptions{})
	case "crash":
		if err := r.prime(ctx); err != nil {
			return "", nil, err
		}
		return r.boot(ctx, harness.BootOptions{CrashAt: st.Arg})
	case "mitm":
		if err := r.prime(ctx); err != nil {
			return "", nil, err
		}
		r.mitm.set(st.Arg)
		defer r.mitm.set("")
		return r.boot(ctx, harness.BootOptions{AttestTimeout: 10 * time.Second})
	case "snapshot":
		if err := r.vm.Snapshot(st.Arg); err != nil {
			return "", nil, err
		}
		m.snaps[st.Arg] = m.disk
		return "disk copied aside", nil, nil
	case "restore":
		img, ok := m.snaps[st.Arg]
		if !ok {
			return "no such copy: nothing done", nil, nil
		}
		if err := r.vm.Restore(st.Arg); err != nil {
			return "", nil, err
		}
		m.disk = img
		return "disk holds " + r.describe(img), nil, nil
	case "recover":
		if m.backup.gen == 0 {
			return "no good boot yet: nothing done", nil, nil
		}
		if err := r.vm.Restore("good"); err != nil {
			return "", nil, err
		}
		m.disk = m.backup
		return "disk holds " + r.describe(m.disk), nil, nil
	case "wipe":
		n, err := r.vm.StateDiskSize()
		if err != nil {
			return "", nil, err
		}
		if err := r.vm.ZeroRange(0, int(n)); err != nil {
			return "", nil, err
		}
		m.disk.damaged = true
		return "zeroed", nil, nil
	case "corrupt":
		n, err := r.vm.StateDiskSize()
		if err != nil {
			return "", nil, err
		}
		off, _ := strconv.ParseInt(st.Arg, 10, 64)
		off %= n
		if err := r.vm.Corrupt(off, 0x5a); err != nil {
			return "", nil, err
		}
		m.disk.damaged = true
		return fmt.Sprintf("byte %d flipped", off), nil, nil
	case "clone":
		return r.clone(ctx, st.Arg)
	case "swap":
		return r.swap(ctx)
	case "crash-service":
		return r.crashService(ctx, st.Arg)
	case "relaunch":
		orig := r.vm.Measurement
		err := r.vm.Relaunch(ctx, func(l *fakesnp.LaunchSpec) {
			l.Measurement = append([]byte(nil), orig...)
			switch st.Arg {
			case "measurement":
				l.Measurement[0] ^= 1
			case "debug":
				l.Policy = fakesnp.DefaultPolicy | fakesnp.PolicyDebug
			case "other-chip":
				l.Faults.SignWithChip = "chip-other"
			case "flipped-report":
				l.Faults.BadSignature = true // a byte of each report changed after signing
			case "tcb":
				tcb := fakesnp.DefaultTCB
				tcb.SnpSpl-- // one security patch level below the registered minimum
				l.TCB = &tcb
			}
		})
		if err != nil {
			return "", nil, err
		}
		m.badLaunch = st.Arg
		if st.Arg == "original" {
			m.badLaunch = ""
		}
		return "launched: " + st.Arg, nil, nil
	case "restart-verifier":
		r.s.Host.KillVerifier()
		return "restarted", nil, r.s.RestartVerifier(ctx)
	case "restart-proxy":
		r.s.Host.KillProxy()
		return "restarted", nil, r.s.Host.RestartProxy(ctx)
	}
	return "", nil, fmt.Errorf("unknown op %q", st.Op)
}

func (r *runner) prime(ctx context.Context) error {
	if err := r.vm.Prime(ctx); err != nil {
		return err
	}
	r.m.primes++
	r.m.pending = true
	return nil
}

// describe says how a disk copy stands against the model, for the step log.
func (r *runner) describe(i image) string {
	s := fmt.Sprintf("generation %d of %d", i.gen, r.m.gen)
	if i.damaged {
		s += ", damaged"
	}
	return s
}

// honest says whether the model requires the next boot to succeed: the disk holds the
// current generation undamaged and a boot request is pending.
func (m *model) honest() bool {
	return m.pending && !m.disk.damaged && m.disk.gen == m.gen && m.badLaunch == ""
}

func (r *runner) data() string {
	r.m.nextData++
	return fmt.Sprintf("d%d", r.m.nextData)
}

// ending is how a boot ended.
type ending int

const (
	ran      ending = iota // powered off after its workload
	refused                // failed closed with a layer and a reason
	powerCut               // cut at its crash point
)

// boot boots the VM once (without priming) and checks the outcome.
func (r *runner) boot(ctx context.Context, o harness.BootOptions) (string, *Violation, error) {
	must := r.m.honest() && !r.serviceCrash
	write := r.data()
	o.NoPrime, o.Actions, o.Timeout = true, []string{"nv-read", "nv-write=" + write}, r.o.BootTimeout
	mark, err := r.auditLen(ctx)
	if err != nil {
		return "", nil, err
	}
	run, err := r.vm.Boot(ctx, o)
	if err != nil {
		return "", nil, err
	}
	r.runs = append(r.runs, run)
	line, end, v := r.outcome(run, write, o.CrashAt != "")
	if v == nil && !r.serviceCrash && !r.mitm.refusedByHost() {
		v, err = r.checkAudit(ctx, mark, run)
		if err != nil {
			return "", nil, err
		}
	}
	if v != nil {
		return line, v, nil
	}
	attacked := r.mitm.acted() > 0
	switch {
	case end == ran && r.m.badLaunch != "":
		return line, &Violation{Rule: RuleWrongLaunch, Detail: "the VM ran though launched with " + r.m.badLaunch + " changed"}, nil
	case end == ran && attacked:
		return line, &Violation{Rule: RuleAttackTaken, Detail: "the guest booted though the host attacked its attestation or confirmation (" + r.mitm.arg() + ")"}, nil
	case end == ran:
		return line, nil, r.afterBoot(run, write)
	case end == powerCut:
		return line, nil, r.afterCut(ctx, run, write)
	case must && !attacked:
		return line, &Violation{Rule: RuleBrick, Detail: "the disk held the current state undamaged, a boot request was primed, and the boot was refused: " + line}, nil
	}
	if read, ok := run.Action("nv-read", 0); ok && attacked {
		// The attack came after the workload started (a write-through runtime confirmation):
		// the verifier may have confirmed the write the guest then halted on, so the next
		// boot may read either value, as after a power cut.
		r.m.accept = []string{read.String("nv_data"), write}
	}
	return line, nil, r.afterRefusal(ctx, attacked || r.serviceCrash)
}

// crashService restarts the verifier or the proxy to die at point, primes and boots (the
// prime may itself be the point), then restarts the service normally. The boot may be
// refused; a committed step whose answer was lost may have consumed the request or moved
// the counter, so the disk becomes a new generation as after an attacked confirmation.
func (r *runner) crashService(ctx context.Context, point string) (string, *Violation, error) {
	restart := r.s.Host.RestartVerifierCrashingAt
	if strings.HasPrefix(point, "proxy/") {
		restart = r.s.Host.RestartProxyCrashingAt
	}
	if err := restart(ctx, point); err != nil {
		return "", nil, err
	}
	r.serviceCrash = true
	defer func() { r.serviceCrash = false }()
	var line string
	var v *Violation
	if err := r.vm.Prime(ctx); err != nil {
		// The prime was the point: committed or not, it counts as one request at most.
		r.m.primes++
		r.m.pending = true
		line = "the prime died with the service"
	} else {
		r.m.primes++
		r.m.pending = true
		var err error
		if line, v, err = r.boot(ctx, harness.BootOptions{AttestTimeout: 10 * time.Second}); err != nil {
			return "", nil, err
		}
	}
	if err := restart(ctx, ""); err != nil {
		return line, v, err
	}
	if v == nil {
		if err := r.observePending(ctx); err != nil {
			return line, nil, err
		}
	}
	return line + "; restarted", v, nil
}

// outcome reads a finished boot: how it ended, and a violation if what it read or how it
// ended breaks the model.
func (r *runner) outcome(run *harness.GuestRun, wrote string, crashing bool) (string, ending, *Violation) {
	last := run.Last()
	read, didRead := run.Action("nv-read", 0)
	got := read.String("nv_data")
	limited := didRead && !slices.Contains(r.m.accept, got) && slices.Contains(r.m.limited, got)
	if didRead && !slices.Contains(r.m.accept, got) && !limited {
		rule, detail := RuleLost, fmt.Sprintf("the boot read %q; the model allows %q", got, r.m.accept)
		if r.isOlder(got) {
			rule = RuleStale
		}
		return fmt.Sprintf("read %q", got), ran, &Violation{Rule: rule, Detail: detail}
	}
	if didRead && !r.m.pending {
		return fmt.Sprintf("read %q", got), ran, &Violation{Rule: RuleUnprimed, Detail: "the VM ran its workload though no boot request was primed"}
	}
	switch {
	case crashing && run.ExitCode == -1:
		if _, ok := run.Find("power-cut"); !ok {
			return "killed without a power-cut event", powerCut, &Violation{Rule: RuleNoReason, Detail: "exit -1 without the power-cut event"}
		}
		if didRead {
			return fmt.Sprintf("power cut after reading %q", got), powerCut, nil
		}
		return "power cut", powerCut, nil
	case run.ExitCode != 0:
		if run.ExitCode != 1 || last.Event != "failed" || last.Layer == "" || last.Reason == "" {
			return fmt.Sprintf("exit %d, last event %+v", run.ExitCode, last), refused,
				&Violation{Rule: RuleNoReason, Detail: fmt.Sprintf("exit %d, last event %q layer %q reason %q", run.ExitCode, last.Event, last.Layer, last.Reason)}
		}
		return fmt.Sprintf("refused: %s/%s", last.Layer, last.Reason), refused, nil
	case last.Event != "poweroff":
		return fmt.Sprintf("exit 0 with last event %q", last.Event), refused,
			&Violation{Rule: RuleNoReason, Detail: fmt.Sprintf("exit 0 but the last event is %q", last.Event)}
	}
	line := fmt.Sprintf("booted: read %q, wrote %q", got, wrote)
	if limited {
		line += fmt.Sprintf(" (known-limitation: default mode rolled back to %q, the data the last boot started from)", got)
	}
	if w, ok := run.Action("nv-write", 0); !didRead || !ok || w.String("nv_data") != wrote {
		return line, ran, &Violation{Rule: RuleNoReason, Detail: "the boot powered off without performing its workload"}
	}
	return line, ran, nil
}

// isOlder: no state at all, or data written by an earlier step than anything the model allows.
func (r *runner) isOlder(data string) bool {
	if data == "" {
		return true
	}
	n, err := strconv.Atoi(strings.TrimPrefix(data, "d"))
	if err != nil {
		return false
	}
	for _, a := range r.m.accept {
		if l, err := strconv.Atoi(strings.TrimPrefix(a, "d")); err == nil && l <= n {
			return false
		}
	}
	return true
}

// afterBoot: a successful boot wrote data; the disk is the new generation, the host keeps a
// backup of it.
func (r *runner) afterBoot(run *harness.GuestRun, data string) error {
	m := &r.m
	m.gen++
	m.limited = nil
	if !r.o.WriteThrough {
		read, _ := run.Action("nv-read", 0)
		m.limited = []string{read.String("nv_data")}
	}
	m.accept, m.disk, m.backup, m.pending = []string{data}, image{gen: m.gen}, image{gen: m.gen}, false
	return r.vm.Snapshot("good")
}

// afterCut: the power went at a write point. A write the guest reported (its action result
// printed) must survive; an unreported one may be there or not. The disk on which it
// happened is the new generation (the next honest boot from it must work); every copy,
// the backup included, may now be behind the verifier.
func (r *runner) afterCut(ctx context.Context, run *harness.GuestRun, wrote string) error {
	m := &r.m
	if _, reported := run.Action("nv-write", 0); reported {
		m.accept = []string{wrote}
	} else if read, ok := run.Action("nv-read", 0); ok {
		m.accept = []string{read.String("nv_data"), wrote} // what it ran on, or its write
	}
	m.gen++
	m.disk = image{gen: m.gen}
	return r.observePending(ctx)
}

// afterRefusal: a refused boot changed nothing the model tracks, unless the host attacked its
// confirmation: then the guest may have advanced its disk first, and older copies may be
// behind the verifier. Whether the boot request survived depends on where the refusal came
// (a release consumes it); the verifier says.
func (r *runner) afterRefusal(ctx context.Context, attacked bool) error {
	// Only a boot from the current state can have advanced it; a stale or damaged copy was
	// refused before any write.
	if attacked && r.m.disk.gen == r.m.gen && !r.m.disk.damaged {
		r.m.gen++
		r.m.disk.gen = r.m.gen
	}
	if r.serviceCrash {
		return nil // the service may be down: crashService asks after its restart
	}
	return r.observePending(ctx)
}

func (r *runner) observePending(ctx context.Context) error {
	v, err := r.vm.View(ctx)
	if err != nil {
		return err
	}
	r.m.pending = r.m.pending && v.Primed
	return nil
}

// clone: a second instance from the same disk, one boot request, both booting. order ""
// starts both at once (a race: which one the verifier serves first is the scheduler's
// choice, so the run's bytes may differ between replays); "after" starts the clone once the
// original has attested or failed, "before" the other way round, both instances alive
// together, so a replay redraws the same bytes.
func (r *runner) clone(ctx context.Context, order string) (string, *Violation, error) {
	c, err := r.s.Clone(r.vm, fmt.Sprintf("clone%d", r.step))
	if err != nil {
		return "", nil, err
	}
	if err := r.prime(ctx); err != nil {
		return "", nil, err
	}
	must := r.m.honest()
	writes := []string{r.data(), r.data()}
	mark, err := r.auditLen(ctx)
	if err != nil {
		return "", nil, err
	}
	vms := []*harness.VM{r.vm, c}
	opts := func(i int) harness.BootOptions {
		return harness.BootOptions{NoPrime: true, Actions: []string{"nv-read", "nv-write=" + writes[i]}, Timeout: r.o.BootTimeout}
	}
	runs := make([]*harness.GuestRun, 2)
	errs := make([]error, 2)
	if order == "" {
		var wg sync.WaitGroup
		for i := range vms {
			wg.Add(1)
			go func() {
				defer wg.Done()
				runs[i], errs[i] = vms[i].Boot(ctx, opts(i))
			}()
		}
		wg.Wait()
	} else {
		first, second := 0, 1
		if order == "before" {
			first, second = 1, 0
		}
		running, err := vms[first].Start(ctx, opts(first))
		if err != nil {
			return "", nil, err
		}
		// Attested or failed: the verifier has decided for the first instance.
		_, errs[first] = running.WaitForEvent(ctx, r.o.BootTimeout, func(e protocol.Event) bool {
			return e.Event == "attested" || e.Event == "failed"
		})
		runs[second], errs[second] = vms[second].Boot(ctx, opts(second))
		var werr error
		runs[first], werr = running.Wait(ctx)
		errs[first] = errors.Join(errs[first], werr)
	}
	if err := errors.Join(errs...); err != nil {
		return "", nil, err
	}
	r.runs = append(r.runs, runs...)
	var lines []string
	winner := -1
	for i, run := range runs {
		line, end, v := r.outcome(run, writes[i], false)
		lines = append(lines, []string{"original", "clone"}[i]+" "+line)
		if v != nil {
			return strings.Join(lines, "; "), v, nil
		}
		if end == ran && r.m.badLaunch != "" {
			return strings.Join(lines, "; "), &Violation{Rule: RuleWrongLaunch, Detail: "an instance ran though launched with " + r.m.badLaunch + " changed"}, nil
		}
		if end == ran {
			if winner >= 0 {
				return strings.Join(lines, "; "), &Violation{Rule: RuleTwoKeys, Detail: "both instances booted on one boot request"}, nil
			}
			winner = i
		}
	}
	line := strings.Join(lines, "; ")
	if v, err := r.checkAudit(ctx, mark, runs...); err != nil || v != nil {
		return line, v, err
	}
	if winner < 0 {
		if must {
			return line, &Violation{Rule: RuleBrick, Detail: "neither instance booted from the current state on a primed request"}, nil
		}
		return line, nil, r.afterRefusal(ctx, false)
	}
	// The host keeps the instance that runs: the winner's disk becomes the VM's.
	if winner == 1 {
		if err := r.vm.LoadState(c.StateDisk); err != nil {
			return "", nil, err
		}
	}
	return line, nil, r.afterBoot(runs[winner], writes[winner])
}

// swap puts another registered VM's state disk in place of this VM's: sound state, another
// VM's key. The other VM is made and booted once on first use.
func (r *runner) swap(ctx context.Context) (string, *Violation, error) {
	if r.other == nil {
		o, err := r.s.NewVM(ctx, harness.VMOptions{Name: "other", DataDiskMiB: -1, NoSecureBoot: true, WriteThrough: r.o.WriteThrough})
		if err != nil {
			return "", nil, err
		}
		run, err := o.Boot(ctx, harness.BootOptions{Actions: []string{"nv-write=other"}, Timeout: r.o.BootTimeout})
		if err != nil {
			return "", nil, err
		}
		r.runs = append(r.runs, run)
		if run.ExitCode != 0 {
			return "", nil, fmt.Errorf("the other VM's first boot failed: %+v", run.Last())
		}
		r.other = o
	}
	if err := r.vm.LoadState(r.other.StateDisk); err != nil {
		return "", nil, err
	}
	r.m.disk = image{gen: r.m.gen, damaged: true} // sound, but not this VM's
	return "disk holds the other VM's state", nil, nil
}

func (r *runner) auditLen(ctx context.Context) (int, error) {
	evs, err := r.s.Audit(ctx, "") // attest refusals may come before the VM is known
	return len(evs), err
}

// checkAudit: a boot the verifier refused (the guest's reason attestation-failed) has a
// refusal with a reason in the verifier's audit since mark.
func (r *runner) checkAudit(ctx context.Context, mark int, runs ...*harness.GuestRun) (*Violation, error) {
	refused := false
	for _, run := range runs {
		if l := run.Last(); run.ExitCode == 1 && l.Reason == "attestation-failed" {
			refused = true
		}
	}
	if !refused {
		return nil, nil
	}
	evs, err := r.s.Audit(ctx, "")
	if err != nil {
		return nil, err
	}
	for _, e := range evs[min(mark, len(evs)):] {
		if e.Outcome == verifier.Deny && e.Reason != "" {
			return nil, nil
		}
	}
	return &Violation{Rule: RuleNoAudit, Detail: "the guest was refused a release and the verifier's audit has no refusal with a reason"}, nil
}

// checkVerifier: after every step, the verifier never released more keys than boot requests
// were primed, and its counter never went back.
func (r *runner) checkVerifier(ctx context.Context) (*Violation, error) {
	v, err := r.vm.View(ctx)
	if err != nil {
		return nil, err
	}
	if v.Releases > r.m.primes {
		return &Violation{Rule: RuleReleases, Detail: fmt.Sprintf("%d releases for %d boot requests", v.Releases, r.m.primes)}, nil
	}
	if v.Counter < r.m.counter {
		return &Violation{Rule: RuleCounterBack, Detail: fmt.Sprintf("counter %d after %d", v.Counter, r.m.counter)}, nil
	}
	r.m.counter = v.Counter
	return nil, nil
}
