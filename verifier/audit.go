package verifier

import (
	"context"
	"sync"
	"time"
)

// auditLog writes decisions that change nothing else (refusals before any state is touched).
// A host can send such requests as fast as it likes; each would cost an fsynced row. So the
// first of a run of identical refusals (same event, outcome, VM and reason) is written at
// once, the ones that follow within the window are only counted, and the count is written
// as one row (Repeats) when the window ends, when the audit is read, and on close. Nothing is
// lost; only identical rows are folded. Alternating refusals are folded per kind.
type auditLog struct {
	store  Store
	window time.Duration
	onErr  func(error)

	mu      sync.Mutex
	pending map[auditKey]*auditRun
	stop    chan struct{}
	done    chan struct{}
}

// auditWriteTimeout bounds one background audit write (a PostgreSQL store may be slow).
const auditWriteTimeout = 30 * time.Second

type auditKey struct{ event, outcome, vm, reason string }

type auditRun struct {
	first   time.Time
	repeats uint64
}

func newAuditLog(store Store, window time.Duration, onErr func(error)) *auditLog {
	a := &auditLog{store: store, window: window, onErr: onErr, pending: map[auditKey]*auditRun{},
		stop: make(chan struct{}), done: make(chan struct{})}
	go a.loop()
	return a
}

func (a *auditLog) loop() {
	defer close(a.done)
	t := time.NewTicker(a.window)
	defer t.Stop()
	for {
		select {
		case <-a.stop:
			return
		case now := <-t.C:
			a.flush(func(r *auditRun) bool { return now.Sub(r.first) >= a.window })
		}
	}
}

// record audits e, coalescing it into a run of identical refusals when there is one.
func (a *auditLog) record(e AuditEvent) {
	k := auditKey{e.Event, e.Outcome, e.VM, e.Reason}
	a.mu.Lock()
	if r, ok := a.pending[k]; ok && e.Outcome == Deny && time.Since(r.first) < a.window {
		r.repeats++
		a.mu.Unlock()
		return
	}
	a.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), auditWriteTimeout)
	defer cancel()
	err := a.store.Update(ctx, func(tx Tx) error { return tx.Audit(e) })
	if err != nil {
		a.onErr(err)
		return
	}
	if e.Outcome == Deny {
		a.mu.Lock()
		a.pending[k] = &auditRun{first: time.Now()}
		a.mu.Unlock()
	}
}

// flush writes the counts of the runs that due selects and forgets them.
func (a *auditLog) flush(due func(*auditRun) bool) {
	a.mu.Lock()
	var rows []AuditEvent
	for k, r := range a.pending {
		if !due(r) {
			continue
		}
		delete(a.pending, k)
		if r.repeats > 0 {
			rows = append(rows, AuditEvent{Event: k.event, Outcome: k.outcome, VM: k.vm, Reason: k.reason, Repeats: r.repeats})
		}
	}
	a.mu.Unlock()
	if len(rows) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), auditWriteTimeout)
	defer cancel()
	if err := a.store.Update(ctx, func(tx Tx) error {
		for _, e := range rows {
			if err := tx.Audit(e); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		a.onErr(err)
	}
}

// sync writes every pending count (before the audit is read).
func (a *auditLog) sync() { a.flush(func(*auditRun) bool { return true }) }

func (a *auditLog) close() {
	close(a.stop)
	<-a.done
	a.sync()
}
