package verifier

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// postgresStore keeps the verifier's state in PostgreSQL, shared by any number of verifier
// replicas. Every transaction is SERIALIZABLE: two replicas releasing on one boot request,
// or confirming one counter, cannot both commit; the loser's transaction fails with a
// serialization error and is run again from the start, and then sees the winner's commit.
// The records are the same JSON documents bbolt holds; commits are durable
// (synchronous_commit as the server has it, on by default).
type postgresStore struct {
	pool *pgxpool.Pool
}

// Retries of a transaction that lost a serialization race, and the back-off between them.
const (
	pgMaxAttempts = 30
	pgBackoffMax  = 20 * time.Millisecond
)

// pgSchemaLock is the advisory lock key under which replicas create the schema (so two
// starting at once do not race on CREATE TABLE).
const pgSchemaLock = 0x5356534d

var pgSchema = []string{
	`CREATE TABLE IF NOT EXISTS svsm_vms (name text PRIMARY KEY, doc jsonb NOT NULL)`,
	`CREATE TABLE IF NOT EXISTS svsm_boots (id text PRIMARY KEY, doc jsonb NOT NULL)`,
	`CREATE TABLE IF NOT EXISTS svsm_audit (seq bigserial PRIMARY KEY, vm text NOT NULL, doc jsonb NOT NULL)`,
	`CREATE INDEX IF NOT EXISTS svsm_audit_vm ON svsm_audit (vm, seq)`,
	`CREATE TABLE IF NOT EXISTS svsm_meta (key text PRIMARY KEY, value bytea NOT NULL)`,
	`CREATE TABLE IF NOT EXISTS svsm_vm_identity (key bytea NOT NULL, name text NOT NULL, PRIMARY KEY (key, name))`,
	`CREATE INDEX IF NOT EXISTS svsm_vm_identity_name ON svsm_vm_identity (name)`,
}

// OpenPostgresStore connects to the database at url (a pgx connection string: URL or
// key=value form) and creates the schema if it is missing.
func OpenPostgresStore(ctx context.Context, url string) (Store, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("verifier database url: %w", err)
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect verifier database: %w", err)
	}
	s := &postgresStore{pool: pool}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(pgSchemaLock)); err != nil {
			return err
		}
		for _, q := range pgSchema {
			if _, err := tx.Exec(ctx, q); err != nil {
				return fmt.Errorf("%s: %w", q, err)
			}
		}
		return buildPgIdentityIndex(&pgTx{ctx: ctx, tx: tx, now: time.Now().UTC()})
	})
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("create verifier schema: %w", err)
	}
	return s, nil
}

func (s *postgresStore) Close() error {
	s.pool.Close()
	return nil
}

// Update implements Store.
func (s *postgresStore) Update(ctx context.Context, fn func(Tx) error) error {
	return s.run(ctx, pgx.TxOptions{IsoLevel: pgx.Serializable}, fn)
}

// View implements Store.
func (s *postgresStore) View(ctx context.Context, fn func(Tx) error) error {
	return s.run(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, fn)
}

// run runs fn in a transaction, again from the start when it lost a serialization race or
// a deadlock, at most pgMaxAttempts times.
func (s *postgresStore) run(ctx context.Context, o pgx.TxOptions, fn func(Tx) error) error {
	var err error
	for attempt := 1; attempt <= pgMaxAttempts; attempt++ {
		err = pgx.BeginTxFunc(ctx, s.pool, o, func(tx pgx.Tx) error {
			return fn(&pgTx{ctx: ctx, tx: tx, now: time.Now().UTC()})
		})
		if !retryable(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("verifier database: %w (after %v)", ctx.Err(), err)
		case <-time.After(rand.N(pgBackoffMax)):
		}
	}
	return fmt.Errorf("verifier database: transaction lost %d serialization races in a row: %w", pgMaxAttempts, err)
}

// retryable: serialization_failure or deadlock_detected, which PostgreSQL asks the client to
// retry.
func retryable(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "40001" || pe.Code == "40P01")
}

type pgTx struct {
	ctx context.Context
	tx  pgx.Tx
	now time.Time
}

func (t *pgTx) Now() time.Time { return t.now }

// getDoc reads one JSON document; ErrNotFound when there is no row.
func (t *pgTx) getDoc(q string, key string, v any) error {
	var raw []byte
	if err := t.tx.QueryRow(t.ctx, q, key).Scan(&raw); err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return ErrNotFound
		}
		return err
	}
	return json.Unmarshal(raw, v)
}

func (t *pgTx) putDoc(q string, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = t.tx.Exec(t.ctx, q, key, raw)
	return err
}

func (t *pgTx) VM(name string) (*VM, error) {
	var vm VM
	if err := t.getDoc(`SELECT doc FROM svsm_vms WHERE name = $1`, name, &vm); err != nil {
		return nil, fmt.Errorf("vm %s: %w", name, err)
	}
	return &vm, nil
}

// PutVM stores a VM record and replaces its identity index rows.
func (t *pgTx) PutVM(vm *VM) error {
	if err := t.putDoc(`INSERT INTO svsm_vms (name, doc) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET doc = EXCLUDED.doc`, vm.Name, vm); err != nil {
		return err
	}
	return t.indexVM(vm)
}

// indexVM makes identityKeys(vm) the identity rows of vm; most writes (a counter, a boot
// request) find them unchanged with one query.
func (t *pgTx) indexVM(vm *VM) error {
	keys := identityKeys(vm)
	rows, err := t.tx.Query(t.ctx, `SELECT key FROM svsm_vm_identity WHERE name = $1`, vm.Name)
	if err != nil {
		return err
	}
	old, err := pgx.CollectRows(rows, pgx.RowTo[[]byte])
	if err != nil {
		return err
	}
	if sameKeys(old, keys) {
		return nil
	}
	if _, err := t.tx.Exec(t.ctx, `DELETE FROM svsm_vm_identity WHERE name = $1`, vm.Name); err != nil {
		return err
	}
	for _, k := range keys {
		if _, err := t.tx.Exec(t.ctx, `INSERT INTO svsm_vm_identity (key, name) VALUES ($1, $2)`, k, vm.Name); err != nil {
			return err
		}
	}
	return nil
}

// sameKeys reports whether a and b hold the same keys, in any order.
func sameKeys(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	sa, sb := slices.Clone(a), slices.Clone(b)
	slices.SortFunc(sa, bytes.Compare)
	slices.SortFunc(sb, bytes.Compare)
	return slices.EqualFunc(sa, sb, bytes.Equal)
}

// IdentifiedVMs implements Tx.
func (t *pgTx) IdentifiedVMs(key []byte) ([]*VM, error) {
	rows, err := t.tx.Query(t.ctx, `SELECT v.name, v.doc FROM svsm_vm_identity i JOIN svsm_vms v ON v.name = i.name WHERE i.key = $1 ORDER BY v.name`, key)
	if err != nil {
		return nil, err
	}
	return scanVMs(rows)
}

// buildPgIdentityIndex indexes every VM once, in a database that predates the index (under
// the schema lock).
func buildPgIdentityIndex(t *pgTx) error {
	if v, err := t.Meta(identityIndexMeta); err != nil || string(v) == identityIndexVersion {
		return err
	}
	vms, err := t.VMs()
	if err != nil {
		return err
	}
	for _, vm := range vms {
		if err := t.indexVM(vm); err != nil {
			return err
		}
	}
	return t.PutMeta(identityIndexMeta, []byte(identityIndexVersion))
}

func (t *pgTx) VMs() ([]*VM, error) {
	rows, err := t.tx.Query(t.ctx, `SELECT name, doc FROM svsm_vms ORDER BY name`)
	if err != nil {
		return nil, err
	}
	return scanVMs(rows)
}

// scanVMs decodes (name, doc) rows.
func scanVMs(rows pgx.Rows) ([]*VM, error) {
	defer rows.Close()
	var out []*VM
	for rows.Next() {
		var name string
		var raw []byte
		if err := rows.Scan(&name, &raw); err != nil {
			return nil, err
		}
		var vm VM
		if err := json.Unmarshal(raw, &vm); err != nil {
			return nil, fmt.Errorf("vm %s: %w", name, err)
		}
		out = append(out, &vm)
	}
	return out, rows.Err()
}

func (t *pgTx) Boot(id string) (*Boot, error) {
	var b Boot
	if err := t.getDoc(`SELECT doc FROM svsm_boots WHERE id = $1`, id, &b); err != nil {
		return nil, fmt.Errorf("boot %s: %w", id, err)
	}
	return &b, nil
}

func (t *pgTx) PutBoot(b *Boot) error {
	return t.putDoc(`INSERT INTO svsm_boots (id, doc) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc`, b.ID, b)
}

// Audit implements Tx: the sequence number is the row's bigserial (increasing; with
// several replicas a reader may see a row before one with a smaller number commits).
func (t *pgTx) Audit(e AuditEvent) error {
	e.Seq = 0
	if e.Time.IsZero() { // a held row keeps the time it was decided (auditLog.hold)
		e.Time = t.now
	}
	raw, err := json.Marshal(e)
	if err != nil {
		return err
	}
	_, err = t.tx.Exec(t.ctx, `INSERT INTO svsm_audit (vm, doc) VALUES ($1, $2)`, e.VM, raw)
	return err
}

func (t *pgTx) Meta(key string) ([]byte, error) {
	var v []byte
	err := t.tx.QueryRow(t.ctx, `SELECT value FROM svsm_meta WHERE key = $1`, key).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	return v, err
}

func (t *pgTx) PutMeta(key string, v []byte) error {
	_, err := t.tx.Exec(t.ctx, `INSERT INTO svsm_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value`, key, v)
	return err
}

// AuditEvents implements Store.
func (s *postgresStore) AuditEvents(ctx context.Context, vm string, since uint64, limit int) ([]AuditEvent, error) {
	if limit <= 0 || limit > maxAuditRead {
		limit = maxAuditRead
	}
	if since > math.MaxInt64 {
		return []AuditEvent{}, nil // past any bigserial
	}
	rows, err := s.pool.Query(ctx, `SELECT seq, doc FROM svsm_audit WHERE seq > $1 AND ($2 = '' OR vm = $2) ORDER BY seq LIMIT $3`,
		int64(since), vm, limit)
	if err != nil {
		return nil, fmt.Errorf("read audit: %w", err)
	}
	defer rows.Close()
	out := []AuditEvent{}
	for rows.Next() {
		var seq int64
		var raw []byte
		if err := rows.Scan(&seq, &raw); err != nil {
			return nil, err
		}
		var e AuditEvent
		if err := json.Unmarshal(raw, &e); err != nil {
			return nil, fmt.Errorf("audit row %d: %w", seq, err)
		}
		e.Seq = uint64(seq)
		out = append(out, e)
	}
	return out, rows.Err()
}
