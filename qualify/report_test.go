package qualify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/onsi/ginkgo/v2/types"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// fixture writes a Ginkgo JSON report of four specs (an attack the guest stopped, an attack
// the verifier stopped, a known limitation, a failed spec) and the bundles they name.
func fixture(t *testing.T) (dir, ginkgoJSON string) {
	t.Helper()
	dir = t.TempDir()
	t0 := time.Date(2026, 11, 30, 9, 0, 0, 0, time.UTC)
	bundle := func(name string, events []harness.TimedEvent, audit string, proxy string) string {
		b := filepath.Join(dir, "artifacts", name)
		vmDir := filepath.Join(b, "vms", "vm")
		if err := os.MkdirAll(filepath.Join(b, "logs"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(vmDir, 0o755); err != nil {
			t.Fatal(err)
		}
		var lines []string
		for _, e := range events {
			l, _ := json.Marshal(e)
			lines = append(lines, string(l))
		}
		must(t, os.WriteFile(filepath.Join(vmDir, "01-boot.events.jsonl"), []byte(strings.Join(lines, "\n")+"\n"), 0o644))
		must(t, os.WriteFile(filepath.Join(b, "verifier-audit.json"), []byte(audit), 0o644))
		must(t, os.WriteFile(filepath.Join(b, "logs", "svsm-proxy.log"), []byte(proxy), 0o644))
		return b
	}
	ev := func(dt time.Duration, name, layer, reason string) harness.TimedEvent {
		return harness.TimedEvent{Time: t0.Add(dt), Event: protocol.Event{Event: name, Layer: layer, Reason: reason, Fields: map[string]any{}}}
	}
	rollback := bundle("rollback",
		[]harness.TimedEvent{ev(0, "boot-start", "svsm", ""), ev(20*time.Millisecond, "attested", "svsm", ""), ev(30*time.Millisecond, "failed", "svsm", "stale-state")},
		`[{"seq":1,"time":"2026-11-30T09:00:00.010Z","vm":"vm","event":"release","outcome":"allow","boot_id":"ab"}]`,
		"time=2026-11-30T09:00:00.015Z level=INFO msg=\"attestation succeeded, secret forwarded wrapped\" component=svsm-proxy session=s1 verifier=http://v\n")
	clone := bundle("clone",
		[]harness.TimedEvent{ev(0, "boot-start", "svsm", ""), ev(10*time.Millisecond, "failed", "svsm", "attestation-failed")},
		`[{"seq":2,"time":"2026-11-30T09:00:00.005Z","vm":"vm","event":"release","outcome":"deny","reason":"boot_request: no primed boot request"}]`, "")
	spec := func(text string, labels []string, state types.SpecState, entries ...types.ReportEntry) types.SpecReport {
		return types.SpecReport{ContainerHierarchyTexts: []string{"Suite"}, LeafNodeText: text, LeafNodeType: types.NodeTypeIt,
			LeafNodeLabels: labels, State: state, RunTime: 1500 * time.Millisecond, ReportEntries: entries}
	}
	entry := func(name string, v any) types.ReportEntry {
		return types.ReportEntry{Name: name, Value: types.WrapEntryValue(v)}
	}
	failed := spec("a spec that failed", []string{"backend:process"}, types.SpecStateFailed)
	failed.Failure = types.Failure{Message: "expected 1 release, got 2"}
	rep := []types.Report{{SuiteDescription: "svsm-e2e scenarios", RunTime: 90 * time.Second,
		SuiteConfig: types.SuiteConfig{RandomSeed: 42, LabelFilter: "backend:process"},
		SpecReports: []types.SpecReport{
			spec("a rollback is refused", []string{"backend:process", "attack"}, types.SpecStatePassed, entry("seed", 7), entry("artifacts", rollback)),
			spec("a clone is refused a second key", []string{"backend:process", "attack"}, types.SpecStatePassed, entry("artifacts", clone), entry("fresh explorer seed", 99)),
			spec("known-limitation: a live clone in default mode", []string{"backend:process", "attack"}, types.SpecStatePassed),
			failed,
			spec("a hardware spec", []string{"hardware"}, types.SpecStateSkipped),
		}}}
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	ginkgoJSON = filepath.Join(dir, "ginkgo.json")
	must(t, os.WriteFile(ginkgoJSON, b, 0o644))
	return dir, ginkgoJSON
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestReportModel: the summary, verdict, attack matrix and timelines come out of Ginkgo's
// report and the bundles as a reader would expect.
func TestReportModel(t *testing.T) {
	_, path := fixture(t)
	r, err := FromGinkgo(path)
	if err != nil {
		t.Fatal(err)
	}
	if s := r.Summary; s.Total != 5 || s.Passed != 3 || s.Failed != 1 || s.Skipped != 1 || s.Verdict != "FAIL" {
		t.Fatalf("summary %+v", s)
	}
	if r.Env.GinkgoSeed != 42 || r.Env.Seeds["explorer"] != "99" {
		t.Fatalf("seeds: %d %v", r.Env.GinkgoSeed, r.Env.Seeds)
	}
	rows := map[string]AttackRow{}
	for _, a := range r.Attacks {
		rows[a.Spec] = a
	}
	if a := rows["Suite a rollback is refused"]; a.StoppedBy != "svsm" || a.GuestReason != "svsm/stale-state" {
		t.Errorf("rollback row %+v", a)
	}
	if a := rows["Suite a clone is refused a second key"]; a.StoppedBy != "svsm" || !strings.HasPrefix(a.Audit, "release deny: boot_request") {
		t.Errorf("clone row %+v", a)
	}
	if a := rows["Suite known-limitation: a live clone in default mode"]; a.StoppedBy != "known-limitation" {
		t.Errorf("known limitation row %+v", a)
	}
	var rb SpecResult
	for _, s := range r.Specs {
		if s.Name == "Suite a rollback is refused" {
			rb = s
		}
	}
	var actors []string
	for _, it := range rb.Timeline {
		actors = append(actors, it.Actor+":"+it.What)
	}
	want := "guest vm (01-boot):boot-start,verifier:release allow,proxy:attestation succeeded, secret forwarded wrapped,guest vm (01-boot):attested,guest vm (01-boot):failed"
	if got := strings.Join(actors, ","); got != want {
		t.Errorf("timeline, merged by time:\n got %s\nwant %s", got, want)
	}
	r.SetExplorer(&ExplorerResult{Seed: 1, Steps: 10})
	if r.Summary.Verdict != "FAIL" {
		t.Error("a failed spec must keep the verdict FAIL")
	}
}

// EnvRequireChromium makes a missing Chromium a failure instead of a skip (make test sets it).
const EnvRequireChromium = "SVSM_E2E_REQUIRE_CHROMIUM"

// TestReportInChromium opens the written report in headless Chromium (Debian's chromium,
// driven by chromedp) and checks what a person sees: the verdict, the counts, the attack
// matrix's rows and a spec's timeline once expanded; a screenshot is kept.
func TestReportInChromium(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		if os.Getenv(EnvRequireChromium) != "" {
			t.Fatalf("no chromium on PATH (Debian's chromium package; ci/install-deps.sh installs it): %v", err)
		}
		t.Skipf("no chromium on PATH (set %s=1 to make this a failure): %v", EnvRequireChromium, err)
	}
	dir, path := fixture(t)
	r, err := FromGinkgo(path)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	must(t, r.Write(out))
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(browser), chromedp.NoSandbox, chromedp.Headless,
		chromedp.Flag("disable-gpu", true), chromedp.WindowSize(1280, 900))
	actx, cancel := chromedp.NewExecAllocator(t.Context(), opts...)
	defer cancel()
	bctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	// The first action starts the browser: no timeout on it (chromedp's rule), then bounds.
	if err := chromedp.Do(bctx, chromedp.Navigate("file://"+filepath.Join(out, "report.html"))); err != nil {
		t.Fatalf("chromium: open the report: %v", err)
	}
	tctx, cancel := context.WithTimeout(bctx, 60*time.Second)
	defer cancel()
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(tctx, chromedp.Text(sel))
		if err != nil {
			t.Fatalf("chromium: text of %s: %v", sel, err)
		}
		return s
	}
	if err := chromedp.Do(tctx, chromedp.WaitVisible("#attack-matrix")); err != nil {
		t.Fatalf("chromium: %v", err)
	}
	verdict, summary, matrix := text("#verdict"), text("#summary"), text("#attack-matrix")
	rollback := -1
	for i, sp := range r.Specs {
		if strings.HasSuffix(sp.Name, "a rollback is refused") {
			rollback = i
		}
	}
	sel := fmt.Sprintf("#spec-%d", rollback)
	if err := chromedp.Do(tctx, chromedp.Click(sel+" summary")); err != nil { // expand the rollback spec
		t.Fatalf("chromium: expand a spec: %v", err)
	}
	timeline := text(sel + " table.timeline")
	shot, err := chromedp.Run(tctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("chromium: screenshot: %v", err)
	}
	for _, c := range []struct{ what, got, want string }{
		{"verdict", verdict, "FAIL"},
		{"summary", summary, "5 specs: 3 passed, 1 failed, 1 skipped"},
		{"matrix", matrix, "svsm/stale-state"},
		{"matrix", matrix, "release deny: boot_request"},
		{"matrix", matrix, "known-limitation"},
		{"timeline", timeline, "attestation succeeded"},
	} {
		if !strings.Contains(c.got, c.want) {
			t.Errorf("%s as shown: %q lacks %q", c.what, c.got, c.want)
		}
	}
	keep := os.Getenv("SVSM_E2E_ARTIFACTS")
	if keep == "" {
		keep = filepath.Join("..", "reports", "artifacts")
	}
	if err := os.MkdirAll(keep, 0o755); err != nil {
		t.Fatal(err)
	}
	shotPath := filepath.Join(keep, "qualify-report.png")
	must(t, os.WriteFile(shotPath, shot, 0o644))
	if len(shot) < 1000 {
		t.Fatalf("screenshot of %d bytes", len(shot))
	}
	t.Logf("screenshot of the report as Chromium shows it: %s", shotPath)
	if _, err := os.Stat(filepath.Join(out, "report.json")); errors.Is(err, os.ErrNotExist) {
		t.Fatal("no report.json beside report.html")
	}
}
