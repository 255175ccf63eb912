package uniontest

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// splitRel splits a slash-separated path relative to a layer or mount root
// into its components. "" and "." are the root itself (no components).
func splitRel(rel string) []string {
	var parts []string
	for _, p := range strings.Split(rel, "/") {
		if p != "" && p != "." {
			parts = append(parts, p)
		}
	}
	return parts
}

// openDirs walks the directories comps from dirfd with openat, one
// component at a time and never following symlinks, so any depth and any
// total length work. With mkdir, missing directories are created with
// mode 0755 (then chmod'ed, whatever the umask) and reported to created.
// The returned fd is owned by the caller; it is a dup of dirfd when comps
// is empty.
func openDirs(dirfd int, comps []string, mkdir bool, created func(depth int)) (int, error) {
	fd, err := unix.Dup(dirfd)
	if err != nil {
		return -1, err
	}
	unix.CloseOnExec(fd)
	for i, c := range comps {
		next, err := unix.Openat(fd, c, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) && mkdir {
			if err = unix.Mkdirat(fd, c, 0o755); err == nil {
				err = unix.Fchmodat(fd, c, 0o755, 0)
			}
			if err == nil {
				if created != nil {
					created(i)
				}
				next, err = unix.Openat(fd, c, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			}
		}
		unix.Close(fd)
		if err != nil {
			return -1, fmt.Errorf("open dir %q: %w", strings.Join(comps[:i+1], "/"), err)
		}
		fd = next
	}
	return fd, nil
}

// openParent opens the parent directory of rel (relative to dirfd) and
// returns it with rel's last component. rel must name something below the
// root.
func openParent(dirfd int, rel string, mkdir bool, created func(depth int)) (int, string, error) {
	comps := splitRel(rel)
	if len(comps) == 0 {
		return -1, "", fmt.Errorf("path %q names the root", rel)
	}
	fd, err := openDirs(dirfd, comps[:len(comps)-1], mkdir, created)
	if err != nil {
		return -1, "", err
	}
	return fd, comps[len(comps)-1], nil
}

// dirent is one entry of a raw getdents64 listing.
type dirent struct {
	Name string
	Ino  uint64
	Type uint8 // DT_*
}

// readDirents lists an open directory with getdents64, exactly as the
// filesystem reports it: "." and "..", d_ino and d_type included, in the
// filesystem's order. (os.ReadDir drops "." and "..", and fills in
// DT_UNKNOWN types with lstat, hiding what the filesystem said.)
func readDirents(fd int) ([]dirent, error) {
	if _, err := unix.Seek(fd, 0, 0); err != nil {
		return nil, err
	}
	var out []dirent
	buf := make([]byte, 32<<10)
	for {
		n, err := unix.Getdents(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return out, nil
		}
		for b := buf[:n]; len(b) > 0; {
			// struct linux_dirent64 { u64 d_ino; s64 d_off; u16 d_reclen;
			// u8 d_type; char d_name[]; }
			if len(b) < 19 {
				return nil, fmt.Errorf("getdents: short record of %d bytes", len(b))
			}
			reclen := int(b[16]) | int(b[17])<<8
			if reclen < 19 || reclen > len(b) {
				return nil, fmt.Errorf("getdents: bad d_reclen %d", reclen)
			}
			ino := uint64(0)
			for i := 7; i >= 0; i-- {
				ino = ino<<8 | uint64(b[i])
			}
			name := b[19:reclen]
			if i := indexByte(name, 0); i >= 0 {
				name = name[:i]
			}
			out = append(out, dirent{Name: string(name), Ino: ino, Type: b[18]})
			b = b[reclen:]
		}
	}
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

// dtName names a d_type value.
func dtName(t uint8) string {
	switch t {
	case unix.DT_REG:
		return "file"
	case unix.DT_DIR:
		return "dir"
	case unix.DT_LNK:
		return "symlink"
	case unix.DT_FIFO:
		return "fifo"
	case unix.DT_CHR:
		return "char"
	case unix.DT_BLK:
		return "block"
	case unix.DT_SOCK:
		return "socket"
	case unix.DT_UNKNOWN:
		return "unknown"
	}
	return fmt.Sprintf("dt%d", t)
}

// typeName names the file type of a st_mode.
func typeName(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "file"
	case unix.S_IFDIR:
		return "dir"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFIFO:
		return "fifo"
	case unix.S_IFCHR:
		return "char"
	case unix.S_IFBLK:
		return "block"
	case unix.S_IFSOCK:
		return "socket"
	}
	return fmt.Sprintf("type%o", mode&unix.S_IFMT)
}

// readlinkAt reads a symlink's target, whatever its length.
func readlinkAt(dirfd int, name string) (string, error) {
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
}

// errnoName renders an error the way op logs and snapshots show it: the
// errno's symbolic name ("ENOENT"), "ok" for nil, or the text of any other
// error.
func errnoName(err error) string {
	if err == nil {
		return "ok"
	}
	var errno unix.Errno
	if errors.As(err, &errno) {
		if n := unix.ErrnoName(errno); n != "" {
			return n
		}
		return fmt.Sprintf("errno%d", int(errno))
	}
	return "error: " + err.Error()
}
