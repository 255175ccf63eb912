package unionfs

import (
	"context"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// fileHandle is an open regular file: an fd of the object in one layer.
type fileHandle struct {
	n *node

	mu    sync.RWMutex
	fd    int // protected by mu (replaced when a lower handle follows a copy-up)
	layer int // protected by mu
	flags int // open flags, as given to openat
	// counted: the handle is in its node's cachedOpen. Set once, before
	// the handle is returned.
	counted bool
}

// openFlags are the flags strata opens a layer file with for an open(2)
// with flags: no creation flags (the object exists), no O_APPEND (the
// kernel sends explicit offsets, as in go-fuse's loopback), no O_DIRECT
// (data goes through FUSE buffers, which need not be aligned), never
// following a symlink.
func openFlags(flags uint32) int {
	f := int(flags) &^ (unix.O_CREAT | unix.O_EXCL | unix.O_NOCTTY | unix.O_APPEND | unix.O_DIRECT | unix.O_TRUNC)
	return f | unix.O_NOFOLLOW | unix.O_CLOEXEC
}

// wantsWrite reports whether an open with flags changes the file, so that a
// lower file must be copied up first.
func wantsWrite(flags uint32) bool {
	return flags&unix.O_ACCMODE != unix.O_RDONLY || flags&unix.O_TRUNC != 0
}

var _ = (fs.NodeOpener)((*node)(nil))

// Open opens the object, copying it up first when the open may change it.
func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	s := n.s
	if wantsWrite(flags) {
		if !s.writable {
			return nil, 0, syscall.EROFS
		}
		if err := s.copyUpObject(ctx, n, false); err != nil {
			return nil, 0, s.toErrno(ctx, "open", n, err)
		}
	}
	h, err := s.openHandle(n, openFlags(flags))
	if err != nil {
		return nil, 0, s.toErrno(ctx, "open", n, err)
	}
	if flags&unix.O_TRUNC != 0 {
		if err := unix.Ftruncate(h.fd, 0); err != nil {
			h.Release(ctx)
			return nil, 0, s.toErrno(ctx, "open", n, err)
		}
	}
	fh, fuseFlags := s.wrapHandle(h)
	return fh, fuseFlags, 0
}

// wrapHandle decides how the kernel does I/O on a new handle. With FUSE
// passthrough (Linux >= 6.9, CAP_SYS_ADMIN) reads and writes go straight
// to the layer file. The kernel keeps one backing file per inode, shared by
// all its opens, and refuses an open without passthrough while the inode
// has one (and a passthrough open while it has cached opens;
// fs/fuse/iomode.c:fuse_file_io_open). So the mode is chosen per inode,
// when it has no open handle, and kept while any is open:
//
//   - passthrough when the object is in the upper layer, or the mount is
//     read-only: its backing file can never go stale;
//   - otherwise (a lower file that a write may copy up while it is open)
//     I/O through strata with the page cache, so that after a copy-up every
//     open, old and new, reads and writes the upper copy.
func (s *Stack) wrapHandle(h *fileHandle) (fs.FileHandle, uint32) {
	pt := s.passthroughOK()
	n := h.n
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case !pt:
	case n.ptOpen > 0:
	case n.cachedOpen > 0:
		pt = false
	default:
		pt = n.inUpperLocked() || !s.writable
	}
	if pt {
		n.ptOpen++
		return &ptHandle{h}, fuse.FOPEN_KEEP_CACHE
	}
	n.cachedOpen++
	h.counted = true
	return h, fuse.FOPEN_KEEP_CACHE
}

// ptHandle is a handle the kernel serves by passthrough.
type ptHandle struct{ *fileHandle }

var _ = (fs.FilePassthroughFder)((*ptHandle)(nil))

// PassthroughFd gives the kernel the layer fd to register as the inode's
// backing file. go-fuse calls it only when the inode has none yet.
func (h *ptHandle) PassthroughFd() (int, bool) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.fd, true
}

// Release closes the handle and drops its share of the backing file.
func (h *ptHandle) Release(ctx context.Context) syscall.Errno {
	n := h.n
	n.mu.Lock()
	n.ptOpen--
	n.mu.Unlock()
	return h.fileHandle.Release(ctx)
}

// asHandle returns the fileHandle behind a handle the kernel sent back.
func asHandle(f fs.FileHandle) (*fileHandle, bool) {
	switch h := f.(type) {
	case *fileHandle:
		return h, true
	case *ptHandle:
		return h.fileHandle, true
	}
	return nil, false
}

// openHandle opens n's object in its current layer.
func (s *Stack) openHandle(n *node, flags int) (*fileHandle, error) {
	n.mu.Lock()
	layer := n.layer
	n.mu.Unlock()
	loc := n.location()
	ref, err := s.dirfd(loc.parent, layer)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Openat(ref.fd, loc.name, flags, 0)
	s.release(ref)
	if err != nil {
		return nil, err
	}
	return &fileHandle{n: n, fd: fd, layer: layer, flags: flags}, nil
}

// current returns the handle's fd, first switching a read-only handle of a
// lower file to the upper copy if the file was copied up since it was
// opened: the kernel's readers see the new data too
// (fs/overlayfs/file.c:ovl_real_fdget). The caller must call h.mu.RUnlock.
func (h *fileHandle) current() int {
	h.mu.RLock()
	if h.layer == 0 || h.n.s.upper == nil {
		return h.fd
	}
	n := h.n
	n.mu.Lock()
	up := n.inUpperLocked()
	n.mu.Unlock()
	if !up {
		return h.fd
	}
	h.mu.RUnlock()
	h.mu.Lock()
	if h.layer != 0 {
		if nh, err := n.s.openHandle(n, h.flags); err == nil {
			unix.Close(h.fd)
			h.fd, h.layer = nh.fd, nh.layer
		}
	}
	h.mu.Unlock()
	h.mu.RLock()
	return h.fd
}

// fstat stats the open file; ok is false if the handle is not current.
func (h *fileHandle) fstat() (unix.Stat_t, bool) {
	var st unix.Stat_t
	fd := h.current()
	err := unix.Fstat(fd, &st)
	h.mu.RUnlock()
	return st, err == nil
}

var _ = (fs.FileReader)((*fileHandle)(nil))

// Read reads from the layer file, by splice where possible.
func (h *fileHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	fd := h.current()
	defer h.mu.RUnlock()
	n, err := unix.Pread(fd, dest, off)
	if err != nil {
		return nil, h.n.s.toErrno(ctx, "read", h.n, err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

var _ = (fs.FileWriter)((*fileHandle)(nil))

// Write writes to the (upper) layer file.
func (h *fileHandle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	fd := h.current()
	defer h.mu.RUnlock()
	n, err := unix.Pwrite(fd, data, off)
	if err != nil {
		return 0, h.n.s.toErrno(ctx, "write", h.n, err)
	}
	return uint32(n), 0
}

var _ = (fs.FileGetattrer)((*fileHandle)(nil))

// Getattr stats the open file.
func (h *fileHandle) Getattr(ctx context.Context, out *fuse.AttrOut) syscall.Errno {
	st, ok := h.fstat()
	if !ok {
		return syscall.EIO
	}
	h.n.s.fillAttr(h.n, nil, &st, &out.Attr)
	return 0
}

var _ = (fs.FileFlusher)((*fileHandle)(nil))

// Flush answers ENOSYS on purpose: the kernel then stops sending FLUSH for
// the whole mount, saving a round trip on every close(2). Nothing is lost:
// the layer filesystems report write errors at write and fsync (as they do
// under kernel overlay, whose flush only forwards to a ->flush that local
// filesystems lack), and strata leaves POSIX locks to the kernel, which
// drops them at close by itself.
func (h *fileHandle) Flush(ctx context.Context) syscall.Errno {
	return syscall.ENOSYS
}

var _ = (fs.FileFsyncer)((*fileHandle)(nil))

// Fsync syncs the file (fdatasync when asked), unless -o fsync=0.
func (h *fileHandle) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	if h.n.s.opts.NoSync {
		return 0
	}
	fd := h.current()
	defer h.mu.RUnlock()
	var err error
	if flags&1 != 0 { // FUSE_FSYNC_FDATASYNC
		err = unix.Fdatasync(fd)
	} else {
		err = unix.Fsync(fd)
	}
	return h.n.s.toErrno(ctx, "fsync", h.n, err)
}

var _ = (fs.FileReleaser)((*fileHandle)(nil))

// Release closes the layer fd.
func (h *fileHandle) Release(ctx context.Context) syscall.Errno {
	h.n.mu.Lock()
	if h.counted {
		h.n.cachedOpen--
	}
	if h.n.tmpfd == h.fd {
		h.n.tmpfd = -1 // an O_TMPFILE file closed before it got a name
	}
	h.n.mu.Unlock()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.fd >= 0 {
		unix.Close(h.fd)
		h.fd = -1
	}
	return 0
}

var _ = (fs.FileLseeker)((*fileHandle)(nil))

// Lseek answers SEEK_DATA and SEEK_HOLE from the layer file.
func (h *fileHandle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	fd := h.current()
	defer h.mu.RUnlock()
	r, err := unix.Seek(fd, int64(off), int(whence))
	if err != nil {
		return 0, h.n.s.toErrno(ctx, "lseek", h.n, err)
	}
	return uint64(r), 0
}

var _ = (fs.FileAllocater)((*fileHandle)(nil))

// Allocate is fallocate(2) on the (upper) layer file.
func (h *fileHandle) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	fd := h.current()
	defer h.mu.RUnlock()
	return h.n.s.toErrno(ctx, "fallocate", h.n, unix.Fallocate(fd, mode, int64(off), int64(size)))
}

var _ = (fs.NodeCopyFileRanger)((*node)(nil))

// CopyFileRange copies between two open files of the mount inside the
// kernel, without the data passing through strata.
func (n *node) CopyFileRange(ctx context.Context, fhIn fs.FileHandle, offIn uint64, out *fs.Inode, fhOut fs.FileHandle,
	offOut uint64, size uint64, flags uint64) (uint32, syscall.Errno) {
	hin, ok1 := asHandle(fhIn)
	hout, ok2 := asHandle(fhOut)
	if !ok1 || !ok2 {
		return 0, syscall.EBADF
	}
	fin := hin.current()
	defer hin.mu.RUnlock()
	fout := hout.current()
	defer hout.mu.RUnlock()
	ri, ro := int64(offIn), int64(offOut)
	w, err := unix.CopyFileRange(fin, &ri, fout, &ro, int(size), int(flags))
	if err != nil {
		return 0, n.s.toErrno(ctx, "copy_file_range", n, err)
	}
	return uint32(w), 0
}

// fsyncDir syncs the upper copy of a directory.
func (s *Stack) fsyncDir(ctx context.Context, n *node) syscall.Errno {
	if s.opts.NoSync || s.upper == nil {
		return 0
	}
	n.mu.Lock()
	up := n.inUpperLocked()
	n.mu.Unlock()
	if !up {
		return 0
	}
	ref, err := s.dirfd(n, 0)
	if err != nil {
		return s.toErrno(ctx, "fsyncdir", n, err)
	}
	defer s.release(ref)
	fd, err := unix.Openat(ref.fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return s.toErrno(ctx, "fsyncdir", n, err)
	}
	defer unix.Close(fd)
	return s.toErrno(ctx, "fsyncdir", n, unix.Fsync(fd))
}
