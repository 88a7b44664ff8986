package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/svsm-e2e/svsm-e2e/explore"
	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
	"github.com/svsm-e2e/svsm-e2e/qualify"
)

// errNotQualified makes qualify exit 1 after writing a failing report.
var errNotQualified = errors.New("not qualified: a spec failed or the explorer broke an invariant (see the report)")

func qualifyCmd() *cobra.Command {
	var labels, focus, out, binDir string
	var exploreSteps int
	cmd := &cobra.Command{
		Use:   "qualify",
		Short: "Run the scenario suite and an exploration, and write a release-qualification report (HTML, JSON, JUnit)",
		Long: `qualify runs the scenario suite (from the svsm-e2e source tree it is run in, as make test
does, keeping every spec's artifact bundle) and an exploration on the process backend, then
writes into --out:

  report.html   self-contained (no network when viewed): verdict, summary, environment,
                the attack matrix (each attack spec, the layer that stopped it, the guest's
                reason, the verifier's audit row, or known-limitation), and per spec a
                timeline of guest events, proxy lines and verifier decisions
  report.json   the same data
  junit.xml     Ginkgo's JUnit report;  ginkgo.json  Ginkgo's JSON report
  artifacts/    the bundles the report links to

It exits 0 when every spec passed or was skipped and the explorer broke no invariant.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := daemon.SignalContext()
			defer stop()
			w := cmd.OutOrStdout()
			root, err := moduleRoot(ctx)
			if err != nil {
				return err
			}
			if out, err = filepath.Abs(out); err != nil {
				return err
			}
			bins, err := harness.FindBinaries(binDir)
			if err != nil {
				return err
			}
			if bins.Guest == "" {
				return errors.New("qualify needs svsm-guest (make build)")
			}
			artifacts := filepath.Join(out, "artifacts")
			if err := os.MkdirAll(artifacts, 0o755); err != nil {
				return err
			}
			fmt.Fprintf(w, "qualify: running the scenario suite (%s) from %s; bundles in %s\n", orAll(labels), root, artifacts)
			suiteErr := runSuite(ctx, root, filepath.Dir(bins.Guest), out, artifacts, labels, focus, w)
			rep, err := qualify.FromGinkgo(filepath.Join(out, "ginkgo.json"))
			if err != nil {
				return fmt.Errorf("the suite wrote no report (%v): %w", suiteErr, err)
			}
			env := qualify.CollectEnv(ctx, root, os.Getenv(harness.EnvQEMU), harness.DefaultImageCache())
			env.Seeds, env.GinkgoSeed, env.Labels = rep.Env.Seeds, rep.Env.GinkgoSeed, rep.Env.Labels
			rep.Env = env
			if exploreSteps > 0 {
				e, err := runExplorer(ctx, bins, filepath.Join(artifacts, "explore"), exploreSteps, w)
				if err != nil {
					return fmt.Errorf("explorer: %w", err)
				}
				rep.Env.Seeds["explorer"] = fmt.Sprint(e.Seed)
				rep.SetExplorer(e)
			}
			if err := rep.Write(out); err != nil {
				return err
			}
			fmt.Fprintf(w, "qualify: %s: %d specs, %d passed, %d failed, %d skipped; report %s\n", rep.Summary.Verdict,
				rep.Summary.Total, rep.Summary.Passed, rep.Summary.Failed, rep.Summary.Skipped, filepath.Join(out, "report.html"))
			if rep.Summary.Verdict != "PASS" {
				return errNotQualified
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&labels, "labels", "", "Ginkgo label filter (e.g. 'backend:process && attack'; default: every spec, as make test)")
	cmd.Flags().StringVar(&focus, "focus", "", "Ginkgo focus regexp on spec text")
	cmd.Flags().StringVar(&out, "out", "reports/qualify", "directory for report.html, report.json, junit.xml and the artifact bundles")
	cmd.Flags().StringVar(&binDir, "bin-dir", "", "where the binaries are (default: beside svsm-e2e, then PATH)")
	cmd.Flags().IntVar(&exploreSteps, "explore-steps", 100, "steps of exploration on the process backend (0: none)")
	return cmd
}

func orAll(labels string) string {
	if labels == "" {
		return "every spec"
	}
	return "labels " + labels
}

// moduleRoot is the svsm-e2e source tree the command runs in: the suite is Go test code.
func moduleRoot(ctx context.Context) (string, error) {
	b, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(b))
	if err != nil || gomod == "" || gomod == os.DevNull {
		return "", errors.New("qualify runs the scenario suite, which is Go test code: run it inside the svsm-e2e source tree, with Go on PATH")
	}
	root := filepath.Dir(gomod)
	if _, err := os.Stat(filepath.Join(root, "scenarios")); err != nil {
		return "", fmt.Errorf("%s is not the svsm-e2e source tree (no scenarios/)", root)
	}
	return root, nil
}

// runSuite runs Ginkgo on ./scenarios, keeping every bundle, with the JSON and JUnit reports
// in out. A failing spec is not an error here: the report says so.
func runSuite(ctx context.Context, root, binDir, out, artifacts, labels, focus string, w io.Writer) error {
	args := []string{"tool", "ginkgo", "-p", "--timeout", "60m", "--json-report", filepath.Join(out, "ginkgo.json"),
		"--junit-report", filepath.Join(out, "junit.xml")}
	if labels != "" {
		args = append(args, "--label-filter", labels)
	}
	if focus != "" {
		args = append(args, "--focus", focus)
	}
	log, err := os.Create(filepath.Join(out, "ginkgo.log"))
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.CommandContext(ctx, "go", append(args, "./scenarios")...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "SVSM_E2E_BIN="+binDir, "SVSM_E2E_KEEP=1", "SVSM_E2E_ARTIFACTS="+artifacts, "GINKGO_NO_COLOR=TRUE")
	cmd.Stdout, cmd.Stderr = io.MultiWriter(log, &summaryLines{w: w}), log
	return cmd.Run()
}

// summaryLines passes Ginkgo's summary lines through to the user (the rest goes to the log).
type summaryLines struct {
	w       io.Writer
	partial string
}

func (s *summaryLines) Write(b []byte) (int, error) {
	lines := strings.Split(s.partial+string(b), "\n")
	s.partial = lines[len(lines)-1] // an unfinished line waits for the rest
	for _, l := range lines[:len(lines)-1] {
		if strings.HasPrefix(l, "Ran ") || strings.HasPrefix(l, "SUCCESS!") || strings.HasPrefix(l, "FAIL!") || strings.Contains(l, "[FAIL]") {
			fmt.Fprintln(s.w, "qualify: suite:", strings.TrimSpace(l))
		}
	}
	return len(b), nil
}

func runExplorer(ctx context.Context, bins harness.Binaries, dir string, steps int, w io.Writer) (*qualify.ExplorerResult, error) {
	caDir := filepath.Join(dir, "amd-ca")
	if _, err := fakesnp.LoadOrCreateCA(fakesnp.CAOptions{Dir: caDir}); err != nil {
		return nil, fmt.Errorf("fake AMD chain: %w", err)
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	seed := binary.LittleEndian.Uint64(b[:]) >> 1
	fmt.Fprintf(w, "qualify: exploring %d steps from seed %d\n", steps, seed)
	start := time.Now()
	rep, err := explore.Explore(ctx, explore.Options{Binaries: bins, CADir: caDir, WorkRoot: dir}, seed, explore.Budget{Steps: steps}, nil)
	if err != nil {
		return nil, err
	}
	took := time.Since(start)
	e := &qualify.ExplorerResult{Seed: seed, Sequences: rep.Sequences, Steps: rep.Steps, Duration: took, StepsPerMin: float64(rep.Steps) / took.Minutes()}
	if rep.Found != nil {
		e.Violation, e.Replay, e.Artifacts = rep.Found.Violation.Error(), explore.Command(rep.Found), rep.Found.Dir
	}
	return e, nil
}
