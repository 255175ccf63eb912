package unionfs

import (
	"context"
	"encoding/binary"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"strata/whiteout"
)

// readdir returns the merged listing of directory n: ".", "..", then each
// visible name once, in the order of the topmost layer that holds it, with
// its type from that layer and its identity as d_ino. Whiteouts are
// removed; xattr whiteouts only in layer dirs marked opaque "x" that are
// in a lower layer or are a layer's root, as Linux 6.18's readdir does
// (an upper subdirectory marked "x" lists them as broken names), while its
// lookup honours them everywhere.
func (s *Stack) readdir(ctx context.Context, n *node) ([]fuse.DirEntry, error) {
	_, dirs, removed := n.state()
	if removed {
		return nil, unix.ENOENT
	}
	parentIno := n.ino
	if loc := n.location(); loc.parent != nil {
		parentIno = loc.parent.ino
	}
	out := []fuse.DirEntry{
		{Name: ".", Mode: unix.S_IFDIR, Ino: n.ino},
		{Name: "..", Mode: unix.S_IFDIR, Ino: parentIno},
	}
	var seen map[string]struct{}
	if len(dirs) > 1 {
		seen = make(map[string]struct{})
	}
	buf := make([]byte, 64<<10)
	root := n.isRoot()
	for _, dl := range dirs {
		l := s.layers[dl.layer]
		xw := dl.opacity == whiteout.XattrWhiteouts && (!l.upper || root)
		ref, err := s.dirfd(n, dl.layer)
		if err != nil {
			return nil, err
		}
		fd, err := unix.Openat(ref.fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			s.release(ref)
			return nil, err
		}
		err = readDirents(fd, buf, func(name string, ino uint64, typ uint8) error {
			if seen != nil {
				if _, dup := seen[name]; dup {
					return nil
				}
				seen[name] = struct{}{}
			}
			mode := dtToMode(typ)
			if typ == unix.DT_UNKNOWN || typ == unix.DT_CHR ||
				(typ == unix.DT_REG && xw) {
				var st unix.Stat_t
				if err := unix.Fstatat(ref.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
					if err == unix.ENOENT {
						return nil // gone meanwhile
					}
					return err
				}
				mode = st.Mode & unix.S_IFMT
				if whiteout.IsCharWhiteout(&st) {
					return nil
				}
				if xw && whiteout.MaybeXattrWhiteout(&st) {
					wh, err := whiteout.HasWhiteoutXattr(ref.fd, name, s.ns)
					if err != nil {
						return err
					}
					if wh {
						return nil
					}
				}
			}
			id := s.identity(l, ino)
			if l.upper && mode == unix.S_IFDIR && len(s.layers) > 1 {
				var drop bool
				var err error
				if id, drop, err = s.listedDirIdentity(n, dirs, ref.fd, name, id); err != nil || drop {
					return err
				}
			}
			out = append(out, fuse.DirEntry{Name: name, Mode: mode, Ino: id})
			return nil
		})
		unix.Close(fd)
		s.release(ref)
		if err != nil {
			return nil, err
		}
	}
	for i := range out {
		out[i].Off = uint64(i + 1)
	}
	return out, nil
}

// readDirents calls fn for each entry of the directory open as fd, except
// "." and "..".
func readDirents(fd int, buf []byte, fn func(name string, ino uint64, typ uint8) error) error {
	for {
		n, err := unix.Getdents(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n <= 0 {
			return nil
		}
		b := buf[:n]
		for len(b) >= 19 {
			// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
			ino := binary.NativeEndian.Uint64(b[0:8])
			reclen := int(binary.NativeEndian.Uint16(b[16:18]))
			if reclen < 19 || reclen > len(b) {
				return unix.EIO
			}
			typ := b[18]
			nameb := b[19:reclen]
			for i, c := range nameb {
				if c == 0 {
					nameb = nameb[:i]
					break
				}
			}
			b = b[reclen:]
			name := string(nameb)
			if name == "." || name == ".." {
				continue
			}
			if err := fn(name, ino, typ); err != nil {
				return err
			}
		}
	}
}

func dtToMode(t uint8) uint32 {
	switch t {
	case unix.DT_REG:
		return unix.S_IFREG
	case unix.DT_DIR:
		return unix.S_IFDIR
	case unix.DT_LNK:
		return unix.S_IFLNK
	case unix.DT_CHR:
		return unix.S_IFCHR
	case unix.DT_BLK:
		return unix.S_IFBLK
	case unix.DT_FIFO:
		return unix.S_IFIFO
	case unix.DT_SOCK:
		return unix.S_IFSOCK
	}
	return 0
}

// dirHandle is an open directory. Like the kernel (which caches the merged
// list in the struct file), it lists the directory once, at the first read,
// and serves seeks from that list; a seek to 0 lists it anew. Directories
// usually open without a round trip (see openless.go), so that every READDIR
// comes with a handle of its own: one that starts at an offset other than 0
// continues the listing its node kept from the read at offset 0.
type dirHandle struct {
	n *node

	mu      sync.Mutex
	entries []fuse.DirEntry // protected by mu; nil until the first read
	pos     int             // protected by mu
}

var _ = (fs.NodeOpendirHandler)((*node)(nil))

// OpendirHandle opens directory n for reading. The kernel may cache the
// listing (FOPEN_CACHE_DIR): strata is the only writer while mounted, and
// every change through the mount invalidates it.
func (n *node) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if _, _, removed := n.state(); removed {
		return nil, 0, syscall.ENOENT
	}
	return &dirHandle{n: n}, fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE, 0
}

// listing returns the entries d reads from: its own, else (a handle whose
// first read is not at offset 0) the node's kept listing, else a new one.
// A new listing read from offset 0 is kept on the node for the reads that
// continue it; the read that finds its end drops it.
func (d *dirHandle) listing(ctx context.Context) ([]fuse.DirEntry, syscall.Errno) {
	if d.entries != nil {
		return d.entries, 0
	}
	n := d.n
	if d.pos > 0 {
		n.mu.Lock()
		kept := n.listing
		if kept != nil && d.pos >= len(kept) {
			n.listing = nil
		}
		n.mu.Unlock()
		if kept != nil {
			d.entries = kept
			return kept, 0
		}
	}
	entries, err := n.s.readdir(ctx, n)
	if err != nil {
		return nil, n.s.toErrno(ctx, "readdir", n, err)
	}
	n.mu.Lock()
	n.listing = entries
	n.mu.Unlock()
	d.entries = entries
	return entries, 0
}

var _ = (fs.FileReaddirenter)((*dirHandle)(nil))

// Readdirent returns the next entry, or nil at the end.
func (d *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	d.mu.Lock()
	defer d.mu.Unlock()
	entries, errno := d.listing(ctx)
	if errno != 0 {
		return nil, errno
	}
	if d.pos >= len(entries) {
		return nil, 0
	}
	e := entries[d.pos]
	d.pos++
	return &e, 0
}

var _ = (fs.FileLookuper)((*dirHandle)(nil))

// Lookup looks up a name READDIRPLUS lists. A name whose node is already
// in the tree gets no entry: the kernel keeps the one it has (an entry
// with node id 0 is "no attributes for this name", not ENOENT:
// fs/fuse/readdir.c:fuse_direntplus_link), and strata, the only writer,
// keeps that one current. This spares a walk of the layers per entry when
// a directory is listed after its names were looked up (git status, rm -rf
// of files just made).
func (d *dirHandle) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if d.n.GetChild(name) != nil {
		return nil, syscall.EEXIST
	}
	return d.n.Lookup(ctx, name, out)
}

var _ = (fs.FileSeekdirer)((*dirHandle)(nil))

// Seekdir moves to the entry after offset off (offsets are positions + 1).
func (d *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off == 0 {
		d.entries = nil
	}
	d.pos = int(off)
	return 0
}

var _ = (fs.FileFsyncdirer)((*dirHandle)(nil))

// Fsyncdir syncs the upper copy of the directory, if any.
func (d *dirHandle) Fsyncdir(ctx context.Context, flags uint32) syscall.Errno {
	return d.n.s.fsyncDir(ctx, d.n)
}

var _ = (fs.FileReleasedirer)((*dirHandle)(nil))

// Releasedir drops the listing.
func (d *dirHandle) Releasedir(ctx context.Context, flags uint32) {
	d.mu.Lock()
	d.entries = nil
	d.mu.Unlock()
}
