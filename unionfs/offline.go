package unionfs

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"strata/whiteout"
)

// Offline access: tools that inspect a stack without mounting it (explain,
// diff, fsck, merge) resolve paths with exactly the code that serves the
// mount.

// OpenStack opens the layers of o for reading only: unlike a mount it does
// not touch the work dir, and every change through it fails with EROFS.
func OpenStack(o Options) (*Stack, error) {
	o.ReadOnly = true
	if err := o.Resolve(); err != nil {
		return nil, err
	}
	if err := o.Validate(); err != nil {
		return nil, err
	}
	return NewStack(o)
}

// LayerInfo describes one layer of a stack.
type LayerInfo struct {
	Index int    // 0 is the upper layer when there is one
	Path  string // as given
	Upper bool
}

// Layers lists the stack's layers, the upper one (if any) first, then the
// lowers top to bottom.
func (s *Stack) Layers() []LayerInfo {
	out := make([]LayerInfo, len(s.layers))
	for i, l := range s.layers {
		out[i] = LayerInfo{Index: l.index, Path: l.path, Upper: l.upper}
	}
	return out
}

// NS returns the private xattr namespace the stack reads.
func (s *Stack) NS() whiteout.NS { return s.ns }

// DirLayer is one layer's copy of a merged directory.
type DirLayer struct {
	Layer   int
	Opacity whiteout.Opacity
	// Path is the copy's path from the layer's root ("/a/b"): the merged
	// path, unless a redirect moved it (or one of its parents).
	Path string
	// Redirect is the overlay.redirect the copy carries, as stored, when
	// the lookup followed it to the layers below ("" otherwise).
	Redirect string
}

// RedirectHop is a redirect that a resolution followed.
type RedirectHop struct {
	// Path is the merged path of the directory whose copy carries it.
	Path string
	// Layer holds that copy; the layers below it are looked up at the
	// redirect.
	Layer int
	// Value is the redirect as stored: "/a/b" from the layer roots, or a
	// name in the parent directory.
	Value string
}

// Resolution is what a path resolves to through the stack.
type Resolution struct {
	// Found: the path names a visible object.
	Found bool
	// Layer decides: the layer holding the object (a directory's topmost).
	Layer int
	// Stat is the lstat of the deciding object.
	Stat unix.Stat_t
	// Ino is the st_ino a mount shows for the object.
	Ino uint64
	// Dirs lists, for a directory, the layers merged into it, top first.
	Dirs []DirLayer
	// WhiteoutLayer is the layer of the whiteout that hides the last
	// component, or -1.
	WhiteoutLayer int
	// MissingAt is the path prefix that does not resolve, when an earlier
	// component is missing, hidden or not a directory ("" otherwise).
	MissingAt string
	// LayerPath is the deciding object's path from the root of Layer: the
	// resolved path, unless a redirect moved a directory on the way.
	LayerPath string
	// Looked gives, per layer, the path from the layer's root at which
	// the lookup of the last component looks there (or, for the layers
	// it does not reach, would look): the resolved path, unless a
	// redirect moved it. nil when a parent does not resolve.
	Looked []string
	// Redirects lists the redirects followed on the way, in order.
	Redirects []RedirectHop
}

// Resolve resolves path (relative to the merged root; "" or "/" is the
// root) the way a lookup through the mount does.
func (s *Stack) Resolve(path string) (Resolution, error) {
	r := Resolution{WhiteoutLayer: -1}
	dir, err := newRoot(s)
	if err != nil {
		return r, err
	}
	comps := splitPath(path)
	if len(comps) == 0 {
		var st unix.Stat_t
		if err := unix.Fstat(s.layers[0].fd, &st); err != nil {
			return r, err
		}
		r.Found, r.Layer, r.Stat, r.LayerPath, r.Ino = true, 0, st, "/", dir.ino
		for _, d := range dir.dirs {
			r.Dirs = append(r.Dirs, DirLayer{Layer: d.layer, Opacity: d.opacity, Path: "/"})
			r.Looked = append(r.Looked, "/")
		}
		return r, nil
	}
	looked := make([]string, len(s.layers))
	for i := range looked {
		looked[i] = "/"
	}
	for i, c := range comps {
		if err := whiteout.CheckName(c); err != nil {
			return r, err
		}
		last := i == len(comps)-1
		tr := newTrace(looked)
		e, err := s.resolveTraced(dir, dir.dirs, c, tr)
		looked = tr.looked
		if last {
			r.Looked = looked
		}
		for _, d := range e.dirs {
			if err == nil && d.redirect != "" {
				r.Redirects = append(r.Redirects, RedirectHop{Path: "/" + strings.Join(comps[:i+1], "/"), Layer: d.layer, Value: d.redirect})
			}
		}
		if errors.Is(err, unix.ENOENT) {
			if last {
				r.WhiteoutLayer = e.whiteoutLayer
			} else {
				r.MissingAt = strings.Join(comps[:i+1], "/")
			}
			return r, nil
		}
		if err != nil {
			return r, fmt.Errorf("%s: %w", strings.Join(comps[:i+1], "/"), err)
		}
		if last {
			r.Found, r.Layer, r.Stat, r.Ino = true, e.layer, e.st, s.entryIdentity(&e)
			r.LayerPath = looked[e.layer]
			for _, d := range e.dirs {
				r.Dirs = append(r.Dirs, DirLayer{Layer: d.layer, Opacity: d.opacity, Path: looked[d.layer], Redirect: d.redirect})
			}
			return r, nil
		}
		if !e.isDir() {
			r.MissingAt = strings.Join(comps[:i+1], "/")
			return r, nil
		}
		dir = s.newNode(dir, c, &e)
	}
	return r, nil
}

// ReadDir returns the merged listing of the directory at path, without "."
// and "..", as readdir through the mount gives it.
func (s *Stack) ReadDir(path string) ([]DirEntry, error) {
	dir, err := newRoot(s)
	if err != nil {
		return nil, err
	}
	for _, c := range splitPath(path) {
		e, err := s.resolve(dir, dir.dirs, c)
		if err != nil {
			return nil, err
		}
		if !e.isDir() {
			return nil, unix.ENOTDIR
		}
		dir = s.newNode(dir, c, &e)
	}
	entries, err := s.readdir(context.Background(), dir)
	if err != nil {
		return nil, err
	}
	out := make([]DirEntry, 0, len(entries))
	for _, e := range entries[2:] {
		out = append(out, DirEntry{Name: e.Name, Mode: e.Mode, Ino: e.Ino})
	}
	return out, nil
}

// DirEntry is one entry of a merged listing.
type DirEntry struct {
	Name string
	Mode uint32 // file type bits
	Ino  uint64
}

func splitPath(p string) []string {
	var out []string
	for _, c := range strings.Split(p, "/") {
		if c != "" && c != "." {
			out = append(out, c)
		}
	}
	return out
}
