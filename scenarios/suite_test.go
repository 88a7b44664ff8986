// Package scenarios is the end-to-end suite (SCENARIOS.md): each spec starts a whole stack —
// fakesnp, svsm-verifier, svsm-proxy as real processes, and svsm-guest boots — plays the host
// (benign or malicious) and asserts what every layer saw.
//
// Run: `make scenarios`, or `go tool ginkgo -p ./scenarios`, one family with
// `--focus 'rollback'`, one label with `--label-filter attack`. A failed spec keeps its
// artifact bundle (see README) and names it in the report.
package scenarios

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"

	"github.com/svsm-e2e/svsm-e2e/fakesnp"
	"github.com/svsm-e2e/svsm-e2e/harness"
)

func TestScenarios(t *testing.T) {
	RegisterFailHandler(Fail)
	RunSpecs(t, "svsm-e2e scenarios")
}

// shared is what process 1 prepares once for every parallel process.
type shared struct {
	BinDir string `json:"bin_dir"`
	CADir  string `json:"ca_dir"`
	// QEMU is empty when no backend:qemu spec will run; else the image cache, built.
	QEMUImages string `json:"qemu_images"`
}

var suite shared

// qemuBackend is this process's QEMU backend (nil until a backend:qemu spec needs it).
var qemuBackend *harness.QEMUBackend

var _ = SynchronizedBeforeSuite(func() []byte {
	s := shared{BinDir: os.Getenv("SVSM_E2E_BIN")}
	if s.BinDir == "" {
		dir, err := os.MkdirTemp("", "svsm-e2e-suite-bin-")
		Expect(err).NotTo(HaveOccurred())
		_, err = harness.BuildBinaries(context.Background(), "..", dir)
		Expect(err).NotTo(HaveOccurred())
		s.BinDir = dir
	}
	if wantQEMU() {
		// Build the guest image once, before the parallel processes look for it.
		bins, err := harness.FindBinaries(s.BinDir)
		Expect(err).NotTo(HaveOccurred())
		s.QEMUImages = harness.DefaultImageCache()
		b, err := harness.NewQEMUBackend(context.Background(), harness.QEMUOptions{Guest: bins.Guest, ImageCache: s.QEMUImages, Binary: os.Getenv(harness.EnvQEMU)})
		Expect(err).NotTo(HaveOccurred(), "the QEMU backend is needed by backend:qemu specs")
		fmt.Fprintf(GinkgoWriter, "qemu backend: %s\n", b.Choice.Reason)
	}
	ca, err := os.MkdirTemp("", "svsm-e2e-suite-ca-")
	Expect(err).NotTo(HaveOccurred())
	_, err = fakesnp.LoadOrCreateCA(fakesnp.CAOptions{Dir: ca})
	Expect(err).NotTo(HaveOccurred())
	s.CADir = ca
	b, err := json.Marshal(s)
	Expect(err).NotTo(HaveOccurred())
	return b
}, func(b []byte) {
	Expect(json.Unmarshal(b, &suite)).To(Succeed())
})

var _ = SynchronizedAfterSuite(func() {}, func() {
	_ = os.RemoveAll(suite.CADir)
	if os.Getenv("SVSM_E2E_BIN") == "" {
		_ = os.RemoveAll(suite.BinDir)
	}
})

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// artifactsRoot is where failed specs leave their bundle.
func artifactsRoot() string {
	if d := os.Getenv("SVSM_E2E_ARTIFACTS"); d != "" {
		return d
	}
	return filepath.Join(os.TempDir(), "svsm-e2e-artifacts")
}

// newStack starts a stack for the current spec. Its directory is the artifact bundle: kept
// and reported when the spec fails (or SVSM_E2E_KEEP=1), removed otherwise.
// wantQEMU reports whether the label filter lets backend:qemu specs run.
func wantQEMU() bool {
	f := GinkgoLabelFilter()
	if f == "" {
		return true
	}
	return Label("backend:qemu").MatchesLabelFilter(f)
}

// newQEMUStack is newStack with VMs booted by QEMU.
func newQEMUStack() *harness.Stack {
	GinkgoHelper()
	if qemuBackend == nil {
		bins, err := harness.FindBinaries(suite.BinDir)
		Expect(err).NotTo(HaveOccurred())
		Expect(suite.QEMUImages).NotTo(BeEmpty(), "the suite did not prepare the QEMU image")
		qemuBackend, err = harness.NewQEMUBackend(ctx(), harness.QEMUOptions{Guest: bins.Guest, ImageCache: suite.QEMUImages, Binary: os.Getenv(harness.EnvQEMU)})
		Expect(err).NotTo(HaveOccurred())
	}
	AddReportEntry("qemu", qemuBackend.Choice.Reason)
	return newStackWith(qemuBackend)
}

func newStack() *harness.Stack {
	GinkgoHelper()
	return newStackWith(nil)
}

func newStackWith(backend harness.Backend) *harness.Stack {
	GinkgoHelper()
	return newStackWithOptions(func(o *harness.StackOptions) { o.Backend = backend })
}

// newStackWithOptions starts a stack for the current spec with options adjusted by change.
func newStackWithOptions(change func(*harness.StackOptions)) *harness.Stack {
	GinkgoHelper()
	report := CurrentSpecReport()
	h := fnv.New64a()
	h.Write([]byte(report.FullText()))
	seed := uint64(GinkgoRandomSeed()) ^ h.Sum64()
	name := unsafeChars.ReplaceAllString(report.FullText(), "_")
	if len(name) > 60 {
		name = name[:60]
	}
	Expect(os.MkdirAll(artifactsRoot(), 0o755)).To(Succeed())
	dir, err := os.MkdirTemp(artifactsRoot(), fmt.Sprintf("%s-p%d-", name, GinkgoParallelProcess()))
	Expect(err).NotTo(HaveOccurred())
	bins, err := harness.FindBinaries(suite.BinDir)
	Expect(err).NotTo(HaveOccurred())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	opts := harness.StackOptions{WorkDir: dir, Binaries: bins, CADir: suite.CADir, Seed: seed}
	change(&opts)
	s, err := harness.NewStack(ctx, opts)
	Expect(err).NotTo(HaveOccurred())
	AddReportEntry("seed", s.Seed())
	DeferCleanup(func() {
		failed := CurrentSpecReport().Failed()
		keep := os.Getenv("SVSM_E2E_KEEP") == "1"
		if failed || keep { // a kept bundle (svsm-e2e qualify) holds the audit too
			cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = s.CollectArtifacts(cctx)
			ccancel()
		}
		Expect(s.Close()).To(Succeed())
		if failed || keep {
			AddReportEntry("artifacts", dir)
			GinkgoWriter.Printf("artifact bundle: %s\n", dir)
			return
		}
		_ = os.RemoveAll(dir)
	})
	return s
}

// ctx bounds one step of a spec.
func ctx() context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	DeferCleanup(cancel)
	return c
}
