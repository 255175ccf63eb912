package unionfs

import (
	"context"
	"hash/fnv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"strata/internal/sysx"
	"strata/whiteout"
)

// location is where a node's object lives: the name in a parent directory.
// It is immutable; a rename installs a new one.
type location struct {
	parent *node // nil for the root
	name   string
	// stale: name was unlinked but the (upper, hard-linked) object has
	// other names; see node.location.
	stale bool
}

// node is one object of the merged tree, as the kernel knows it.
type node struct {
	fs.Inode

	s   *Stack
	ino uint64 // identity; immutable, equal to the StableAttr's Ino

	loc atomic.Pointer[location]

	mu sync.Mutex
	// layer is, for a non-directory, the layer holding the object.
	// Protected by mu.
	layer int
	// dirs is, for a directory, the layers merged into it, top first.
	// Replaced (never modified in place) under mu, so a copy of the slice
	// header taken under mu can be read after unlocking.
	dirs []dirLayer
	// removed: a directory that was removed, or a non-directory whose last
	// name was unlinked. Protected by mu.
	removed bool

	// ptOpen and cachedOpen count the open handles that use FUSE
	// passthrough and those that do not; see wrapHandle. Protected by mu.
	ptOpen     int
	cachedOpen int
	// expire: a copy-up broke this lower hard link; the kernel's entry for
	// the name must go (copyUpObject). Protected by mu.
	expire bool
	// tmpfd is the fd of an O_TMPFILE file that has no name yet (its
	// handle's), else -1. Protected by mu.
	tmpfd int

	// gone holds the attributes of a removed directory as they were at its
	// removal, for fstat(2) of its open fds (the kernel opens
	// directories without telling strata, see openlessDirs). Protected by mu.
	gone *unix.Stat_t

	// listing is, for a directory, the merged listing the last READDIR
	// from offset 0 made, kept for the READDIRs that continue it until one
	// finds its end (see dirHandle.listing). Protected by mu.
	listing []fuse.DirEntry

	fds []*dirFd // protected by Stack.fds.mu

	// locs lists the copies of a directory that a redirect moved (nil
	// when none did), for dirfd; see redirect.go.
	locs atomic.Pointer[[]layerLoc]
}

func (n *node) isDir() bool { return n.StableAttr().Mode&syscall.S_IFMT == syscall.S_IFDIR }

func (n *node) isRoot() bool { return n.loc.Load().parent == nil }

// location returns where the object lives. A non-directory whose recorded
// name was unlinked while other names remain takes one of those from the
// go-fuse tree. The new location replaces the stale one only if nothing
// (a rename) replaced it meanwhile.
func (n *node) location() *location {
	for {
		loc := n.loc.Load()
		if !loc.stale {
			return loc
		}
		name, p := n.Inode.Parent()
		if p == nil {
			return loc
		}
		pn, ok := p.Operations().(*node)
		if !ok || pn == loc.parent && name == loc.name {
			// go-fuse has not dropped the unlinked name yet.
			return loc
		}
		nl := &location{parent: pn, name: name}
		if n.loc.CompareAndSwap(loc, nl) {
			return nl
		}
	}
}

// unlinked records that name in p, one of several names of n's object, was
// unlinked: if it is the name n's location holds, that location is stale.
func (n *node) unlinked(p *node, name string) {
	for {
		loc := n.loc.Load()
		if loc.stale || loc.parent != p || loc.name != name {
			return
		}
		if n.loc.CompareAndSwap(loc, &location{parent: p, name: name, stale: true}) {
			return
		}
	}
}

// debugPath renders the node's path for log messages.
func (n *node) debugPath() string {
	if n == nil {
		return ""
	}
	var parts []string
	for x := n; x != nil; {
		loc := x.loc.Load()
		if loc.parent == nil {
			break
		}
		parts = append(parts, loc.name)
		x = loc.parent
	}
	for i, j := 0, len(parts)-1; i < j; i, j = i+1, j-1 {
		parts[i], parts[j] = parts[j], parts[i]
	}
	return "/" + strings.Join(parts, "/")
}

// state returns a consistent copy of the layer state.
func (n *node) state() (layer int, dirs []dirLayer, removed bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.layer, n.dirs, n.removed
}

// removeDir marks directory n removed, keeping st, its attributes at the
// removal, for goneAttr: with no links if its top copy was the upper one
// (the kernel then stats a dead directory), else as the lower copy still
// has them. The caller holds n.mu.
func (n *node) removeDir(st *unix.Stat_t) {
	n.removed = true
	gone := *st
	if len(n.dirs) > 0 && n.dirs[0].layer == 0 {
		gone.Nlink = 0
	}
	n.gone = &gone
}

// goneAttr returns the attributes of a removed directory at its removal.
func (n *node) goneAttr() (unix.Stat_t, []dirLayer, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.gone == nil { // set only with removed, by removeDir
		return unix.Stat_t{}, nil, false
	}
	return *n.gone, n.dirs, true
}

// tmpFd returns the fd of an unnamed O_TMPFILE file, or -1.
func (n *node) tmpFd() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.tmpfd
}

// isRemoved reports whether the node's object lost its last name.
func (n *node) isRemoved() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.removed
}

// topLayer returns the layer whose copy of the object decides its
// attributes: the object's layer, or a directory's topmost layer.
//
// Preconditions: n.mu held.
func (n *node) topLayerLocked() int {
	if n.dirs != nil {
		return n.dirs[0].layer
	}
	return n.layer
}

// inUpperLocked reports whether the object exists in the upper layer.
//
// Preconditions: n.mu held.
func (n *node) inUpperLocked() bool {
	return n.s.upper != nil && n.topLayerLocked() == 0
}

// merged reports whether a directory is merged from several layers; such
// directories report st_nlink 1, as the kernel does (ovl_getattr).
func merged(dirs []dirLayer) bool { return len(dirs) > 1 }

// newNode makes the node for entry e found as name in parent.
func (s *Stack) newNode(parent *node, name string, e *entry) *node {
	n := &node{s: s, layer: e.layer, dirs: e.dirs, tmpfd: -1}
	n.loc.Store(&location{parent: parent, name: name})
	n.setLocs(e.dirs)
	n.ino = s.entryIdentity(e)
	return n
}

// stableAttr returns the go-fuse identity of node n with object stat st.
// Names of one lower object with several hard links get distinct nodes in
// a writable mount, because copying one of them up breaks the link (the
// kernel does not hash such inodes by their lower inode either,
// fs/overlayfs/inode.c:ovl_hash_bylower); they still show one st_ino.
func (s *Stack) stableAttr(n *node, st *unix.Stat_t, parentIno uint64, name string) fs.StableAttr {
	a := fs.StableAttr{Mode: st.Mode & unix.S_IFMT, Ino: n.ino, Gen: 1}
	if s.brokenOnCopyUp(&entry{st: *st, layer: n.layer}) {
		h := fnv.New64a()
		var b [8]byte
		for i := range b {
			b[i] = byte(parentIno >> (8 * i))
		}
		h.Write(b[:])
		h.Write([]byte(name))
		a.Gen = 2 + h.Sum64()>>1
	}
	return a
}

// fillAttr converts st to FUSE attributes for node n with dirs (nil for
// non-directories).
func (s *Stack) fillAttr(n *node, dirs []dirLayer, st *unix.Stat_t, out *fuse.Attr) {
	*out = fuse.Attr{
		Ino: n.ino, Size: uint64(st.Size), Blocks: uint64(st.Blocks),
		Atime: uint64(st.Atim.Sec), Atimensec: uint32(st.Atim.Nsec),
		Mtime: uint64(st.Mtim.Sec), Mtimensec: uint32(st.Mtim.Nsec),
		Ctime: uint64(st.Ctim.Sec), Ctimensec: uint32(st.Ctim.Nsec),
		Mode: st.Mode, Nlink: uint32(st.Nlink), Rdev: uint32(st.Rdev),
		Owner: fuse.Owner{Uid: st.Uid, Gid: st.Gid}, Blksize: uint32(st.Blksize),
	}
	if merged(dirs) {
		out.Nlink = 1
	}
	s.mapOwner(out)
}

// mapOwner applies squash and id-mapping options to attributes going out.
func (s *Stack) mapOwner(out *fuse.Attr) {
	o := &s.opts
	if o.SquashUID >= 0 {
		out.Uid = uint32(o.SquashUID)
	} else if len(o.UIDMap) > 0 {
		if id, ok := o.UIDMap.ToContainer(out.Uid); ok {
			out.Uid = id
		} else {
			out.Uid = overflowID
		}
	}
	if o.SquashGID >= 0 {
		out.Gid = uint32(o.SquashGID)
	} else if len(o.GIDMap) > 0 {
		if id, ok := o.GIDMap.ToContainer(out.Gid); ok {
			out.Gid = id
		} else {
			out.Gid = overflowID
		}
	}
}

// overflowID is shown for ids outside a mapping, as the kernel shows
// /proc/sys/kernel/overflowuid (65534).
const overflowID = 65534

// stat returns the lstat of n's object in its deciding layer, and the
// directory layers for a directory.
func (s *Stack) stat(n *node) (unix.Stat_t, []dirLayer, error) {
	var st unix.Stat_t
	layer, dirs, removed := n.state()
	if removed && n.isDir() {
		return st, nil, unix.ENOENT
	}
	if dirs != nil {
		ref, err := s.dirfd(n, dirs[0].layer)
		if err != nil {
			return st, nil, err
		}
		err = unix.Fstat(ref.fd, &st)
		s.release(ref)
		return st, dirs, err
	}
	loc := n.location()
	ref, err := s.dirfd(loc.parent, layer)
	if err != nil {
		return st, nil, err
	}
	err = unix.Fstatat(ref.fd, loc.name, &st, unix.AT_SYMLINK_NOFOLLOW)
	s.release(ref)
	return st, nil, err
}

// objectRef returns a directory fd and a name that reach n's object in its
// deciding layer, for *at calls: the parent's fd and n's name, or, for a
// directory, its own fd and "".
func (s *Stack) objectRef(n *node) (dirRef, string, error) {
	layer, dirs, _ := n.state()
	if dirs != nil {
		ref, err := s.dirfd(n, dirs[0].layer)
		return ref, "", err
	}
	loc := n.location()
	ref, err := s.dirfd(loc.parent, layer)
	return ref, loc.name, err
}

var _ = (fs.NodeLookuper)((*node)(nil))

// Lookup resolves name in directory n across its layers.
func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	s := n.s
	if len(name) > unix.NAME_MAX {
		return nil, syscall.ENAMETOOLONG
	}
	_, dirs, removed := n.state()
	if removed {
		return nil, syscall.ENOENT
	}
	e, err := s.resolve(n, dirs, name)
	if err != nil {
		return nil, s.toErrno(ctx, "lookup", n, err)
	}
	child := s.childFor(ctx, n, name, &e)
	if loc := child.location(); child.isDir() && (loc.parent != n || loc.name != name) {
		// Another directory has this identity: two redirects to one lower
		// directory, or a redirect's origin still visible under its own
		// name. The kernel refuses the second one it meets
		// (fs/overlayfs/inode.c:ovl_verify_inode fails: ESTALE).
		s.log.Warn("directory shares its origin with another", "path", n.debugPath()+"/"+name, "other", child.debugPath())
		return nil, syscall.ESTALE
	}
	_, cdirs, _ := child.state()
	s.fillAttr(child, cdirs, &e.st, &out.Attr)
	return &child.Inode, 0
}

// brokenOnCopyUp reports whether e is a lower non-directory with several
// hard links in a writable mount: copying it up breaks the link.
func (s *Stack) brokenOnCopyUp(e *entry) bool {
	return s.writable && !s.layers[e.layer].upper && e.st.Mode&unix.S_IFMT != unix.S_IFDIR && e.st.Nlink > 1
}

// childFor returns the node for entry e found as name in n: the existing
// child node when it is the same object (its state refreshed unless it is
// already in the upper layer, which only strata's own operations change),
// or a new one.
//
// The identities are compared under the child's mu: copyUp holds it from
// before the upper copy appears until the copy's identity is recorded, so
// an entry that shows the fresh upper copy is not taken for another object.
func (s *Stack) childFor(ctx context.Context, n *node, name string, e *entry) *node {
	if ch := n.GetChild(name); ch != nil {
		if cn, ok := ch.Operations().(*node); ok && ch.StableAttr().Mode == e.st.Mode&unix.S_IFMT {
			cn.mu.Lock()
			same := cn.ino == s.entryIdentity(e)
			if same && !cn.inUpperLocked() && !cn.removed {
				cn.layer, cn.dirs = e.layer, e.dirs
				if cn.setLocs(e.dirs) {
					s.dropFds(cn, -1)
				}
			}
			cn.mu.Unlock()
			if same {
				return cn
			}
		}
	}
	cn := s.newNode(n, name, e)
	ino := n.StableAttr().Ino
	ch := n.NewInode(ctx, cn, s.stableAttr(cn, &e.st, ino, name))
	if got := ch.Operations().(*node); got != cn {
		// A node with this identity exists already (a hard link).
		return got
	}
	return cn
}

var _ = (fs.NodeGetattrer)((*node)(nil))

// Getattr returns n's attributes. With an open handle it uses the handle's
// fd, which also works after the last name is gone; a removed directory
// shows its attributes at its removal (see removeDir for its links).
func (n *node) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	s := n.s
	if h, ok := asHandle(f); ok {
		if st, ok := h.fstat(); ok {
			s.fillAttr(n, nil, &st, &out.Attr)
			return 0
		}
	}
	st, dirs, err := s.stat(n)
	if err == unix.ENOENT {
		if gst, gdirs, ok := n.goneAttr(); ok {
			st, dirs, err = gst, gdirs, nil
		}
	}
	if err != nil {
		return s.toErrno(ctx, "getattr", n, err)
	}
	s.fillAttr(n, dirs, &st, &out.Attr)
	return 0
}

var _ = (fs.NodeReadlinker)((*node)(nil))

// Readlink returns the target of a symlink.
func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	s := n.s
	ref, name, err := s.objectRef(n)
	if err != nil {
		return nil, s.toErrno(ctx, "readlink", n, err)
	}
	defer s.release(ref)
	target, err := sysx.Readlinkat(ref.fd, name)
	if err != nil {
		return nil, s.toErrno(ctx, "readlink", n, err)
	}
	return []byte(target), 0
}

var _ = (fs.NodeStatfser)((*node)(nil))

// Statfs reports the upper layer's filesystem, or the top lower's when
// there is no upper (as fs/overlayfs/super.c:ovl_statfs).
func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	s := n.s
	var st unix.Statfs_t
	if err := unix.Fstatfs(s.layers[0].fd, &st); err != nil {
		return s.toErrno(ctx, "statfs", n, err)
	}
	*out = fuse.StatfsOut{Blocks: st.Blocks, Bfree: st.Bfree, Bavail: st.Bavail, Files: st.Files, Ffree: st.Ffree,
		Bsize: uint32(st.Bsize), NameLen: uint32(st.Namelen), Frsize: uint32(st.Frsize)}
	return 0
}

var _ = (fs.NodeOnForgetter)((*node)(nil))

// OnForget releases the node's cached directory fds.
func (n *node) OnForget() {
	n.s.dropFds(n, -1)
}

// opacityOf returns the opacity recorded for layer li of dirs.
func opacityOf(dirs []dirLayer, li int) whiteout.Opacity {
	for _, d := range dirs {
		if d.layer == li {
			return d.opacity
		}
	}
	return whiteout.NotOpaque
}
