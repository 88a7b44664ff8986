package verifier

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Store is the verifier's durable state in one bbolt file. Every decision that changes state
// (a release consuming a boot request, a counter advance) commits, with its audit record, in
// one fsynced transaction before the HTTP response is written.
type Store struct {
	db *bolt.DB
}

var (
	bucketVMs   = []byte("vms")
	bucketBoots = []byte("boots")
	bucketAudit = []byte("audit")
	bucketMeta  = []byte("meta")
)

// ErrNotFound is returned (wrapped) for a missing VM or boot.
var ErrNotFound = errors.New("not found")

// OpenStore opens (creating if needed) the database at path.
func OpenStore(path string) (*Store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open verifier db %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketVMs, bucketBoots, bucketAudit, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init verifier db: %w", err)
	}
	return &Store{db: db}, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// Tx is one read-write transaction with typed helpers.
type Tx struct {
	tx  *bolt.Tx
	now time.Time
}

// Update runs fn in a durable read-write transaction.
func (s *Store) Update(fn func(*Tx) error) error {
	return s.db.Update(func(tx *bolt.Tx) error { return fn(&Tx{tx: tx, now: time.Now().UTC()}) })
}

// View runs fn in a read-only transaction.
func (s *Store) View(fn func(*Tx) error) error {
	return s.db.View(func(tx *bolt.Tx) error { return fn(&Tx{tx: tx, now: time.Now().UTC()}) })
}

func getJSON(b *bolt.Bucket, key []byte, v any) error {
	raw := b.Get(key)
	if raw == nil {
		return ErrNotFound
	}
	return json.Unmarshal(raw, v)
}

func putJSON(b *bolt.Bucket, key []byte, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(key, raw)
}

// VM loads one VM record.
func (t *Tx) VM(name string) (*VM, error) {
	var vm VM
	if err := getJSON(t.tx.Bucket(bucketVMs), []byte(name), &vm); err != nil {
		return nil, fmt.Errorf("vm %s: %w", name, err)
	}
	return &vm, nil
}

// PutVM stores a VM record.
func (t *Tx) PutVM(vm *VM) error { return putJSON(t.tx.Bucket(bucketVMs), []byte(vm.Name), vm) }

// VMs lists every VM.
func (t *Tx) VMs() ([]*VM, error) {
	var out []*VM
	err := t.tx.Bucket(bucketVMs).ForEach(func(k, v []byte) error {
		var vm VM
		if err := json.Unmarshal(v, &vm); err != nil {
			return fmt.Errorf("vm %s: %w", k, err)
		}
		out = append(out, &vm)
		return nil
	})
	return out, err
}

// Boot loads a boot record.
func (t *Tx) Boot(id string) (*Boot, error) {
	var b Boot
	if err := getJSON(t.tx.Bucket(bucketBoots), []byte(id), &b); err != nil {
		return nil, fmt.Errorf("boot %s: %w", id, err)
	}
	return &b, nil
}

// PutBoot stores a boot record.
func (t *Tx) PutBoot(b *Boot) error { return putJSON(t.tx.Bucket(bucketBoots), []byte(b.ID), b) }

// Audit appends an audit event in the same transaction as the decision it records.
func (t *Tx) Audit(e AuditEvent) error {
	b := t.tx.Bucket(bucketAudit)
	seq, err := b.NextSequence()
	if err != nil {
		return err
	}
	e.Seq = seq
	e.Time = t.now
	var k [8]byte
	binary.BigEndian.PutUint64(k[:], seq)
	return putJSON(b, k[:], e)
}

// Meta reads a metadata value.
func (t *Tx) Meta(key string) []byte {
	v := t.tx.Bucket(bucketMeta).Get([]byte(key))
	if v == nil {
		return nil
	}
	return append([]byte(nil), v...)
}

// PutMeta writes a metadata value.
func (t *Tx) PutMeta(key string, v []byte) error { return t.tx.Bucket(bucketMeta).Put([]byte(key), v) }

// AuditEvents returns events with Seq > since, optionally for one VM, at most limit.
func (s *Store) AuditEvents(vm string, since uint64, limit int) ([]AuditEvent, error) {
	if limit <= 0 || limit > 10000 {
		limit = 10000
	}
	out := []AuditEvent{}
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketAudit).Cursor()
		var k [8]byte
		binary.BigEndian.PutUint64(k[:], since+1)
		for key, v := c.Seek(k[:]); key != nil && len(out) < limit; key, v = c.Next() {
			var e AuditEvent
			if err := json.Unmarshal(v, &e); err != nil {
				return err
			}
			if vm == "" || e.VM == vm {
				out = append(out, e)
			}
		}
		return nil
	})
	return out, err
}
