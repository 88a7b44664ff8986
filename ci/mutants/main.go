// Command mutants applies the mutant catalog to a copy of the tree, one mutant at a time, and
// reports which test or spec kills each: every mutant disables one protection, and every
// protection must have a test that fails without it. Run it with `make mutants`; it needs a
// clean git checkout (it works in a temporary worktree of HEAD, never in yours).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"
)

// Mutant disables one protection by replacing Old with New in File (Old must occur once).
type Mutant struct {
	ID, What, File, Old, New string
}

// Result is what killed a mutant.
type Result struct {
	Mutant
	KilledBy []string `json:"killed_by"`
	Error    string   `json:"error,omitempty"`
}

var failLine = regexp.MustCompile(`(?m)^--- FAIL: (\S+)`)
var specLine = regexp.MustCompile(`(?m)^\s*\[(?:FAIL|PANICKED|TIMEDOUT|INTERRUPTED)\] (.*?)(?: \[[a-z:, -]+\])?$`)

func main() {
	only := flag.String("only", "", "comma-separated mutant ids (default: all)")
	out := flag.String("out", "mutants.json", "where to write the results")
	suiteTimeout := flag.Duration("suite-timeout", 6*time.Minute, "bound on one run of the process scenarios")
	logDir := flag.String("logs", "", "keep each mutant's test and scenario output here (ID-go.log, ID-specs.log)")
	fast := flag.Bool("fast", false, "stop at the first stage that kills a mutant (unit tests, then scenarios) and let go test reuse cached results of packages the mutant does not touch: the score, not every killer")
	flag.Parse()
	root, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		fail("not in a git checkout: %v", err)
	}
	work, err := os.MkdirTemp("", "svsm-e2e-mutants-")
	if err != nil {
		fail("%v", err)
	}
	defer os.RemoveAll(work)
	tree := filepath.Join(work, "tree")
	run(strings.TrimSpace(string(root)), 2*time.Minute, "git", "worktree", "add", "--detach", tree, "HEAD")
	defer run(strings.TrimSpace(string(root)), 2*time.Minute, "git", "worktree", "remove", "--force", tree)
	want := map[string]bool{}
	for _, id := range strings.Split(*only, ",") {
		if id != "" {
			want[id] = true
		}
	}
	var results []Result
	for _, m := range catalog {
		if len(want) > 0 && !want[m.ID] {
			continue
		}
		r := Result{Mutant: m}
		path := filepath.Join(tree, m.File)
		orig, err := os.ReadFile(path)
		if err != nil || bytes.Count(orig, []byte(m.Old)) != 1 {
			r.Error = fmt.Sprintf("the mutant does not apply to %s (%d matches): the catalog is stale", m.File, bytes.Count(orig, []byte(m.Old)))
			results = append(results, r)
			fmt.Printf("%-4s STALE %s\n", m.ID, r.Error)
			continue
		}
		_ = os.WriteFile(path, bytes.Replace(orig, []byte(m.Old), []byte(m.New), 1), 0o644)
		if out, err := run(tree, 5*time.Minute, "make", "build"); err != nil {
			// A mutant that does not compile proves nothing about the tests: a catalog error.
			r.Error = "the mutant does not build: " + firstError(out)
		} else {
			args := []string{"test", "-count=1", "./protocol/...", "./svsm/...", "./verifier/...", "./harness/...",
				"./fakesnp/...", "./proxy/...", "./internal/...", "./firmware/...", "./guestos/...", "./igvm/..."}
			if *fast {
				args = append(args[:1], args[2:]...) // cached results for untouched packages
			}
			tests, terr := run(tree, 15*time.Minute, "go", args...)
			keepLog(*logDir, m.ID+"-go.log", tests, terr)
			for _, m := range failLine.FindAllStringSubmatch(tests, -1) {
				r.KilledBy = append(r.KilledBy, "go: "+m[1])
			}
			if pkgs := failedOutsideTests(tests); len(pkgs) > 0 && len(r.KilledBy) == 0 {
				// A package that failed before or beside its tests (build, TestMain, a
				// timeout) ran nothing that could kill the mutant: not a verdict.
				r.Error = "tests did not run in " + strings.Join(pkgs, ", ") + " (see -logs)"
				goto done
			}
			if *fast && len(r.KilledBy) > 0 {
				goto done
			}
			specs, serr := run(tree, *suiteTimeout+time.Minute, "env", "SVSM_E2E_BIN="+filepath.Join(tree, "bin"), "GINKGO_NO_COLOR=TRUE",
				"go", "tool", "ginkgo", "-p", "--label-filter", "backend:process", "--timeout", suiteTimeout.String(), "./scenarios")
			keepLog(*logDir, m.ID+"-specs.log", specs, serr)
			for _, m := range specLine.FindAllStringSubmatch(specs, -1) {
				r.KilledBy = append(r.KilledBy, "spec: "+m[1])
			}
		}
	done:
		_ = os.WriteFile(path, orig, 0o644)
		sort.Strings(r.KilledBy)
		r.KilledBy = compact(r.KilledBy)
		results = append(results, r)
		status := fmt.Sprintf("killed by %d", len(r.KilledBy))
		switch {
		case r.Error != "":
			status = "BROKEN " + r.Error
		case len(r.KilledBy) == 0:
			status = "SURVIVED"
		}
		fmt.Printf("%-4s %-9s %s\n", m.ID, status, m.What)
		for _, k := range r.KilledBy {
			fmt.Printf("       %s\n", k)
		}
	}
	killed, total := 0, 0
	var survivors []string
	for _, r := range results {
		total++
		if len(r.KilledBy) > 0 {
			killed++
		} else {
			survivors = append(survivors, r.ID)
		}
	}
	b, _ := json.MarshalIndent(results, "", "  ")
	_ = os.WriteFile(*out, append(b, '\n'), 0o644)
	fmt.Printf("\nmutation score: %d of %d mutants killed; survivors: %v (details in %s)\n", killed, total, survivors, *out)
	if killed != total {
		os.Exit(1)
	}
}

// failedOutsideTests lists the packages whose go test output ends in FAIL without any test
// of theirs failing (a build failure, a failing TestMain, a panic outside a test, a timeout).
func failedOutsideTests(out string) []string {
	var pkgs []string
	testFailed := false
	for _, l := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(l, "--- FAIL: "):
			testFailed = true
		case strings.HasPrefix(l, "ok  \t"), strings.HasPrefix(l, "?   \t"):
			testFailed = false
		case strings.HasPrefix(l, "FAIL\t"):
			if !testFailed {
				pkgs = append(pkgs, strings.Fields(l)[1])
			}
			testFailed = false
		}
	}
	return pkgs
}

// keepLog writes a stage's output (and how it ended) into dir, when one is given.
func keepLog(dir, name, out string, err error) {
	if dir == "" {
		return
	}
	_ = os.MkdirAll(dir, 0o755)
	_ = os.WriteFile(filepath.Join(dir, name), fmt.Appendf([]byte(out), "\n(exit: %v)\n", err), 0o644)
}

func run(dir string, bound time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// firstError is the compiler's first complaint in make's output.
func firstError(s string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, ".go:") {
			return strings.TrimSpace(l)
		}
	}
	return lastLine(s)
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

func compact(s []string) []string {
	var out []string
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "mutants: "+format+"\n", a...)
	os.Exit(2)
}
