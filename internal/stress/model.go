package stress

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// Kind is the type of a model object.
type Kind uint8

const (
	// File is a regular file.
	File Kind = iota + 1
	// Dir is a directory.
	Dir
	// Symlink is a symbolic link.
	Symlink
)

func (k Kind) String() string {
	switch k {
	case File:
		return "file"
	case Dir:
		return "dir"
	case Symlink:
		return "symlink"
	}
	return fmt.Sprintf("kind(%d)", k)
}

// Obj is one object of the model. Hard links are several paths mapping to
// one *Obj.
type Obj struct {
	Kind   Kind
	Mode   uint32 // permission bits
	Data   []byte // File
	Target string // Symlink
	Xattrs map[string]string
	// PureUpper: a directory that exists only in the upper layer (made by
	// mkdir through the mount), which may be renamed; lower and merged
	// directories give EXDEV (kernel overlay without redirect_dir).
	PureUpper bool
}

func (o *Obj) clone() *Obj {
	c := *o
	c.Data = append([]byte(nil), o.Data...)
	c.Xattrs = map[string]string{}
	for k, v := range o.Xattrs {
		c.Xattrs[k] = v
	}
	return &c
}

// Tree is a model of (part of) a merged tree: paths relative to the root,
// "/"-separated, the root itself being "".
type Tree struct {
	M map[string]*Obj
}

// NewTree returns a tree holding only a root directory.
func NewTree() *Tree {
	return &Tree{M: map[string]*Obj{"": {Kind: Dir, Mode: 0o755, Xattrs: map[string]string{}}}}
}

// Get returns the object at p, or nil.
func (t *Tree) Get(p string) *Obj { return t.M[p] }

// Put sets p to o.
func (t *Tree) Put(p string, o *Obj) {
	if o.Xattrs == nil {
		o.Xattrs = map[string]string{}
	}
	t.M[p] = o
}

// isUnder reports whether p is strictly inside dir.
func isUnder(p, dir string) bool {
	if dir == "" {
		return p != ""
	}
	return strings.HasPrefix(p, dir+"/")
}

// RemoveAll removes p and everything under it.
func (t *Tree) RemoveAll(p string) {
	delete(t.M, p)
	for k := range t.M {
		if isUnder(k, p) {
			delete(t.M, k)
		}
	}
}

// Children returns the names directly inside dir, sorted.
func (t *Tree) Children(dir string) []string {
	var out []string
	for k := range t.M {
		if isUnder(k, dir) && !strings.Contains(k[len(prefixOf(dir)):], "/") {
			out = append(out, k[len(prefixOf(dir)):])
		}
	}
	sort.Strings(out)
	return out
}

func prefixOf(dir string) string {
	if dir == "" {
		return ""
	}
	return dir + "/"
}

// Move renames src (and, for a directory, its subtree) to dst, which must
// not exist.
func (t *Tree) Move(src, dst string) {
	moved := map[string]*Obj{}
	for k, o := range t.M {
		if k == src {
			moved[dst] = o
		} else if isUnder(k, src) {
			moved[dst+k[len(src):]] = o
		}
	}
	t.RemoveAll(src)
	for k, o := range moved {
		t.M[k] = o
	}
}

// Nlink counts the names of o.
func (t *Tree) Nlink(o *Obj) int {
	n := 0
	for _, x := range t.M {
		if x == o {
			n++
		}
	}
	return n
}

// Paths returns the paths of objects of the given kinds (all kinds when
// none is given), sorted, so that a seeded run picks the same ones.
func (t *Tree) Paths(kinds ...Kind) []string {
	var out []string
	for k, o := range t.M {
		if len(kinds) == 0 || hasKind(kinds, o.Kind) {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

func hasKind(ks []Kind, k Kind) bool {
	for _, x := range ks {
		if x == k {
			return true
		}
	}
	return false
}

// Mkdir applies a directory of a layer at p, bottom-up: a directory there
// already merges with it; anything else is replaced by an empty directory.
func (t *Tree) Mkdir(p string, mode uint32) {
	if o := t.M[p]; o != nil && o.Kind == Dir {
		// A merged directory's attributes come from its topmost layer.
		o.Mode = mode
		o.Xattrs = map[string]string{}
		return
	}
	t.RemoveAll(p)
	t.Put(p, &Obj{Kind: Dir, Mode: mode})
}

// Entry is a snapshot of one object as seen through a mount.
type Entry struct {
	Kind   Kind
	Mode   uint32
	Size   int64
	Sum    [32]byte
	Target string
	Nlink  uint64
	Xattrs map[string]string
}

func (e Entry) String() string {
	s := fmt.Sprintf("%s mode=%o", e.Kind, e.Mode)
	switch e.Kind {
	case File:
		s += fmt.Sprintf(" size=%d sum=%x nlink=%d", e.Size, e.Sum[:6], e.Nlink)
	case Symlink:
		s += " -> " + e.Target
	}
	if len(e.Xattrs) > 0 {
		s += fmt.Sprintf(" xattrs=%v", e.Xattrs)
	}
	return s
}

// Expect renders the model as the snapshot a correct mount shows.
func (t *Tree) Expect() map[string]Entry {
	out := make(map[string]Entry, len(t.M))
	for p, o := range t.M {
		e := Entry{Kind: o.Kind, Mode: o.Mode, Xattrs: map[string]string{}}
		for k, v := range o.Xattrs {
			e.Xattrs[k] = v
		}
		switch o.Kind {
		case File:
			e.Size = int64(len(o.Data))
			e.Sum = sha256.Sum256(o.Data)
			e.Nlink = uint64(t.Nlink(o))
		case Symlink:
			e.Target = o.Target
		}
		out[p] = e
	}
	return out
}

// Snapshot walks the tree at root (without following symlinks) and
// returns every object; skip, if not nil, says which paths not to descend
// into or record (besides the root).
func Snapshot(root string, skip func(rel string) bool) (map[string]Entry, error) {
	out := map[string]Entry{}
	var walk func(rel string) error
	walk = func(rel string) error {
		full := filepath.Join(root, rel)
		e, err := statEntry(full)
		if err != nil {
			return fmt.Errorf("%q: %w", rel, err)
		}
		out[rel] = e
		if e.Kind != Dir {
			return nil
		}
		ents, err := os.ReadDir(full)
		if err != nil {
			return fmt.Errorf("readdir %q: %w", rel, err)
		}
		for _, de := range ents {
			c := path.Join(rel, de.Name())
			if skip != nil && skip(c) {
				continue
			}
			if err := walk(c); err != nil {
				return err
			}
		}
		return nil
	}
	return out, walk("")
}

// statEntry describes the object at full path p.
func statEntry(p string) (Entry, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return Entry{}, err
	}
	e := Entry{Mode: st.Mode & 0o7777, Xattrs: map[string]string{}}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		e.Kind = File
		b, err := os.ReadFile(p)
		if err != nil {
			return e, err
		}
		if int64(len(b)) != st.Size {
			return e, fmt.Errorf("read %d bytes, stat says %d", len(b), st.Size)
		}
		e.Size, e.Sum, e.Nlink = st.Size, sha256.Sum256(b), st.Nlink
	case unix.S_IFDIR:
		e.Kind = Dir
	case unix.S_IFLNK:
		e.Kind = Symlink
		e.Mode = 0
		t, err := os.Readlink(p)
		if err != nil {
			return e, err
		}
		e.Target = t
	default:
		return e, fmt.Errorf("unexpected file type %o", st.Mode&unix.S_IFMT)
	}
	if e.Kind != Symlink {
		x, err := userXattrs(p)
		if err != nil {
			return e, err
		}
		e.Xattrs = x
	}
	return e, nil
}

// userXattrs reads the user.* attributes of p (not following symlinks).
func userXattrs(p string) (map[string]string, error) {
	out := map[string]string{}
	buf := make([]byte, 4096)
	n, err := unix.Llistxattr(p, buf)
	if errors.Is(err, unix.ERANGE) {
		sz, err2 := unix.Llistxattr(p, nil)
		if err2 != nil {
			return nil, err2
		}
		buf = make([]byte, sz)
		n, err = unix.Llistxattr(p, buf)
	}
	if err != nil {
		return nil, fmt.Errorf("listxattr: %w", err)
	}
	for _, name := range bytes.Split(buf[:n], []byte{0}) {
		if !bytes.HasPrefix(name, []byte("user.")) {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, string(name), v)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s: %w", name, err)
		}
		out[string(name)] = string(v[:m])
	}
	return out, nil
}

// Diff compares a snapshot with what the model expects and returns one
// line per difference (at most max).
func Diff(got, want map[string]Entry, max int) []string {
	var out []string
	add := func(f string, a ...any) {
		if len(out) < max {
			out = append(out, fmt.Sprintf(f, a...))
		}
	}
	keys := make([]string, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		g, ok := got[k]
		w := want[k]
		switch {
		case !ok:
			add("%q: missing, want %v", k, w)
		case !sameEntry(g, w):
			add("%q: got %v, want %v", k, g, w)
		}
	}
	keys = keys[:0]
	for k := range got {
		if _, ok := want[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		add("%q: unexpected %v", k, got[k])
	}
	return out
}

func sameEntry(a, b Entry) bool {
	if a.Kind != b.Kind || a.Mode != b.Mode || a.Size != b.Size || a.Sum != b.Sum ||
		a.Target != b.Target || a.Nlink != b.Nlink || len(a.Xattrs) != len(b.Xattrs) {
		return false
	}
	for k, v := range a.Xattrs {
		if w, ok := b.Xattrs[k]; !ok || w != v {
			return false
		}
	}
	return true
}
