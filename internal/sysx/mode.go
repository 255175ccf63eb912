package sysx

import (
	"errors"

	"golang.org/x/sys/unix"
)

// Chmodat changes the mode of the entry name of dirfd (name "" for dirfd
// itself) without following a symlink: fchmodat2 with AT_SYMLINK_NOFOLLOW
// (Linux 6.6), else chmod through /proc/self/fd of an O_PATH fd. A symlink
// itself gives EOPNOTSUPP, as on any Linux filesystem.
func Chmodat(dirfd int, name string, mode uint32) error {
	flags := unix.AT_SYMLINK_NOFOLLOW
	if name == "" {
		flags |= unix.AT_EMPTY_PATH
	}
	err := unix.Fchmodat(dirfd, name, mode, flags)
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return err
	}
	fd := dirfd
	if name != "" {
		fd, err = unix.Openat(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return err
		}
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			return unix.EOPNOTSUPP
		}
	}
	return unix.Chmod(procPath(fd, ""), mode)
}
