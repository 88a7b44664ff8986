package igvm

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// upstreamIGVMs are real COCONUT-SVSM IGVM files written by upstream's igvmbuilder, i.e. by
// the microsoft/igvm crate's writer (../shared/tools/coconut-svsm, see its README): the
// independent source for the crate's byte layout (format version 2, 20-byte VP context,
// parameter headers, deduplicated file data).
func upstreamIGVMs(t *testing.T) []string {
	t.Helper()
	files, _ := filepath.Glob("../../shared/tools/coconut-svsm/*.igvm")
	if len(files) == 0 {
		t.Skip("no upstream COCONUT-SVSM IGVM in ../shared/tools/coconut-svsm (the shared tools are not on this machine)")
	}
	return files
}

// TestUpstreamIGVMRoundTrip: every header of a crate-written file parses (no length is
// rejected), our writer reproduces the file byte for byte, the headers a COCONUT IGVM
// carries are typed, and the file passes igvmmeasure's --check-kvm rules.
func TestUpstreamIGVMRoundTrip(t *testing.T) {
	for _, path := range upstreamIGVMs(t) {
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		f, err := Parse(raw)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if f.Version != FormatVersion2 {
			t.Errorf("%s: format version %d", path, f.Version)
		}
		out, err := f.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out, raw) {
			t.Errorf("%s: our writer does not reproduce the crate's bytes (%d vs %d bytes)", path, len(out), len(raw))
		}
		kinds := map[string]bool{}
		vpContexts := 0
		for _, h := range f.Headers {
			switch h := h.(type) {
			case Parameter:
				kinds[h.Name()] = true
			case VPContext:
				vpContexts++
			case Unknown:
				t.Errorf("%s: header type %#x left untyped", path, h.Type)
			}
		}
		for _, k := range []string{"vp-count", "memory-map", "environment-info", "device-tree", "madt"} {
			if !kinds[k] {
				t.Errorf("%s: no %s parameter", path, k)
			}
		}
		if vpContexts != 2 {
			t.Errorf("%s: %d VP contexts, want the SNP VMSA and the native one", path, vpContexts)
		}
		if err := CheckKVM(f); err != nil {
			t.Errorf("%s: %v", path, err)
		}
	}
}

// TestUpstreamIGVMDigest: the launch digest of the real files, under each rule set, equals the
// independent Python implementation's.
func TestUpstreamIGVMDigest(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Fatal("python3 is needed for the independent cross-check: ", err)
	}
	for _, path := range upstreamIGVMs(t) {
		raw, _ := os.ReadFile(path)
		f, err := Parse(raw)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range []Rules{RulesIgvmmeasure, RulesCrate, RulesQEMU} {
			out, err := exec.Command(py, filepath.Join(fixtures, "measure.py"), path, "--rules", r.String()).CombinedOutput()
			if err != nil {
				t.Fatalf("measure.py: %v\n%s", err, out)
			}
			if got, want := digestWith(t, f, MeasureOptions{Rules: r}), strings.TrimSpace(string(out)); got != want {
				t.Errorf("%s rules %s: Go %s, Python %s", filepath.Base(path), r, got, want)
			}
		}
	}
}

// TestCheckKVM: each of igvmmeasure's --check-kvm rules refuses.
func TestCheckKVM(t *testing.T) {
	cr0 := func(v byte) []byte { d := make([]byte, PageSize4K); d[vmsaCR0] = v; return d }
	good := func() *File {
		return &File{Headers: []Header{
			SupportedPlatform{CompatMask: snpCompat, PlatformType: PlatformSEVSNP, PlatformVersion: 1},
			PageData{GPA: 0x8000, CompatMask: snpCompat, Data: []byte("stage1")},
			VPContext{GPA: VMSAGPA, CompatMask: snpCompat, Data: cr0(0x31)},
		}}
	}
	if err := CheckKVM(good()); err != nil {
		t.Fatalf("a protected-mode VMSA, last: %v", err)
	}
	for name, mutate := range map[string]func(f *File){
		"VMSA not last": func(f *File) {
			f.Headers = append(f.Headers, PageData{GPA: 0x9000, CompatMask: snpCompat})
		},
		"two VMSAs": func(f *File) {
			f.Headers = append(f.Headers, VPContext{GPA: VMSAGPA, CompatMask: snpCompat, VPIndex: 1, Data: cr0(0x31)})
		},
		"VMSA elsewhere": func(f *File) {
			v := f.Headers[len(f.Headers)-1].(VPContext)
			v.GPA = 0x8000
			f.Headers[len(f.Headers)-1] = v
		},
		"CR0 with paging": func(f *File) {
			v := f.Headers[len(f.Headers)-1].(VPContext)
			v.Data = cr0(0x11)
			v.Data[vmsaCR0+3] = 0x80
			f.Headers[len(f.Headers)-1] = v
		},
	} {
		f := good()
		mutate(f)
		if err := CheckKVM(f); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
