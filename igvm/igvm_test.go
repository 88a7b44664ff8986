package igvm

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const fixtures = "../fixtures/igvm"

func digestHex(t testing.TB, f *File, nz bool) string {
	t.Helper()
	return digestWith(t, f, MeasureOptions{NativeZero: nz})
}

func digestWith(t testing.TB, f *File, o MeasureOptions) string {
	t.Helper()
	m, err := MeasureSNP(f, o)
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(m.Digest[:])
}

// TestGoldenVectors: files and digests made by fixtures/igvm/measure.py (an independent
// implementation that also builds the files byte by byte); see that script's header.
func TestGoldenVectors(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(fixtures, "golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	var golden []struct {
		File       string `json:"file"`
		Rules      string `json:"rules"`
		NativeZero bool   `json:"native_zero"`
		Digest     string `json:"digest"`
	}
	if err := json.Unmarshal(b, &golden); err != nil {
		t.Fatal(err)
	}
	if len(golden) < 6 {
		t.Fatalf("%d golden vectors", len(golden))
	}
	for _, g := range golden {
		raw, err := os.ReadFile(filepath.Join(fixtures, g.File))
		if err != nil {
			t.Fatal(err)
		}
		f, err := Parse(raw)
		if err != nil {
			t.Fatalf("%s: %v", g.File, err)
		}
		rules, err := ParseRules(g.Rules)
		if err != nil {
			t.Fatal(err)
		}
		if got := digestWith(t, f, MeasureOptions{Rules: rules, NativeZero: g.NativeZero}); got != g.Digest {
			t.Errorf("%s rules=%s native_zero=%v:\n got %s\nwant %s", g.File, g.Rules, g.NativeZero, got, g.Digest)
		}
		// Our writer reproduces the independently built file byte for byte.
		out, err := f.Marshal()
		if err != nil || !bytes.Equal(out, raw) {
			t.Errorf("%s: re-marshal differs (%v)", g.File, err)
		}
	}
}

func randomFile(r *rand.Rand) *File {
	f := &File{Headers: []Header{
		SupportedPlatform{CompatMask: 1, PlatformType: PlatformSEVSNP, PlatformVersion: 1},
		SupportedPlatform{CompatMask: 2, PlatformType: PlatformTDX, PlatformVersion: 1},
		ParameterArea{Bytes: uint64(1+r.IntN(3)) * PageSize4K, Index: 0},
	}}
	for i := range 5 + r.IntN(20) {
		gpa := uint64(i) * PageSize4K * 4
		switch r.IntN(6) {
		case 0:
			f.Headers = append(f.Headers, PageData{GPA: gpa, CompatMask: 1})
		case 1:
			f.Headers = append(f.Headers, PageData{GPA: gpa, CompatMask: uint32(1 + r.IntN(3)), Flags: uint32(r.IntN(8)) &^ Flag2MB,
				DataType: uint16(r.IntN(4)), Data: randBytes(r, 1+r.IntN(PageSize4K))})
		case 2:
			f.Headers = append(f.Headers, ParameterInsert{GPA: gpa, CompatMask: 1, Index: 0})
		default:
			f.Headers = append(f.Headers, PageData{GPA: gpa, CompatMask: 1, Data: randBytes(r, PageSize4K)})
		}
	}
	vmsa := VPContext{GPA: VMSAGPA, CompatMask: 1, Data: randBytes(r, 1024)}
	if at := 3 + r.IntN(len(f.Headers)-2); r.IntN(2) == 0 && at < len(f.Headers) {
		// Not last: QEMU's rules measure it at the end, the others in file order.
		f.Headers = append(f.Headers[:at], append([]Header{vmsa}, f.Headers[at:]...)...)
	} else {
		f.Headers = append(f.Headers, vmsa)
	}
	return f
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// TestAgainstIndependentImplementation writes random files with the Go writer and has the
// Python implementation measure them.
func TestAgainstIndependentImplementation(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Fatal("python3 is needed for the independent cross-check of the launch digest: ", err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	dir := t.TempDir()
	for i := range 20 {
		f := randomFile(r)
		raw, err := f.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "r.igvm")
		if err := os.WriteFile(path, raw, 0o644); err != nil {
			t.Fatal(err)
		}
		for _, o := range []MeasureOptions{{}, {NativeZero: true}, {Rules: RulesCrate}, {Rules: RulesQEMU}} {
			args := []string{filepath.Join(fixtures, "measure.py"), path, "--rules", o.Rules.String()}
			if o.NativeZero {
				args = append(args, "--native-zero")
			}
			out, err := exec.Command(py, args...).CombinedOutput()
			if err != nil {
				t.Fatalf("measure.py: %v\n%s", err, out)
			}
			if got, want := digestWith(t, f, o), strings.TrimSpace(string(out)); got != want {
				t.Fatalf("random file %d %+v: Go %s, Python %s", i, o, got, want)
			}
		}
	}
}

func TestDigestProperties(t *testing.T) {
	base := func() *File {
		return &File{Headers: []Header{
			SupportedPlatform{CompatMask: 1, PlatformType: PlatformSEVSNP},
			PageData{GPA: 0x1000, CompatMask: 1, Data: []byte("page one")},
			PageData{GPA: 0x2000, CompatMask: 1, Data: []byte("page two")},
			PageData{GPA: 0x3000, CompatMask: 1, Flags: FlagUnmeasured, Data: []byte("unmeasured")},
			PageData{GPA: 0x4000, CompatMask: 1},
		}}
	}
	d0 := digestHex(t, base(), false)
	swapped := base()
	swapped.Headers[1], swapped.Headers[2] = swapped.Headers[2], swapped.Headers[1]
	if digestHex(t, swapped, false) == d0 {
		t.Error("page order does not matter")
	}
	flipped := base()
	p := flipped.Headers[1].(PageData)
	p.Data = []byte("page onf")
	flipped.Headers[1] = p
	if digestHex(t, flipped, false) == d0 {
		t.Error("one changed byte did not change the digest")
	}
	unmeasured := base()
	u := unmeasured.Headers[3].(PageData)
	u.Data = []byte("anything else")
	unmeasured.Headers[3] = u
	if digestHex(t, unmeasured, false) != d0 {
		t.Error("an unmeasured page's contents changed the digest")
	}
	if digestHex(t, base(), true) == d0 {
		t.Error("native zero must measure the empty page differently")
	}
	other := base()
	other.Headers = append(other.Headers, PageData{GPA: 0x5000, CompatMask: 2, Data: []byte("tdx only")})
	if digestHex(t, other, false) != d0 {
		t.Error("a page of another platform changed the SNP digest")
	}
	if _, err := MeasureSNP(&File{}, MeasureOptions{}); err == nil {
		t.Error("a file without an SNP platform was measured")
	}
}

func TestLaunchRoundTrip(t *testing.T) {
	l := &Launch{Kernel: randBytes(rand.New(rand.NewPCG(3, 4)), 3*PageSize4K+17), Initrd: []byte("initrd"), Cmdline: "console=ttyS0", Policy: 0x30000}
	f, err := BuildLaunch(l)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := f.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	g, err := Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	raw2, _ := g.Marshal()
	if !bytes.Equal(raw, raw2) {
		t.Fatal("write → read → write is not stable")
	}
	back, err := ExtractLaunch(g)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back.Kernel, l.Kernel) || !bytes.Equal(back.Initrd, l.Initrd) || back.Cmdline != l.Cmdline || back.Policy != l.Policy {
		t.Fatalf("extracted launch differs: %d/%d kernel bytes, cmdline %q", len(back.Kernel), len(l.Kernel), back.Cmdline)
	}
	if digestHex(t, f, false) != digestHex(t, g, false) {
		t.Fatal("digest changed across write/read")
	}
	// One byte of the kernel changes the launch digest.
	l.Kernel = bytes.Clone(l.Kernel) // f refers to the old slice
	l.Kernel[PageSize4K+5] ^= 1
	f2, _ := BuildLaunch(l)
	if digestHex(t, f2, false) == digestHex(t, f, false) {
		t.Fatal("a changed kernel byte kept the digest")
	}
}

func TestParseRejects(t *testing.T) {
	good, _ := (&File{Headers: []Header{SupportedPlatform{CompatMask: 1, PlatformType: PlatformSEVSNP}, PageData{GPA: 0x1000, CompatMask: 1, Data: []byte{1}}}}).Marshal()
	for name, mutate := range map[string]func([]byte) []byte{
		"short":        func(b []byte) []byte { return b[:10] },
		"magic":        func(b []byte) []byte { b[0] ^= 1; return b },
		"checksum":     func(b []byte) []byte { b[30] ^= 1; return b },
		"total size":   func(b []byte) []byte { return append(b, 0) },
		"data outside": func(b []byte) []byte { return b[:len(b)-1] },
	} {
		if _, err := Parse(mutate(bytes.Clone(good))); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, name := range []string{"one-normal-page.igvm", "every-page-type.igvm"} {
		b, err := os.ReadFile(filepath.Join(fixtures, name))
		if err == nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		file, err := Parse(b)
		if err != nil {
			return
		}
		for _, r := range []Rules{RulesIgvmmeasure, RulesCrate, RulesQEMU} {
			_, _ = MeasureSNP(file, MeasureOptions{Rules: r})
		}
		_ = CheckKVM(file)
		if out, err := file.Marshal(); err == nil {
			if _, err := Parse(out); err != nil {
				t.Fatalf("re-marshalled file does not parse: %v", err)
			}
		}
	})
}
