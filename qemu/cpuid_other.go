//go:build !amd64

package qemu

// CBitPos is only known on x86-64.
func CBitPos() (int, bool) { return 0, false }
