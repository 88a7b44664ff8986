package scenarios

import (
	"errors"
	"fmt"
	"os"
	"sync"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/internal/postgres"
	"github.com/svsm-e2e/svsm-e2e/internal/postgres/pgtest"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

// requirePostgres skips without PostgreSQL, or fails when make test requires it.
func requirePostgres() {
	GinkgoHelper()
	if _, err := postgres.BinDir(); errors.Is(err, postgres.ErrNotInstalled) {
		if os.Getenv(pgtest.EnvRequire) != "" {
			Fail(err.Error())
		}
		Skip(err.Error())
	}
}

var _ = Describe("Verifier replicas on PostgreSQL", Label("backend:process", "postgres"), func() {
	It("two replicas behind one proxy: reboots and clones racing across them get exactly one release per boot request and lose no confirmation", func() {
		requirePostgres()
		s := newStackWithOptions(func(o *harness.StackOptions) { o.Postgres, o.Replicas = true, 2 })
		vm := newVM(s, harness.VMOptions{Name: "vm", DataDiskMiB: -1, NoSecureBoot: true})

		By("reboots: the proxy alternates sessions, so one replica releases and the other confirms")
		const reboots = 4
		for i := 1; i <= reboots; i++ {
			run := boot(vm, "nv-read", fmt.Sprintf("nv-write=r%d", i))
			expectBooted(run)
			if i > 1 {
				Expect(action(run, "nv-read").String("nv_data")).To(Equal(fmt.Sprintf("r%d", i-1)), "boot %d lost the last confirmed data", i)
			}
			Expect(view(vm).Counter).To(Equal(uint64(i)), "every confirmation counted, whichever replica took it")
		}

		By("clones racing on one boot request, their sessions on different replicas")
		const rounds = 3
		for r := range rounds {
			c, err := s.Clone(vm, fmt.Sprintf("clone%d", r))
			Expect(err).NotTo(HaveOccurred())
			Expect(vm.Prime(ctx())).To(Succeed())
			runs := make([]*harness.GuestRun, 2)
			var wg sync.WaitGroup
			for i, v := range []*harness.VM{vm, c} {
				wg.Add(1)
				go func() {
					defer GinkgoRecover()
					defer wg.Done()
					runs[i] = bootWith(v, harness.BootOptions{NoPrime: true, Actions: []string{"nv-read", fmt.Sprintf("nv-write=c%d-%d", r, i)}})
				}()
			}
			wg.Wait()
			winners := 0
			for i, run := range runs {
				if run.ExitCode == 0 {
					winners++
					if i == 1 {
						Expect(vm.LoadState(c.StateDisk)).To(Succeed()) // the host keeps the instance that ran
					}
				} else {
					expectFailed(run, "svsm", "attestation-failed")
				}
			}
			Expect(winners).To(Equal(1), "round %d: one boot request, %d instances booted", r, winners)
		}
		Expect(view(vm).Counter).To(Equal(uint64(reboots + rounds)))
		run := boot(vm, "nv-read")
		expectBooted(run)
		Expect(action(run, "nv-read").String("nv_data")).To(MatchRegexp(`^c2-[01]$`), "the last round's winner's data")

		By("the shared audit: every release and refusal, from both replicas, one release per request")
		evs := audit(s, "vm")
		released := map[string]string{} // boot id → the replica that released it
		byReplica := map[string]map[string]int{}
		allow, deny := 0, 0
		for _, e := range evs {
			Expect(e.Instance).To(BeElementOf("replica-0", "replica-1"), "row without its replica: %+v", e)
			if byReplica[e.Instance] == nil {
				byReplica[e.Instance] = map[string]int{}
			}
			byReplica[e.Instance][e.Event+" "+e.Outcome]++
			switch {
			case e.Event == "release" && e.Outcome == verifier.Allow:
				allow++
				released[e.BootID] = e.Instance
			case e.Event == "release" && e.Outcome == verifier.Deny:
				deny++
			}
		}
		primes := reboots + rounds + 1
		Expect(allow).To(Equal(primes), "one release per boot request")
		Expect(deny).To(Equal(rounds), "each clone round's loser refused and audited")
		Expect(view(vm).Releases).To(Equal(uint64(primes)))
		crossed := 0
		for _, e := range evs {
			if e.Event == "confirm" && e.Outcome == verifier.Allow && released[e.BootID] != "" && released[e.BootID] != e.Instance {
				crossed++
			}
		}
		Expect(crossed).To(BeNumerically(">", 0), "no boot was released by one replica and confirmed by the other: %v", byReplica)
		Expect(byReplica).To(HaveLen(2), "both replicas decided")
		AddReportEntry("decisions by replica", byReplica)
	})
})
