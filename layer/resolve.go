package layer

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"strata/whiteout"
)

// refusal is an entry that must not be written (it would escape the
// target or go through a symlink). The unpacker lists it and moves on.
type refusal struct{ reason string }

func (r *refusal) Error() string { return r.reason }

func refusef(format string, a ...any) error { return &refusal{fmt.Sprintf(format, a...)} }

// splitName turns a tar entry name into path components below the target.
// Leading slashes are dropped (an absolute name is taken as relative, as
// GNU tar and containerd do); "" and "." components are dropped; a ".."
// component anywhere refuses the name, even where it would stay inside
// (no legitimate layer needs one, and refusing is simpler to trust than
// resolving). Each component must be a valid directory entry name.
func splitName(name string) ([]string, error) {
	var parts []string
	for _, p := range strings.Split(name, "/") {
		switch p {
		case "", ".":
			continue
		case "..":
			return nil, refusef("name has a \"..\" component")
		}
		if err := whiteout.CheckName(p); err != nil {
			return nil, refusef("invalid name component: %v", err)
		}
		parts = append(parts, p)
	}
	return parts, nil
}

// maxCachedDirs bounds the open directory fds the unpacker keeps between
// entries. Archives list entries of one directory together, so a small
// cache catches nearly every lookup.
const maxCachedDirs = 256

// dirCache resolves directories below the unpack root to open fds. Every
// component is opened relative to its (already verified) parent with
// O_NOFOLLOW|O_DIRECTORY: a symlink or a non-directory anywhere on the way
// is never followed, so nothing an archive creates can redirect a later
// write outside the root. Components are never "..": see [splitName].
//
// Fds handed out stay valid until [dirCache.endEntry]: invalidated ones
// (their directory was removed) are parked, not closed, so that a caller
// never uses a closed fd number that a later open could have reused.
type dirCache struct {
	root int
	ns   whiteout.NS // of the opaque attribute, for replaced whiteouts
	fds  map[string]int
	dead []int
}

func newDirCache(root int, ns whiteout.NS) *dirCache {
	return &dirCache{root: root, ns: ns, fds: map[string]int{}}
}

// get returns an fd of the directory parts (the root for none). With
// create, missing directories are made (mode 0755, as tar does for
// implied parents).
func (c *dirCache) get(parts []string, create bool) (int, error) {
	if len(parts) == 0 {
		return c.root, nil
	}
	key := strings.Join(parts, "/")
	if fd, ok := c.fds[key]; ok {
		return fd, nil
	}
	parent, err := c.get(parts[:len(parts)-1], create)
	if err != nil {
		return -1, err
	}
	name := parts[len(parts)-1]
	fd, err := openDir(parent, name)
	if errors.Is(err, unix.ENOTDIR) && create && c.isWhiteout(parent, name) {
		// ".wh.d" then "d/f" in one layer: the lower d is deleted and
		// this layer's d replaces it, which the kernel format says with
		// an opaque directory.
		if err := unix.Unlinkat(parent, name, 0); err != nil {
			return -1, fmt.Errorf("replace whiteout %q: %w", key, err)
		}
		fd, err = c.mkdir(parent, name, key)
		if err == nil {
			err = whiteout.SetOpaque(fd, "", c.ns)
		}
		if err != nil {
			return -1, err
		}
	} else if errors.Is(err, unix.ENOENT) && create {
		fd, err = c.mkdir(parent, name, key)
		if err != nil && !errors.Is(err, unix.ENOTDIR) && !errors.Is(err, unix.ELOOP) {
			return -1, err
		}
	}
	switch {
	case err == nil:
	case errors.Is(err, unix.ELOOP), errors.Is(err, unix.ENOTDIR):
		var st unix.Stat_t
		if unix.Fstatat(parent, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
			return -1, refusef("parent %q is a symlink (never followed)", key)
		}
		return -1, refusef("parent %q is not a directory", key)
	case errors.Is(err, unix.ENOENT):
		return -1, refusef("%q not in the archive", key)
	default:
		return -1, fmt.Errorf("open directory %q: %w", key, err)
	}
	c.fds[key] = fd
	return fd, nil
}

// mkdir makes the implied directory name in parent, mode 0755, and opens
// it.
func (c *dirCache) mkdir(parent int, name, key string) (int, error) {
	if err := unix.Mkdirat(parent, name, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
		return -1, fmt.Errorf("mkdir %q: %w", key, err)
	}
	fd, err := openDir(parent, name)
	if err != nil {
		return -1, err
	}
	// The umask must not decide the mode of an implied parent.
	if err := unix.Fchmod(fd, 0o755); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("chmod %q: %w", key, err)
	}
	return fd, nil
}

// isWhiteout reports whether name in dirfd is a 0/0 character device.
func (c *dirCache) isWhiteout(dirfd int, name string) bool {
	var st unix.Stat_t
	return unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && whiteout.IsCharWhiteout(&st)
}

// invalidate forgets the directory key and everything below it, after it
// was removed or replaced.
func (c *dirCache) invalidate(key string) {
	for k, fd := range c.fds {
		if k == key || strings.HasPrefix(k, key+"/") {
			c.dead = append(c.dead, fd)
			delete(c.fds, k)
		}
	}
}

// endEntry closes the fds invalidated while handling an entry and trims
// the cache.
func (c *dirCache) endEntry() {
	for _, fd := range c.dead {
		unix.Close(fd)
	}
	c.dead = c.dead[:0]
	if len(c.fds) > maxCachedDirs {
		for k, fd := range c.fds {
			unix.Close(fd)
			delete(c.fds, k)
		}
	}
}

// close closes every fd except the root.
func (c *dirCache) close() {
	c.endEntry()
	for k, fd := range c.fds {
		unix.Close(fd)
		delete(c.fds, k)
	}
}

func openDir(dirfd int, name string) (int, error) {
	return unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
}

// RemoveAll removes path and everything below it, like [os.RemoveAll],
// but it never follows a symlink and it makes read-only directories
// writable on the way (a rootless unpack can leave directories of mode
// 0555 that even their owner cannot empty otherwise). A missing path is
// not an error.
func RemoveAll(path string) error {
	dir, name := splitPath(path)
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("remove %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := removeAllAt(fd, name); err != nil {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

func splitPath(path string) (dir, name string) {
	path = strings.TrimRight(path, "/")
	i := strings.LastIndexByte(path, '/')
	switch {
	case i < 0:
		return ".", path
	case i == 0:
		return "/", path[1:]
	}
	return path[:i], path[i+1:]
}

// removeAllAt removes name in dirfd and, if it is a directory, its
// contents; symlinks are removed, never followed.
func removeAllAt(dirfd int, name string) error {
	err := unix.Unlinkat(dirfd, name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EPERM) {
		return fmt.Errorf("unlink %q: %w", name, err)
	}
	fd, oerr := openDir(dirfd, name)
	if oerr != nil {
		if errors.Is(oerr, unix.ENOTDIR) || errors.Is(oerr, unix.ELOOP) {
			return fmt.Errorf("unlink %q: %w", name, err)
		}
		return fmt.Errorf("open %q: %w", name, oerr)
	}
	// Owner (or root) may always chmod; a failure surfaces below.
	_ = unix.Fchmod(fd, 0o700)
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	// Read all names, remove them, and read again: removing entries while
	// reading a directory in batches may skip some on some filesystems.
	for range 3 {
		if _, err := f.Seek(0, 0); err != nil {
			return fmt.Errorf("rewind %q: %w", name, err)
		}
		names, err := f.Readdirnames(-1)
		if err != nil {
			return fmt.Errorf("read %q: %w", name, err)
		}
		for _, n := range names {
			if err := removeAllAt(fd, n); err != nil {
				return err
			}
		}
		err = unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.ENOTEMPTY) {
			return fmt.Errorf("rmdir %q: %w", name, err)
		}
	}
	return fmt.Errorf("rmdir %q: %w", name, unix.ENOTEMPTY)
}
