package firmware

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-eventlog/register"
	"github.com/google/go-eventlog/tcg"
	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/svsm-e2e/svsm-e2e/internal/libcrypto"
	"github.com/svsm-e2e/svsm-e2e/svsm/uefivars"
	"github.com/svsm-e2e/svsm-e2e/svsm/vtpm"
)

// storeVars adapts a bare store to the firmware's view (the SVSM adds persistence).
type storeVars struct{ *uefivars.Store }

func (v storeVars) Set(u uefivars.Update) error { return v.Apply(u) }

var owner = uefivars.MustGUID("11111111-2222-3333-4444-555555555555")

func template(t *testing.T) ([]uefivars.Update, *uefivars.Key) {
	t.Helper()
	pk, err := uefivars.NewKey("PK", nil)
	if err != nil {
		t.Fatal(err)
	}
	tmpl, err := uefivars.EnrollmentTemplate(pk, pk, pk, owner, time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	if err != nil {
		t.Fatal(err)
	}
	return tmpl, pk
}

func boot() Boot {
	return Boot{
		LaunchDigest: make([]byte, 48),
		Kernel:       Component{Name: "kernel", Data: []byte("kernel image")},
		Initrd:       &Component{Name: "initrd", Data: []byte("initrd image")},
		Cmdline:      "console=ttyS0 root=/dev/mapper/data",
	}
}

func TestEventLogReplaysAgainstPCRs(t *testing.T) {
	for _, large := range []bool{false, true} {
		t.Run(fmt.Sprintf("large-kernel=%v", large), func(t *testing.T) { testEventLogReplays(t, large) })
	}
}

// largeBoot has a kernel of 2 MiB, hashed ahead in the background or not.
func largeBoot() Boot {
	b := boot()
	b.Kernel.Data = bytes.Repeat([]byte("kernel image "), (2<<20)/13)
	return b
}

// bootOnce runs the firmware once on a new vTPM and an empty variable store.
func bootOnce(t *testing.T, b Boot) *Result {
	t.Helper()
	tpm, err := vtpm.Manufacture()
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	res, err := Run(context.Background(), tpm.Transport(), storeVars{uefivars.New()}, nil, b)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func testEventLogReplays(t *testing.T, large bool) {
	tpm, err := vtpm.Manufacture()
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	rw := tpm.Transport()
	tmpl, _ := template(t)
	vars := storeVars{uefivars.New()}
	b := boot()
	if large {
		b = largeBoot()
	}
	res, err := Run(context.Background(), rw, vars, tmpl, b)
	if err != nil {
		t.Fatal(err)
	}
	if !res.SecureBoot {
		t.Fatal("template enrolled a PK but Secure Boot is off")
	}
	banks, err := allocatedBanks(rw)
	if err != nil {
		t.Fatal(err)
	}
	replayed := 0
	for _, b := range banks {
		if b.Hash == crypto.SHA512 {
			continue // go-eventlog's register package knows SHA-1/256/384 banks only
		}
		replayed++
		vals, err := tpm2.ReadPCRs(rw, tpm2.PCRSelection{Hash: tpm2.Algorithm(b.Alg), PCRs: []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}})
		if err != nil {
			t.Fatal(err)
		}
		var mrs []register.MR
		for i, v := range vals {
			mrs = append(mrs, register.PCR{Index: i, Digest: v, DigestAlg: b.Hash})
		}
		events, err := tcg.ParseAndReplay(res.Log, mrs, tcg.ParseOpts{})
		if err != nil {
			t.Fatalf("bank %v: replay: %v", b.Hash, err)
		}
		if len(events) < 10 {
			t.Fatalf("bank %v: %d events", b.Hash, len(events))
		}
	}
	if replayed < 2 {
		t.Fatalf("only %d banks replayed (banks %v)", replayed, banks)
	}
	// A log that does not match the PCRs must fail replay (the check has teeth).
	if err := tpm2.PCRExtend(rw, 8, tpm2.AlgSHA256, make([]byte, 32), ""); err != nil {
		t.Fatal(err)
	}
	v, _ := tpm2.ReadPCR(rw, 8, tpm2.AlgSHA256)
	if _, err := tcg.ParseAndReplay(res.Log, []register.MR{register.PCR{Index: 8, Digest: v, DigestAlg: banksHash(tpm2.AlgSHA256)}}, tcg.ParseOpts{}); err == nil {
		t.Fatal("replay accepted a PCR extended outside the log")
	}
}

func banksHash(a tpm2.Algorithm) crypto.Hash { return bankOf[a].Hash }

func TestPCRsFollowWhatIsBooted(t *testing.T) {
	run := func(b Boot) map[int][]byte { return bootOnce(t, b).PCRs }
	base := run(boot())
	if again := run(boot()); string(again[4]) != string(base[4]) || string(again[8]) != string(base[8]) {
		t.Fatal("same boot, different PCRs")
	}
	b := boot()
	b.Cmdline += " init=/bin/sh"
	if got := run(b); string(got[8]) == string(base[8]) || string(got[4]) != string(base[4]) {
		t.Fatal("command line change must move PCR 8 only")
	}
	b = boot()
	b.Kernel.Data = []byte("other kernel")
	if got := run(b); string(got[4]) == string(base[4]) {
		t.Fatal("kernel change must move PCR 4")
	}
}

// TestDBXRevokesComponent: dbx refuses a listed kernel or initrd, small or large,
// with the SHA-256 bank active (its digest reused) or not (hashed besides).
func TestDBXRevokesComponent(t *testing.T) {
	for _, tc := range []struct {
		name      string
		boot      Boot
		revoke    string
		sha256Off bool
	}{
		{"kernel", boot(), "kernel", false},
		{"initrd", boot(), "initrd", false},
		{"large-kernel", largeBoot(), "kernel", false},
		{"kernel-sha256-bank-inactive", boot(), "kernel", true},
		{"large-initrd-sha256-bank-inactive", func() Boot {
			b := largeBoot()
			b.Kernel, b.Initrd = *b.Initrd, &b.Kernel
			b.Kernel.Name, b.Initrd.Name = "kernel", "initrd"
			return b
		}(), "initrd", true},
		{"none", boot(), "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tpm, err := vtpm.Manufacture()
			if err != nil {
				t.Fatal(err)
			}
			if tc.sha256Off {
				tpm = withoutSHA256Bank(t, tpm)
			}
			defer tpm.Close()
			tmpl, pk := template(t)
			vars := storeVars{uefivars.New()}
			for _, u := range tmpl {
				if err := vars.Apply(u); err != nil {
					t.Fatal(err)
				}
			}
			revoked := []byte("something else")
			switch tc.revoke {
			case "kernel":
				revoked = tc.boot.Kernel.Data
			case "initrd":
				revoked = tc.boot.Initrd.Data
			}
			h := sha256.Sum256(revoked)
			u, err := uefivars.SignedUpdate(uefivars.ImageSecurityDatabase, "dbx",
				[]uefivars.Signature{{Type: uefivars.CertSHA256, Owner: owner, Data: h[:]}}, time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC), true, pk)
			if err != nil {
				t.Fatal(err)
			}
			if err := vars.Apply(u); err != nil {
				t.Fatal(err)
			}
			_, err = Run(context.Background(), tpm.Transport(), vars, nil, tc.boot)
			var sbErr *ErrSecureBoot
			switch {
			case tc.revoke == "" && err != nil:
				t.Fatalf("boot with nothing revoked: %v", err)
			case tc.revoke != "" && (!errors.As(err, &sbErr) || sbErr.Component != tc.revoke || sbErr.Hash != fmt.Sprintf("%x", h)):
				t.Fatalf("revoked %s booted: %v", tc.revoke, err)
			}
		})
	}
}

// withoutSHA256Bank restarts tpm with its SHA-256 bank deallocated (SHA-384 only).
func withoutSHA256Bank(t *testing.T, tpm *vtpm.TPM) *vtpm.TPM {
	t.Helper()
	all := []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23}
	auth := tpm2.AuthCommand{Session: tpm2.HandlePasswordSession, Attributes: tpm2.AttrContinueSession}
	if err := tpm2.PCRAllocate(tpm.Transport(), tpm2.HandlePlatform, auth, []tpm2.PCRSelection{{Hash: tpm2.AlgSHA256}, {Hash: tpm2.AlgSHA384, PCRs: all}}); err != nil {
		t.Fatal(err)
	}
	nv, err := tpm.Shutdown()
	if err != nil {
		t.Fatal(err)
	}
	restored, err := vtpm.Restore(nv)
	if err != nil {
		t.Fatal(err)
	}
	banks, err := allocatedBanks(restored.Transport())
	if err != nil || len(banks) != 1 || banks[0].Hash != crypto.SHA384 {
		restored.Close()
		t.Fatalf("banks after deallocating SHA-256: %v, %v", banks, err)
	}
	return restored
}

func TestPredictPCRsMatchesABoot(t *testing.T) {
	b := boot()
	res := bootOnce(t, b)
	pred := PredictPCRs(b.Kernel.Data, b.Initrd.Data, &b.Cmdline)
	for _, pcr := range []int{PCRBootApp, PCRInitrd, PCRCmdline} {
		if string(pred[pcr]) != string(res.PCRs[pcr]) {
			t.Errorf("PCR %d: predicted %x, booted %x", pcr, pred[pcr], res.PCRs[pcr])
		}
	}
}

// TestPrehashedComponents: digests hashed ahead (Prehash) give the PCRs and the event log
// a plain boot gives, whichever banks were hashed ahead; a Prehashed started on other bytes
// than the component's is not used (the firmware measures what boots).
func TestPrehashedComponents(t *testing.T) {
	wb := largeBoot()
	want := bootOnce(t, wb)
	other := bytes.Repeat([]byte("another kernel"), 1000)
	for _, tc := range []struct {
		name   string
		hashed func(kernel []byte) *Prehashed
	}{
		{"both-banks", func(k []byte) *Prehashed { return Prehash(k, nil, crypto.SHA256, crypto.SHA384) }},
		{"sha256-only", func(k []byte) *Prehashed { return Prehash(k, nil, crypto.SHA256) }},
		{"other-hashes", func(k []byte) *Prehashed { return Prehash(k, nil, crypto.SHA1, crypto.SHA512) }},
		{"other-bytes", func([]byte) *Prehashed { return Prehash(other, nil, crypto.SHA256, crypto.SHA384) }},
		{"libcrypto", func(k []byte) *Prehashed { return Prehash(k, libcrypto.Digest, crypto.SHA256, crypto.SHA384) }},
		// A digest that fails, or gives the wrong length, is computed by the firmware.
		{"digest-fails", func(k []byte) *Prehashed {
			return Prehash(k, func(crypto.Hash, []byte) ([]byte, error) { return nil, errors.New("no") }, crypto.SHA256, crypto.SHA384)
		}},
		{"digest-short", func(k []byte) *Prehashed {
			return Prehash(k, func(h crypto.Hash, d []byte) ([]byte, error) {
				s, err := libcrypto.Digest(h, d)
				return s[:h.Size()-1], err
			}, crypto.SHA256, crypto.SHA384)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := largeBoot()
			b.Kernel.Hashed = tc.hashed(b.Kernel.Data)
			res := bootOnce(t, b)
			if !bytes.Equal(res.Log, want.Log) {
				t.Error("event log differs from a boot without prehashing")
			}
			for pcr, v := range want.PCRs {
				if !bytes.Equal(res.PCRs[pcr], v) {
					t.Errorf("PCR %d = %x, want %x", pcr, res.PCRs[pcr], v)
				}
			}
			if pred := PredictPCRs(wb.Kernel.Data, nil, nil); !bytes.Equal(res.PCRs[PCRBootApp], pred[PCRBootApp]) {
				t.Errorf("PCR 4 = %x, the kernel that booted predicts %x", res.PCRs[PCRBootApp], pred[PCRBootApp])
			}
		})
	}
}
