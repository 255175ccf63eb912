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
}

// Resolution is what a path resolves to through the stack.
type Resolution struct {
	// Found: the path names a visible object.
	Found bool
	// Layer decides: the layer holding the object (a directory's topmost).
	Layer int
	// Stat is the lstat of the deciding object.
	Stat unix.Stat_t
	// Dirs lists, for a directory, the layers merged into it, top first.
	Dirs []DirLayer
	// WhiteoutLayer is the layer of the whiteout that hides the last
	// component, or -1.
	WhiteoutLayer int
	// MissingAt is the path prefix that does not resolve, when an earlier
	// component is missing, hidden or not a directory ("" otherwise).
	MissingAt string
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
		r.Found, r.Layer, r.Stat, r.Dirs = true, 0, st, exportDirs(dir.dirs)
		return r, nil
	}
	for i, c := range comps {
		if err := whiteout.CheckName(c); err != nil {
			return r, err
		}
		e, err := s.resolve(dir, dir.dirs, c)
		last := i == len(comps)-1
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
			r.Found, r.Layer, r.Stat, r.Dirs = true, e.layer, e.st, exportDirs(e.dirs)
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

func exportDirs(d []dirLayer) []DirLayer {
	if d == nil {
		return nil
	}
	out := make([]DirLayer, len(d))
	for i, x := range d {
		out[i] = DirLayer{Layer: x.layer, Opacity: x.opacity}
	}
	return out
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
