package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/svsm-e2e/svsm-e2e/qualify"
)

// TestQualifyCommand runs `svsm-e2e qualify` as a user would, on one attack spec and a short
// exploration: it writes the HTML, JSON and JUnit reports, the spec's bundle, a PASS verdict,
// and an attack-matrix row naming the guest's refusal.
func TestQualifyCommand(t *testing.T) {
	bin, err := filepath.Abs(filepath.Join("..", "..", "bin", "svsm-e2e"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("needs the built binaries (make build): %v", err)
	}
	out := t.TempDir()
	cmd := exec.CommandContext(t.Context(), bin, "qualify", "--focus", "a replayed rollback is refused", "--explore-steps", "5", "--out", out)
	b, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("qualify: %v\n%s", err, b)
	}
	if !strings.Contains(string(b), "qualify: PASS:") {
		t.Fatalf("no PASS line:\n%s", b)
	}
	for _, f := range []string{"report.html", "report.json", "junit.xml", "ginkgo.json"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Errorf("missing %s: %v", f, err)
		}
	}
	raw, err := os.ReadFile(filepath.Join(out, "report.json"))
	if err != nil {
		t.Fatal(err)
	}
	var r qualify.Report
	if err := json.Unmarshal(raw, &r); err != nil {
		t.Fatal(err)
	}
	if r.Summary.Passed != 1 || r.Summary.Verdict != "PASS" || r.Explorer == nil || r.Explorer.Steps < 5 || r.Env.Commit == "" {
		t.Fatalf("report: %+v explorer %+v", r.Summary, r.Explorer)
	}
	if len(r.Attacks) != 1 || r.Attacks[0].GuestReason != "svsm/stale-state" || r.Attacks[0].Artifacts == "" {
		t.Fatalf("attack matrix: %+v", r.Attacks)
	}
	if len(r.Specs) == 0 {
		t.Fatal("no specs")
	}
	for _, s := range r.Specs {
		if s.State == "passed" && len(s.Timeline) == 0 {
			t.Errorf("%s: no timeline", s.Name)
		}
	}
}
