package images

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"
)

// GuestModules are the modules the guest loads, in this order (dependencies first, resolved
// from .modinfo): virtio-mmio (microvm) and virtio-pci (q35) transports, block, serial
// ports, entropy (cryptsetup stalls without it), device-mapper and dm-crypt with XTS. xts only soft-depends on ecb, so ecb is
// named explicitly.
var GuestModules = []string{"virtio_mmio", "virtio_pci", "virtio_blk", "virtio_console", "virtio_rng", "dm_mod", "dm_crypt", "ecb", "xts"}

// ModuleListPath is where the initramfs lists its modules, one per line in load order, each
// followed by the modules it depends on (.modinfo "depends="), separated by spaces.
const ModuleListPath = "etc/svsm-e2e/modules"

// builderVersion changes whenever the initramfs layout changes (part of the content hash).
const builderVersion = "initramfs-v3" // v2: /init without its symbol table; v3: module dependencies listed

// InitramfsSpec is what goes into the initramfs.
type InitramfsSpec struct {
	Guest      string // static svsm-guest, becomes /init
	Modules    []Module
	Cryptsetup string // default: cryptsetup from PATH
}

// files lists (path in image → host file) for cryptsetup, its libraries and the loader.
func (s *InitramfsSpec) files(ctx context.Context) (map[string]string, error) {
	cs := s.Cryptsetup
	if cs == "" {
		p, err := exec.LookPath("cryptsetup")
		if err != nil {
			return nil, fmt.Errorf("cryptsetup not found (Debian package cryptsetup-bin): %w", err)
		}
		cs = p
	}
	out := map[string]string{"usr/sbin/cryptsetup": cs}
	ldd, err := run(ctx, "", "ldd", cs)
	if err != nil {
		return nil, err
	}
	re := regexp.MustCompile(`(?m)(?:=>\s*)?(/\S+)\s+\(0x`)
	for _, m := range re.FindAllStringSubmatch(string(ldd), -1) {
		out[strings.TrimPrefix(m[1], "/")] = m[1]
	}
	// argon2id's threads need libgcc_s, which ldd does not list (it is dlopened).
	for _, p := range []string{"/lib/x86_64-linux-gnu/libgcc_s.so.1", "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1"} {
		if _, err := os.Stat(p); err == nil {
			out[strings.TrimPrefix(p, "/")] = p
			break
		}
	}
	return out, nil
}

// Hash is the content hash of everything that goes into the image.
func (s *InitramfsSpec) Hash(ctx context.Context) (string, error) {
	h := sha256.New()
	fmt.Fprintln(h, builderVersion)
	add := func(name, path string) error {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s %x\n", name, sha256.Sum256(b))
		return nil
	}
	if err := add("init", s.Guest); err != nil {
		return "", err
	}
	for _, m := range s.Modules {
		if err := add(m.Name, m.Path); err != nil {
			return "", err
		}
	}
	files, err := s.files(ctx)
	if err != nil {
		return "", err
	}
	names := make([]string, 0, len(files))
	for k := range files {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		if err := add(k, files[k]); err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// StripSymbols returns the executable at path without its symbol table and debug sections
// (objcopy --strip-all, binutils, which cgo's gcc brings). A VM's firmware measures /init,
// hashing every byte in each PCR bank at each boot, and the kernel unpacks every byte: the
// symbol table is 11 % of svsm-guest (1.6 MB), which needs none of it to run (Go's own
// stack traces use .gopclntab). The shipped bin/svsm-guest keeps it (vtpm.CheckBinary).
func StripSymbols(ctx context.Context, path string) ([]byte, error) {
	dir, err := os.MkdirTemp("", "svsm-e2e-strip-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "stripped")
	if _, err := run(ctx, "", "objcopy", "--strip-all", path, out); err != nil {
		return nil, fmt.Errorf("strip %s (objcopy from Debian package binutils): %w", path, err)
	}
	return os.ReadFile(out)
}

// BuildInitramfs writes the uncompressed newc archive to out (gzip costs more than it saves
// under TCG).
func BuildInitramfs(ctx context.Context, s *InitramfsSpec, out string) error {
	var buf bytes.Buffer
	c := NewCPIO(&buf)
	for _, d := range []string{"dev", "proc", "sys", "run", "tmp", "etc", "etc/svsm-e2e", "lib", "lib/modules", "usr", "usr/sbin", "mnt"} {
		c.Dir(d)
	}
	c.CharDev("dev/console", 0o600, 5, 1)
	c.CharDev("dev/null", 0o666, 1, 3)
	init, err := StripSymbols(ctx, s.Guest)
	if err != nil {
		return err
	}
	c.File("init", 0o755, init)
	var list strings.Builder
	for _, m := range s.Modules {
		b, err := os.ReadFile(m.Path) // Debian 12 ships modules uncompressed
		if err != nil {
			return err
		}
		c.File("lib/modules/"+m.Name+".ko", 0o644, b)
		// "name dependency...": the guest loads modules side by side, each after its own.
		list.WriteString(strings.Join(append([]string{m.Name}, canonAll(m.Depends)...), " ") + "\n")
	}
	c.File(ModuleListPath, 0o644, []byte(list.String()))
	files, err := s.files(ctx)
	if err != nil {
		return err
	}
	names := make([]string, 0, len(files))
	for k := range files {
		names = append(names, k)
	}
	sort.Strings(names)
	made := map[string]bool{}
	for _, k := range names {
		for dir := filepath.Dir(k); dir != "." && !made[dir]; dir = filepath.Dir(dir) {
			made[dir] = true
		}
	}
	dirs := make([]string, 0, len(made))
	for d := range made {
		dirs = append(dirs, d)
	}
	sort.Strings(dirs) // parents sort before children
	for _, d := range dirs {
		c.Dir(d)
	}
	for _, k := range names {
		b, err := os.ReadFile(files[k]) // follows symlinks: the image holds real files
		if err != nil {
			return err
		}
		c.File(k, 0o755, b)
	}
	if err := c.Close(); err != nil {
		return err
	}
	tmp := out + ".tmp"
	if err := os.WriteFile(tmp, buf.Bytes(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}

// Image is a bootable kernel + initramfs pair.
type Image struct {
	Kernel    *Kernel
	Initramfs string
	Hash      string
}

// Options for Ensure.
type Options struct {
	Cache string // where downloads and images live
	Guest string // static svsm-guest
}

// Ensure fetches the kernel and builds the initramfs unless an image with the same content
// hash is already in the cache.
func Ensure(ctx context.Context, o Options) (*Image, error) {
	pkg, err := KernelPackage(ctx)
	if err != nil {
		return nil, err
	}
	k, err := FetchKernel(ctx, o.Cache, pkg)
	if err != nil {
		return nil, err
	}
	mods, err := ResolveModules(k.ModulesDir, GuestModules)
	if err != nil {
		return nil, err
	}
	spec := &InitramfsSpec{Guest: o.Guest, Modules: mods}
	hash, err := spec.Hash(ctx)
	if err != nil {
		return nil, err
	}
	img := &Image{Kernel: k, Hash: hash, Initramfs: filepath.Join(o.Cache, "initramfs-"+hash+".cpio")}
	if _, err := os.Stat(img.Initramfs); err == nil {
		return img, nil
	}
	if err := BuildInitramfs(ctx, spec, img.Initramfs); err != nil {
		return nil, fmt.Errorf("build initramfs: %w", err)
	}
	pruneOld(o.Cache, img.Initramfs)
	return img, nil
}

// pruneOld removes initramfs images of earlier inputs that nobody has touched for an hour.
func pruneOld(cache, keep string) {
	old, _ := filepath.Glob(filepath.Join(cache, "initramfs-*.cpio"))
	for _, p := range old {
		if fi, err := os.Stat(p); err == nil && p != keep && time.Since(fi.ModTime()) > time.Hour {
			_ = os.Remove(p)
		}
	}
}
