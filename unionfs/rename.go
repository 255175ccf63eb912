package unionfs

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"golang.org/x/sys/unix"

	"strata/cow"
	"strata/whiteout"
)

var _ = (fs.NodeRenamer)((*node)(nil))

// Rename moves name in n to newName in newParent.
func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	return n.s.toErrno(ctx, "rename", n, n.s.rename(ctx, n, name, np, newName, flags))
}

// pureUpper reports whether directory dirs exist only in the upper layer.
func pureUpper(dirs []dirLayer) bool { return len(dirs) == 1 && dirs[0].layer == 0 }

// rename follows fs/overlayfs/dir.c:ovl_rename without redirect_dir:
// non-directories are copied up and renamed in the upper layer; a lower or
// merged directory cannot move (EXDEV, so that mv falls back to copying);
// where the old name is still held by a lower layer a whiteout is left in
// the same step (RENAME_WHITEOUT, or an exchange with a whiteout at the
// new name); a directory moved into a merged parent becomes opaque.
func (s *Stack) rename(ctx context.Context, op *node, oldName string, np *node, newName string, flags uint32) error {
	if !s.writable {
		return unix.EROFS
	}
	if flags&^(unix.RENAME_NOREPLACE|unix.RENAME_EXCHANGE) != 0 {
		return unix.EINVAL // RENAME_WHITEOUT is not for overlay callers
	}
	exchange := flags&unix.RENAME_EXCHANGE != 0
	if err := whiteout.CheckName(newName); err != nil {
		return err
	}
	_, odirs, removed := op.state()
	if removed {
		return unix.ENOENT
	}
	oe, err := s.resolve(op, odirs, oldName)
	if err != nil {
		return err
	}
	oldNode := s.childFor(ctx, op, oldName, &oe)
	_, ndirs, removed := np.state()
	if removed {
		return unix.ENOENT
	}
	ne, err := s.resolve(np, ndirs, newName)
	newExists := err == nil
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return err
	}
	newWhiteout := !newExists && ne.whiteoutLayer == 0 && s.upper != nil
	if exchange && !newExists {
		return unix.ENOENT
	}
	if flags&unix.RENAME_NOREPLACE != 0 && newExists {
		return unix.EEXIST
	}
	var newNode *node
	if newExists {
		newNode = s.childFor(ctx, np, newName, &ne)
		if newNode == oldNode {
			return nil // two names of one object: rename(2) does nothing
		}
	}
	isDir := oe.isDir()
	newIsDir := newExists && ne.isDir()
	if isDir && !pureUpper(oldNode.dirsNow()) {
		return unix.EXDEV
	}
	if exchange && newIsDir && !pureUpper(newNode.dirsNow()) {
		return unix.EXDEV
	}
	if newExists && !exchange {
		switch {
		case isDir && !newIsDir:
			return unix.ENOTDIR
		case !isDir && newIsDir:
			return unix.EISDIR
		case newIsDir:
			empty, err := s.isEmptyDir(ctx, newNode)
			if err != nil {
				return err
			}
			if !empty {
				return unix.ENOTEMPTY
			}
		}
	}

	if err := s.copyUpObject(ctx, oldNode, true); err != nil {
		return err
	}
	if exchange {
		if err := s.copyUpObject(ctx, newNode, true); err != nil {
			return err
		}
	}
	if err := s.copyUp(ctx, np); err != nil {
		return err
	}
	_, odirs, _ = op.state()
	_, ndirs, _ = np.state()
	oldNeedsWhiteout := false
	if !exchange {
		if oldNeedsWhiteout, err = s.lowerHas(op, odirs, oldName); err != nil {
			return err
		}
	}
	opUp, err := s.dirfd(op, 0)
	if err != nil {
		return err
	}
	defer s.release(opUp)
	npUp, err := s.dirfd(np, 0)
	if err != nil {
		return err
	}
	defer s.release(npUp)

	// An upper target that loses its last name goes with the rename:
	// forget its identity before its inode can be reused (see forgetCopy).
	targetGoes := newExists && !exchange && ne.layer == 0 && (newIsDir || ne.st.Nlink <= 1)
	restore := func() {}
	if targetGoes {
		restore = s.forgetCopy(ne.st.Ino)
	}
	if newIsDir && !exchange && ne.layer == 0 && !pureUpper(ne.dirs) {
		// The target is a merged directory that shows nothing, but its
		// upper copy may hold whiteouts: swap in an empty opaque
		// directory first (ovl_clear_empty), so that rename can replace
		// it.
		if err := s.clearUpperDir(npUp.fd, newName); err != nil {
			restore()
			return err
		}
		restore = func() {} // the target's upper copy is gone
	}
	// A directory moved into a merged parent must not merge with what
	// the layers below hold under its new name (ovl_set_opaque_xerr).
	oldOpaque := isDir && merged(ndirs) && opacityOf(oldNode.dirsNow(), 0) != whiteout.Opaque
	if oldOpaque {
		if err := whiteout.SetOpaque(opUp.fd, oldName, s.ns); err != nil {
			restore()
			return err
		}
	}
	newOpaque := exchange && newIsDir && merged(odirs) && opacityOf(newNode.dirsNow(), 0) != whiteout.Opaque
	if newOpaque {
		if err := whiteout.SetOpaque(npUp.fd, newName, s.ns); err != nil {
			return err
		}
	}

	var realFlags uint
	cleanupWhiteout := false
	switch {
	case exchange:
		realFlags = unix.RENAME_EXCHANGE
	case oldNeedsWhiteout && newWhiteout:
		realFlags = unix.RENAME_EXCHANGE // switch the whiteout over
	case oldNeedsWhiteout:
		realFlags = unix.RENAME_WHITEOUT
	case isDir && newWhiteout:
		// rename(2) cannot put a directory over a non-directory.
		realFlags, cleanupWhiteout = unix.RENAME_EXCHANGE, true
	}
	if err := unix.Renameat2(opUp.fd, oldName, npUp.fd, newName, realFlags); err != nil {
		restore()
		return err
	}
	if cleanupWhiteout {
		if err := unix.Unlinkat(opUp.fd, oldName, 0); err != nil {
			s.log.Error("cannot remove whiteout after rename", "path", op.debugPath()+"/"+oldName, "err", err)
		}
	}

	oldNode.loc.Store(&location{parent: np, name: newName})
	if oldOpaque {
		oldNode.setUpperOpacity(whiteout.Opaque)
	}
	switch {
	case exchange:
		newNode.loc.Store(&location{parent: op, name: oldName})
		if newOpaque {
			newNode.setUpperOpacity(whiteout.Opaque)
		}
	case newExists:
		newNode.mu.Lock()
		switch {
		case newIsDir:
			newNode.removeDir(&ne.st)
		case ne.layer != 0 || ne.st.Nlink <= 1:
			newNode.removed = true
		default:
			newNode.unlinked(np, newName)
		}
		newNode.mu.Unlock()
		if newIsDir {
			s.dropFds(newNode, -1)
		}
	}
	return nil
}

// clearUpperDir replaces the upper directory name of dirfd by an empty
// opaque one, removing the whiteouts the old one held.
func (s *Stack) clearUpperDir(dirfd int, name string) error {
	tmp := s.copier.TempName()
	if err := unix.Mkdirat(s.workFd, tmp, 0o700); err != nil {
		return err
	}
	if err := whiteout.SetOpaque(s.workFd, tmp, s.ns); err != nil {
		unix.Unlinkat(s.workFd, tmp, unix.AT_REMOVEDIR)
		return err
	}
	if err := unix.Renameat2(s.workFd, tmp, dirfd, name, unix.RENAME_EXCHANGE); err != nil {
		unix.Unlinkat(s.workFd, tmp, unix.AT_REMOVEDIR)
		return fmt.Errorf("swap in empty dir: %w", err)
	}
	if err := cow.RemoveAllAt(s.workFd, tmp); err != nil {
		s.log.Error("cannot remove directory from work dir", "path", tmp, "err", err)
	}
	return nil
}

// dirsNow returns the directory layers under the lock.
func (n *node) dirsNow() []dirLayer {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.dirs
}

// setUpperOpacity records the opacity of the upper copy of a directory.
func (n *node) setUpperOpacity(o whiteout.Opacity) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.dirs) > 0 && n.dirs[0].layer == 0 {
		d := append([]dirLayer(nil), n.dirs...)
		d[0].opacity = o
		n.dirs = d
	}
}
