package cow

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"strata/internal/sysx"
	"strata/whiteout"
)

// ErrNotCopyable is returned for an object of a type that cannot be copied.
var ErrNotCopyable = errors.New("file type cannot be copied up")

// Options configure a Copier.
type Options struct {
	// WorkFd is an open directory fd of workdir/work, on the same
	// filesystem as the upper layer.
	WorkFd int
	// NS is the private xattr namespace: its attributes are never copied.
	NS whiteout.NS
	// NoSync skips the fsync of copied data (kernel "volatile").
	NoSync bool
	// Logger receives warnings about metadata that could not be copied; nil
	// discards them.
	Logger *slog.Logger
}

// Copier copies objects into the upper layer through the work dir.
type Copier struct {
	opts Options
	log  *slog.Logger
	seq  atomic.Uint64
	// privileged: chown to another owner is possible. Without it, objects
	// keep the mounter's ownership, as for any file the mounter creates.
	privileged bool
}

// New returns a Copier.
func New(opts Options) *Copier {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Copier{opts: opts, log: log, privileged: os.Geteuid() == 0}
}

// TempName returns a fresh name for a temporary entry in the work dir. The
// "#" prefix is the kernel's own for work dir temporaries.
func (c *Copier) TempName() string {
	return "#strata." + strconv.Itoa(os.Getpid()) + "." + strconv.FormatUint(c.seq.Add(1), 16)
}

// WorkFd returns the work dir fd.
func (c *Copier) WorkFd() int { return c.opts.WorkFd }

// Object copies the object srcName of srcDir, whose lstat result is st, to
// dstName in dstDir: a regular file with its data, a directory without its
// contents, a symlink, a fifo, a socket or a device node, each with owner,
// mode, xattrs (private ones excepted) and times. It is built in the work
// dir and renamed into dstDir with RENAME_NOREPLACE, so dstName appears
// complete or not at all. dstDir's own times are restored afterwards, as
// the kernel does, so copy-up does not show as a change of the parent.
//
// Preconditions:
//   - the caller serialises copy-ups of the same object;
//   - dstName does not exist in dstDir.
func (c *Copier) Object(ctx context.Context, srcDir int, srcName string, st *unix.Stat_t, dstDir int, dstName string) error {
	var parent unix.Stat_t
	haveParent := unix.Fstat(dstDir, &parent) == nil

	tmp := c.TempName()
	work := c.opts.WorkFd
	if err := c.build(ctx, srcDir, srcName, st, tmp); err != nil {
		c.discard(tmp, st)
		return fmt.Errorf("copy up %q: %w", srcName, err)
	}
	if err := unix.Renameat2(work, tmp, dstDir, dstName, unix.RENAME_NOREPLACE); err != nil {
		c.discard(tmp, st)
		return fmt.Errorf("copy up %q: rename into upper: %w", srcName, err)
	}
	if haveParent {
		// Best effort, like fs/overlayfs/copy_up.c:ovl_set_timestamps.
		_ = unix.UtimesNanoAt(dstDir, "", []unix.Timespec{parent.Atim, parent.Mtim}, unix.AT_EMPTY_PATH)
	}
	return nil
}

// build creates the copy under name tmp in the work dir.
func (c *Copier) build(ctx context.Context, srcDir int, srcName string, st *unix.Stat_t, tmp string) error {
	work := c.opts.WorkFd
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		return c.buildFile(ctx, srcDir, srcName, st, tmp)
	case unix.S_IFDIR:
		if err := unix.Mkdirat(work, tmp, 0o700); err != nil {
			return err
		}
	case unix.S_IFLNK:
		target, err := sysx.Readlinkat(srcDir, srcName)
		if err != nil {
			return err
		}
		if err := unix.Symlinkat(target, work, tmp); err != nil {
			return err
		}
	case unix.S_IFIFO, unix.S_IFSOCK, unix.S_IFCHR, unix.S_IFBLK:
		if err := unix.Mknodat(work, tmp, st.Mode&unix.S_IFMT, int(st.Rdev)); err != nil {
			return err
		}
	default:
		return ErrNotCopyable
	}
	return c.metadata(work, tmp, -1, srcDir, srcName, st)
}

func (c *Copier) buildFile(ctx context.Context, srcDir int, srcName string, st *unix.Stat_t, tmp string) error {
	src, err := unix.Openat(srcDir, srcName, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NOATIME, 0)
	if errors.Is(err, unix.EPERM) {
		// O_NOATIME needs ownership or CAP_FOWNER.
		src, err = unix.Openat(srcDir, srcName, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return err
	}
	defer unix.Close(src)
	dst, err := unix.Openat(c.opts.WorkFd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	defer unix.Close(dst)
	if err := CopyData(ctx, dst, src, st.Size); err != nil {
		return err
	}
	if err := c.metadata(c.opts.WorkFd, tmp, dst, srcDir, srcName, st); err != nil {
		return err
	}
	if !c.opts.NoSync {
		if err := unix.Fsync(dst); err != nil {
			return fmt.Errorf("fsync: %w", err)
		}
	}
	return nil
}

// metadata copies owner, mode, xattrs and times from the source to tmp in
// the work dir; fd, when >= 0, is an open fd of tmp.
func (c *Copier) metadata(work int, tmp string, fd int, srcDir int, srcName string, st *unix.Stat_t) error {
	isLink := st.Mode&unix.S_IFMT == unix.S_IFLNK
	if err := unix.Fchownat(work, tmp, int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if c.privileged || !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("chown: %w", err)
		}
		// Unprivileged: the copy keeps the mounter's ownership, as any
		// file this user creates would.
	}
	if !isLink {
		if err := sysx.Chmodat(work, tmp, st.Mode&0o7777); err != nil {
			return fmt.Errorf("chmod: %w", err)
		}
	}
	if err := c.copyXattrs(srcDir, srcName, work, tmp); err != nil {
		return err
	}
	times := []unix.Timespec{st.Atim, st.Mtim}
	if err := unix.UtimesNanoAt(work, tmp, times, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

// copyXattrs copies every attribute except overlay-private ones. An
// attribute the upper filesystem refuses (e.g. a security.* label it does
// not support, or trusted.* without privilege) is skipped with a warning,
// as the kernel skips ENOTSUPP (ovl_copy_xattr).
func (c *Copier) copyXattrs(srcDir int, srcName string, dstDir int, dstName string) error {
	names, err := sysx.ListxattrAll(srcDir, srcName)
	if err != nil {
		return fmt.Errorf("list xattrs: %w", err)
	}
	for _, name := range names {
		if c.opts.NS.Shown(name) == "" {
			continue
		}
		val, err := sysx.GetxattrAll(srcDir, srcName, name)
		if err != nil {
			if sysx.IsNoAttr(err) {
				continue
			}
			return fmt.Errorf("read xattr %s: %w", name, err)
		}
		if err := sysx.Setxattr(dstDir, dstName, name, val, 0); err != nil {
			if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPERM) {
				c.log.Warn("xattr not copied up", "path", srcName, "xattr", name, "err", err)
				continue
			}
			return fmt.Errorf("write xattr %s: %w", name, err)
		}
	}
	return nil
}

// discard removes a partly built temporary entry from the work dir.
func (c *Copier) discard(tmp string, st *unix.Stat_t) {
	flags := 0
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		flags = unix.AT_REMOVEDIR
	}
	if err := unix.Unlinkat(c.opts.WorkFd, tmp, flags); err != nil && !errors.Is(err, unix.ENOENT) {
		c.log.Error("cannot remove copy-up leftover from work dir", "path", tmp, "err", err)
	}
}
