package unionfs

import (
	"context"
	"errors"
	"strings"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"strata/internal/sysx"
)

var _ = (fs.NodeGetxattrer)((*node)(nil))

// Getxattr reads an attribute from the object's deciding layer.
func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	s := n.s
	ref, name, err := s.objectRef(n)
	if err != nil {
		return 0, s.toErrno(ctx, "getxattr", n, err)
	}
	defer s.release(ref)
	sz, err := sysx.Getxattr(ref.fd, name, s.ns.Escape(attr), dest)
	if errors.Is(err, unix.ERANGE) {
		sz, err = sysx.Getxattr(ref.fd, name, s.ns.Escape(attr), nil)
		if err == nil {
			return uint32(sz), syscall.ERANGE
		}
	}
	if err != nil {
		return 0, s.toErrno(ctx, "getxattr", n, err)
	}
	return uint32(sz), 0
}

var _ = (fs.NodeListxattrer)((*node)(nil))

// Listxattr lists the attributes of the object's deciding layer, without
// overlay-private ones. trusted.* names are shown only to privileged
// callers, as local filesystems do (ext4, xfs: CAP_SYS_ADMIN), since FUSE
// passes the whole list through.
func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	s := n.s
	ref, name, err := s.objectRef(n)
	if err != nil {
		return 0, s.toErrno(ctx, "listxattr", n, err)
	}
	names, err := sysx.ListxattrAll(ref.fd, name)
	s.release(ref)
	if err != nil {
		return 0, s.toErrno(ctx, "listxattr", n, err)
	}
	privileged := true
	if c, ok := fuse.FromContext(ctx); ok && c.Uid != 0 {
		privileged = false
	}
	var buf []byte
	for _, raw := range names {
		shown := s.ns.Shown(raw)
		if shown == "" || (!privileged && strings.HasPrefix(shown, "trusted.")) {
			continue
		}
		buf = append(buf, shown...)
		buf = append(buf, 0)
	}
	if len(dest) == 0 {
		return uint32(len(buf)), 0
	}
	if len(buf) > len(dest) {
		return uint32(len(buf)), syscall.ERANGE
	}
	return uint32(copy(dest, buf)), 0
}

var _ = (fs.NodeSetxattrer)((*node)(nil))

// Setxattr copies the object up and sets the attribute there.
func (n *node) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) syscall.Errno {
	s := n.s
	if err := s.copyUpObject(ctx, n, false); err != nil {
		return s.toErrno(ctx, "setxattr", n, err)
	}
	ref, name, err := s.objectRef(n)
	if err != nil {
		return s.toErrno(ctx, "setxattr", n, err)
	}
	defer s.release(ref)
	return s.toErrno(ctx, "setxattr", n, sysx.Setxattr(ref.fd, name, s.ns.Escape(attr), data, int(flags)))
}

var _ = (fs.NodeRemovexattrer)((*node)(nil))

// Removexattr removes an attribute. A lower object is copied up only if it
// has the attribute (fs/overlayfs/xattrs.c:ovl_xattr_set).
func (n *node) Removexattr(ctx context.Context, attr string) syscall.Errno {
	s := n.s
	if !s.writable {
		return syscall.EROFS
	}
	real := s.ns.Escape(attr)
	n.mu.Lock()
	upper := n.inUpperLocked()
	n.mu.Unlock()
	if !upper {
		ref, name, err := s.objectRef(n)
		if err != nil {
			return s.toErrno(ctx, "removexattr", n, err)
		}
		_, err = sysx.Getxattr(ref.fd, name, real, nil)
		s.release(ref)
		if err != nil {
			return s.toErrno(ctx, "removexattr", n, err)
		}
		if err := s.copyUpObject(ctx, n, false); err != nil {
			return s.toErrno(ctx, "removexattr", n, err)
		}
	}
	ref, name, err := s.objectRef(n)
	if err != nil {
		return s.toErrno(ctx, "removexattr", n, err)
	}
	defer s.release(ref)
	return s.toErrno(ctx, "removexattr", n, sysx.Removexattr(ref.fd, name, real))
}
