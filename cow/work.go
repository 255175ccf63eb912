package cow

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// PrepareWork opens workdir/work, creating it if missing, and removes every
// stale entry left in it by a crash, so that no half-built copy survives a
// restart. The kernel makes it with mode 0 and reaches it through its
// capabilities; an unprivileged mounter has none, so strata makes it
// 0700 (and opens up a mode 0 one it owns, left by a kernel mount).
// workdir is an open directory fd of the work dir. It returns an fd of
// workdir/work.
func PrepareWork(workdir int) (int, error) {
	err := unix.Mkdirat(workdir, "work", 0o700)
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return -1, fmt.Errorf("create work dir: %w", err)
	}
	open := func() (int, error) {
		return unix.Openat(workdir, "work", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	}
	fd, err := open()
	if errors.Is(err, unix.EACCES) {
		if cerr := unix.Fchmodat(workdir, "work", 0o700, 0); cerr == nil {
			fd, err = open()
		}
	}
	if err != nil {
		return -1, fmt.Errorf("open work dir: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstatat(fd, "incompat/volatile", &st, unix.AT_SYMLINK_NOFOLLOW); err == nil {
		unix.Close(fd)
		return -1, ErrVolatileDirty
	}
	if err := clearWork(fd); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("clear work dir: %w", err)
	}
	return fd, nil
}

// ErrVolatileDirty: the work dir holds the kernel's volatile marker
// (work/incompat/volatile): a volatile mount of this upper dir ended
// without a sync, so the upper dir may have lost writes. The kernel refuses
// to mount it until the marker is removed by hand; so does strata.
var ErrVolatileDirty = errors.New("work/incompat/volatile exists: a volatile mount of this upper dir may have lost writes; check the upper dir, then remove the marker to mount it")

// clearWork removes the work dir's temporary entries; "incompat" holds the
// kernel's markers and stays.
func clearWork(fd int) error {
	names, err := ReadNames(fd)
	if err != nil {
		return err
	}
	for _, name := range names {
		if name == "incompat" {
			continue
		}
		if err := RemoveAllAt(fd, name); err != nil {
			return err
		}
	}
	return nil
}

// ClearDir removes everything inside the directory open as fd, recursively,
// without following symlinks.
func ClearDir(fd int) error {
	names, err := ReadNames(fd)
	if err != nil {
		return err
	}
	for _, name := range names {
		if err := RemoveAllAt(fd, name); err != nil {
			return err
		}
	}
	return nil
}

// RemoveAllAt removes name in dirfd and, for a directory, everything in it.
func RemoveAllAt(dirfd int, name string) error {
	err := unix.Unlinkat(dirfd, name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EPERM) {
		return fmt.Errorf("remove %q: %w", name, err)
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %q: %w", name, err)
	}
	// A dir with mode 0 (the kernel's work dirs) cannot be listed by a
	// non-owner; make it accessible first.
	_ = unix.Fchmod(fd, 0o700)
	err = ClearDir(fd)
	unix.Close(fd)
	if err != nil {
		return err
	}
	if err := unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove %q: %w", name, err)
	}
	return nil
}

// ReadNames lists the entries of the directory open as fd (which must not
// be O_PATH), without "." and "..".
func ReadNames(fd int) ([]string, error) {
	if _, err := unix.Seek(fd, 0, 0); err != nil {
		return nil, err
	}
	var names []string
	buf := make([]byte, 32<<10)
	for {
		n, err := unix.Getdents(fd, buf)
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			return names, nil
		}
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
}
