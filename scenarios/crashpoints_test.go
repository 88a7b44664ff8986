package scenarios

import (
	"fmt"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/internal/crashpoint"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// guestRecipe says how a boot reaches a guest write point, and what the oracle may expect of
// the data afterwards.
type guestRecipe struct {
	vm harness.VMOptions
	// before runs before the crashing boot (nil: the crashing boot is the first).
	before []string
	// during are the crashing boot's workload actions.
	during []string
	// after is what nv-read may show after the crash: the data of every write the guest
	// reported durable, or (for a write it did not report) the old or the new data.
	after []string
}

// guestRecipes covers every guest point of the registry; a point without a recipe fails the
// suite, so a newly registered write cannot escape it.
func guestRecipes() map[string]guestRecipe {
	v1 := harness.VMOptions{Name: "vm", DataDiskMiB: -1}
	wt := harness.VMOptions{Name: "vm", DataDiskMiB: -1, WriteThrough: true}
	raw := harness.VMOptions{Name: "vm", DataDiskMiB: -1, SecretMode: protocol.SecretModeRaw}
	luks := harness.VMOptions{Name: "vm"}
	r := map[string]guestRecipe{}
	phases := []string{"before", "write", "synced"}
	for _, ph := range phases {
		r["guest/state/first-boot/"+ph] = guestRecipe{vm: raw}
		r["guest/state/advance/"+ph] = guestRecipe{vm: v1, before: []string{"nv-write=old"}, after: []string{"old"}}
		r["guest/state/mirror/"+ph] = guestRecipe{vm: v1, before: []string{"nv-write=old"}, after: []string{"old"}}
		r["guest/state/tpm-nv/"+ph] = guestRecipe{vm: v1, before: []string{"nv-write=old"}, during: []string{"nv-write=new"}, after: []string{"old", "new"}}
		// The first boot enrolls the Secure Boot variables: each is a uefi-var write.
		r["guest/state/uefi-var/"+ph] = guestRecipe{vm: harness.VMOptions{Name: "vm", DataDiskMiB: -1}}
		// The nv-write was reported durable before the power-off write: it must survive.
		r["guest/state/power-off/"+ph] = guestRecipe{vm: v1, before: []string{"nv-write=old"}, during: []string{"nv-write=new"}, after: []string{"new"}}
	}
	for _, ph := range []string{"sent", "answered"} {
		r["guest/confirm/advance/"+ph] = guestRecipe{vm: v1, before: []string{"nv-write=old"}, after: []string{"old"}}
		r["guest/confirm/tpm-nv/"+ph] = guestRecipe{vm: wt, before: []string{"nv-write=old"}, during: []string{"nv-write=new"}, after: []string{"old", "new"}}
		r["guest/confirm/uefi-var/"+ph] = guestRecipe{vm: harness.VMOptions{Name: "vm", DataDiskMiB: -1, WriteThrough: true}}
		r["guest/confirm/power-off/"+ph] = guestRecipe{vm: wt, before: []string{"nv-write=old"}, during: []string{"nv-write=new"}, after: []string{"new"}}
	}
	r["guest/luks/add-keyslot/done"] = guestRecipe{vm: luks}
	r["guest/luks/import-token/done"] = guestRecipe{vm: luks}
	r["guest/luks/kill-old-keyslot/done"] = guestRecipe{vm: luks, before: []string{"nv-write=old"}, during: []string{"fde-reseal"}, after: []string{"old"}}
	return r
}

// The crash suite: a power cut at every registered write point of the guest (and a torn
// write at every disk write), with the oracle: the guest reaches the point (no recipe may
// miss it), the next honest boot neither bricks nor raises a false rollback alarm, data the
// guest reported durable is there and unreported data is old or new, never anything else,
// and every release consumed its own boot request.
var _ = Describe("Crash at every registered write point", Label("backend:process", "slow"), func() {
	recipes := guestRecipes()
	It("has a recipe for every guest point of the registry", func() {
		for _, p := range crashpoint.Of("guest") {
			Expect(recipes).To(HaveKey(p.Name), "registered point %s has no crash recipe", p.Name)
		}
	})

	var entries []TableEntry
	for _, p := range crashpoint.Of("guest") {
		entries = append(entries, Entry(p.Name, p.Name))
		if p.Tearable {
			entries = append(entries, Entry(p.Name+":torn", p.Name+":torn"))
		}
	}
	DescribeTable("guest", func(spec string) {
		sp, err := crashpoint.Parse(spec)
		Expect(err).NotTo(HaveOccurred())
		rc, ok := recipes[sp.Name]
		Expect(ok).To(BeTrue(), "no recipe for %s", sp.Name)
		s := newStack()
		vm := newVM(s, rc.vm)
		boots := 0
		if rc.before != nil {
			expectBooted(boot(vm, rc.before...))
			boots++
		}
		run := bootWith(vm, harness.BootOptions{CrashAt: spec, Actions: rc.during})
		boots++
		Expect(run.ExitCode).To(Equal(-1), "the boot never reached %s:\n%s", spec, run.Stdout)
		event(run, "power-cut")
		By("the next honest boot comes up: no brick, no false rollback alarm")
		actions := []string{}
		if rc.after != nil {
			actions = append(actions, "nv-read")
		}
		next := boot(vm, actions...)
		boots++
		expectBooted(next)
		if rc.after != nil {
			Expect(action(next, "nv-read").String("nv_data")).To(BeElementOf(rc.after), "data after a crash at %s", spec)
		}
		By("and the one after it, and every release consumed its own boot request")
		expectBooted(boot(vm))
		boots++
		v := view(vm)
		Expect(v.Releases).To(Equal(uint64(boots)))
		Expect(v.Primed).To(BeFalse())
	}, entries)
})

// hostRecipe crashes a host component at a point while a guest boots.
var _ = Describe("Crash of a host service at every registered point", Label("backend:process", "slow"), func() {
	It("covers every verifier and proxy point", func() {
		for _, c := range []string{"verifier", "proxy"} {
			Expect(crashpoint.Of(c)).NotTo(BeEmpty())
		}
	})
	var entries []TableEntry
	for _, c := range []string{"verifier", "proxy"} {
		for _, p := range crashpoint.Of(c) {
			entries = append(entries, Entry(p.Name, p.Name))
			if p.Tearable {
				entries = append(entries, Entry(p.Name+":torn", p.Name+":torn"))
			}
		}
	}
	DescribeTable("service", func(spec string) {
		sp, _ := crashpoint.Parse(spec)
		s := newStack()
		vm := newVM(s, harness.VMOptions{Name: "vm", DataDiskMiB: -1})
		expectBooted(boot(vm, "nv-write=old"))
		isProxy := sp.Name[:len("proxy")] == "proxy"
		if isProxy {
			Expect(s.Host.RestartProxyCrashingAt(ctx(), spec)).To(Succeed())
		} else {
			Expect(s.Host.RestartVerifierCrashingAt(ctx(), spec)).To(Succeed())
		}
		// The prime may itself be the point; then the owner's call fails and the verifier dies.
		primeErr := vm.Prime(ctx())
		var run *harness.GuestRun
		if primeErr == nil {
			run = bootWith(vm, harness.BootOptions{NoPrime: true, AttestTimeout: 10 * time.Second})
		}
		if isProxy {
			Eventually(s.Host.Proxy.Done()).WithTimeout(30 * time.Second).Should(BeClosed())
		} else {
			Eventually(s.Host.Verifier.Done()).WithTimeout(30*time.Second).Should(BeClosed(), "the verifier never reached %s", spec)
		}
		if run != nil {
			Expect(run.ExitCode).To(Equal(1), "a crash of the %s must fail the boot closed:\n%s", sp.Name, run.Stdout)
		}
		By("services restarted normally, the owner primes again: the VM boots with its data")
		if isProxy {
			Expect(s.Host.RestartProxyCrashingAt(ctx(), "")).To(Succeed())
		} else {
			Expect(s.Host.RestartVerifierCrashingAt(ctx(), "")).To(Succeed())
		}
		next := boot(vm, "nv-read")
		expectBooted(next)
		Expect(action(next, "nv-read").String("nv_data")).To(Equal("old"))
		v := view(vm)
		Expect(v.Primed).To(BeFalse())
		// Each release consumed a boot request of its own: the first boot, possibly the
		// crashed one (a committed release whose answer was lost), and the last.
		Expect(v.Releases).To(BeNumerically(">=", 2))
		Expect(v.Releases).To(BeNumerically("<=", 3))
		AddReportEntry("releases", fmt.Sprint(v.Releases))
	}, entries)
})
