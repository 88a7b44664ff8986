package guest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestMapExecutable: the mapping holds the file's bytes; empty files are refused (there is
// nothing to map, and a kernel of no bytes is no kernel).
func TestMapExecutable(t *testing.T) {
	dir := t.TempDir()
	want := bytes.Repeat([]byte("kernel image "), 100000)
	p := filepath.Join(dir, "init")
	if err := os.WriteFile(p, want, 0o755); err != nil {
		t.Fatal(err)
	}
	got, err := mapExecutable(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("mapped bytes differ from the file")
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	// Refused by the size check, with the size named (mmap would also refuse, less clearly).
	if _, err := mapExecutable(empty); err == nil || !strings.Contains(err.Error(), "is 0 bytes") {
		t.Fatalf("an empty file as a kernel: %v", err)
	}
	if _, err := mapExecutable(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("a missing file was mapped")
	}
}

// TestNeededModule: without PCI devices virtio's PCI transport is left out, and nothing else.
func TestNeededModule(t *testing.T) {
	for _, tc := range []struct {
		name string
		pci  bool
		want bool
	}{
		{"virtio_pci", false, false},
		{"virtio_pci_modern_dev", false, false},
		{"virtio_pci_legacy_dev", false, false},
		{"virtio_pci", true, true},
		{"virtio_pci_modern_dev", true, true},
		{"virtio_mmio", false, true},
		{"virtio_ring", false, true},
		{"virtio_blk", false, true},
		{"dm_crypt", false, true},
	} {
		if got := neededModule(tc.name, tc.pci); got != tc.want {
			t.Errorf("neededModule(%q, pci=%v) = %v, want %v", tc.name, tc.pci, got, tc.want)
		}
	}
}

// TestParseModuleList: names with their dependencies; a dependency must be listed before the
// module, a module once, and the list is bounded.
func TestParseModuleList(t *testing.T) {
	got, err := parseModuleList("virtio_ring\nvirtio\nvirtio_blk virtio virtio_ring\n\ndm_mod\n")
	if err != nil {
		t.Fatal(err)
	}
	want := []moduleLine{{"virtio_ring", nil}, {"virtio", nil}, {"virtio_blk", []string{"virtio", "virtio_ring"}}, {"dm_mod", nil}}
	if len(got) != len(want) {
		t.Fatalf("got %+v", got)
	}
	for i := range want {
		if got[i].name != want[i].name || strings.Join(got[i].deps, ",") != strings.Join(want[i].deps, ",") {
			t.Errorf("line %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	var tooMany string
	for i := range maxModules + 1 {
		tooMany += fmt.Sprintf("m%d\n", i)
	}
	for _, bad := range []string{
		"virtio_blk virtio\nvirtio\n", // dependency after the module
		"dm_crypt dm_mod\n",           // dependency not listed
		"virtio\nvirtio\n",            // twice
		"a a\n",                       // itself
		tooMany,
	} {
		if _, err := parseModuleList(bad); err == nil {
			t.Errorf("parseModuleList(%.40q) accepted", bad)
		}
	}
}

// TestLoadConcurrently: each module loads after its dependencies, independent ones at the
// same time, and every failure is returned.
func TestLoadConcurrently(t *testing.T) {
	mods := []moduleLine{{"virtio_ring", nil}, {"virtio", nil}, {"virtio_blk", []string{"virtio", "virtio_ring"}},
		{"dm_mod", nil}, {"dm_crypt", []string{"dm_mod"}}}
	var mu sync.Mutex
	loaded := map[string]bool{}
	// virtio_ring and dm_mod meet: neither finishes until both have started, which only
	// happens when independent modules load side by side.
	var meet sync.WaitGroup
	meet.Add(2)
	met := make(chan struct{})
	go func() { meet.Wait(); close(met) }()
	err := loadConcurrently(mods, func(name string) error {
		mu.Lock()
		for _, m := range mods {
			if m.name == name {
				for _, d := range m.deps {
					if !loaded[d] {
						t.Errorf("%s loads before its dependency %s", name, d)
					}
				}
			}
		}
		mu.Unlock()
		if name == "virtio_ring" || name == "dm_mod" {
			meet.Done()
			select {
			case <-met:
			case <-time.After(10 * time.Second):
				t.Errorf("%s: independent modules did not load side by side", name)
			}
		}
		mu.Lock()
		loaded[name] = true
		mu.Unlock()
		if name == "dm_crypt" || name == "virtio" {
			return fmt.Errorf("load module %s: no", name)
		}
		return nil
	})
	if len(loaded) != len(mods) {
		t.Errorf("loaded %v, want all of %d", loaded, len(mods))
	}
	if err == nil || !strings.Contains(err.Error(), "dm_crypt") || !strings.Contains(err.Error(), "virtio:") {
		t.Errorf("err = %v, want both failures", err)
	}
}
