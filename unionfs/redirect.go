package unionfs

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"strata/internal/sysx"
	"strata/whiteout"
)

// Redirects (Documentation/filesystems/overlayfs.rst, "Redirect dir"): a
// kernel mount with redirect_dir=on renames a lower or merged directory by
// moving its upper copy and recording in overlay.redirect where the lower
// copies are. strata never writes redirects (it renames such directories
// with EXDEV, as the kernel does without redirect_dir), but it reads them
// exactly as the kernel does, which follows them even with redirect_dir=off
// (redirect_always_follow), so that an upper or lower layer written by such
// a mount shows the same tree:
//
//   - a relative redirect ("name") replaces the name looked up in the
//     parent's copies of the layers below the one holding it;
//   - an absolute one ("/a/b") restarts the lookup of the layers below
//     from their roots, walking the path component by component; each
//     component is looked up as a name is (a whiteout or non-directory on
//     the way ends the lookup, an opaque directory stops the layers below
//     unless a later absolute redirect on the way restarts them, and
//     redirects met on the way rewrite the path for the layers below);
//   - opaque directories, non-directories and the copy in the layer below
//     which nothing is looked up do not read it;
//   - a malformed value fails the lookup with EINVAL, a "." or ".."
//     component that is reached with EACCES;
//   - with userxattr (redirect_dir=nofollow) a redirect that is read fails
//     the lookup with EPERM.
//
// Each directory copy found through a redirect records where it is
// (dirLayer.at), so that every use of the node's copies (readdir,
// copy-up, whiteout decisions) reaches the copy the lookup merged.

// followRedirects reports whether lookups follow redirects: with the
// trusted format, as the kernel's default (redirect_dir=off follows when
// redirect_always_follow, the default); userxattr implies
// redirect_dir=nofollow (fs/overlayfs/params.c:ovl_fs_params_verify).
func (s *Stack) followRedirects() bool { return s.ns != whiteout.User }

// lookupData is the state of one name's lookup across the layers
// (fs/overlayfs/namei.c: struct ovl_lookup_data).
type lookupData struct {
	// name is what the next layer looks up: a name in the parent's copy,
	// or "/a/b", a path from the layer's root.
	name string
	// isDir: a directory was found; a non-directory below ends the merge.
	isDir bool
	// stop: no layer below is looked at.
	stop bool
	// last: this layer does not read opacity or redirect.
	last bool
	// redirect: a redirect was read.
	redirect bool
}

// hit is what one layer holds for a lookup.
type hit struct {
	found    bool // an object to keep: the answer, or a directory to merge
	whiteout bool // a whiteout ended the lookup
	st       unix.Stat_t
	opacity  whiteout.Opacity
	at       string // see dirLayer.at
	redirect string // the redirect the object carries, if read
}

func (h *hit) dirLayer(li int) dirLayer {
	return dirLayer{layer: li, opacity: h.opacity, at: h.at, redirect: h.redirect}
}

// errNoParentCopy: the parent's copy in a layer could not be opened.
var errNoParentCopy = errors.New("parent directory copy not reachable")

// lookupLayer looks d.name up in layer li: as a name in dir's copy in li,
// or as a path from li's root (fs/overlayfs/namei.c:ovl_lookup_layer).
// name is the name the lookup started with.
func (s *Stack) lookupLayer(dir *node, li int, name string, d *lookupData) (hit, error) {
	if d.name[0] != '/' {
		ref, err := s.dirfd(dir, li)
		if err != nil {
			return hit{}, fmt.Errorf("open layer %d dir: %w: %w", li, errNoParentCopy, err)
		}
		defer s.release(ref)
		at := ""
		if d.name != name {
			at = d.name
		}
		h, err := s.lookupStep(ref.fd, d.name, d, 0, "")
		h.at = at
		return h, err
	}
	// Counting down from the end, since a redirect on the way rewrites
	// the part before it.
	base := s.layers[li].fd
	defer func() {
		if base != s.layers[li].fd {
			unix.Close(base)
		}
	}()
	rem := len(d.name) - 1
	var walked []string
	for {
		start := len(d.name) - rem
		comp := d.name[start:]
		if i := strings.IndexByte(comp, '/'); i >= 0 {
			comp = comp[:i]
		}
		post := d.name[start+len(comp):]
		h, err := s.lookupStep(base, comp, d, start, post)
		if err != nil || !h.found {
			return hit{whiteout: h.whiteout && post == ""}, err
		}
		walked = append(walked, comp)
		if post == "" {
			h.at = "/" + strings.Join(walked, "/")
			return h, nil
		}
		fd, err := unix.Openat(base, comp, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
			return hit{}, nil // changed meanwhile
		}
		if err != nil {
			return hit{}, err
		}
		if base != s.layers[li].fd {
			unix.Close(base)
		}
		base = fd
		rem -= len(comp) + 1
	}
}

// lookupStep looks comp up in the directory base, as one step of a layer's
// lookup (fs/overlayfs/namei.c:ovl_lookup_single). post is what follows
// comp in an absolute path ("" for the last component) and prelen the
// length of d.name before comp.
func (s *Stack) lookupStep(base int, comp string, d *lookupData, prelen int, post string) (hit, error) {
	var h hit
	last := post == ""
	if comp == "." || comp == ".." {
		// fs/namei.c:lookup_one_common refuses them.
		return h, fmt.Errorf("redirect to %q: %w", d.name, unix.EACCES)
	}
	err := unix.Fstatat(base, comp, &h.st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ENAMETOOLONG) {
		return h, nil
	}
	if err != nil {
		return h, err
	}
	wh, err := whiteout.IsWhiteout(base, comp, &h.st, s.ns)
	if err != nil {
		return h, err
	}
	if wh {
		d.stop = true
		h.whiteout = true
		return h, nil
	}
	if h.st.Mode&unix.S_IFMT != unix.S_IFDIR {
		d.stop = true
		h.found = !d.isDir && last
		return h, nil
	}
	if last {
		d.isDir = true
	}
	if h.opacity, err = whiteout.GetOpacity(base, comp, s.ns); err != nil {
		return h, err
	}
	h.found = true
	if d.last {
		return h, nil
	}
	if h.opacity == whiteout.Opaque {
		d.stop = true
		return h, nil
	}
	val, ok, err := whiteout.ReadRedirect(base, comp, s.ns)
	if err != nil || !ok {
		return h, err
	}
	r, err := whiteout.ParseRedirect(val)
	if err != nil {
		return h, err
	}
	if r.Abs {
		// An absolute redirect restarts the layers below, even after an
		// opaque directory on the way.
		d.name = r.Path() + post
		d.stop = false
	} else {
		d.name = d.name[:prelen] + r.Name + post
	}
	d.redirect = true
	h.redirect = r.Raw
	return h, nil
}

// layersBelow lists the layers below li, for a lookup from their roots.
func (s *Stack) layersBelow(li int) []dirLayer {
	out := make([]dirLayer, 0, len(s.layers)-li-1)
	for j := li + 1; j < len(s.layers); j++ {
		out = append(out, dirLayer{layer: j})
	}
	return out
}

// entryIdentity returns the st_ino of the object e resolves to: that of a
// directory whose upper copy was redirected is its origin's, the topmost
// lower copy (fs/overlayfs/inode.c:ovl_getattr takes a merged directory's
// st_ino from its lower copy), so that a directory renamed by a kernel
// mount with redirect_dir=on keeps its inode number.
func (s *Stack) entryIdentity(e *entry) uint64 {
	if e.originLayer > 0 {
		return s.identity(s.layers[e.originLayer], e.originIno)
	}
	return s.identity(s.layers[e.layer], e.st.Ino)
}

// layerLoc is where a node's copy in one layer is, when a redirect moved
// it (dirLayer.at).
type layerLoc struct {
	layer int
	at    string
}

// redirectedLocs returns the moved copies of dirs, or nil.
func redirectedLocs(dirs []dirLayer) []layerLoc {
	var out []layerLoc
	for _, d := range dirs {
		if d.at != "" {
			out = append(out, layerLoc{d.layer, d.at})
		}
	}
	return out
}

// setLocs records where n's copies are, from its directory layers; it
// reports whether that changed.
func (n *node) setLocs(dirs []dirLayer) bool {
	locs := redirectedLocs(dirs)
	old := n.locs.Load()
	if old == nil && locs == nil {
		return false
	}
	if old != nil && locs != nil && len(*old) == len(locs) {
		same := true
		for i := range locs {
			same = same && (*old)[i] == locs[i]
		}
		if same {
			return false
		}
	}
	if locs == nil {
		n.locs.Store(nil)
	} else {
		n.locs.Store(&locs)
	}
	return true
}

// locIn returns where n's copy in layer li is ("" when it is its own name
// in the parent's copy).
func (n *node) locIn(li int) string {
	locs := n.locs.Load()
	if locs == nil {
		return ""
	}
	for _, l := range *locs {
		if l.layer == li {
			return l.at
		}
	}
	return ""
}

// openLayerPath opens the directory at path ("/a/b") from layer li's root,
// one component at a time, following no symlink.
func (s *Stack) openLayerPath(li int, path string) (int, error) {
	fd := s.layers[li].fd
	for _, c := range strings.Split(path[1:], "/") {
		nfd, err := unix.Openat(fd, c, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if fd != s.layers[li].fd {
			unix.Close(fd)
		}
		if err != nil {
			return -1, err
		}
		fd = nfd
	}
	if fd == s.layers[li].fd {
		return unix.Openat(fd, ".", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	}
	return fd, nil
}

// listedDirIdentity returns the d_ino of directory name, listed by n's
// upper copy (dirfd): id, its own identity, unless it carries a redirect
// that gives it its origin's (entryIdentity), so that d_ino equals st_ino.
//
// The kernel computes the d_ino of the upper entries of an "impure"
// directory (overlay.impure=y: it holds copied-up or renamed objects) by
// looking each up (fs/overlayfs/readdir.c:ovl_cache_update), and a lookup
// that fails costs the entry, or the readdir: drop says to leave the name
// out (a merged directory marks it stale), a non-nil error fails the
// readdir (a directory that merges nothing, ovl_dir_read_impure). Of the
// lookups strata makes, those of redirected directories can fail.
func (s *Stack) listedDirIdentity(n *node, dirs []dirLayer, dirfd int, name string, id uint64) (_ uint64, drop bool, _ error) {
	if _, ok, err := whiteout.ReadRedirect(dirfd, name, s.ns); err != nil || !ok {
		return id, false, nil
	}
	e, err := s.resolve(n, dirs, name)
	var errno unix.Errno
	switch {
	case err == nil && e.isDir() && e.layer == 0:
		return s.entryIdentity(&e), false, nil
	case err != nil && errors.As(err, &errno) && errno != unix.ENOENT && s.isImpure(dirfd):
		if merged(dirs) {
			return id, true, nil
		}
		return id, false, err
	}
	return id, false, nil
}

// isImpure reports whether the upper directory dirfd is marked
// overlay.impure=y (fs/overlayfs/util.c:ovl_path_check_dir_xattr).
func (s *Stack) isImpure(dirfd int) bool {
	var buf [1]byte
	n, err := sysx.Getxattr(dirfd, "", s.ns.Prefix()+"impure", buf[:])
	return err == nil && n == 1 && buf[0] == 'y'
}

// lookupTrace records where a lookup looks in each layer, for the
// offline tools (Stack.Resolve).
type lookupTrace struct {
	parent []string // per layer: where the parent directory's lookup looked
	looked []string // per layer: the path looked at, "" when not reached
	before []string // per layer: the lookup's name before that layer
}

func newTrace(parent []string) *lookupTrace {
	return &lookupTrace{parent: parent, looked: make([]string, len(parent)), before: make([]string, len(parent))}
}

// look records that layer li is looked at for name.
func (t *lookupTrace) look(li int, name string) {
	t.looked[li], t.before[li] = t.path(li, name), name
}

// path is where a lookup of name (a name, or an absolute redirect path)
// looks in layer li.
func (t *lookupTrace) path(li int, name string) string {
	switch {
	case strings.HasPrefix(name, "/"):
		return name
	case t.parent[li] == "/":
		return "/" + name
	}
	return t.parent[li] + "/" + name
}

// finish fills in, for each layer the lookup did not reach, where it would
// have looked: the name as the redirects of the layers above left it.
func (t *lookupTrace) finish(d *lookupData) {
	for j := range t.looked {
		if t.looked[j] != "" {
			continue
		}
		name := d.name
		for k := j + 1; k < len(t.looked); k++ {
			if t.before[k] != "" {
				name = t.before[k]
				break
			}
		}
		t.looked[j] = t.path(j, name)
	}
}
