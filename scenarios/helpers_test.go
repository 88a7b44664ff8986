package scenarios

import (
	"context"
	"strings"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm/statestore"
	"github.com/svsm-e2e/svsm-e2e/verifier"
)

func newVM(s *harness.Stack, o harness.VMOptions) *harness.VM {
	GinkgoHelper()
	vm, err := s.NewVM(ctx(), o)
	Expect(err).NotTo(HaveOccurred())
	return vm
}

// boot boots once (priming a boot request) with the actions, and returns what happened.
func boot(vm *harness.VM, actions ...string) *harness.GuestRun {
	GinkgoHelper()
	return bootWith(vm, harness.BootOptions{Actions: actions})
}

func bootWith(vm *harness.VM, o harness.BootOptions) *harness.GuestRun {
	GinkgoHelper()
	run, err := vm.Boot(ctx(), o)
	Expect(err).NotTo(HaveOccurred(), "guest run of %s", vm.Name)
	return run
}

func expectBooted(run *harness.GuestRun) {
	GinkgoHelper()
	Expect(run.ExitCode).To(Equal(0), "boot failed: last event %+v\n%s", run.Last(), run.Stdout)
	Expect(run.Last().Event).To(BeElementOf("poweroff", "reboot"))
}

// expectFailed checks a fail-closed boot: exit 1, last event "failed" at layer with reason.
func expectFailed(run *harness.GuestRun, layer, reason string) protocol.Event {
	GinkgoHelper()
	last := run.Last()
	Expect(run.ExitCode).To(Equal(1), "want a fail-closed exit; events:\n%s", run.Stdout)
	Expect(last.Event).To(Equal("failed"))
	Expect(last.Layer).To(Equal(layer), "failure layer (%+v)", last)
	Expect(last.Reason).To(Equal(reason), "failure reason (%+v)", last)
	return last
}

func event(run *harness.GuestRun, name string) protocol.Event {
	GinkgoHelper()
	ev, ok := run.Find(name)
	Expect(ok).To(BeTrue(), "no %q event in:\n%s", name, run.Stdout)
	return ev
}

func noEvent(run *harness.GuestRun, name string) {
	GinkgoHelper()
	_, ok := run.Find(name)
	Expect(ok).To(BeFalse(), "unexpected %q event in:\n%s", name, run.Stdout)
}

func num(ev protocol.Event, key string) uint64 {
	GinkgoHelper()
	v, err := ev.Uint(key)
	Expect(err).NotTo(HaveOccurred())
	return v
}

func action(run *harness.GuestRun, name string) protocol.Event {
	GinkgoHelper()
	ev, ok := run.Action(name, 0)
	Expect(ok).To(BeTrue(), "no result for action %s in:\n%s", name, run.Stdout)
	return ev
}

// viewer is a VM of any backend.
type viewer interface {
	View(ctx context.Context) (*verifier.VMView, error)
}

func view(vm viewer) *verifier.VMView {
	GinkgoHelper()
	v, err := vm.View(ctx())
	Expect(err).NotTo(HaveOccurred())
	return v
}

func audit(s *harness.Stack, vm string) []verifier.AuditEvent {
	GinkgoHelper()
	evs, err := s.Audit(ctx(), vm)
	Expect(err).NotTo(HaveOccurred())
	return evs
}

// auditAfter returns the audit events for vm after the first n.
func auditAfter(s *harness.Stack, vm string, n int) []verifier.AuditEvent {
	GinkgoHelper()
	evs := audit(s, vm)
	Expect(len(evs)).To(BeNumerically(">=", n))
	return evs[n:]
}

func hasAudit(evs []verifier.AuditEvent, event, outcome, reasonPrefix string) bool {
	for _, e := range evs {
		if e.Event == event && e.Outcome == outcome && strings.HasPrefix(e.Reason, reasonPrefix) {
			return true
		}
	}
	return false
}

// headers is the host's view of the state disk.
func headers(vm *harness.VM) [statestore.SlotCount]statestore.HeaderInfo {
	GinkgoHelper()
	h, err := vm.StateHeaders()
	Expect(err).NotTo(HaveOccurred())
	return h
}
