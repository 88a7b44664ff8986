// Package qualify turns a run of the scenario suite (Ginkgo's JSON report and the artifact
// bundle each spec kept) and an exploration into a release-qualification report: a
// self-contained HTML page (no network when viewed) and its JSON twin. It holds the attack
// matrix (each attack spec, which layer stopped it, the guest's reason and the verifier's
// audit row, or a known limitation), a message-sequence timeline per spec (guest events,
// proxy lines and verifier decisions, merged by time), the environment and the summary.
package qualify

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/onsi/ginkgo/v2/types"
)

// Report is what a qualification run found; it is written as report.json and rendered as
// report.html.
type Report struct {
	Title     string          `json:"title"`
	Generated time.Time       `json:"generated"`
	Summary   Summary         `json:"summary"`
	Env       Environment     `json:"environment"`
	Attacks   []AttackRow     `json:"attack_matrix"`
	Specs     []SpecResult    `json:"specs"`
	Explorer  *ExplorerResult `json:"explorer,omitempty"`
}

// Summary counts specs by outcome.
type Summary struct {
	Total, Passed, Failed, Skipped int
	Duration                       time.Duration
	// Verdict is PASS when no spec failed and the explorer broke no invariant.
	Verdict string
}

// Environment is where the run happened.
type Environment struct {
	Commit       string            `json:"commit"`
	GoVersion    string            `json:"go_version"`
	HostKernel   string            `json:"host_kernel"`
	QEMU         string            `json:"qemu"`
	GuestKernel  string            `json:"guest_kernel"`
	Accelerator  string            `json:"accelerator"`
	Labels       string            `json:"label_filter"`
	GinkgoSeed   int64             `json:"ginkgo_seed"`
	Seeds        map[string]string `json:"seeds"` // fresh seeds the run printed, by name
	Machine      string            `json:"machine"`
	ReportFormat string            `json:"report_format"`
}

// AttackRow is one attack spec in the matrix.
type AttackRow struct {
	Spec        string `json:"spec"`
	State       string `json:"state"`
	StoppedBy   string `json:"stopped_by"`   // svsm, firmware, os, verifier, known-limitation, or "" (nothing refused)
	GuestReason string `json:"guest_reason"` // layer/reason of the guest's last failed event
	Audit       string `json:"audit"`        // the verifier's first refusal in the spec
	Artifacts   string `json:"artifacts,omitempty"`
}

// SpecResult is one spec.
type SpecResult struct {
	Name      string         `json:"name"`
	Labels    []string       `json:"labels"`
	State     string         `json:"state"`
	Duration  time.Duration  `json:"duration"`
	Failure   string         `json:"failure,omitempty"`
	Seed      string         `json:"seed,omitempty"`
	Artifacts string         `json:"artifacts,omitempty"`
	Timeline  []TimelineItem `json:"timeline,omitempty"`
}

// TimelineItem is one message or decision, at its host time.
type TimelineItem struct {
	Time   time.Time     `json:"t"`
	Offset time.Duration `json:"offset"` // since the spec's first item
	Actor  string        `json:"actor"`  // "guest VM", "proxy", "verifier"
	What   string        `json:"what"`
	Detail string        `json:"detail,omitempty"`
}

// ExplorerResult is the exploration the run made.
type ExplorerResult struct {
	Seed        uint64        `json:"seed"`
	Sequences   int           `json:"sequences"`
	Steps       int           `json:"steps"`
	Duration    time.Duration `json:"duration"`
	StepsPerMin float64       `json:"steps_per_minute"`
	Violation   string        `json:"violation,omitempty"`
	Replay      string        `json:"replay,omitempty"`
	Artifacts   string        `json:"artifacts,omitempty"`
}

// maxTimeline bounds one spec's timeline in the report (the bundle has everything).
const maxTimeline = 400

// FromGinkgo reads Ginkgo's JSON report (--json-report) and the bundles its specs name
// (report entry "artifacts").
func FromGinkgo(path string) (*Report, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("ginkgo report: %w", err)
	}
	var suites []types.Report
	if err := json.Unmarshal(b, &suites); err != nil {
		return nil, fmt.Errorf("ginkgo report %s: %w", path, err)
	}
	r := &Report{Title: "svsm-e2e qualification", Generated: time.Now().UTC(), Env: Environment{Seeds: map[string]string{}}}
	for _, s := range suites {
		r.Summary.Duration += s.RunTime
		r.Env.GinkgoSeed = s.SuiteConfig.RandomSeed
		r.Env.Labels = s.SuiteConfig.LabelFilter
		for _, sr := range s.SpecReports {
			if sr.LeafNodeType != types.NodeTypeIt {
				continue
			}
			spec := SpecResult{Name: sr.FullText(), Labels: sr.Labels(), State: sr.State.String(), Duration: sr.RunTime}
			if sr.Failed() {
				spec.Failure = sr.FailureMessage()
			}
			for _, e := range sr.ReportEntries {
				v := entryValue(e)
				switch {
				case e.Name == "seed":
					spec.Seed = v
				case e.Name == "artifacts":
					spec.Artifacts = v
				case strings.HasPrefix(e.Name, "fresh ") && strings.HasSuffix(e.Name, " seed"):
					r.Env.Seeds[strings.TrimSuffix(strings.TrimPrefix(e.Name, "fresh "), " seed")] = v
				}
			}
			r.Summary.Total++
			switch {
			case sr.State.Is(types.SpecStatePassed):
				r.Summary.Passed++
			case sr.State.Is(types.SpecStateSkipped | types.SpecStatePending):
				r.Summary.Skipped++
			default:
				r.Summary.Failed++
			}
			var guestFail, audit string
			if spec.Artifacts != "" {
				spec.Timeline, guestFail, audit = readBundle(spec.Artifacts)
			}
			if slices.Contains(spec.Labels, "attack") && !sr.State.Is(types.SpecStateSkipped|types.SpecStatePending) {
				r.Attacks = append(r.Attacks, attackRow(spec, guestFail, audit))
			}
			r.Specs = append(r.Specs, spec)
		}
	}
	sort.SliceStable(r.Specs, func(i, j int) bool { return r.Specs[i].Name < r.Specs[j].Name })
	sort.SliceStable(r.Attacks, func(i, j int) bool { return r.Attacks[i].Spec < r.Attacks[j].Spec })
	r.verdict()
	return r, nil
}

func (r *Report) verdict() {
	r.Summary.Verdict = "PASS"
	if r.Summary.Failed > 0 || (r.Explorer != nil && r.Explorer.Violation != "") {
		r.Summary.Verdict = "FAIL"
	}
}

// SetExplorer records the exploration and updates the verdict.
func (r *Report) SetExplorer(e *ExplorerResult) {
	r.Explorer = e
	r.verdict()
}

// entryValue is a report entry's value as text (Ginkgo's JSON keeps it as JSON).
func entryValue(e types.ReportEntry) string {
	var v any
	if err := json.Unmarshal([]byte(e.Value.AsJSON), &v); err == nil {
		if s, ok := v.(string); ok {
			return s
		}
		if f, ok := v.(float64); ok {
			return fmt.Sprintf("%.0f", f)
		}
	}
	return e.Value.Representation
}

// attackRow says which layer stopped an attack spec: the guest (its last failed event's
// layer) or the verifier (a refusal in its audit); or that the spec documents a known
// limitation.
func attackRow(s SpecResult, guestFail, audit string) AttackRow {
	row := AttackRow{Spec: s.Name, State: s.State, GuestReason: guestFail, Audit: audit, Artifacts: s.Artifacts}
	switch {
	case strings.Contains(strings.ToLower(s.Name), "known-limitation") || strings.Contains(strings.ToLower(s.Name), "known limitation") ||
		slices.Contains(s.Labels, "known-limitation"):
		row.StoppedBy = "known-limitation"
	case guestFail != "":
		row.StoppedBy, _, _ = strings.Cut(guestFail, "/")
	case audit != "":
		row.StoppedBy = "verifier"
	}
	return row
}

// readBundle merges a bundle's guest events (vms/*/NN-boot.events.jsonl), the verifier's
// audit (verifier-audit.json) and the proxy's log lines into one timeline, and returns the
// guest's last refusal (layer/reason) and the verifier's first refusal.
func readBundle(dir string) (items []TimelineItem, guestFail, audit string) {
	files, _ := filepath.Glob(filepath.Join(dir, "vms", "*", "*.events.jsonl"))
	sort.Strings(files)
	for _, f := range files {
		vm := filepath.Base(filepath.Dir(f))
		boot := strings.TrimSuffix(filepath.Base(f), ".events.jsonl")
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
		for sc.Scan() {
			var te struct {
				T     time.Time       `json:"t"`
				Event json.RawMessage `json:"event"`
			}
			if json.Unmarshal(sc.Bytes(), &te) != nil {
				continue
			}
			var ev map[string]any
			_ = json.Unmarshal(te.Event, &ev)
			name, _ := ev["event"].(string)
			layer, _ := ev["layer"].(string)
			reason, _ := ev["reason"].(string)
			detail := layer
			if reason != "" {
				detail += "/" + reason
			}
			if name == "failed" {
				guestFail = layer + "/" + reason
			}
			items = append(items, TimelineItem{Time: te.T, Actor: "guest " + vm + " (" + boot + ")", What: name, Detail: detail})
		}
		fh.Close()
	}
	if b, err := os.ReadFile(filepath.Join(dir, "verifier-audit.json")); err == nil {
		var evs []struct {
			Time     time.Time `json:"time"`
			VM       string    `json:"vm"`
			Event    string    `json:"event"`
			Outcome  string    `json:"outcome"`
			Reason   string    `json:"reason"`
			BootID   string    `json:"boot_id"`
			Instance string    `json:"instance"`
		}
		if json.Unmarshal(b, &evs) == nil {
			for _, e := range evs {
				d := strings.TrimSpace(strings.Join([]string{e.VM, e.Reason}, " "))
				if audit == "" && e.Outcome == "deny" {
					audit = e.Event + " deny: " + e.Reason
				}
				actor := "verifier"
				if e.Instance != "" {
					actor += " " + e.Instance
				}
				items = append(items, TimelineItem{Time: e.Time, Actor: actor, What: e.Event + " " + e.Outcome, Detail: d})
			}
		}
	}
	items = append(items, proxyLines(filepath.Join(dir, "logs", "svsm-proxy.log"))...)
	sort.SliceStable(items, func(i, j int) bool { return items[i].Time.Before(items[j].Time) })
	if len(items) > maxTimeline {
		items = append(items[:maxTimeline], TimelineItem{Time: items[len(items)-1].Time, Actor: "report", What: fmt.Sprintf("%d more in the bundle", len(items)-maxTimeline)})
	}
	if len(items) > 0 {
		t0 := items[0].Time
		for i := range items {
			items[i].Offset = items[i].Time.Sub(t0)
		}
	}
	return items, guestFail, audit
}

var logLine = regexp.MustCompile(`^time=(\S+) level=(\S+) msg="([^"]*)"(.*)$`)

// proxyLines reads svsm-proxy's text log: one item per message about a guest session.
func proxyLines(path string) []TimelineItem {
	fh, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer fh.Close()
	var out []TimelineItem
	sc := bufio.NewScanner(fh)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		m := logLine.FindStringSubmatch(sc.Text())
		if m == nil || strings.HasPrefix(m[3], "svsm-proxy serving") {
			continue
		}
		t, err := time.Parse(time.RFC3339Nano, m[1])
		if err != nil {
			continue
		}
		detail := strings.TrimSpace(strings.ReplaceAll(m[4], "component=svsm-proxy", ""))
		out = append(out, TimelineItem{Time: t, Actor: "proxy", What: m[3], Detail: detail})
	}
	return out
}

// Write writes report.json and report.html into dir.
func (r *Report) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "report.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(dir, "report.html"))
	if err != nil {
		return err
	}
	if err := page.Execute(f, view{r, dir}); err != nil {
		f.Close()
		return fmt.Errorf("render report.html: %w", err)
	}
	return f.Close()
}
