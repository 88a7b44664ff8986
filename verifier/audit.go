package verifier

import (
	"context"
	"slices"
	"sync"
	"time"
)

// auditLog writes decisions that change nothing else (refusals before any state is touched,
// allowed attestations). A host can send such requests as fast as it likes; each would cost
// an fsynced row. So the first of a run of identical refusals (same event, outcome, VM and
// reason) is written at once, the ones that follow within the window are only counted, and
// the count is written as one row (Repeats) when the window ends, when the audit is read,
// and on close. Only identical rows are folded. Alternating refusals are folded per kind.
//
// An allowed attestation is held (hold) and written in the commit of its session's next
// decision, the release or its refusal, before that decision's row; a session that decides
// nothing more within the window has its row written alone. An attestation thus costs no
// commit of its own (one of the four durable commits of a boot). A crash in between
// loses the held row together with the session, which lives in memory: nothing was released
// on it, and the guest's next attestation is audited.
type auditLog struct {
	store  Store
	window time.Duration
	onErr  func(error)

	mu      sync.Mutex
	pending map[auditKey]*auditRun
	held    map[string][]AuditEvent // by session: allowed attestations not yet written
	nheld   int
	stop    chan struct{}
	done    chan struct{}
}

// maxHeld bounds the held rows (the session table holds at most MaxSessions); past it a row
// is written at once.
const maxHeld = 16384

// auditWriteTimeout bounds one background audit write (a PostgreSQL store may be slow).
const auditWriteTimeout = 30 * time.Second

type auditKey struct{ event, outcome, vm, reason string }

type auditRun struct {
	first   time.Time
	repeats uint64
}

func newAuditLog(store Store, window time.Duration, onErr func(error)) *auditLog {
	a := &auditLog{store: store, window: window, onErr: onErr, pending: map[auditKey]*auditRun{},
		held: map[string][]AuditEvent{}, stop: make(chan struct{}), done: make(chan struct{})}
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
			a.flush(func(first time.Time) bool { return now.Sub(first) >= a.window })
		}
	}
}

// hold keeps an allowed attestation's row (it carries a session) for its session's next
// decision; its time is now, when it was decided.
func (a *auditLog) hold(e AuditEvent) {
	e.Time = time.Now().UTC()
	a.mu.Lock()
	if a.nheld < maxHeld {
		a.held[e.Session] = append(a.held[e.Session], e)
		a.nheld++
		a.mu.Unlock()
		return
	}
	a.mu.Unlock()
	a.write([]AuditEvent{e})
}

// take returns the rows held for session and forgets them: the caller writes them in its
// own transaction, before its decision's row, and gives them back (unhold) if that
// transaction fails.
func (a *auditLog) take(session string) []AuditEvent {
	if session == "" {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	rows := a.held[session]
	delete(a.held, session)
	a.nheld -= len(rows)
	return rows
}

// unhold gives back rows take returned whose transaction did not commit.
func (a *auditLog) unhold(rows []AuditEvent) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, e := range rows {
		a.held[e.Session] = append(a.held[e.Session], e)
		a.nheld++
	}
}

// record audits e, coalescing it into a run of identical refusals when there is one; a row
// held for e's session is written first, in the same commit.
func (a *auditLog) record(e AuditEvent) {
	rows := a.take(e.Session)
	k := auditKey{e.Event, e.Outcome, e.VM, e.Reason}
	a.mu.Lock()
	if r, ok := a.pending[k]; ok && e.Outcome == Deny && time.Since(r.first) < a.window {
		r.repeats++
		a.mu.Unlock()
		if !a.write(rows) {
			a.unhold(rows)
		}
		return
	}
	a.mu.Unlock()
	if !a.write(append(rows, e)) {
		a.unhold(rows)
		return
	}
	if e.Outcome == Deny {
		a.mu.Lock()
		a.pending[k] = &auditRun{first: time.Now()}
		a.mu.Unlock()
	}
}

// write commits rows in one transaction; false if it failed (reported through onErr).
func (a *auditLog) write(rows []AuditEvent) bool {
	if len(rows) == 0 {
		return true
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
		return false
	}
	return true
}

// flush writes the counts of the runs, and the held rows, that due selects (by when they
// began) and forgets them.
func (a *auditLog) flush(due func(first time.Time) bool) {
	a.mu.Lock()
	var rows []AuditEvent
	for k, r := range a.pending {
		if !due(r.first) {
			continue
		}
		delete(a.pending, k)
		if r.repeats > 0 {
			rows = append(rows, AuditEvent{Event: k.event, Outcome: k.outcome, VM: k.vm, Reason: k.reason, Repeats: r.repeats})
		}
	}
	var held []AuditEvent
	for sid, es := range a.held {
		if due(es[0].Time) {
			delete(a.held, sid)
			a.nheld -= len(es)
			held = append(held, es...)
		}
	}
	a.mu.Unlock()
	slices.SortFunc(held, func(x, y AuditEvent) int { return x.Time.Compare(y.Time) }) // as decided
	if !a.write(append(rows, held...)) {
		a.unhold(held) // the next tick tries again; counts are reported lost through onErr
	}
}

// sync writes every pending count and held row (before the audit is read).
func (a *auditLog) sync() { a.flush(func(time.Time) bool { return true }) }

func (a *auditLog) close() {
	close(a.stop)
	<-a.done
	a.sync()
}
