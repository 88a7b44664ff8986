package main

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/svsm-e2e/svsm-e2e/explore"
	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
)

// errFinding makes the command exit 1 after it printed a finding.
var errFinding = errors.New("an invariant broke (see above)")

func exploreCmd() *cobra.Command {
	var seed uint64
	var budget, replay, workdir, binDir, backend, qemuBin string
	var keep, listOps, writeThrough bool
	cmd := &cobra.Command{
		Use:   "explore",
		Short: "Run random sequences of host actions against a real stack and check each step against the reference model",
		Long: `explore boots a VM on a real stack (fakesnp, svsm-verifier, svsm-proxy, svsm-guest) and plays
random sequences of host actions (svsm-e2e explore --ops: disk copies, restores, wipes and
corruption, another VM's disk swapped in, clones on one boot request (racing or in order),
service kills, power cuts at registered write points, attacks on the attestation and on any
confirmation, relaunches with another measurement, policy, chip or TCB, or with the reports
altered), checking after each step that no state older than the last
confirmed one is accepted, confirmed data is never lost, at most one instance boots per boot
request, the verifier never releases more keys than boot requests, an honest boot from the last
good state is never refused, and every refusal carries a layer and a reason. A violation is
shrunk to a minimal sequence and printed as a replay command and a ready Ginkgo spec; its
artifact bundle is kept. --replay runs one given sequence.

Every run is seeded: fakesnp, each verifier start and each boot of svsm-guest get a
--test-seed derived from the run's seed, so keys, nonces, boot ids, the vTPM and the state
disk follow from it. A finding's replay command carries its seed and redraws the same bytes;
a replay prints a digest of every step's events and disk to compare runs by. Two racing
instances (clone) are served in the scheduler's order, so their bytes may swap. With
--backend qemu the guest draws from its VM's kernel and only the host side is seeded.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if listOps {
				for _, l := range explore.Ops() {
					fmt.Println(l)
				}
				return nil
			}
			bins, err := harness.FindBinaries(binDir)
			if err != nil {
				return err
			}
			if bins.Guest == "" {
				return errors.New("explore needs svsm-guest (make build)")
			}
			workdir, _ = filepath.Abs(workdir)
			// One fake AMD chain for every run: generating it is most of a fresh stack's cost.
			caDir := filepath.Join(workdir, "amd-ca")
			if _, err := fakesnp.LoadOrCreateCA(fakesnp.CAOptions{Dir: caDir}); err != nil {
				return fmt.Errorf("fake AMD chain: %w", err)
			}
			o := explore.Options{Binaries: bins, CADir: caDir, WorkRoot: workdir, Keep: keep, WriteThrough: writeThrough}
			ctx, stop := daemon.SignalContext()
			defer stop()
			switch backend {
			case "process":
			case "qemu":
				if qemuBin == "" {
					qemuBin = os.Getenv(harness.EnvQEMU)
				}
				q, err := harness.NewQEMUBackend(ctx, harness.QEMUOptions{Guest: bins.Guest, Binary: qemuBin})
				if err != nil {
					return fmt.Errorf("qemu backend: %w", err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "explore: %s: %s\n", q.Caps.Binary, q.Choice.Reason)
				o.Backend, o.BootTimeout = q, 5*time.Minute
			default:
				return fmt.Errorf("--backend %q: want process or qemu", backend)
			}
			out := cmd.OutOrStdout()
			if !cmd.Flags().Changed("seed") {
				var b [8]byte
				_, _ = rand.Read(b[:])
				seed = binary.LittleEndian.Uint64(b[:]) >> 1
			}
			if replay != "" {
				steps, err := explore.Parse(replay)
				if err != nil {
					return err
				}
				o.Seed = seed
				fmt.Fprintf(out, "explore: replay with test seed %d\n", seed)
				res, err := explore.Run(ctx, o, steps)
				if res != nil {
					fmt.Fprintln(out, strings.Join(res.Log, "\n"))
					if backend == "process" {
						fmt.Fprintf(out, "explore: run digest %s (events and state disk after every step; the same seed and sequence give the same)\n", res.Digest())
					}
				}
				if err != nil {
					return err
				}
				return finding(out, res)
			}
			bud, err := explore.ParseBudget(budget)
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "explore: seed %d, budget %s, work in %s\n", seed, budget, workdir)
			start := time.Now()
			rep, err := explore.Explore(ctx, o, seed, bud, func(l string) { fmt.Fprintln(out, "explore:", l) })
			if err != nil {
				return err
			}
			took := time.Since(start)
			fmt.Fprintf(out, "explore: seed %d: %d sequences, %d steps in %s (%.0f steps/min)\n", seed, rep.Sequences, rep.Steps,
				took.Round(time.Second), float64(rep.Steps)/took.Minutes())
			if rep.Found == nil {
				fmt.Fprintln(out, "explore: no invariant broke")
				return nil
			}
			fmt.Fprintf(out, "explore: generated sequence: %s\n", explore.Format(rep.Original))
			fmt.Fprintln(out, strings.Join(rep.Found.Log, "\n"))
			return finding(out, rep.Found)
		},
	}
	cmd.Flags().Uint64Var(&seed, "seed", 0, "seed of the action sequences and every process's draws; with --replay, the run's test seed (default: a fresh one, printed)")
	cmd.Flags().StringVar(&budget, "budget", "100", "steps (a number) or a duration (e.g. 2m), whichever is given")
	cmd.Flags().StringVar(&replay, "replay", "", "run this one sequence ('boot;snapshot a;boot;restore a;boot')")
	cmd.Flags().StringVar(&workdir, "workdir", "explore-work", "where each run's artifact bundle is made")
	cmd.Flags().StringVar(&binDir, "bin-dir", "", "where the binaries are (default: beside svsm-e2e, then PATH)")
	cmd.Flags().BoolVar(&keep, "keep", false, "keep every run's bundle, not only a failing one")
	cmd.Flags().BoolVar(&listOps, "ops", false, "list the host actions and exit")
	cmd.Flags().BoolVar(&writeThrough, "write-through", false, "the VM confirms every runtime write (the model then tolerates no rollback within a boot)")
	cmd.Flags().StringVar(&backend, "backend", "process", "process (embedded) or qemu (real VMs; slow under TCG: use short budgets)")
	cmd.Flags().StringVar(&qemuBin, "qemu", "", "QEMU binary for --backend qemu (default $"+harness.EnvQEMU+", then the system's)")
	return cmd
}

func finding(out interface{ Write([]byte) (int, error) }, res *explore.Result) error {
	if res.Violation == nil {
		fmt.Fprintln(out, "explore: no invariant broke")
		return nil
	}
	fmt.Fprintf(out, "explore: VIOLATION %s\n", res.Violation)
	fmt.Fprintf(out, "explore: replay: %s\n", explore.Command(res))
	fmt.Fprintf(out, "explore: artifacts: %s\n", res.Dir)
	fmt.Fprintf(out, "explore: spec for scenarios/explore_test.go:\n%s", explore.Spec(res))
	return errFinding
}
