// Package images builds what a QEMU guest boots: the uncompressed kernel (vmlinux) from
// Debian's kernel package, the modules it needs, and an initramfs whose /init is the static
// svsm-guest, with cryptsetup for in-guest dm-crypt.
package images

import (
	"fmt"
	"io"
	"strings"
)

// CPIO writes a "newc" cpio archive (the initramfs format). Unlike the cpio writers on the
// module proxy it can create device nodes (/dev/console).
type CPIO struct {
	w   io.Writer
	ino uint32
	err error
}

// NewCPIO writes to w.
func NewCPIO(w io.Writer) *CPIO { return &CPIO{w: w, ino: 1} }

const (
	modeDir  = 0o040000
	modeFile = 0o100000
	modeLink = 0o120000
	modeChr  = 0o020000
)

func (c *CPIO) entry(name string, mode uint32, data []byte, rmajor, rminor uint32) {
	if c.err != nil {
		return
	}
	name = strings.TrimPrefix(name, "/")
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	c.ino++
	buf := append([]byte(hdr), name...)
	buf = append(buf, 0)
	buf = pad4(buf)
	buf = append(buf, data...)
	buf = pad4(buf)
	_, c.err = c.w.Write(buf)
}

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// Dir adds a directory.
func (c *CPIO) Dir(name string) { c.entry(name, modeDir|0o755, nil, 0, 0) }

// File adds a regular file.
func (c *CPIO) File(name string, perm uint32, data []byte) { c.entry(name, modeFile|perm, data, 0, 0) }

// Symlink adds a symbolic link to target.
func (c *CPIO) Symlink(name, target string) { c.entry(name, modeLink|0o777, []byte(target), 0, 0) }

// CharDev adds a character device node.
func (c *CPIO) CharDev(name string, perm, major, minor uint32) {
	c.entry(name, modeChr|perm, nil, major, minor)
}

// Close writes the trailer and reports the first error.
func (c *CPIO) Close() error {
	c.entry("TRAILER!!!", 0, nil, 0, 0)
	return c.err
}
