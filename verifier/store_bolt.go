package verifier

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// boltStore is the embedded Store: one bbolt file. Updates are serial (bbolt has one
// writer) and group-committed: updates that arrive together share one transaction and one
// fsync (bbolt's Batch), and none returns before the commit is on disk. A batch that fails
// runs its functions again one by one, which the Store contract allows.
type boltStore struct {
	db *bolt.DB
}

var (
	bucketVMs   = []byte("vms")
	bucketBoots = []byte("boots")
	bucketAudit = []byte("audit")
	bucketMeta  = []byte("meta")
	// bucketIdentity holds identityKey(...) + VM name → empty.
	bucketIdentity = []byte("vm_identity")
)

// OpenBoltStore opens (creating if needed) the bbolt database at path.
func OpenBoltStore(path string) (Store, error) {
	// The freelist is not written at each commit (etcd's setting): a commit writes fewer
	// pages (about 20 % less CPU per release, BenchmarkBoltReleaseTx) and an open after a
	// crash rebuilds the list by scanning the file, which is small here.
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second, NoFreelistSync: true, FreelistType: bolt.FreelistMapType})
	if err != nil {
		return nil, fmt.Errorf("open verifier db %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketVMs, bucketBoots, bucketAudit, bucketMeta, bucketIdentity} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return buildBoltIdentityIndex(&boltTx{tx: tx, now: time.Now().UTC()})
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init verifier db: %w", err)
	}
	db.MaxBatchDelay = boltBatchDelay
	return &boltStore{db: db}, nil
}

func (s *boltStore) Close() error { return s.db.Close() }

type boltTx struct {
	tx  *bolt.Tx
	now time.Time
}

// boltBatchDelay is how long an update waits for others to share its commit: short beside
// an fsync, so a lone update hardly waits.
const boltBatchDelay = time.Millisecond

// Update implements Store. bbolt takes no context: its one writer lock is held briefly.
func (s *boltStore) Update(_ context.Context, fn func(Tx) error) error {
	return s.db.Batch(func(tx *bolt.Tx) error { return fn(&boltTx{tx: tx, now: time.Now().UTC()}) })
}

// View implements Store.
func (s *boltStore) View(_ context.Context, fn func(Tx) error) error {
	return s.db.View(func(tx *bolt.Tx) error { return fn(&boltTx{tx: tx, now: time.Now().UTC()}) })
}

func (t *boltTx) Now() time.Time { return t.now }

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
func (t *boltTx) VM(name string) (*VM, error) {
	var vm VM
	if err := getJSON(t.tx.Bucket(bucketVMs), []byte(name), &vm); err != nil {
		return nil, fmt.Errorf("vm %s: %w", name, err)
	}
	return &vm, nil
}

// PutVM stores a VM record and, when they change, its identity index entries.
func (t *boltTx) PutVM(vm *VM) error {
	if err := t.indexVM(vm.Name, identityKeys(vm)); err != nil {
		return err
	}
	return putJSON(t.tx.Bucket(bucketVMs), []byte(vm.Name), vm)
}

// indexVM makes keys the identity entries of VM name. The VM's own entry (kind 'n') lists
// its keys, so that most writes (a counter, a boot request) compare two short values and
// touch nothing else.
func (t *boltTx) indexVM(name string, keys [][]byte) error {
	idx := t.tx.Bucket(bucketIdentity)
	own := identityKey(identityOwn, []byte(name))
	list := encodeKeyList(keys)
	old := idx.Get(own)
	if old != nil && bytes.Equal(old, list) {
		return nil
	}
	old = bytes.Clone(old) // bbolt's value lives in its read-only map, valid until a write
	oldKeys, err := decodeKeyList(old)
	if err != nil {
		return fmt.Errorf("identity index of vm %s: %w", name, err)
	}
	for _, k := range oldKeys {
		if err := idx.Delete(append(k, name...)); err != nil {
			return err
		}
	}
	for _, k := range keys {
		if err := idx.Put(append(k, name...), []byte{}); err != nil {
			return err
		}
	}
	return idx.Put(own, list)
}

// IdentifiedVMs implements Tx.
func (t *boltTx) IdentifiedVMs(key []byte) ([]*VM, error) {
	var out []*VM
	c := t.tx.Bucket(bucketIdentity).Cursor()
	for k, _ := c.Seek(key); k != nil && bytes.HasPrefix(k, key); k, _ = c.Next() {
		vm, err := t.VM(string(k[len(key):]))
		if err != nil {
			return nil, err
		}
		out = append(out, vm)
	}
	return out, nil
}

// buildBoltIdentityIndex indexes every VM once, in a store that predates the index.
func buildBoltIdentityIndex(t *boltTx) error {
	if v, err := t.Meta(identityIndexMeta); err != nil || string(v) == identityIndexVersion {
		return err
	}
	if err := t.tx.DeleteBucket(bucketIdentity); err != nil {
		return err
	}
	if _, err := t.tx.CreateBucket(bucketIdentity); err != nil {
		return err
	}
	vms, err := t.VMs()
	if err != nil {
		return err
	}
	for _, vm := range vms {
		if err := t.indexVM(vm.Name, identityKeys(vm)); err != nil {
			return err
		}
	}
	return t.PutMeta(identityIndexMeta, []byte(identityIndexVersion))
}

// VMs lists every VM.
func (t *boltTx) VMs() ([]*VM, error) {
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
func (t *boltTx) Boot(id string) (*Boot, error) {
	var b Boot
	if err := getJSON(t.tx.Bucket(bucketBoots), []byte(id), &b); err != nil {
		return nil, fmt.Errorf("boot %s: %w", id, err)
	}
	return &b, nil
}

// PutBoot stores a boot record.
func (t *boltTx) PutBoot(b *Boot) error { return putJSON(t.tx.Bucket(bucketBoots), []byte(b.ID), b) }

// Audit appends an audit event in the same transaction as the decision it records.
func (t *boltTx) Audit(e AuditEvent) error {
	b := t.tx.Bucket(bucketAudit)
	seq, err := b.NextSequence()
	if err != nil {
		return err
	}
	e.Seq = seq
	if e.Time.IsZero() { // a held row keeps the time it was decided (auditLog.hold)
		e.Time = t.now
	}
	var k [8]byte
	binary.BigEndian.PutUint64(k[:], seq)
	return putJSON(b, k[:], e)
}

// Meta reads a metadata value.
func (t *boltTx) Meta(key string) ([]byte, error) {
	v := t.tx.Bucket(bucketMeta).Get([]byte(key))
	if v == nil {
		return nil, nil
	}
	return append([]byte(nil), v...), nil
}

// PutMeta writes a metadata value.
func (t *boltTx) PutMeta(key string, v []byte) error {
	return t.tx.Bucket(bucketMeta).Put([]byte(key), v)
}

// AuditEvents implements Store.
func (s *boltStore) AuditEvents(_ context.Context, vm string, since uint64, limit int) ([]AuditEvent, error) {
	if limit <= 0 || limit > maxAuditRead {
		limit = maxAuditRead
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
