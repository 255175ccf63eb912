package unionfs

import (
	"context"

	"golang.org/x/sys/unix"
)

// copyUp makes sure n's object exists in the upper layer, copying it (and
// first any parent directory missing there) up from the layer that holds
// it. Concurrent copy-ups of one node copy it once: the node's mu
// serialises them and the second finds the work done.
func (s *Stack) copyUp(ctx context.Context, n *node) error {
	if !s.writable {
		return unix.EROFS
	}
	n.mu.Lock()
	up, removed := n.inUpperLocked(), n.removed
	n.mu.Unlock()
	if up {
		return nil
	}
	if removed {
		return unix.ENOENT
	}
	loc := n.location()
	if loc.parent == nil {
		return nil // the upper root always exists
	}
	// Parents first, holding no lock of n (lock order: parent before child).
	if err := s.copyUp(ctx, loc.parent); err != nil {
		return err
	}

	n.mu.Lock()
	defer n.mu.Unlock()
	if n.inUpperLocked() {
		return nil
	}
	if n.removed {
		return unix.ENOENT
	}
	loc = n.loc.Load()
	src, err := s.dirfd(loc.parent, n.topLayerLocked())
	if err != nil {
		return err
	}
	defer s.release(src)
	dst, err := s.dirfd(loc.parent, 0)
	if err != nil {
		return err
	}
	defer s.release(dst)
	var st unix.Stat_t
	if err := unix.Fstatat(src.fd, loc.name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	if err := s.copier.Object(ctx, src.fd, loc.name, &st, dst.fd, loc.name); err != nil {
		return err
	}
	var ust unix.Stat_t
	if err := unix.Fstatat(dst.fd, loc.name, &ust, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
	if isDir || st.Nlink <= 1 {
		s.rememberCopy(ust.Ino, n.ino)
	} else {
		// Copying one name of a lower hard link up breaks the link, so the
		// copy is a different file and must not keep the shared st_ino
		// (fs/overlayfs/inode.c:ovl_getattr uses the upper inode number
		// for such files). Make the kernel look the name up again, which
		// gives it a node with the new identity. Asynchronously: the
		// operation that triggered the copy-up may hold the parent's lock.
		parent := loc.parent
		go parent.NotifyEntry(loc.name)
	}
	if isDir {
		n.dirs = append([]dirLayer{{layer: 0}}, n.dirs...)
	} else {
		n.layer = 0
	}
	s.log.Debug("copied up", "path", n.debugPath())
	return nil
}
