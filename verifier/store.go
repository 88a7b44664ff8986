package verifier

import (
	"context"
	"errors"
	"time"
)

// Store is the verifier's durable state. Every decision that changes state (a release
// consuming a boot request, a counter advance) commits, with its audit record, in one
// durable transaction before the answer is written. Two implementations keep the same
// semantics: bbolt in the data directory (one replica; the default) and PostgreSQL (any
// number of replicas on one database; transactions are SERIALIZABLE and retried on a
// serialization failure, so fn may run more than once and must only act through tx and on
// variables it assigns afresh).
type Store interface {
	// Update runs fn in a durable read-write transaction.
	Update(ctx context.Context, fn func(Tx) error) error
	// View runs fn in a read-only transaction.
	View(ctx context.Context, fn func(Tx) error) error
	// AuditEvents returns events with Seq > since, optionally for one VM, at most limit
	// (at most 10000), in Seq order.
	AuditEvents(ctx context.Context, vm string, since uint64, limit int) ([]AuditEvent, error)
	Close() error
}

// Tx is one transaction's typed view of the records.
type Tx interface {
	// Now is the transaction's time (UTC), stamped on what it writes.
	Now() time.Time
	VM(name string) (*VM, error)
	PutVM(vm *VM) error
	VMs() ([]*VM, error)
	// IdentifiedVMs returns the VMs indexed under an identity key (identityKey), in name
	// order: what identify reads instead of every record.
	IdentifiedVMs(key []byte) ([]*VM, error)
	Boot(id string) (*Boot, error)
	PutBoot(b *Boot) error
	// Audit appends an event in the same transaction as the decision it records; the store
	// assigns Seq, and Time unless the event carries one (a held attestation keeps the time
	// it was decided: auditLog.hold).
	Audit(e AuditEvent) error
	// Meta reads a metadata value (nil when unset).
	Meta(key string) ([]byte, error)
	PutMeta(key string, v []byte) error
}

// ErrNotFound is returned (wrapped) for a missing VM or boot.
var ErrNotFound = errors.New("not found")

// instanceStore stamps the deciding replica's name on every audit row it writes.
type instanceStore struct {
	Store
	name string
}

func (s instanceStore) Update(ctx context.Context, fn func(Tx) error) error {
	return s.Store.Update(ctx, func(tx Tx) error { return fn(instanceTx{tx, s.name}) })
}

type instanceTx struct {
	Tx
	name string
}

func (t instanceTx) Audit(e AuditEvent) error {
	e.Instance = t.name
	return t.Tx.Audit(e)
}

// maxAuditRead bounds one AuditEvents answer.
const maxAuditRead = 10000

// Identity keys index VMs by what an attestation report names them by: HOST_DATA for a VM
// registered with one, else each of its accepted launch measurements. identify still applies
// its rules to the candidates; the index saves reading and decoding every VM record on each
// attestation (O(registered VMs) before). Each store keeps the index in the same transaction
// as the VM record.
const (
	identityHostData    = 'h'
	identityMeasurement = 'm'
	identityOwn         = 'n' // bbolt: a VM's own list of its keys
)

// identityKey is kind, the value's length (2 bytes, big-endian) and the value: no key is a
// prefix of another, so a store may append the VM name.
func identityKey(kind byte, value []byte) []byte {
	k := make([]byte, 0, 3+len(value))
	k = append(k, kind, byte(len(value)>>8), byte(len(value)))
	return append(k, value...)
}

// encodeKeyList and decodeKeyList store a list of identity keys as one value: each key with
// its length (2 bytes, big-endian) before it.
func encodeKeyList(keys [][]byte) []byte {
	var out []byte
	for _, k := range keys {
		out = append(out, byte(len(k)>>8), byte(len(k)))
		out = append(out, k...)
	}
	return out
}

func decodeKeyList(b []byte) ([][]byte, error) {
	var out [][]byte
	for len(b) > 0 {
		if len(b) < 2 {
			return nil, errors.New("truncated key list")
		}
		n := int(b[0])<<8 | int(b[1])
		if len(b) < 2+n {
			return nil, errors.New("truncated key list")
		}
		out = append(out, b[2:2+n:2+n]) // capped: appending to a key must not write into the next
		b = b[2+n:]
	}
	return out, nil
}

// identityKeys are the keys vm is indexed under.
func identityKeys(vm *VM) [][]byte {
	if len(vm.HostData) > 0 {
		return [][]byte{identityKey(identityHostData, vm.HostData)}
	}
	var out [][]byte
	seen := map[string]bool{}
	for _, m := range vm.Measurements {
		if !seen[string(m)] {
			seen[string(m)] = true
			out = append(out, identityKey(identityMeasurement, m))
		}
	}
	return out
}

// identityIndexVersion is the store metadata value saying the identity index is complete
// (written once the index of a store that predates it has been built).
const (
	identityIndexMeta    = "identity-index"
	identityIndexVersion = "1"
)
