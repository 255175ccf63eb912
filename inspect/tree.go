package inspect

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"strata/cow"
	"strata/internal/sysx"
	"strata/whiteout"
)

// Node is one object of a merged tree as a program sees it through a
// mount: what a round trip (merge, export/import) must preserve.
// Inode numbers, st_dev, atime and ctime are left out: the kernel leaves
// them to the filesystem.
type Node struct {
	Path   string            `json:"path"`             // from the merged root: "/", "/a/b"
	Type   string            `json:"type"`             // Kind names; "unresolvable" for a listed name that lookup refuses
	Mode   uint32            `json:"mode"`             // permission bits, setuid/setgid/sticky included
	UID    uint32            `json:"uid"`              // owner
	GID    uint32            `json:"gid"`              // group
	Size   int64             `json:"size,omitempty"`   // regular files
	Digest string            `json:"digest,omitempty"` // sha256 of a regular file's data
	Target string            `json:"target,omitempty"` // symlinks
	Rdev   uint64            `json:"rdev,omitempty"`   // devices
	Mtime  int64             `json:"mtime"`            // nanoseconds since the epoch
	Xattrs map[string]string `json:"xattrs,omitempty"` // as listxattr through a mount shows them
	// LinkOf is, for a non-directory with several names in the tree, the
	// first of those names in walk order ("" for that first one).
	LinkOf string `json:"link_of,omitempty"`
}

// Tree is a merged tree in walk order: each directory before its entries,
// entries sorted by name.
type Tree []Node

// Tree snapshots the stack's merged tree offline, through the mount's
// resolution: what a mount of the stack shows.
func (s *Stack) Tree() (Tree, error) {
	w := &treeWalk{links: map[[2]uint64]string{}}
	root, err := s.view.Resolve("")
	if err != nil {
		return nil, err
	}
	if err := w.add(s, "/", root.Layer, root.LayerPath, &root.Stat); err != nil {
		return nil, err
	}
	if err := s.treeDir(w, "/"); err != nil {
		return nil, err
	}
	return w.finish(), nil
}

func (s *Stack) treeDir(w *treeWalk, p string) error {
	ents, err := s.view.ReadDir(p)
	if err != nil {
		return fmt.Errorf("readdir %s: %w", p, err)
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
	for _, e := range ents {
		q := child(p, e.Name)
		r, err := s.view.Resolve(q)
		if err != nil && !lookupRefused(err) {
			return err
		}
		if err != nil || !r.Found {
			w.nodes = append(w.nodes, Node{Path: q, Type: "unresolvable"})
			continue
		}
		if err := w.add(s, q, r.Layer, r.LayerPath, &r.Stat); err != nil {
			return err
		}
		if r.Stat.Mode&unix.S_IFMT == unix.S_IFDIR {
			if err := s.treeDir(w, q); err != nil {
				return err
			}
		}
	}
	return nil
}

type treeWalk struct {
	nodes []Node
	links map[[2]uint64]string // (dev, ino) → first path
}

// add appends the object at p, decided by layer li, where it is at lp
// (p, unless a redirect moved a parent), with lstat st.
func (w *treeWalk) add(s *Stack, p string, li int, lp string, st *unix.Stat_t) error {
	n := nodeOf(p, st)
	err := s.withParent(li, lp, func(dirfd int, name string) error {
		var err error
		if n.Xattrs, err = visibleXattrs(dirfd, name, s.NS()); err != nil {
			return err
		}
		switch n.Type {
		case "symlink":
			n.Target, err = sysx.Readlinkat(dirfd, name)
		case "file":
			var f *os.File
			if f, err = openRead(dirfd, name); err == nil {
				n.Digest, err = digest(f)
				f.Close()
			}
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("%s in %s: %w", p, s.layers[li], err)
	}
	w.link(&n, st)
	w.nodes = append(w.nodes, n)
	return nil
}

func (w *treeWalk) link(n *Node, st *unix.Stat_t) {
	if n.Type == "directory" || st.Nlink < 2 {
		return
	}
	k := [2]uint64{st.Dev, st.Ino}
	if first, ok := w.links[k]; ok {
		n.LinkOf = first
	} else {
		w.links[k] = n.Path
	}
}

// finish returns the tree walked. Only links among visible names show:
// an object with one visible name has an empty LinkOf whatever its nlink.
func (w *treeWalk) finish() Tree { return Tree(w.nodes) }

func nodeOf(p string, st *unix.Stat_t) Node {
	n := Node{Path: p, Type: kindOf(st).String(), Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid,
		Mtime: st.Mtim.Nano()}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		n.Size = st.Size
	case unix.S_IFCHR, unix.S_IFBLK:
		n.Rdev = st.Rdev
		n.Type = typeName(st.Mode) // a 0/0 device seen through a mount is just a device
	case unix.S_IFLNK:
		n.Mode = 0 // symlink modes carry no meaning on Linux
	}
	return n
}

// DirTree snapshots a plain directory tree, typically a mount point, the
// way a program sees it: lstat, readlink, listxattr and file contents.
func DirTree(root string) (Tree, error) {
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: root, Err: err}
	}
	defer unix.Close(fd)
	w := &treeWalk{links: map[[2]uint64]string{}}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	n := nodeOf("/", &st)
	if n.Xattrs, err = allXattrs(fd, ""); err != nil {
		return nil, err
	}
	w.nodes = append(w.nodes, n)
	if err := dirTree(w, fd, "/"); err != nil {
		return nil, err
	}
	return w.finish(), nil
}

func dirTree(w *treeWalk, fd int, p string) error {
	names, err := cow.ReadNames(fd)
	if err != nil {
		return fmt.Errorf("readdir %s: %w", p, err)
	}
	slices.Sort(names)
	for _, name := range names {
		q := child(p, name)
		var st unix.Stat_t
		if err := unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if errors.Is(err, unix.ENOENT) || lookupRefused(err) {
				// A name the listing shows but lookup refuses: the
				// kernel lists whiteouts in non-merged dirs this way,
				// and directories whose redirect it rejects.
				w.nodes = append(w.nodes, Node{Path: q, Type: "unresolvable"})
				continue
			}
			return fmt.Errorf("stat %s: %w", q, err)
		}
		n := nodeOf(q, &st)
		if n.Xattrs, err = allXattrs(fd, name); err != nil {
			return fmt.Errorf("%s: %w", q, err)
		}
		switch n.Type {
		case "symlink":
			if n.Target, err = sysx.Readlinkat(fd, name); err != nil {
				return fmt.Errorf("%s: %w", q, err)
			}
		case "file":
			f, err := openRead(fd, name)
			if err != nil {
				return fmt.Errorf("%s: %w", q, err)
			}
			n.Digest, err = digest(f)
			f.Close()
			if err != nil {
				return fmt.Errorf("%s: %w", q, err)
			}
		}
		w.link(&n, &st)
		w.nodes = append(w.nodes, n)
		if n.Type == "directory" {
			cfd, err := unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("open %s: %w", q, err)
			}
			err = dirTree(w, cfd, q)
			unix.Close(cfd)
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// lookupRefused reports whether err is a lookup's refusal of a listed
// name that a mount gives too: a redirect the kernel rejects (EINVAL,
// EACCES, EPERM) or a directory that shares its origin with another
// (ESTALE).
func lookupRefused(err error) bool {
	return errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.ESTALE)
}

func digest(f *os.File) (string, error) {
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// allXattrs returns every attribute of the entry name of dirfd, or nil.
func allXattrs(dirfd int, name string) (map[string]string, error) {
	names, err := sysx.ListxattrAll(dirfd, name)
	if err != nil {
		return nil, fmt.Errorf("listxattr: %w", err)
	}
	var out map[string]string
	for _, x := range names {
		v, err := sysx.GetxattrAll(dirfd, name, x)
		if sysx.IsNoAttr(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("getxattr %s: %w", x, err)
		}
		if out == nil {
			out = map[string]string{}
		}
		out[x] = string(v)
	}
	return out, nil
}

// visibleXattrs returns the attributes a mount in namespace ns shows for
// the layer entry name of dirfd: private ones hidden, escaped ones
// ("trusted.overlay.overlay.X") shown unescaped: whiteout.NS.Shown, the
// rule the mount uses.
func visibleXattrs(dirfd int, name string, ns whiteout.NS) (map[string]string, error) {
	all, err := allXattrs(dirfd, name)
	if err != nil {
		return nil, err
	}
	for _, x := range slices.Collect(maps.Keys(all)) {
		if shown := ns.Shown(x); shown != x {
			v := all[x]
			delete(all, x)
			if shown != "" {
				all[shown] = v
			}
		}
	}
	if len(all) == 0 {
		return nil, nil
	}
	return all, nil
}

// Compare lists the differences between two trees, one line each, in path
// order; none means equal.
func (t Tree) Compare(u Tree) []string {
	a, b := map[string]*Node{}, map[string]*Node{}
	var paths []string
	for i := range t {
		a[t[i].Path] = &t[i]
		paths = append(paths, t[i].Path)
	}
	for i := range u {
		b[u[i].Path] = &u[i]
		if a[u[i].Path] == nil {
			paths = append(paths, u[i].Path)
		}
	}
	sort.Strings(paths)
	var out []string
	for _, p := range paths {
		x, y := a[p], b[p]
		switch {
		case y == nil:
			out = append(out, fmt.Sprintf("%s: only in the first tree (%s)", p, x.Type))
		case x == nil:
			out = append(out, fmt.Sprintf("%s: only in the second tree (%s)", p, y.Type))
		default:
			if d := x.diff(y); d != "" {
				out = append(out, p+": "+d)
			}
		}
	}
	return out
}

// diff describes how n and m differ, or returns "".
func (n *Node) diff(m *Node) string {
	var d []string
	f := func(name string, x, y any) {
		if x != y {
			d = append(d, fmt.Sprintf("%s %v != %v", name, x, y))
		}
	}
	f("type", n.Type, m.Type)
	f("mode", fmt.Sprintf("%04o", n.Mode), fmt.Sprintf("%04o", m.Mode))
	f("uid", n.UID, m.UID)
	f("gid", n.GID, m.GID)
	f("size", n.Size, m.Size)
	f("digest", n.Digest, m.Digest)
	f("target", n.Target, m.Target)
	f("rdev", n.Rdev, m.Rdev)
	f("mtime", n.Mtime, m.Mtime)
	f("link_of", n.LinkOf, m.LinkOf)
	if !maps.Equal(n.Xattrs, m.Xattrs) {
		d = append(d, fmt.Sprintf("xattrs %v != %v", n.Xattrs, m.Xattrs))
	}
	return strings.Join(d, ", ")
}
