package firmware

import (
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"testing"
	"time"

	"github.com/google/go-eventlog/register"
	"github.com/google/go-eventlog/tcg"
	"github.com/google/go-tpm/legacy/tpm2"

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
	tpm, err := vtpm.Manufacture()
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	rw := tpm.Transport()
	tmpl, _ := template(t)
	vars := storeVars{uefivars.New()}
	res, err := Run(context.Background(), rw, vars, tmpl, boot())
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
	run := func(b Boot) map[int][]byte {
		tpm, err := vtpm.Manufacture()
		if err != nil {
			t.Fatal(err)
		}
		defer tpm.Close()
		res, err := Run(context.Background(), tpm.Transport(), storeVars{uefivars.New()}, nil, b)
		if err != nil {
			t.Fatal(err)
		}
		return res.PCRs
	}
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

func TestDBXRevokesComponent(t *testing.T) {
	tpm, err := vtpm.Manufacture()
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	tmpl, pk := template(t)
	vars := storeVars{uefivars.New()}
	for _, u := range tmpl {
		if err := vars.Apply(u); err != nil {
			t.Fatal(err)
		}
	}
	h := sha256.Sum256(boot().Kernel.Data)
	u, err := uefivars.SignedUpdate(uefivars.ImageSecurityDatabase, "dbx",
		[]uefivars.Signature{{Type: uefivars.CertSHA256, Owner: owner, Data: h[:]}}, time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC), true, pk)
	if err != nil {
		t.Fatal(err)
	}
	if err := vars.Apply(u); err != nil {
		t.Fatal(err)
	}
	_, err = Run(context.Background(), tpm.Transport(), vars, nil, boot())
	var sbErr *ErrSecureBoot
	if !errors.As(err, &sbErr) || sbErr.Component != "kernel" {
		t.Fatalf("revoked kernel booted: %v", err)
	}
}

func TestPredictPCRsMatchesABoot(t *testing.T) {
	tpm, err := vtpm.Manufacture()
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	b := boot()
	res, err := Run(context.Background(), tpm.Transport(), storeVars{uefivars.New()}, nil, b)
	if err != nil {
		t.Fatal(err)
	}
	pred := PredictPCRs(b.Kernel.Data, b.Initrd.Data, &b.Cmdline)
	for _, pcr := range []int{PCRBootApp, PCRInitrd, PCRCmdline} {
		if string(pred[pcr]) != string(res.PCRs[pcr]) {
			t.Errorf("PCR %d: predicted %x, booted %x", pcr, pred[pcr], res.PCRs[pcr])
		}
	}
}
