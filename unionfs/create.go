package unionfs

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"strata/internal/sysx"
	"strata/whiteout"
)

// newSpec says how to create one new object.
type newSpec struct {
	isDir bool
	// owned: set the owner to the caller (every new object but a hard link).
	owned bool
	mode  uint32 // permission bits wanted, to restore setuid/setgid after chown
	// make creates the object as name in dirfd and may return an open fd
	// of it (or -1).
	make func(dirfd int, name string) (int, error)
}

// newObject creates a new object named name in directory p, in the upper
// layer, as fs/overlayfs/dir.c:ovl_create_or_link does: the parent chain is
// copied up first; over an upper whiteout the object is built in the work
// dir and exchanged with the whiteout (ovl_create_over_whiteout), so the
// name is never missing; a new directory is opaque when it replaces an upper
// whiteout (ovl_set_opaque there). Linux 6.18 does not mark other new
// directories, not even in a merged parent: nothing below can hold their
// name, or the name would not be free.
// It returns the fd made by spec.make (or -1) and the new object's entry.
func (s *Stack) newObject(ctx context.Context, p *node, name string, spec newSpec) (int, entry, error) {
	e := entry{layer: 0, whiteoutLayer: -1}
	if !s.writable {
		return -1, e, unix.EROFS
	}
	if err := whiteout.CheckName(name); err != nil {
		return -1, e, err
	}
	if _, _, removed := p.state(); removed {
		return -1, e, unix.ENOENT
	}
	if err := s.copyUp(ctx, p); err != nil {
		return -1, e, err
	}
	up, err := s.dirfd(p, 0)
	if err != nil {
		return -1, e, err
	}
	defer s.release(up)

	var old unix.Stat_t
	replace := false
	switch err := unix.Fstatat(up.fd, name, &old, unix.AT_SYMLINK_NOFOLLOW); {
	case errors.Is(err, unix.ENOENT):
	case err != nil:
		return -1, e, err
	case whiteout.IsCharWhiteout(&old):
		replace = true
	default:
		return -1, e, unix.EEXIST
	}
	var pst unix.Stat_t
	if err := unix.Fstat(up.fd, &pst); err != nil {
		return -1, e, err
	}
	opaque := spec.isDir && replace

	dir, at := up.fd, name
	if replace {
		dir, at = s.workFd, s.copier.TempName()
	}
	fd, err := spec.make(dir, at)
	if err != nil {
		return -1, e, err
	}
	undo := func(cause error) (int, entry, error) {
		if fd >= 0 {
			unix.Close(fd)
		}
		flags := 0
		if spec.isDir {
			flags = unix.AT_REMOVEDIR
		}
		if err := unix.Unlinkat(dir, at, flags); err != nil && !errors.Is(err, unix.ENOENT) {
			s.log.Error("cannot undo a failed create", "path", p.debugPath()+"/"+name, "err", err)
		}
		return -1, e, cause
	}
	if spec.owned {
		if err := s.setOwner(ctx, dir, at, spec, &pst); err != nil {
			return undo(err)
		}
	}
	if opaque {
		if err := whiteout.SetOpaque(dir, at, s.ns); err != nil {
			return undo(err)
		}
	}
	if replace {
		if err := unix.Renameat2(dir, at, up.fd, name, unix.RENAME_EXCHANGE); err != nil {
			return undo(fmt.Errorf("replace whiteout: %w", err))
		}
		// The whiteout is now the work dir entry.
		if err := unix.Unlinkat(s.workFd, at, 0); err != nil {
			s.log.Error("cannot remove replaced whiteout from work dir", "path", at, "err", err)
		}
	}
	if err := unix.Fstatat(up.fd, name, &e.st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return -1, e, err
	}
	if spec.isDir {
		op := whiteout.NotOpaque
		if opaque {
			op = whiteout.Opaque
		}
		e.dirs = []dirLayer{{layer: 0, opacity: op}}
	}
	return fd, e, nil
}

// setOwner gives a new object the caller's uid, and its gid unless the
// parent is setgid (then the filesystem already gave it the parent's), as
// the kernel's inode_init_owner does for the overlay inode. chown clears
// setuid/setgid on non-directories, so they are put back. Without
// privilege the object keeps the mounter's ids, like any file the
// mounter creates.
func (s *Stack) setOwner(ctx context.Context, dirfd int, name string, spec newSpec, pst *unix.Stat_t) error {
	if !s.privileged {
		return nil
	}
	c, ok := fuse.FromContext(ctx)
	if !ok {
		return nil
	}
	uid, gid := s.hostUID(c.Uid), s.hostGID(c.Gid)
	if pst.Mode&unix.S_ISGID != 0 {
		gid = pst.Gid
	}
	if uid == 0 && gid == 0 {
		return nil // created by root with root's ids already
	}
	flags := unix.AT_SYMLINK_NOFOLLOW
	if name == "" {
		flags |= unix.AT_EMPTY_PATH
	}
	if err := unix.Fchownat(dirfd, name, int(uid), int(gid), flags); err != nil {
		return fmt.Errorf("chown new object: %w", err)
	}
	if !spec.isDir && spec.mode&(unix.S_ISUID|unix.S_ISGID) != 0 {
		if err := sysx.Chmodat(dirfd, name, spec.mode&0o7777); err != nil {
			return fmt.Errorf("chmod new object: %w", err)
		}
	}
	return nil
}

// addChild makes the node for a new object created as name in p and fills
// out.
func (s *Stack) addChild(ctx context.Context, p *node, name string, e *entry, out *fuse.EntryOut) *fs.Inode {
	cn := s.newNode(p, name, e)
	ch := p.NewInode(ctx, cn, s.stableAttr(cn, &e.st, p.ino, name))
	got := ch.Operations().(*node)
	s.fillAttr(got, e.dirs, &e.st, &out.Attr)
	return ch
}

var _ = (fs.NodeCreater)((*node)(nil))

// Create creates and opens a regular file.
func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	s := n.s
	oflags := openFlags(flags)
	fd, e, err := s.newObject(ctx, n, name, newSpec{owned: true, mode: mode, make: func(dirfd int, nm string) (int, error) {
		return unix.Openat(dirfd, nm, oflags|unix.O_CREAT|unix.O_EXCL, mode&0o7777)
	}})
	if err != nil {
		return nil, nil, 0, s.toErrno(ctx, "create", n, err)
	}
	ch := s.addChild(ctx, n, name, &e, out)
	h := &fileHandle{n: ch.Operations().(*node), fd: fd, layer: 0, flags: oflags}
	fh, fuseFlags := s.wrapHandle(h)
	return ch, fh, fuseFlags, 0
}

var _ = (fs.NodeMkdirer)((*node)(nil))

// Mkdir creates a directory.
func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	s := n.s
	_, e, err := s.newObject(ctx, n, name, newSpec{isDir: true, owned: true, mode: mode, make: func(dirfd int, nm string) (int, error) {
		return -1, unix.Mkdirat(dirfd, nm, mode&0o7777)
	}})
	if err != nil {
		return nil, s.toErrno(ctx, "mkdir", n, err)
	}
	return s.addChild(ctx, n, name, &e, out), 0
}

var _ = (fs.NodeMknoder)((*node)(nil))

// Mknod creates a fifo, socket or device node. A 0/0 character device is
// refused with EPERM: through an overlay it would be a whiteout
// (fs/overlayfs/dir.c:ovl_mknod).
func (n *node) Mknod(ctx context.Context, name string, mode uint32, dev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	s := n.s
	if mode&unix.S_IFMT == unix.S_IFCHR && dev == 0 {
		return nil, syscall.EPERM
	}
	_, e, err := s.newObject(ctx, n, name, newSpec{owned: true, mode: mode, make: func(dirfd int, nm string) (int, error) {
		return -1, unix.Mknodat(dirfd, nm, mode, int(dev))
	}})
	if err != nil {
		return nil, s.toErrno(ctx, "mknod", n, err)
	}
	return s.addChild(ctx, n, name, &e, out), 0
}

var _ = (fs.NodeSymlinker)((*node)(nil))

// Symlink creates a symbolic link.
func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	s := n.s
	_, e, err := s.newObject(ctx, n, name, newSpec{owned: true, mode: 0o777, make: func(dirfd int, nm string) (int, error) {
		return -1, unix.Symlinkat(target, dirfd, nm)
	}})
	if err != nil {
		return nil, s.toErrno(ctx, "symlink", n, err)
	}
	return s.addChild(ctx, n, name, &e, out), 0
}

var _ = (fs.NodeLinker)((*node)(nil))

// Link makes a hard link to target, copying target up first: a lower
// file cannot be linked from the upper layer.
func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	s := n.s
	tn, ok := target.(*node)
	if !ok {
		return nil, syscall.EXDEV
	}
	if !s.writable {
		return nil, syscall.EROFS
	}
	if fd := tn.tmpFd(); fd >= 0 {
		return s.linkTmpfile(ctx, n, tn, fd, name, out)
	}
	if err := s.copyUpObject(ctx, tn, true); err != nil {
		return nil, s.toErrno(ctx, "link", n, err)
	}
	tloc := tn.location()
	tref, err := s.dirfd(tloc.parent, 0)
	if err != nil {
		return nil, s.toErrno(ctx, "link", n, err)
	}
	defer s.release(tref)
	_, e, err := s.newObject(ctx, n, name, newSpec{make: func(dirfd int, nm string) (int, error) {
		return -1, unix.Linkat(tref.fd, tloc.name, dirfd, nm, 0)
	}})
	if err != nil {
		return nil, s.toErrno(ctx, "link", n, err)
	}
	s.fillAttr(tn, nil, &e.st, &out.Attr)
	return &tn.Inode, 0
}

var _ = (fs.NodeTmpfiler)((*node)(nil))

// Tmpfile creates an unnamed regular file in the directory's upper copy
// (open(2) with O_TMPFILE). Until it is linked into place it is, like an
// unlinked file, reachable only through its open handle.
func (n *node) Tmpfile(ctx context.Context, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	s := n.s
	if !s.writable {
		return nil, nil, 0, syscall.EROFS
	}
	if n.isRemoved() {
		return nil, nil, 0, syscall.ENOENT
	}
	if err := s.copyUp(ctx, n); err != nil {
		return nil, nil, 0, s.toErrno(ctx, "tmpfile", n, err)
	}
	up, err := s.dirfd(n, 0)
	if err != nil {
		return nil, nil, 0, s.toErrno(ctx, "tmpfile", n, err)
	}
	defer s.release(up)
	oflags := openFlags(flags) &^ unix.O_NOFOLLOW
	fd, err := unix.Openat(up.fd, ".", oflags|unix.O_TMPFILE, mode&0o7777)
	if err != nil {
		return nil, nil, 0, s.toErrno(ctx, "tmpfile", n, err)
	}
	var pst unix.Stat_t
	e := entry{layer: 0, whiteoutLayer: -1}
	err = unix.Fstat(up.fd, &pst)
	if err == nil {
		err = s.setOwner(ctx, fd, "", newSpec{mode: mode}, &pst)
	}
	if err == nil {
		err = unix.Fstat(fd, &e.st)
	}
	if err != nil {
		unix.Close(fd)
		return nil, nil, 0, s.toErrno(ctx, "tmpfile", n, err)
	}
	cn := s.newNode(n, "", &e)
	cn.removed = true
	cn.tmpfd = fd
	ch := n.NewInode(ctx, cn, s.stableAttr(cn, &e.st, n.ino, ""))
	s.fillAttr(cn, nil, &e.st, &out.Attr)
	h := &fileHandle{n: cn, fd: fd, layer: 0, flags: oflags}
	fh, fuseFlags := s.wrapHandle(h)
	return ch, fh, fuseFlags, 0
}

// linkTmpfile gives an O_TMPFILE file its first name, through its open fd
// (linkat of /proc/self/fd/N, as the caller did on the mount).
func (s *Stack) linkTmpfile(ctx context.Context, p, tn *node, fd int, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	proc := "/proc/self/fd/" + strconv.Itoa(fd)
	_, e, err := s.newObject(ctx, p, name, newSpec{make: func(dirfd int, nm string) (int, error) {
		return -1, unix.Linkat(unix.AT_FDCWD, proc, dirfd, nm, unix.AT_SYMLINK_FOLLOW)
	}})
	if err != nil {
		return nil, s.toErrno(ctx, "link", p, err)
	}
	tn.mu.Lock()
	tn.loc.Store(&location{parent: p, name: name})
	tn.removed = false
	tn.tmpfd = -1
	tn.mu.Unlock()
	s.fillAttr(tn, nil, &e.st, &out.Attr)
	return &tn.Inode, 0
}
