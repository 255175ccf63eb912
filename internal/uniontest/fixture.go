package uniontest

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/internal/sysx"
	"strata/whiteout"
)

// FixtureMtime and FixtureAtime are the times every fixture object gets
// unless a [Times] applier sets others. They are far in the past (and carry
// nanoseconds), so a time preserved by copy-up compares exactly while a
// time changed during the test shows as "recent".
var (
	FixtureMtime = time.Date(2001, 2, 3, 4, 5, 6, 123456789, time.UTC)
	FixtureAtime = time.Date(2001, 2, 3, 4, 0, 0, 987654321, time.UTC)
)

// Layer is the content of one layer directory, built by applying its
// appliers in order.
type Layer []Applier

// Applier changes a layer under construction. Paths are relative to the
// layer root, slash-separated; missing parent directories are created with
// mode 0755.
type Applier interface {
	Apply(b *Builder) error
	String() string
}

// Builder is a layer being built.
type Builder struct {
	// Root is the layer directory.
	Root string
	// NS is the namespace of overlay-private xattrs (whiteouts, opacity).
	NS whiteout.NS

	rootfd int
	times  map[string][2]time.Time // explicit times by path: {atime, mtime}
}

// Parent opens the parent directory of path, creating missing directories,
// and returns it (the caller closes it) with path's last component.
func (b *Builder) Parent(path string) (int, string, error) {
	return openParent(b.rootfd, path, true, nil)
}

// Dir opens the directory path itself ("" for the root), creating it if
// missing. The caller closes the fd.
func (b *Builder) Dir(path string) (int, error) {
	return openDirs(b.rootfd, splitRel(path), true, nil)
}

// At runs f on the parent of path and path's last component.
func (b *Builder) At(path string, f func(dirfd int, name string) error) error {
	fd, name, err := b.Parent(path)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return f(fd, name)
}

type applier struct {
	desc string
	fn   func(b *Builder) error
}

func (a applier) Apply(b *Builder) error {
	if err := a.fn(b); err != nil {
		return fmt.Errorf("%s: %w", a.desc, err)
	}
	return nil
}
func (a applier) String() string { return a.desc }

// need is a privilege an applier may need beyond what a user has over
// the files it creates (see [Unprivileged]).
type need int

const (
	needOwner  need = iota + 1 // chown: to ids other than the builder's, CAP_CHOWN
	needDevice                 // a device node other than a 0/0 whiteout: CAP_MKNOD
	needXattr                  // trusted.* (CAP_SYS_ADMIN) or security.* xattrs
)

// privileged is an applier that may need privilege; uid and gid are the
// owner a needOwner applier sets.
type privileged struct {
	applier
	need     need
	uid, gid int
}

// Func is an applier for anything the named ones do not cover.
func Func(desc string, fn func(b *Builder) error) Applier { return applier{desc, fn} }

// File creates a regular file with content and mode (permission bits
// including setuid/setgid/sticky; applied exactly, whatever the umask).
func File(path, content string, mode uint32) Applier {
	return applier{fmt.Sprintf("file %q %#o len=%d", path, mode, len(content)), func(b *Builder) error {
		return b.At(path, func(dirfd int, name string) error {
			fd, err := unix.Openat(dirfd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			for data := []byte(content); len(data) > 0; {
				n, err := unix.Write(fd, data)
				if err != nil {
					return err
				}
				data = data[n:]
			}
			return unix.Fchmod(fd, mode)
		})
	}}
}

// SparseFile creates a regular file of size bytes that holds data only at
// the given offsets; the rest are holes.
func SparseFile(path string, size int64, data map[int64]string, mode uint32) Applier {
	return applier{fmt.Sprintf("sparse file %q size=%d extents=%d", path, size, len(data)), func(b *Builder) error {
		return b.At(path, func(dirfd int, name string) error {
			fd, err := unix.Openat(dirfd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			if err := unix.Ftruncate(fd, size); err != nil {
				return err
			}
			for off, s := range data {
				if _, err := unix.Pwrite(fd, []byte(s), off); err != nil {
					return err
				}
			}
			return unix.Fchmod(fd, mode)
		})
	}}
}

// Dir creates a directory (and any missing parents) with mode.
func Dir(path string, mode uint32) Applier {
	return applier{fmt.Sprintf("dir %q %#o", path, mode), func(b *Builder) error {
		return b.At(path, func(dirfd int, name string) error {
			if err := unix.Mkdirat(dirfd, name, 0o700); err != nil {
				return err
			}
			return unix.Fchmodat(dirfd, name, mode, 0)
		})
	}}
}

// Symlink creates a symlink at path pointing to target.
func Symlink(path, target string) Applier {
	return applier{fmt.Sprintf("symlink %q -> %q", path, target), func(b *Builder) error {
		return b.At(path, func(dirfd int, name string) error { return unix.Symlinkat(target, dirfd, name) })
	}}
}

// Link creates path as a hard link to existing, an entry of the same layer.
func Link(path, existing string) Applier {
	return applier{fmt.Sprintf("link %q => %q", path, existing), func(b *Builder) error {
		ofd, oname, err := b.Parent(existing)
		if err != nil {
			return err
		}
		defer unix.Close(ofd)
		return b.At(path, func(dirfd int, name string) error { return unix.Linkat(ofd, oname, dirfd, name, 0) })
	}}
}

func mknod(desc, path string, mode uint32, dev uint64) applier {
	return applier{desc, func(b *Builder) error {
		return b.At(path, func(dirfd int, name string) error {
			if err := unix.Mknodat(dirfd, name, mode, int(dev)); err != nil {
				return err
			}
			return unix.Fchmodat(dirfd, name, mode&0o7777, 0)
		})
	}}
}

// Fifo creates a named pipe with mode 0644.
func Fifo(path string) Applier {
	return mknod(fmt.Sprintf("fifo %q", path), path, unix.S_IFIFO|0o644, 0)
}

// CharDev creates a character device node with mode 0644.
func CharDev(path string, major, minor uint32) Applier {
	a := mknod(fmt.Sprintf("char %q %d:%d", path, major, minor), path, unix.S_IFCHR|0o644, unix.Mkdev(major, minor))
	if major == 0 && minor == 0 {
		return a // any user may make a whiteout (Linux >= 5.8)
	}
	return privileged{a, needDevice, 0, 0}
}

// BlockDev creates a block device node with mode 0644.
func BlockDev(path string, major, minor uint32) Applier {
	return privileged{mknod(fmt.Sprintf("block %q %d:%d", path, major, minor), path, unix.S_IFBLK|0o644, unix.Mkdev(major, minor)), needDevice, 0, 0}
}

// Socket creates a unix socket node with mode 0755 (by mknod, so nothing
// listens on it).
func Socket(path string) Applier {
	return mknod(fmt.Sprintf("socket %q", path), path, unix.S_IFSOCK|0o755, 0)
}

// Whiteout creates the kernel's classic whiteout (char 0/0) at path.
func Whiteout(path string) Applier {
	return applier{fmt.Sprintf("whiteout %q", path), func(b *Builder) error {
		return b.At(path, func(dirfd int, name string) error { return whiteout.Create(dirfd, name) })
	}}
}

// XattrWhiteout creates an xattr whiteout (a zero-size file with the
// overlay.whiteout xattr) at path and marks its parent directory opaque "x"
// so that readdir filters it (Linux 6.7+). Lookups honour xattr whiteouts
// in any directory; use [XattrWhiteoutOnly] to leave the parent unmarked.
func XattrWhiteout(path string) Applier {
	return applier{fmt.Sprintf("xattr whiteout %q (parent x)", path), func(b *Builder) error {
		return b.At(path, func(dirfd int, name string) error {
			if err := whiteout.CreateXattr(dirfd, name, b.NS); err != nil {
				return err
			}
			return whiteout.SetOpacity(dirfd, "", b.NS, whiteout.XattrWhiteouts)
		})
	}}
}

// XattrWhiteoutOnly creates an xattr whiteout at path without marking its
// parent "x".
func XattrWhiteoutOnly(path string) Applier {
	return applier{fmt.Sprintf("xattr whiteout %q (parent unmarked)", path), func(b *Builder) error {
		return b.At(path, func(dirfd int, name string) error { return whiteout.CreateXattr(dirfd, name, b.NS) })
	}}
}

// Opaque marks the directory dir opaque ("y"), creating it if missing.
func Opaque(dir string) Applier {
	return applier{fmt.Sprintf("opaque %q", dir), func(b *Builder) error {
		fd, err := b.Dir(dir)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return whiteout.SetOpacity(fd, "", b.NS, whiteout.Opaque)
	}}
}

// Xattr sets the extended attribute name on path (not following a
// symlink).
func Xattr(path, name, value string) Applier {
	a := applier{fmt.Sprintf("xattr %q %s=%q", path, name, value), func(b *Builder) error {
		return b.at(path, func(dirfd int, n string) error { return sysx.Setxattr(dirfd, n, name, []byte(value), 0) })
	}}
	if strings.HasPrefix(name, "trusted.") || strings.HasPrefix(name, "security.") {
		return privileged{a, needXattr, 0, 0}
	}
	return a
}

// PrivateXattr sets the overlay-private xattr "<ns>.overlay.<suffix>" of
// the fixture's namespace on path.
func PrivateXattr(path, suffix, value string) Applier {
	return applier{fmt.Sprintf("private xattr %q overlay.%s=%q", path, suffix, value), func(b *Builder) error {
		return b.at(path, func(dirfd int, n string) error {
			return sysx.Setxattr(dirfd, n, b.NS.Prefix()+suffix, []byte(value), 0)
		})
	}}
}

// at is At that also accepts the root ("" or ".").
func (b *Builder) at(path string, f func(dirfd int, name string) error) error {
	if len(splitRel(path)) == 0 {
		return f(b.rootfd, "")
	}
	return b.At(path, f)
}

// Chown changes the owner of path (not following a symlink). The mode is
// kept as it was, setuid/setgid included (chown(2) alone clears them).
func Chown(path string, uid, gid int) Applier {
	return privileged{chown(path, uid, gid), needOwner, uid, gid}
}

func chown(path string, uid, gid int) applier {
	return applier{fmt.Sprintf("chown %q %d:%d", path, uid, gid), func(b *Builder) error {
		return b.at(path, func(dirfd int, name string) error {
			var st unix.Stat_t
			flags := unix.AT_SYMLINK_NOFOLLOW
			if name == "" {
				flags |= unix.AT_EMPTY_PATH
			}
			if err := unix.Fstatat(dirfd, name, &st, flags); err != nil {
				return err
			}
			if err := unix.Fchownat(dirfd, name, uid, gid, flags); err != nil {
				return err
			}
			if st.Mode&unix.S_IFMT == unix.S_IFLNK {
				return nil
			}
			return sysx.Chmodat(dirfd, name, st.Mode&0o7777)
		})
	}}
}

// Chmod sets the permission bits (including setuid/setgid/sticky) of path.
func Chmod(path string, mode uint32) Applier {
	return applier{fmt.Sprintf("chmod %q %#o", path, mode), func(b *Builder) error {
		return b.at(path, func(dirfd int, name string) error { return sysx.Chmodat(dirfd, name, mode) })
	}}
}

// Times sets the access and modification times of path (not following a
// symlink) instead of the fixture times.
func Times(path string, atime, mtime time.Time) Applier {
	return applier{fmt.Sprintf("times %q a=%s m=%s", path, atime.Format(time.RFC3339Nano), mtime.Format(time.RFC3339Nano)), func(b *Builder) error {
		b.times[strings.Join(splitRel(path), "/")] = [2]time.Time{atime, mtime}
		return nil
	}}
}

// BuildLayer creates dir (if missing) and builds layer in it, with
// overlay-private xattrs in namespace ns, then gives every object its
// fixture times (deepest first, so that setting a child's times cannot
// touch its parent's). It fails t on any error.
func BuildLayer(t testing.TB, dir string, ns whiteout.NS, layer Layer) {
	t.Helper()
	if err := buildLayer(dir, ns, layer); err != nil {
		t.Fatalf("build layer %s: %v", dir, err)
	}
}

func buildLayer(dir string, ns whiteout.NS, layer Layer) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	b := &Builder{Root: dir, NS: ns, rootfd: fd, times: map[string][2]time.Time{}}
	for _, a := range layer {
		if err := a.Apply(b); err != nil {
			return err
		}
	}
	return b.setTimes(fd, "", "")
}

// setTimes gives name in dirfd (dirfd itself when name is "") and
// everything below it its times, children first.
func (b *Builder) setTimes(dirfd int, name, rel string) error {
	var st unix.Stat_t
	flags := unix.AT_SYMLINK_NOFOLLOW
	if name == "" {
		flags |= unix.AT_EMPTY_PATH
	}
	if err := unix.Fstatat(dirfd, name, &st, flags); err != nil {
		return fmt.Errorf("times %q: %w", rel, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		fd := dirfd
		if name != "" {
			var err error
			fd, err = unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if errors.Is(err, unix.EACCES) && st.Mode&0o500 != 0o500 {
				// Without CAP_DAC_OVERRIDE its owner must open it up
				// for a moment (chmod changes only the ctime).
				fd, err = openOwnDir(dirfd, name, st.Mode&0o7777)
			}
			if err != nil {
				return fmt.Errorf("times %q: %w", rel, err)
			}
			defer unix.Close(fd)
		}
		ents, err := readDirents(fd)
		if err != nil {
			return fmt.Errorf("times %q: %w", rel, err)
		}
		sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
		for _, e := range ents {
			if e.Name == "." || e.Name == ".." {
				continue
			}
			if err := b.setTimes(fd, e.Name, joinRel(rel, e.Name)); err != nil {
				return err
			}
		}
	}
	at, mt := FixtureAtime, FixtureMtime
	if tt, ok := b.times[rel]; ok {
		at, mt = tt[0], tt[1]
	}
	ts := []unix.Timespec{unix.NsecToTimespec(at.UnixNano()), unix.NsecToTimespec(mt.UnixNano())}
	if name == "" {
		// utimensat(fd, NULL, ...) is futimens: the directory itself.
		return unix.UtimesNanoAt(dirfd, ".", ts, unix.AT_SYMLINK_NOFOLLOW)
	}
	return unix.UtimesNanoAt(dirfd, name, ts, unix.AT_SYMLINK_NOFOLLOW)
}

// openOwnDir opens the directory name in dirfd, whose permissions mode
// keep its owner out, by adding u+rx for the open and restoring mode.
func openOwnDir(dirfd int, name string, mode uint32) (int, error) {
	if err := sysx.Chmodat(dirfd, name, mode|0o500); err != nil {
		return -1, err
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if cerr := sysx.Chmodat(dirfd, name, mode); cerr != nil && err == nil {
		unix.Close(fd)
		return -1, cerr
	}
	return fd, err
}

// joinRel joins a relative path and a name; the root is "".
func joinRel(rel, name string) string {
	if rel == "" {
		return name
	}
	return rel + "/" + name
}
