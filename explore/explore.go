package explore

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/svsm-e2e/svsm-e2e/internal/detrand"
)

// Budget bounds an exploration: whichever of its limits is reached first (zero = no limit;
// one of them must be set).
type Budget struct {
	Steps    int
	Duration time.Duration
}

// ParseBudget reads "200" (steps) or a duration ("2m").
func ParseBudget(s string) (Budget, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 1_000_000 {
			return Budget{}, fmt.Errorf("budget %d steps: want 1 to 1000000", n)
		}
		return Budget{Steps: n}, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return Budget{}, fmt.Errorf("budget %q: want a number of steps or a duration such as 2m", s)
	}
	return Budget{Duration: d}, nil
}

// SequenceLen is the length of each random sequence: long enough for a snapshot, later boots
// and a restore, short enough that a fresh stack per sequence keeps runs independent.
const SequenceLen = 20

// Report is what an exploration did.
type Report struct {
	Seed      uint64
	Sequences int
	Steps     int
	// Found is the shrunk failing run, nil when no invariant broke.
	Found    *Result
	Original []Step // the sequence as generated, before shrinking
}

// Explore runs random sequences from seed until the budget is spent or an invariant breaks;
// a violation is shrunk before it is reported. progress, if set, gets one line per sequence.
func Explore(ctx context.Context, o Options, seed uint64, b Budget, progress func(string)) (*Report, error) {
	if b.Steps <= 0 && b.Duration <= 0 {
		return nil, fmt.Errorf("explore: no budget")
	}
	var deadline time.Time
	if b.Duration > 0 {
		deadline = time.Now().Add(b.Duration)
	}
	rep := &Report{Seed: seed}
	rng := rand.New(rand.NewPCG(seed, seed^0x6578706c6f726572))
	for {
		if (b.Steps > 0 && rep.Steps >= b.Steps) || (!deadline.IsZero() && time.Now().After(deadline)) {
			return rep, nil
		}
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		steps := Generate(rng, SequenceLen)
		o.Seed = SequenceSeed(seed, rep.Sequences)
		res, err := Run(ctx, o, steps)
		if err != nil {
			return rep, err
		}
		rep.Sequences++
		rep.Steps += len(steps)
		if progress != nil {
			status := "ok"
			if res.Violation != nil {
				status = res.Violation.Error()
			}
			progress(fmt.Sprintf("sequence %d (%d steps): %s", rep.Sequences, len(steps), status))
		}
		if res.Violation != nil {
			rep.Original = steps
			shrunk, err := Shrink(ctx, o, res, progress)
			if err != nil {
				return rep, err
			}
			rep.Found = shrunk
			return rep, nil
		}
	}
}

// SequenceSeed is the test seed of an exploration's n-th sequence (from 0): the --seed of
// its replay.
func SequenceSeed(seed uint64, n int) uint64 {
	return detrand.Derive(seed, fmt.Sprintf("sequence#%d", n))
}

// Shrink removes steps from a failing run while the same rule still breaks: first the tail
// after the violation, then chunks of halving size, then single steps (a greedy ddmin). Each
// candidate runs on a fresh stack.
func Shrink(ctx context.Context, o Options, failing *Result, progress func(string)) (*Result, error) {
	o.Seed = failing.Seed // every candidate redraws the failing run's bytes
	return shrink(failing, func(steps []Step) (*Result, error) { return Run(ctx, o, steps) }, progress)
}

func shrink(failing *Result, run func([]Step) (*Result, error), progress func(string)) (*Result, error) {
	best := failing
	steps := failing.Steps[:failing.Violation.Step]
	rule := failing.Violation.Rule
	try := func(cand []Step) (bool, error) {
		if len(cand) == 0 {
			return false, nil
		}
		res, err := run(cand)
		if err != nil {
			return false, err
		}
		if res.Violation == nil || res.Violation.Rule != rule {
			return false, nil
		}
		best = res
		return true, nil
	}
	if len(steps) < len(failing.Steps) {
		if ok, err := try(steps); err != nil {
			return nil, err
		} else if ok {
			steps = best.Steps[:best.Violation.Step]
		}
	}
	for chunk := len(steps) / 2; chunk >= 1; chunk /= 2 {
		for i := 0; i+chunk <= len(steps); {
			cand := append(append([]Step{}, steps[:i]...), steps[i+chunk:]...)
			ok, err := try(cand)
			if err != nil {
				return nil, err
			}
			if !ok {
				i++
				continue
			}
			steps = best.Steps[:best.Violation.Step]
			if progress != nil {
				progress(fmt.Sprintf("shrunk to %d steps: %s", len(steps), Format(steps)))
			}
		}
	}
	return best, nil
}

// Command is the one-line replay of a run.
func Command(res *Result) string {
	mode := ""
	if res.WriteThrough {
		mode = "--write-through "
	}
	return fmt.Sprintf("svsm-e2e explore %s--seed %d --replay '%s'", mode, res.Seed, Format(res.Steps))
}

// Spec is a ready Ginkgo spec for the scenarios package (its replay helper) that replays a
// finding and fails while the violation remains.
func Spec(res *Result) string {
	var b strings.Builder
	title := "explorer finding"
	if res.Violation != nil {
		title = "explorer: " + res.Violation.Rule
	}
	fmt.Fprintf(&b, "It(%q, Label(\"backend:process\", \"explore\"), func() {\n", title)
	mode := ""
	if res.WriteThrough {
		mode = ", writeThrough"
	}
	fmt.Fprintf(&b, "\tres := replay(%q, seed(%d)%s)\n", Format(res.Steps), res.Seed, mode)
	b.WriteString("\tExpect(res.Violation).To(BeNil(), \"%s\", strings.Join(res.Log, \"\\n\"))\n")
	b.WriteString("})\n")
	return b.String()
}
