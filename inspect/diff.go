package inspect

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"sort"

	"golang.org/x/sys/unix"

	"strata/cow"
	"strata/internal/sysx"
	"strata/unionfs"
)

// ChangeKind is the kind of one change, as docker diff prints it.
type ChangeKind string

const (
	// Added: the path is visible with the upper dir and not without it.
	Added ChangeKind = "A"
	// Changed: visible either way, with other content or metadata.
	Changed ChangeKind = "C"
	// Deleted: visible without the upper dir, not with it.
	Deleted ChangeKind = "D"
)

// Change is one line of a diff.
type Change struct {
	Kind ChangeKind `json:"kind"` // A, C or D
	Path string     `json:"path"` // from the merged root
	// Type of the object: the new one for A and C, the old one for D.
	Type string `json:"type"`
	// MetadataOnly: a C whose data (file content, symlink target, device
	// number) is unchanged.
	MetadataOnly bool `json:"metadata_only,omitempty"`
	// Fields that differ, for C: "content", "target", "rdev", "mode",
	// "owner", "mtime", "xattrs".
	Fields []string `json:"fields,omitempty"`
}

// Diff lists what the upper dir changes in the merged tree: the merged
// tree of the whole stack against the merged tree of the lowers-only
// stack, both through the mount's resolution. Like docker diff:
//
//   - a deleted directory is one D line (not one per entry inside it);
//   - an added directory is an A line followed by one per entry inside;
//   - a type change is D then A;
//   - an opaque directory over a lower one deletes every lower entry it
//     hides: one D per hidden name;
//   - a C line for a directory means its own mode, owner or xattrs
//     changed; directory times are not compared (every change inside a
//     directory changes them). Non-directories compare mtime too.
//
// Only directories the upper dir holds are visited, so the cost grows with
// the upper dir and the lower directories it touches, not with the stack.
func (s *Stack) Diff() ([]Change, error) {
	if !s.upper {
		return nil, errors.New("diff needs an upperdir: without one nothing changes")
	}
	lo, err := s.lowersOnly()
	if err != nil {
		return nil, err
	}
	d := &differ{s: s, lo: lo}
	if err := d.entry("/"); err != nil {
		return nil, err
	}
	if err := d.dir("/"); err != nil {
		return nil, err
	}
	return d.out, nil
}

type differ struct {
	s   *Stack
	lo  *unionfs.Stack // lowers-only: its layer i is s's layer i+1
	out []Change
}

func (d *differ) emit(k ChangeKind, p string, mode uint32) {
	d.out = append(d.out, Change{Kind: k, Path: p, Type: typeName(mode)})
}

// dir diffs the entries of directory p, which the upper dir holds.
func (d *differ) dir(p string) error {
	newEnts, err := d.s.view.ReadDir(p)
	if err != nil {
		return fmt.Errorf("readdir %s: %w", p, err)
	}
	oldModes := map[string]uint32{}
	if r, err := d.lo.Resolve(p); err != nil {
		return err
	} else if r.Found && r.Stat.Mode&unix.S_IFMT == unix.S_IFDIR {
		oldEnts, err := d.lo.ReadDir(p)
		if err != nil {
			return fmt.Errorf("readdir %s without the upper dir: %w", p, err)
		}
		for _, e := range oldEnts {
			oldModes[e.Name] = e.Mode
		}
	}
	newModes := map[string]uint32{}
	for _, e := range newEnts {
		newModes[e.Name] = e.Mode
	}
	inUpper, err := d.upperNames(p)
	if err != nil {
		return err
	}
	names := make([]string, 0, len(newModes)+len(oldModes))
	for n := range newModes {
		names = append(names, n)
	}
	for n := range oldModes {
		if _, ok := newModes[n]; !ok {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		q := child(p, n)
		_, isOld := oldModes[n]
		_, isNew := newModes[n]
		if isOld && isNew && !inUpper[n] {
			continue // resolved through the lowers either way
		}
		if err := d.entry(q); err != nil {
			return err
		}
	}
	return nil
}

// entry diffs the object at path q (the root included).
func (d *differ) entry(q string) error {
	rn, err := d.s.view.Resolve(q)
	if err != nil {
		return err
	}
	ro, err := d.lo.Resolve(q)
	if err != nil {
		return err
	}
	switch {
	case !rn.Found && !ro.Found:
		return nil
	case !rn.Found:
		d.emit(Deleted, q, ro.Stat.Mode)
		return nil
	case !ro.Found:
		d.emit(Added, q, rn.Stat.Mode)
		return d.addAll(q, &rn)
	}
	if rn.Stat.Mode&unix.S_IFMT != ro.Stat.Mode&unix.S_IFMT {
		d.emit(Deleted, q, ro.Stat.Mode)
		d.emit(Added, q, rn.Stat.Mode)
		return d.addAll(q, &rn)
	}
	if rn.Layer != 0 {
		// Neither the object nor, for a directory, its topmost copy is in
		// the upper dir: the lowers decide it both ways.
		return nil
	}
	fields, err := d.compare(q, &ro, &rn)
	if err != nil {
		return err
	}
	if len(fields) > 0 {
		c := Change{Kind: Changed, Path: q, Type: typeName(rn.Stat.Mode), Fields: fields, MetadataOnly: true}
		for _, f := range fields {
			if f == "content" || f == "target" || f == "rdev" {
				c.MetadataOnly = false
			}
		}
		d.out = append(d.out, c)
	}
	if rn.Stat.Mode&unix.S_IFMT == unix.S_IFDIR && q != "/" {
		return d.dir(q)
	}
	return nil
}

// addAll lists everything inside an added directory as added.
func (d *differ) addAll(p string, r *unionfs.Resolution) error {
	if r.Stat.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil
	}
	ents, err := d.s.view.ReadDir(p)
	if err != nil {
		return fmt.Errorf("readdir %s: %w", p, err)
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
	for _, e := range ents {
		q := child(p, e.Name)
		rq, err := d.s.view.Resolve(q)
		if err != nil {
			return err
		}
		if !rq.Found {
			continue
		}
		d.emit(Added, q, rq.Stat.Mode)
		if err := d.addAll(q, &rq); err != nil {
			return err
		}
	}
	return nil
}

// upperNames lists the names the upper dir holds in directory p, markers
// included.
func (d *differ) upperNames(p string) (map[string]bool, error) {
	out := map[string]bool{}
	err := d.s.withParent(0, p, func(dirfd int, name string) error {
		if name == "" {
			name = "."
		}
		fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		names, err := cow.ReadNames(fd)
		for _, n := range names {
			out[n] = true
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list %s in the upper dir: %w", p, err)
	}
	return out, nil
}

// compare lists what differs between the object at q without the upper dir
// (ro, lowers-only layer numbering) and with it (rn). Each is read where
// its resolution found it (LayerPath): a redirect may have moved it.
func (d *differ) compare(q string, ro, rn *unionfs.Resolution) ([]string, error) {
	var fields []string
	a, b := &ro.Stat, &rn.Stat
	oldLayer := ro.Layer + 1
	isDir := b.Mode&unix.S_IFMT == unix.S_IFDIR
	switch b.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		same, err := d.sameData(oldLayer, ro.LayerPath, rn.LayerPath, a, b)
		if err != nil {
			return nil, err
		}
		if !same {
			fields = append(fields, "content")
		}
	case unix.S_IFLNK:
		ta, err := d.target(oldLayer, ro.LayerPath)
		if err != nil {
			return nil, err
		}
		tb, err := d.target(rn.Layer, rn.LayerPath)
		if err != nil {
			return nil, err
		}
		if ta != tb {
			fields = append(fields, "target")
		}
	case unix.S_IFCHR, unix.S_IFBLK:
		if a.Rdev != b.Rdev {
			fields = append(fields, "rdev")
		}
	}
	if b.Mode&unix.S_IFMT != unix.S_IFLNK && a.Mode&0o7777 != b.Mode&0o7777 {
		fields = append(fields, "mode")
	}
	if a.Uid != b.Uid || a.Gid != b.Gid {
		fields = append(fields, "owner")
	}
	if !isDir && a.Mtim != b.Mtim {
		fields = append(fields, "mtime")
	}
	xa, err := d.xattrs(oldLayer, ro.LayerPath)
	if err != nil {
		return nil, err
	}
	xb, err := d.xattrs(rn.Layer, rn.LayerPath)
	if err != nil {
		return nil, err
	}
	if !maps.Equal(xa, xb) {
		fields = append(fields, "xattrs")
	}
	return fields, nil
}

func (d *differ) target(li int, q string) (string, error) {
	var t string
	err := d.s.withParent(li, q, func(dirfd int, name string) error {
		var err error
		t, err = sysx.Readlinkat(dirfd, name)
		return err
	})
	return t, err
}

func (d *differ) xattrs(li int, q string) (map[string]string, error) {
	var x map[string]string
	err := d.s.withParent(li, q, func(dirfd int, name string) error {
		var err error
		x, err = visibleXattrs(dirfd, name, d.s.NS())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%s in %s: %w", q, d.s.layers[li], err)
	}
	return x, nil
}

// sameData reports whether two regular files hold the same bytes: the old
// one at path pa of oldLayer, the new one at pb of the upper dir.
func (d *differ) sameData(oldLayer int, pa, pb string, a, b *unix.Stat_t) (bool, error) {
	if a.Size != b.Size {
		return false, nil
	}
	if a.Dev == b.Dev && a.Ino == b.Ino {
		return true, nil
	}
	fa, err := d.s.openFile(oldLayer, pa)
	if err != nil {
		return false, err
	}
	defer fa.Close()
	fb, err := d.s.openFile(0, pb)
	if err != nil {
		return false, err
	}
	defer fb.Close()
	return sameReaders(fa, fb)
}

func sameReaders(a, b io.Reader) (bool, error) {
	ba, bb := make([]byte, 64<<10), make([]byte, 64<<10)
	for {
		na, ea := io.ReadFull(a, ba)
		nb, eb := io.ReadFull(b, bb)
		if !bytes.Equal(ba[:na], bb[:nb]) {
			return false, nil
		}
		aEnd := errors.Is(ea, io.EOF) || errors.Is(ea, io.ErrUnexpectedEOF)
		bEnd := errors.Is(eb, io.EOF) || errors.Is(eb, io.ErrUnexpectedEOF)
		if ea != nil && !aEnd {
			return false, ea
		}
		if eb != nil && !bEnd {
			return false, eb
		}
		if aEnd || bEnd {
			return aEnd == bEnd, nil
		}
	}
}
