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
	// Not cancelled by an interrupt: a signal to the caller (the Go
	// runtime sends SIGURG all the time) must not fail the operation; the
	// kernel's copy-up is not interruptible either.
	if err := s.copier.Object(context.WithoutCancel(ctx), src.fd, loc.name, &st, dst.fd, loc.name); err != nil {
		return err
	}
	var ust unix.Stat_t
	if err := unix.Fstatat(dst.fd, loc.name, &ust, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
	if isDir || st.Nlink <= 1 {
		s.rememberCopy(ust.Ino, n.ino)
	}
	// Else: copying one name of a lower hard link up breaks the link, so
	// the copy is a different file and must not keep the shared st_ino
	// (fs/overlayfs/inode.c:ovl_getattr uses the upper inode number for
	// such files). go-fuse pins a node's st_ino, so the name needs a new
	// node: the caller makes the kernel drop its entry (copyUpObject), and
	// the next lookup gives the name a node with the new identity.
	if !isDir && st.Nlink > 1 {
		n.expire = true
	}
	if isDir {
		n.dirs = append([]dirLayer{{layer: 0}}, n.dirs...)
		// A directory that gains an upper copy becomes merged, and merged
		// directories show st_nlink 1: drop the kernel's cached
		// attributes. (FUSE_NOTIFY_INVAL_INODE takes no inode lock, so it
		// is safe inside a request.)
		defer n.NotifyContent(0, 0)
	} else {
		n.layer = 0
	}
	s.log.Debug("copied up", "path", n.debugPath())
	return nil
}

// copyUpObject copies n up for a change to n itself, then, if the copy-up
// broke a lower hard link, makes the kernel forget n's name so that it is
// looked up again and gets a node with its new identity. parentLocked says
// whether the kernel holds the parent directory's lock for the running
// operation (link, rename), which the invalidation needs: then the copy-up
// is done and ESTALE returned instead, which makes the kernel retry the
// whole system call once with every dentry revalidated (fs/namei.c:
// retry_estale), so the retry finds the new node.
func (s *Stack) copyUpObject(ctx context.Context, n *node, parentLocked bool) error {
	if err := s.copyUp(ctx, n); err != nil {
		return err
	}
	n.mu.Lock()
	expire := n.expire
	n.expire = false
	n.mu.Unlock()
	if !expire {
		return nil
	}
	if parentLocked {
		return unix.ESTALE
	}
	loc := n.location()
	loc.parent.NotifyEntry(loc.name)
	return nil
}
