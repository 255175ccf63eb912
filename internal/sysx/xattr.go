package sysx

import (
	"errors"
	"strconv"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// xattrArgs is struct xattr_args of include/uapi/linux/xattr.h.
type xattrArgs struct {
	value uint64
	size  uint32
	flags uint32
}

// noXattrAt is set once the kernel answered ENOSYS to an *xattrat call;
// from then on the /proc/self/fd fallback is used.
var noXattrAt atomic.Bool

// atArgs returns the path and flags for an *xattrat call on name in
// dirfd: an empty name means dirfd itself, which must then be a directory
// (it is reached as "."; AT_EMPTY_PATH does not accept O_PATH fds).
// Symlinks are never followed.
func atArgs(name string) (string, int) {
	if name == "" {
		return ".", unix.AT_SYMLINK_NOFOLLOW
	}
	return name, unix.AT_SYMLINK_NOFOLLOW
}

// selfDenied reports whether an *xattrat call on dirfd itself failed
// only because "." is looked up in it: that needs search permission on
// the directory, which its owner lacks without CAP_DAC_OVERRIDE when the
// mode denies it (an unprivileged mounter on a mode-0 lower directory).
// The /proc/self/fd path reaches the directory without a lookup in it.
func selfDenied(name string, e unix.Errno) bool {
	return e == unix.EACCES && (name == "" || name == ".")
}

// procPath names the entry name of dirfd through procfs, for the fallback
// path of kernels before 6.13.
func procPath(dirfd int, name string) string {
	p := "/proc/self/fd/" + strconv.Itoa(dirfd)
	if name != "" && name != "." {
		p += "/" + name
	}
	return p
}

func bytePtr(b []byte) uint64 {
	if len(b) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(&b[0])))
}

// Getxattr reads attribute attr of the entry name of dirfd (name "" is
// dirfd itself) into dest and returns its size. With an empty dest it
// returns the size only. Symlinks are not followed.
func Getxattr(dirfd int, name, attr string, dest []byte) (int, error) {
	if !noXattrAt.Load() {
		path, flags := atArgs(name)
		p0, err := unix.BytePtrFromString(path)
		if err != nil {
			return 0, err
		}
		p1, err := unix.BytePtrFromString(attr)
		if err != nil {
			return 0, err
		}
		args := xattrArgs{value: bytePtr(dest), size: uint32(len(dest))}
		r, _, e := unix.Syscall6(unix.SYS_GETXATTRAT, uintptr(dirfd), uintptr(unsafe.Pointer(p0)), uintptr(flags),
			uintptr(unsafe.Pointer(p1)), uintptr(unsafe.Pointer(&args)), unsafe.Sizeof(args))
		if e != unix.ENOSYS && !selfDenied(name, e) {
			if e != 0 {
				return 0, e
			}
			return int(r), nil
		}
		if e == unix.ENOSYS {
			noXattrAt.Store(true)
		}
	}
	return unix.Lgetxattr(procPath(dirfd, name), attr, dest)
}

// Setxattr sets attribute attr of the entry name of dirfd. flags are
// XATTR_CREATE / XATTR_REPLACE or 0.
func Setxattr(dirfd int, name, attr string, data []byte, flags int) error {
	if !noXattrAt.Load() {
		path, atf := atArgs(name)
		p0, err := unix.BytePtrFromString(path)
		if err != nil {
			return err
		}
		p1, err := unix.BytePtrFromString(attr)
		if err != nil {
			return err
		}
		args := xattrArgs{value: bytePtr(data), size: uint32(len(data)), flags: uint32(flags)}
		_, _, e := unix.Syscall6(unix.SYS_SETXATTRAT, uintptr(dirfd), uintptr(unsafe.Pointer(p0)), uintptr(atf),
			uintptr(unsafe.Pointer(p1)), uintptr(unsafe.Pointer(&args)), unsafe.Sizeof(args))
		if e != unix.ENOSYS && !selfDenied(name, e) {
			if e != 0 {
				return e
			}
			return nil
		}
		if e == unix.ENOSYS {
			noXattrAt.Store(true)
		}
	}
	return unix.Lsetxattr(procPath(dirfd, name), attr, data, flags)
}

// Removexattr removes attribute attr of the entry name of dirfd.
func Removexattr(dirfd int, name, attr string) error {
	if !noXattrAt.Load() {
		path, atf := atArgs(name)
		p0, err := unix.BytePtrFromString(path)
		if err != nil {
			return err
		}
		p1, err := unix.BytePtrFromString(attr)
		if err != nil {
			return err
		}
		_, _, e := unix.Syscall6(unix.SYS_REMOVEXATTRAT, uintptr(dirfd), uintptr(unsafe.Pointer(p0)), uintptr(atf),
			uintptr(unsafe.Pointer(p1)), 0, 0)
		if e != unix.ENOSYS && !selfDenied(name, e) {
			if e != 0 {
				return e
			}
			return nil
		}
		if e == unix.ENOSYS {
			noXattrAt.Store(true)
		}
	}
	return unix.Lremovexattr(procPath(dirfd, name), attr)
}

// Listxattr writes the NUL-separated attribute names of the entry name of
// dirfd into dest and returns the length; with an empty dest, the length
// needed.
func Listxattr(dirfd int, name string, dest []byte) (int, error) {
	if !noXattrAt.Load() {
		path, atf := atArgs(name)
		p0, err := unix.BytePtrFromString(path)
		if err != nil {
			return 0, err
		}
		r, _, e := unix.Syscall6(unix.SYS_LISTXATTRAT, uintptr(dirfd), uintptr(unsafe.Pointer(p0)), uintptr(atf),
			uintptr(bytePtr(dest)), uintptr(len(dest)), 0)
		if e != unix.ENOSYS && !selfDenied(name, e) {
			if e != 0 {
				return 0, e
			}
			return int(r), nil
		}
		if e == unix.ENOSYS {
			noXattrAt.Store(true)
		}
	}
	return unix.Llistxattr(procPath(dirfd, name), dest)
}

// GetxattrAll reads the whole value of attr, growing the buffer as needed.
func GetxattrAll(dirfd int, name, attr string) ([]byte, error) {
	buf := make([]byte, 256)
	for {
		n, err := Getxattr(dirfd, name, attr, buf)
		if err == nil {
			return buf[:n], nil
		}
		if !errors.Is(err, unix.ERANGE) {
			return nil, err
		}
		size, err := Getxattr(dirfd, name, attr, nil)
		if err != nil {
			return nil, err
		}
		buf = make([]byte, size+64)
	}
}

// ListxattrAll returns the attribute names of the entry name of dirfd. A
// filesystem without xattr support gives an empty list.
func ListxattrAll(dirfd int, name string) ([]string, error) {
	buf := make([]byte, 1024)
	for {
		n, err := Listxattr(dirfd, name, buf)
		if err == nil {
			return SplitNames(buf[:n]), nil
		}
		if errors.Is(err, unix.EOPNOTSUPP) {
			return nil, nil
		}
		if !errors.Is(err, unix.ERANGE) {
			return nil, err
		}
		size, err := Listxattr(dirfd, name, nil)
		if err != nil {
			return nil, err
		}
		buf = make([]byte, size+256)
	}
}

// SplitNames splits a NUL-separated xattr name list.
func SplitNames(buf []byte) []string {
	var names []string
	start := 0
	for i, c := range buf {
		if c == 0 {
			if i > start {
				names = append(names, string(buf[start:i]))
			}
			start = i + 1
		}
	}
	return names
}

// IsNoAttr reports whether err means "no such attribute" (ENODATA) or "no
// xattr support here" (EOPNOTSUPP).
func IsNoAttr(err error) bool {
	return errors.Is(err, unix.ENODATA) || errors.Is(err, unix.EOPNOTSUPP)
}

// Readlinkat returns the target of the symlink name in dirfd ("" for
// dirfd itself, an O_PATH fd of the link), whatever its length.
func Readlinkat(dirfd int, name string) (string, error) {
	buf := make([]byte, 256)
	for {
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return "", err
		}
		if n < len(buf) {
			return string(buf[:n]), nil
		}
		buf = make([]byte, len(buf)*4)
	}
}
