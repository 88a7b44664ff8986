package explore

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

func TestParseFormat(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		bad      bool
	}{
		{in: "boot;snapshot a; boot ;restore a;boot", want: "boot;snapshot a;boot;restore a;boot"},
		{in: "boot;corrupt 4242;clone;recover", want: "boot;corrupt 4242;clone;recover"},
		{in: "", bad: true},
		{in: "boot;fly", bad: true},
		{in: "snapshot c", bad: true},
		{in: "snapshot", bad: true},
		{in: "boot now", bad: true},
		{in: "corrupt -1", bad: true},
		{in: "corrupt 99999999999", bad: true},
		{in: strings.Repeat("boot;", MaxSteps+1), bad: true},
		{in: "clone after;clone before;clone;swap", want: "clone after;clone before;clone;swap"},
		{in: "clone sideways", bad: true},
		{in: "swap now", bad: true},
		{in: "mitm forge@2;mitm drop-answer@16;mitm attest-key;mitm delay;relaunch tcb", want: "mitm forge@2;mitm drop-answer@16;mitm attest-key;mitm delay;relaunch tcb"},
		{in: "mitm forge@0", bad: true},
		{in: "mitm forge@17", bad: true},
		{in: "mitm forge@", bad: true},
		{in: "mitm attest-flip@2", bad: true}, // only confirmations are numbered
		{in: "mitm delay@1", bad: true},
		{in: "mitm attest-sing", bad: true},
	} {
		steps, err := Parse(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("Parse(%.40q) accepted", tc.in)
			}
			continue
		}
		if err != nil || Format(steps) != tc.want {
			t.Errorf("Parse(%q) = %q, %v", tc.in, Format(steps), err)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add("boot;snapshot a;boot;restore a;boot")
	f.Add("corrupt 1;;wipe")
	f.Fuzz(func(t *testing.T, line string) {
		steps, err := Parse(line)
		if err != nil {
			return
		}
		again, err := Parse(Format(steps))
		if err != nil || !slices.Equal(again, steps) {
			t.Fatalf("round trip of %q: %v", line, err)
		}
	})
}

// TestGenerate: the same seed gives the same sequences, every step parses, and a restore
// only ever names a label snapshotted before it.
func TestGenerate(t *testing.T) {
	a := Generate(rand.New(rand.NewPCG(1, 2)), 1000)
	b := Generate(rand.New(rand.NewPCG(1, 2)), 1000)
	if !slices.Equal(a, b) {
		t.Fatal("one seed, two sequences")
	}
	if a[0].Op != "boot" {
		t.Errorf("first step %s", a[0])
	}
	if _, err := Parse(Format(a)); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	ops := map[string]bool{}
	for _, s := range a {
		ops[s.Op] = true
		switch s.Op {
		case "snapshot":
			seen[s.Arg] = true
		case "restore":
			if !seen[s.Arg] {
				t.Errorf("restore %s before any snapshot %s", s.Arg, s.Arg)
			}
		}
	}
	for op := range opDocs {
		if !ops[op] {
			t.Errorf("1000 steps never drew %s", op)
		}
	}
	// Every attack, relaunch and clone order comes up, and runtime confirmations are aimed at.
	args := map[string]bool{}
	for _, s := range Generate(rand.New(rand.NewPCG(3, 4)), 5000) {
		kind, n, numbered := strings.Cut(s.Arg, "@")
		switch s.Op {
		case "mitm", "relaunch", "clone":
			args[s.Op+" "+kind] = true
		}
		if numbered {
			args["@"+n] = true
		}
	}
	var want []string
	for _, k := range mitmKindNames() {
		want = append(want, "mitm "+k)
	}
	for _, k := range relaunchKinds {
		want = append(want, "relaunch "+k)
	}
	for _, o := range cloneOrders {
		want = append(want, "clone "+o)
	}
	for _, w := range append(want, "@2", "@3") {
		if !args[w] {
			t.Errorf("5000 steps never drew %q", w)
		}
	}
}

// TestOutcome: the model's verdict on what a boot reported.
func TestOutcome(t *testing.T) {
	ev := func(name string, kv ...string) protocol.Event {
		e := protocol.Event{Event: name, Fields: map[string]any{}}
		for i := 0; i+1 < len(kv); i += 2 {
			e.Fields[kv[i]] = kv[i+1]
		}
		return e
	}
	acc := func(a ...string) []string { return a }
	booted := func(read string) *harness.GuestRun {
		return &harness.GuestRun{Events: []protocol.Event{
			ev("action", "action", "nv-read", "nv_data", read), ev("action", "action", "nv-write", "nv_data", "d9"), ev("poweroff")}}
	}
	failed := protocol.Event{Event: "failed", Layer: protocol.LayerSVSM, Reason: "stale-state"}
	for _, tc := range []struct {
		name    string
		m       model
		run     *harness.GuestRun
		end     ending
		violate string
	}{
		{"current state", model{accept: acc("d2"), pending: true}, booted("d2"), ran, ""},
		{"first boot", model{accept: acc(""), pending: true}, booted(""), ran, ""},
		{"older state", model{accept: acc("d5"), pending: true}, booted("d2"), ran, RuleStale},
		{"no state where some was confirmed", model{accept: acc("d5"), pending: true}, booted(""), ran, RuleStale},
		{"other state", model{accept: acc("d5"), pending: true}, booted("x"), ran, RuleLost},
		{"no boot request", model{accept: acc("d2")}, booted("d2"), ran, RuleUnprimed},
		{"refused with a reason", model{accept: acc("d2")}, &harness.GuestRun{ExitCode: 1, Events: []protocol.Event{failed}}, refused, ""},
		{"refused without a reason", model{accept: acc("")}, &harness.GuestRun{ExitCode: 1, Events: []protocol.Event{{Event: "failed", Layer: "svsm"}}}, refused, RuleNoReason},
		{"killed", model{accept: acc("")}, &harness.GuestRun{ExitCode: 2}, refused, RuleNoReason},
		{"after a power cut, the old value", model{accept: acc("d3", "d4"), pending: true}, booted("d3"), ran, ""},
		{"after a power cut, the new value", model{accept: acc("d3", "d4"), pending: true}, booted("d4"), ran, ""},
		{"default mode's known limitation", model{accept: acc("d5"), limited: acc("d3"), pending: true}, booted("d3"), ran, ""},
		{"older than the limitation allows", model{accept: acc("d5"), limited: acc("d3"), pending: true}, booted("d1"), ran, RuleStale},
		{"after a power cut, older still", model{accept: acc("d3", "d4"), pending: true}, booted("d2"), ran, RuleStale},
		{"a power cut nobody asked for", model{accept: acc("")}, &harness.GuestRun{ExitCode: -1, Events: []protocol.Event{{Event: "power-cut"}}}, powerCut, RuleNoReason},
	} {
		r := &runner{m: tc.m}
		_, got, v := r.outcome(tc.run, "d9", false)
		rule := ""
		if v != nil {
			rule = v.Rule
		}
		if (v == nil && got != tc.end) || rule != tc.violate {
			t.Errorf("%s: ending %v, violation %q; want %v, %q", tc.name, got, rule, tc.end, tc.violate)
		}
	}
}

// TestShrink: a violation that needs "snapshot a", a later boot, "restore a" and a boot
// shrinks to exactly those steps from a long sequence.
func TestShrink(t *testing.T) {
	long, _ := Parse("boot;prime;snapshot b;snapshot a;wipe;recover;boot;restart-proxy;boot-unprimed;restore a;clone;restart-verifier;boot;boot;boot")
	run := func(steps []Step) (*Result, error) {
		stage := 0
		for i, s := range steps {
			switch {
			case stage == 0 && s == (Step{"snapshot", "a"}):
				stage = 1
			case stage == 1 && s.Op == "boot":
				stage = 2
			case stage == 2 && s == (Step{"restore", "a"}):
				stage = 3
			case stage == 3 && s.Op == "boot":
				return &Result{Steps: steps, Violation: &Violation{Step: i + 1, Rule: RuleStale}}, nil
			}
		}
		return &Result{Steps: steps}, nil
	}
	first, _ := run(long)
	if first.Violation == nil {
		t.Fatal("the fake does not fail on the long sequence")
	}
	got, err := shrink(first, run, nil)
	if err != nil {
		t.Fatal(err)
	}
	if s := Format(got.Steps); s != "snapshot a;boot;restore a;boot" {
		t.Fatalf("shrunk to %q", s)
	}
}

func TestParseBudget(t *testing.T) {
	if b, err := ParseBudget("150"); err != nil || b.Steps != 150 {
		t.Errorf("150: %+v %v", b, err)
	}
	if b, err := ParseBudget("2m"); err != nil || b.Duration.Minutes() != 2 {
		t.Errorf("2m: %+v %v", b, err)
	}
	for _, bad := range []string{"0", "-3", "soon", "-1m"} {
		if _, err := ParseBudget(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
