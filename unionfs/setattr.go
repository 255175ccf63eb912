package unionfs

import (
	"context"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"strata/internal/sysx"
)

var _ = (fs.NodeSetattrer)((*node)(nil))

// Setattr changes mode, owner, size or times, copying the object up first.
// A metadata-only change copies the whole object but keeps its mtime (the
// kernel's copy-up does too), so only what was asked changes.
func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	s := n.s
	if !s.writable {
		return syscall.EROFS
	}
	var err error
	if h, ok := asHandle(f); ok && n.isRemoved() {
		// The last name is gone; the open file is all there is (it is in
		// the upper layer: only an upper file can have been opened for
		// the writes that lead here).
		fd := h.current()
		h.mu.RUnlock() // fd stays open: RELEASE waits for this request
		err = s.setattrAt(fd, "", unix.AT_EMPTY_PATH, f, in)
	} else if err = s.copyUpObject(ctx, n, false); err == nil {
		err = s.setattr(n, f, in)
	}
	if err != nil {
		return s.toErrno(ctx, "setattr", n, err)
	}
	return n.Getattr(ctx, f, out)
}

func (s *Stack) setattr(n *node, f fs.FileHandle, in *fuse.SetAttrIn) error {
	ref, name, err := s.objectRef(n)
	if err != nil {
		return err
	}
	defer s.release(ref)
	flags := unix.AT_SYMLINK_NOFOLLOW
	if name == "" {
		flags |= unix.AT_EMPTY_PATH
	}
	return s.setattrAt(ref.fd, name, flags, f, in)
}

// setattrAt applies in to the entry name of dirfd (name "" with
// AT_EMPTY_PATH: dirfd itself). flags are the *at flags for chown and
// utimensat.
func (s *Stack) setattrAt(dirfd int, name string, flags int, f fs.FileHandle, in *fuse.SetAttrIn) error {
	ref := dirRef{fd: dirfd}
	uid, uok := in.GetUID()
	gid, gok := in.GetGID()
	if uok || gok {
		u, g := -1, -1
		if uok {
			u = int(s.hostUID(uid))
		}
		if gok {
			g = int(s.hostGID(gid))
		}
		if err := unix.Fchownat(ref.fd, name, u, g, flags); err != nil {
			return err
		}
	}
	if mode, ok := in.GetMode(); ok {
		if err := sysx.Chmodat(ref.fd, name, mode&0o7777); err != nil {
			return err
		}
	}
	if size, ok := in.GetSize(); ok {
		if err := s.truncate(ref.fd, name, f, int64(size)); err != nil {
			return err
		}
	}
	if in.Valid&(fuse.FATTR_ATIME|fuse.FATTR_MTIME) != 0 {
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		if in.Valid&fuse.FATTR_ATIME != 0 {
			ts[0] = unix.Timespec{Sec: int64(in.Atime), Nsec: int64(in.Atimensec)}
			if in.Valid&fuse.FATTR_ATIME_NOW != 0 {
				ts[0] = unix.Timespec{Nsec: unix.UTIME_NOW}
			}
		}
		if in.Valid&fuse.FATTR_MTIME != 0 {
			ts[1] = unix.Timespec{Sec: int64(in.Mtime), Nsec: int64(in.Mtimensec)}
			if in.Valid&fuse.FATTR_MTIME_NOW != 0 {
				ts[1] = unix.Timespec{Nsec: unix.UTIME_NOW}
			}
		}
		if err := unix.UtimesNanoAt(ref.fd, name, ts, flags); err != nil {
			return err
		}
	}
	return nil
}

// truncate sets the size of a regular file, through the open handle when
// the kernel sent one (ftruncate), else by opening it.
func (s *Stack) truncate(dirfd int, name string, f fs.FileHandle, size int64) error {
	if h, ok := asHandle(f); ok {
		fd := h.current()
		err := unix.Ftruncate(fd, size)
		h.mu.RUnlock()
		if err != unix.EBADF && err != unix.EINVAL {
			return err
		}
		// A read-only handle: fall back to opening by name.
	}
	fd, err := unix.Openat(dirfd, name, unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Ftruncate(fd, size)
}

// hostUID maps a uid from the mount's view to the layers' (uidmapping).
func (s *Stack) hostUID(id uint32) uint32 {
	if h, ok := s.opts.UIDMap.ToHost(id); ok {
		return h
	}
	return id
}

// hostGID maps a gid from the mount's view to the layers' (gidmapping).
func (s *Stack) hostGID(id uint32) uint32 {
	if h, ok := s.opts.GIDMap.ToHost(id); ok {
		return h
	}
	return id
}
