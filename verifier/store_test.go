package verifier

import (
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	bolt "go.etcd.io/bbolt"

	"github.com/svsm-e2e/svsm-e2e/internal/postgres/pgtest"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// backend opens stores of one kind for the conformance tests: fresh makes a store on an
// empty database; replica opens another handle on the same database as s (nil when the
// kind cannot be shared between processes).
type backend struct {
	name  string
	fresh func(t *testing.T) (Store, string)
}

// backends are both implementations: bbolt, and PostgreSQL started for the test (one
// server per test, one database per store; left out without PostgreSQL unless
// SVSM_E2E_REQUIRE_POSTGRES is set).
func backends(t *testing.T) []backend {
	t.Helper()
	bolt := backend{name: "bbolt", fresh: func(t *testing.T) (Store, string) {
		s, err := OpenBoltStore(filepath.Join(t.TempDir(), "verifier.db"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s, ""
	}}
	server, ok := pgtest.Available(t)
	if !ok {
		return []backend{bolt}
	}
	srv := server.URL
	var n atomic.Int32
	pg := backend{name: "postgres", fresh: func(t *testing.T) (Store, string) {
		db := fmt.Sprintf("conformance_%d", n.Add(1))
		conn, err := pgx.Connect(t.Context(), srv)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Exec(t.Context(), "CREATE DATABASE "+db); err != nil {
			t.Fatal(err)
		}
		conn.Close(t.Context())
		url := strings.Replace(srv, "dbname=postgres", "dbname="+db, 1)
		s, err := OpenPostgresStore(t.Context(), url)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s, url
	}}
	return []backend{bolt, pg}
}

// TestStoreConformance: both stores keep records, audit and metadata with the same
// semantics: NotFound for what is missing, a failed transaction leaves nothing, the audit is
// numbered in order and filtered by VM, since and limit.
func TestStoreConformance(t *testing.T) {
	for _, b := range backends(t) {
		t.Run(b.name, func(t *testing.T) {
			s, _ := b.fresh(t)
			ctx := t.Context()
			err := s.View(ctx, func(tx Tx) error {
				if _, err := tx.VM("a"); !errors.Is(err, ErrNotFound) {
					return fmt.Errorf("missing vm: %v", err)
				}
				if _, err := tx.Boot("b"); !errors.Is(err, ErrNotFound) {
					return fmt.Errorf("missing boot: %v", err)
				}
				if v, err := tx.Meta("k"); v != nil || err != nil {
					return fmt.Errorf("missing meta: %q %v", v, err)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			boom := errors.New("boom")
			if err := s.Update(ctx, func(tx Tx) error {
				if err := tx.PutVM(&VM{VMSpec: VMSpec{Name: "rolled-back"}}); err != nil {
					return err
				}
				return boom
			}); !errors.Is(err, boom) {
				t.Fatalf("fn's error: %v", err)
			}
			err = s.Update(ctx, func(tx Tx) error {
				if tx.Now().IsZero() {
					return errors.New("no transaction time")
				}
				for _, name := range []string{"b", "a"} {
					if err := tx.PutVM(&VM{VMSpec: VMSpec{Name: name, SecretMode: "v1"}, Counter: 7}); err != nil {
						return err
					}
					if err := tx.Audit(AuditEvent{Event: "register", Outcome: Allow, VM: name}); err != nil {
						return err
					}
				}
				if err := tx.PutBoot(&Boot{ID: "b1", VM: "a", Next: 8}); err != nil {
					return err
				}
				return tx.PutMeta("k", []byte{1, 2, 3})
			})
			if err != nil {
				t.Fatal(err)
			}
			err = s.View(ctx, func(tx Tx) error {
				vms, err := tx.VMs()
				if err != nil || len(vms) != 2 {
					return fmt.Errorf("VMs = %d, %v (the rolled-back one must be absent)", len(vms), err)
				}
				a, err := tx.VM("a")
				if err != nil || a.Counter != 7 {
					return fmt.Errorf("vm a: %+v %v", a, err)
				}
				if b, err := tx.Boot("b1"); err != nil || b.Next != 8 {
					return fmt.Errorf("boot: %+v %v", b, err)
				}
				if v, err := tx.Meta("k"); err != nil || string(v) != "\x01\x02\x03" {
					return fmt.Errorf("meta: %q %v", v, err)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			all, err := s.AuditEvents(ctx, "", 0, 0)
			if err != nil || len(all) != 2 || all[0].Seq >= all[1].Seq || all[0].VM != "b" || all[0].Time.IsZero() {
				t.Fatalf("audit: %+v %v", all, err)
			}
			if got, _ := s.AuditEvents(ctx, "a", 0, 0); len(got) != 1 || got[0].VM != "a" {
				t.Fatalf("audit of a: %+v", got)
			}
			if got, _ := s.AuditEvents(ctx, "", all[0].Seq, 0); len(got) != 1 || got[0].Seq != all[1].Seq {
				t.Fatalf("audit since %d: %+v", all[0].Seq, got)
			}
			if got, _ := s.AuditEvents(ctx, "", 0, 1); len(got) != 1 {
				t.Fatalf("audit limit 1: %+v", got)
			}
			// A row that carries its time (a held attestation) keeps it.
			decided := time.Date(2026, 1, 2, 3, 4, 5, 6000, time.UTC)
			if err := s.Update(ctx, func(tx Tx) error {
				return tx.Audit(AuditEvent{Event: "attest", Outcome: Allow, VM: "a", Time: decided})
			}); err != nil {
				t.Fatal(err)
			}
			if got, _ := s.AuditEvents(ctx, "a", 0, 0); len(got) != 2 || !got[1].Time.Equal(decided) {
				t.Fatalf("audit row with its own time: %+v", got)
			}
		})
	}
}

// TestStoreSerializes: read-modify-write transactions from many goroutines (on PostgreSQL,
// through two handles, as two replicas would) lose no update.
func TestStoreSerializes(t *testing.T) {
	for _, b := range backends(t) {
		t.Run(b.name, func(t *testing.T) {
			s, url := b.fresh(t)
			handles := []Store{s}
			if url != "" {
				s2, err := OpenPostgresStore(t.Context(), url)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { s2.Close() })
				handles = append(handles, s2)
			}
			ctx := t.Context()
			if err := s.Update(ctx, func(tx Tx) error { return tx.PutVM(&VM{VMSpec: VMSpec{Name: "c"}}) }); err != nil {
				t.Fatal(err)
			}
			const workers, each = 8, 10
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					h := handles[w%len(handles)]
					for range each {
						if err := h.Update(ctx, func(tx Tx) error {
							vm, err := tx.VM("c")
							if err != nil {
								return err
							}
							vm.Counter++
							return tx.PutVM(vm)
						}); err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			var got uint64
			_ = s.View(ctx, func(tx Tx) error {
				vm, err := tx.VM("c")
				if err == nil {
					got = vm.Counter
				}
				return err
			})
			if got != workers*each {
				t.Fatalf("counter %d after %d increments: updates were lost", got, workers*each)
			}
		})
	}
}

// TestOneReleasePerBootRequestAcrossReplicas: two verifiers on one PostgreSQL race to release
// on each of 20 boot requests; exactly one wins each, and the loser's refusal is audited.
func TestOneReleasePerBootRequestAcrossReplicas(t *testing.T) {
	bs := backends(t)
	if len(bs) < 2 {
		t.Skip("needs PostgreSQL")
	}
	_, url := bs[1].fresh(t)
	var vs []*Verifier
	for range 2 {
		v, err := New(Options{DataDir: t.TempDir(), DatabaseURL: url, Instance: fmt.Sprintf("replica-%d", len(vs))})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { v.Close() })
		vs = append(vs, v)
	}
	if vs[0].tokenKey.Equal(vs[1].tokenKey) == false {
		t.Fatal("the replicas made two token keys: the shared one lost a race")
	}
	ctx := t.Context()
	if _, err := vs[0].Register(ctx, VMSpec{Name: "vm", Measurements: []protocol.HexBytes{make([]byte, 48)}, SecretMode: "v1"}); err != nil {
		t.Fatal(err)
	}
	priv, _ := ecdh.P521().GenerateKey(rand.Reader)
	key := protocol.ECPublicKeyFromECDH(priv.PublicKey())
	const rounds = 20
	for i := range rounds {
		if _, err := vs[i%2].Prime(ctx, "vm"); err != nil {
			t.Fatal(err)
		}
		var wins atomic.Int32
		var wg sync.WaitGroup
		for _, v := range vs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, ref, err := v.release(ctx, "vm", fmt.Sprintf("s%d", i), key, noGate)
				switch {
				case err != nil:
					t.Error(err)
				case ref == nil:
					wins.Add(1)
				case ref.Field != "boot_request":
					t.Errorf("round %d: refused for %s, want boot_request", i, ref)
				}
			}()
		}
		wg.Wait()
		if wins.Load() != 1 {
			t.Fatalf("round %d: %d releases on one boot request", i, wins.Load())
		}
	}
	evs, err := vs[1].AuditEvents(context.Background(), "vm", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	allow, deny := 0, 0
	for _, e := range evs {
		if e.Event == "release" {
			if !strings.HasPrefix(e.Instance, "replica-") {
				t.Errorf("release row without its replica: %+v", e)
			}
			switch e.Outcome {
			case Allow:
				allow++
			case Deny:
				deny++
			}
		}
	}
	if allow != rounds || deny != rounds {
		t.Fatalf("audit on the shared database: %d releases allowed, %d denied; want %d each", allow, deny, rounds)
	}
	view, _ := vs[0].Show(ctx, "vm")
	if view.Releases != rounds {
		t.Fatalf("the record counts %d releases, want %d", view.Releases, rounds)
	}
}

// identified lists the names IdentifiedVMs returns for (kind, value).
func identified(t *testing.T, s Store, kind byte, value string) []string {
	t.Helper()
	var names []string
	err := s.View(t.Context(), func(tx Tx) error {
		vms, err := tx.IdentifiedVMs(identityKey(kind, []byte(value)))
		for _, vm := range vms {
			names = append(names, vm.Name)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return names
}

func putVM(t *testing.T, s Store, name, hostData string, measurements ...string) {
	t.Helper()
	err := s.Update(t.Context(), func(tx Tx) error {
		vm := &VM{VMSpec: VMSpec{Name: name}}
		if old, err := tx.VM(name); err == nil {
			vm = old
		}
		vm.HostData = HexBytes(hostData)
		vm.Measurements = nil
		for _, m := range measurements {
			vm.Measurements = append(vm.Measurements, HexBytes(m))
		}
		return tx.PutVM(vm)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestIdentityIndex: both stores index a VM under its HOST_DATA, or without one under each
// measurement, and move the entries when the record changes, in the same transaction.
func TestIdentityIndex(t *testing.T) {
	for _, b := range backends(t) {
		t.Run(b.name, func(t *testing.T) {
			s, _ := b.fresh(t)
			putVM(t, s, "a", "host-a", "m1")
			putVM(t, s, "b", "", "m1", "m2", "m1")
			putVM(t, s, "c", "", "m2")
			check := func(kind byte, value string, want ...string) {
				t.Helper()
				if got := identified(t, s, kind, value); !slices.Equal(got, want) {
					t.Errorf("identified %c %q = %v, want %v", kind, value, got, want)
				}
			}
			check(identityHostData, "host-a", "a")
			check(identityMeasurement, "m1", "b") // a has HOST_DATA: found by that only
			check(identityMeasurement, "m2", "b", "c")
			check(identityHostData, "" /* none */)
			putVM(t, s, "b", "", "m3")
			putVM(t, s, "c", "host-c", "m2")
			putVM(t, s, "a", "", "m1")
			check(identityMeasurement, "m1", "a")
			check(identityMeasurement, "m2")
			check(identityMeasurement, "m3", "b")
			check(identityHostData, "host-a")
			check(identityHostData, "host-c", "c")
			// Several measurements and a name of a few bytes (which an append into the key list
			// would write over the next key): moving the entries leaves no stale one.
			long := "vm-x"
			putVM(t, s, long, "", "m4", "m5", "m6")
			putVM(t, s, long, "", "m7")
			check(identityMeasurement, "m4")
			check(identityMeasurement, "m5")
			check(identityMeasurement, "m6")
			check(identityMeasurement, "m7", long)
			// A failed transaction leaves the index as it was.
			err := s.Update(t.Context(), func(tx Tx) error {
				if err := tx.PutVM(&VM{VMSpec: VMSpec{Name: "d", HostData: HexBytes("host-d")}}); err != nil {
					return err
				}
				return errors.New("rolled back")
			})
			if err == nil {
				t.Fatal("a failing transaction committed")
			}
			check(identityHostData, "host-d")
		})
	}
}

// checkReindexed checks the index of a reopened store holding VM a (HOST_DATA host-a) and
// VM b (measurement m1).
func checkReindexed(t *testing.T, s Store) {
	t.Helper()
	if got := identified(t, s, identityHostData, "host-a"); !slices.Equal(got, []string{"a"}) {
		t.Errorf("after reopening: host-a → %v", got)
	}
	if got := identified(t, s, identityMeasurement, "m1"); !slices.Equal(got, []string{"b"}) {
		t.Errorf("after reopening: m1 → %v", got)
	}
}

// TestIdentityIndexBuiltForOldStores: a store written before the index existed (no index
// entries, no index metadata) gets its index built when it is opened.
func TestIdentityIndexBuiltForOldStores(t *testing.T) {
	t.Run("bbolt", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "verifier.db")
		s, err := OpenBoltStore(path)
		if err != nil {
			t.Fatal(err)
		}
		putVM(t, s, "a", "host-a")
		putVM(t, s, "b", "", "m1")
		s.Close()
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		err = db.Update(func(tx *bolt.Tx) error {
			if err := tx.DeleteBucket(bucketIdentity); err != nil {
				return err
			}
			return tx.Bucket(bucketMeta).Delete([]byte(identityIndexMeta))
		})
		db.Close()
		if err != nil {
			t.Fatal(err)
		}
		if s, err = OpenBoltStore(path); err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		checkReindexed(t, s)
	})
	for _, b := range backends(t) {
		if b.name != "postgres" {
			continue
		}
		t.Run(b.name, func(t *testing.T) {
			s, url := b.fresh(t)
			putVM(t, s, "a", "host-a")
			putVM(t, s, "b", "", "m1")
			conn, err := pgx.Connect(t.Context(), url)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(t.Context())
			for _, q := range []string{`DELETE FROM svsm_vm_identity`, `DELETE FROM svsm_meta WHERE key = 'identity-index'`} {
				if _, err := conn.Exec(t.Context(), q); err != nil {
					t.Fatal(err)
				}
			}
			if got := identified(t, s, identityHostData, "host-a"); len(got) != 0 {
				t.Fatalf("index not emptied: %v", got)
			}
			s2, err := OpenPostgresStore(t.Context(), url)
			if err != nil {
				t.Fatal(err)
			}
			defer s2.Close()
			checkReindexed(t, s2)
		})
	}
}

// TestKeyList: a VM's own list of identity keys round-trips, and a damaged one is an error,
// not a panic.
func TestKeyList(t *testing.T) {
	for _, keys := range [][][]byte{nil, {identityKey(identityHostData, []byte("h"))},
		{identityKey(identityMeasurement, []byte("m1")), identityKey(identityMeasurement, make([]byte, 300))}} {
		got, err := decodeKeyList(encodeKeyList(keys))
		if err != nil || !slices.EqualFunc(got, keys, func(a, b []byte) bool { return string(a) == string(b) }) {
			t.Errorf("round trip of %d keys: %d keys, %v", len(keys), len(got), err)
		}
	}
	for _, bad := range [][]byte{{0}, {0, 5, 'a'}, {1, 0}} {
		if _, err := decodeKeyList(bad); err == nil {
			t.Errorf("decodeKeyList(%x) accepted a damaged list", bad)
		}
	}
}
