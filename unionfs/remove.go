package unionfs

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"golang.org/x/sys/unix"

	"strata/cow"
	"strata/whiteout"
)

var _ = (fs.NodeUnlinker)((*node)(nil))

// Unlink removes a non-directory.
func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	return n.s.toErrno(ctx, "unlink", n, n.s.remove(ctx, n, name, false))
}

var _ = (fs.NodeRmdirer)((*node)(nil))

// Rmdir removes a directory that shows no entries.
func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	return n.s.toErrno(ctx, "rmdir", n, n.s.remove(ctx, n, name, true))
}

// remove unlinks (or, with isDir, rmdirs) name in directory p
// (fs/overlayfs/dir.c:ovl_do_remove). An upper object is removed; where a
// lower layer also holds the name a whiteout takes its place, atomically
// (RENAME_WHITEOUT moves the upper object into the work dir and leaves the
// whiteout). A lower-only object only gets the whiteout: no data is ever
// copied to delete something. A merged directory goes once nothing in it
// is visible; the whiteouts its upper copy holds go with it.
func (s *Stack) remove(ctx context.Context, p *node, name string, isDir bool) error {
	if !s.writable {
		return unix.EROFS
	}
	if len(name) > unix.NAME_MAX {
		return unix.ENAMETOOLONG
	}
	_, pdirs, removed := p.state()
	if removed {
		return unix.ENOENT
	}
	e, err := s.resolve(p, pdirs, name)
	if err != nil {
		return err
	}
	switch {
	case isDir && !e.isDir():
		return unix.ENOTDIR
	case !isDir && e.isDir():
		return unix.EISDIR
	}
	child := s.childFor(ctx, p, name, &e)
	if isDir {
		empty, err := s.isEmptyDir(ctx, child)
		if err != nil {
			return err
		}
		if !empty {
			return unix.ENOTEMPTY
		}
	}
	needWhiteout, err := s.lowerHas(p, pdirs, name)
	if err != nil {
		return err
	}
	if e.layer != 0 || s.upper == nil {
		// Only lower layers hold it.
		needWhiteout = true
	}
	if err := s.copyUp(ctx, p); err != nil {
		return err
	}
	up, err := s.dirfd(p, 0)
	if err != nil {
		return err
	}
	defer s.release(up)

	child.mu.Lock()
	defer child.mu.Unlock()
	inUpper := child.inUpperLocked() || e.layer == 0
	lastName := isDir || e.st.Nlink <= 1
	restore := func() {}
	if inUpper && lastName {
		restore = s.forgetCopy(e.st.Ino)
	}
	if err := s.removeObject(up.fd, name, isDir, inUpper, needWhiteout); err != nil {
		restore()
		return err
	}
	if h := testHookRemoved.Load(); h != nil {
		(*h)(name)
	}
	switch {
	case isDir:
		child.removeDir(&e.st)
	case !inUpper || lastName:
		child.removed = true
	default:
		child.unlinked(p, name)
	}
	if isDir {
		s.dropFds(child, -1)
	}
	return nil
}

// testHookRemoved, if set, is called by remove with the name it just took
// out of the upper dir (tests: export_test.go).
var testHookRemoved atomic.Pointer[func(name string)]

// removeObject removes name from the upper dir upfd: the upper object if
// inUpper, leaving a whiteout if needWhiteout (always if not inUpper).
func (s *Stack) removeObject(upfd int, name string, isDir, inUpper, needWhiteout bool) error {
	switch {
	case !inUpper:
		return whiteout.Create(upfd, name)
	case isDir:
		return s.removeUpperDir(upfd, name, needWhiteout)
	case needWhiteout:
		tmp := s.copier.TempName()
		if err := unix.Renameat2(upfd, name, s.workFd, tmp, unix.RENAME_WHITEOUT); err != nil {
			return fmt.Errorf("replace with whiteout: %w", err)
		}
		if err := unix.Unlinkat(s.workFd, tmp, 0); err != nil {
			s.log.Error("cannot remove unlinked file from work dir", "path", tmp, "err", err)
		}
		return nil
	default:
		return unix.Unlinkat(upfd, name, 0)
	}
}

// removeUpperDir removes the upper copy name of a directory in the upper
// dir upfd, leaving a whiteout if wanted. The copy may still hold
// whiteouts (nothing visible is left in it): it is first moved into the
// work dir, so that it disappears from the upper dir in one step, and
// emptied there (fs/overlayfs/dir.c:ovl_clear_empty).
func (s *Stack) removeUpperDir(upfd int, name string, withWhiteout bool) error {
	if !withWhiteout {
		err := unix.Unlinkat(upfd, name, unix.AT_REMOVEDIR)
		if err == nil || !errors.Is(err, unix.ENOTEMPTY) && !errors.Is(err, unix.EEXIST) {
			return err
		}
	}
	tmp := s.copier.TempName()
	flags := uint(unix.RENAME_NOREPLACE)
	if withWhiteout {
		flags = unix.RENAME_WHITEOUT
	}
	if err := unix.Renameat2(upfd, name, s.workFd, tmp, flags); err != nil {
		return fmt.Errorf("move directory out: %w", err)
	}
	if err := cow.RemoveAllAt(s.workFd, tmp); err != nil {
		s.log.Error("cannot remove directory from work dir", "path", tmp, "err", err)
	}
	return nil
}

// isEmptyDir reports whether a directory shows no entries but . and ..
func (s *Stack) isEmptyDir(ctx context.Context, n *node) (bool, error) {
	entries, err := s.readdir(ctx, n)
	if err != nil {
		return false, err
	}
	return len(entries) <= 2, nil
}

// forgetCopy drops the identity recorded for upper object upperIno (see
// rememberCopy), whose last name is about to go; restore puts it back if
// the removal fails. It must run before the object's inode can be freed:
// the upper filesystem may give the number to the next object it creates
// at once (ext4 does), and a copy-up or create in another directory that
// gets it then has its own record dropped, or takes this one's identity.
// The kernel then sees a node with another st_ino under the name, and
// strata's operations on that name act on a node the kernel does not use
// while the kernel's node keeps a stale location.
func (s *Stack) forgetCopy(upperIno uint64) (restore func()) {
	s.copiedMu.Lock()
	id, ok := s.copied[upperIno]
	delete(s.copied, upperIno)
	s.copiedMu.Unlock()
	if !ok {
		return func() {}
	}
	return func() { s.rememberCopy(upperIno, id) }
}
