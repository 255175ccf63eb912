package uniontest

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"strata/internal/sysx"
	"strata/whiteout"
)

// Node is what a snapshot records of one path. Every field but Ino and
// Dev is compared; fields that do not apply to the type are empty.
type Node struct {
	Type   string // file, dir, symlink, fifo, char, block, socket; or "error: ..." when lstat failed
	Mode   uint32 // permission bits including setuid, setgid and sticky
	UID    uint32
	GID    uint32
	Size   string // not for directories
	Alloc  string // regular files: "sparse" when st_blocks cover less than st_size, else "full"
	Digest string // regular files: the content (short text) or its sha256
	Target string // symlinks
	Rdev   string // devices: "major:minor"
	Xattrs []string
	Nlink  string // not for directories
	Links  string // other paths of the snapshot that share this inode
	Mtime  string // see timeClass
	Error  string // a directory that could not be listed, a file that could not be read

	Ino, Dev uint64 // not compared: consistency only
}

// fields lists the compared fields in a fixed order.
func (n *Node) fields() [][2]string {
	f := [][2]string{
		{"type", n.Type},
		{"mode", fmt.Sprintf("%#o", n.Mode)},
		{"owner", fmt.Sprintf("%d:%d", n.UID, n.GID)},
		{"size", n.Size},
		{"alloc", n.Alloc},
		{"content", n.Digest},
		{"target", n.Target},
		{"rdev", n.Rdev},
		{"xattrs", strings.Join(n.Xattrs, " ")},
		{"nlink", n.Nlink},
		{"links", n.Links},
		{"mtime", n.Mtime},
		{"error", n.Error},
	}
	return f
}

// String renders the node on one line (for dumps).
func (n *Node) String() string {
	var parts []string
	for _, f := range n.fields() {
		if f[1] != "" && f[1] != "0:0" && !(f[0] == "mode" && n.Type == "symlink") {
			parts = append(parts, f[0]+"="+f[1])
		}
	}
	return strings.Join(parts, " ")
}

// Violation is a broken identity rule seen on a mount: d_ino differing
// from st_ino, a wrong d_type, a missing "." or "..", a name listed twice,
// or an st_dev differing from the root's.
type Violation struct {
	Path string
	Kind string // the rule, without numbers: `d_ino != st_ino`
	What string // the rule with the values seen
}

// Snapshot is a tree as seen at one moment.
type Snapshot struct {
	Paths      []string // sorted; the root is "."
	Nodes      map[string]*Node
	Violations []Violation
}

// SnapshotOptions say how to take a snapshot.
type SnapshotOptions struct {
	// Since is when the test began: times at or after it are "recent".
	Since time.Time
	// Mount checks the identity rules of a mounted union (see [Violation]).
	Mount bool
	// Upper, when set, is the namespace of an upper dir being snapshotted:
	// [NormalizeUpper] is applied.
	Upper *whiteout.NS
}

// TakeSnapshot walks the tree at root through directory fds, never
// following symlinks, so that paths of any length work.
func TakeSnapshot(root string, o SnapshotOptions) (*Snapshot, error) {
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	w := &walker{o: o, s: &Snapshot{Nodes: map[string]*Node{}}, rootDev: st.Dev}
	w.s.Nodes["."] = w.node(fd, "", &st)
	w.dir(fd, "", &st)
	w.linkGroups()
	if o.Upper != nil {
		NormalizeUpper(*o.Upper, w.s)
	}
	for p := range w.s.Nodes {
		w.s.Paths = append(w.s.Paths, p)
	}
	sort.Strings(w.s.Paths)
	return w.s, nil
}

type walker struct {
	o       SnapshotOptions
	s       *Snapshot
	rootDev uint64
}

func (w *walker) violate(rel, kind, format string, args ...any) {
	if rel == "" {
		rel = "."
	}
	w.s.Violations = append(w.s.Violations, Violation{rel, kind, fmt.Sprintf(format, args...)})
}

// dir records the entries of the directory fd (path rel, stat st) and
// walks into subdirectories.
func (w *walker) dir(fd int, rel string, st *unix.Stat_t) {
	ents, err := readDirents(fd)
	if err != nil {
		w.nodeAt(rel).Error = "readdir: " + errnoName(err)
		return
	}
	byName := map[string]dirent{}
	var names []string
	for _, e := range ents {
		if _, dup := byName[e.Name]; dup {
			w.violate(joinRel(rel, e.Name), "listed twice", "listed more than once")
			continue
		}
		byName[e.Name] = e
		if e.Name != "." && e.Name != ".." {
			names = append(names, e.Name)
		}
	}
	if w.o.Mount {
		if e, ok := byName["."]; !ok {
			w.violate(rel, "no .", `readdir lacks "."`)
		} else if e.Ino != st.Ino {
			w.violate(rel, ". d_ino != st_ino", `"." d_ino %d != st_ino %d`, e.Ino, st.Ino)
		}
		// The d_ino of ".." is not checked: kernel overlay itself lists the
		// real parent's inode there in merged dirs (fs/overlayfs/readdir.c
		// takes "." and ".." from the real upper dir), not the st_ino of the
		// merged parent; at the mount root it is outside the mount anyway.
		if _, ok := byName[".."]; !ok {
			w.violate(rel, "no ..", `readdir lacks ".."`)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		crel := joinRel(rel, name)
		var cst unix.Stat_t
		if err := unix.Fstatat(fd, name, &cst, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			w.s.Nodes[crel] = &Node{Type: "error: lstat " + errnoName(err)}
			continue
		}
		w.s.Nodes[crel] = w.node(fd, name, &cst)
		if w.o.Mount {
			e := byName[name]
			if e.Ino != cst.Ino {
				w.violate(crel, "d_ino != st_ino", "d_ino %d != st_ino %d", e.Ino, cst.Ino)
			}
			if dt := dtName(e.Type); dt != typeName(cst.Mode) {
				w.violate(crel, "d_type != st_mode", "d_type %s != st_mode type %s", dt, typeName(cst.Mode))
			}
			if cst.Dev != w.rootDev {
				w.violate(crel, "st_dev != root's", "st_dev %d:%d != root's %d:%d", unix.Major(cst.Dev), unix.Minor(cst.Dev), unix.Major(w.rootDev), unix.Minor(w.rootDev))
			}
		}
		if cst.Mode&unix.S_IFMT == unix.S_IFDIR {
			cfd, err := unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				w.s.Nodes[crel].Error = "open: " + errnoName(err)
				continue
			}
			w.dir(cfd, crel, &cst)
			unix.Close(cfd)
		}
	}
}

func (w *walker) nodeAt(rel string) *Node {
	if rel == "" {
		rel = "."
	}
	return w.s.Nodes[rel]
}

// node records name in dirfd (dirfd itself when name is ""), whose lstat
// is st.
func (w *walker) node(dirfd int, name string, st *unix.Stat_t) *Node {
	n := &Node{
		Type: typeName(st.Mode),
		Mode: st.Mode & 0o7777,
		UID:  st.Uid,
		GID:  st.Gid,
		Ino:  st.Ino,
		Dev:  st.Dev,
	}
	n.Mtime = timeClass(st.Mtim, w.o.Since)
	isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
	if !isDir {
		n.Size = strconv.FormatInt(st.Size, 10)
		n.Nlink = strconv.FormatUint(uint64(st.Nlink), 10)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		n.Alloc = allocClass(st)
		d, err := digestAt(dirfd, name)
		if err != nil {
			n.Error = "read: " + errnoName(err)
		}
		n.Digest = d
	case unix.S_IFLNK:
		t, err := readlinkAt(dirfd, name)
		if err != nil {
			n.Error = "readlink: " + errnoName(err)
		}
		n.Target = strconv.Quote(t)
	case unix.S_IFCHR, unix.S_IFBLK:
		n.Rdev = fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	x, err := xattrsAt(dirfd, name)
	if err != nil {
		n.Xattrs = []string{"error: " + errnoName(err)}
	} else {
		n.Xattrs = x
	}
	return n
}

// linkGroups fills Links: for every non-directory inode seen under more
// than one path, each path lists the others.
func (w *walker) linkGroups() {
	type key struct{ dev, ino uint64 }
	groups := map[key][]string{}
	for p, n := range w.s.Nodes {
		if n.Type == "dir" || strings.HasPrefix(n.Type, "error") {
			continue
		}
		k := key{n.Dev, n.Ino}
		groups[k] = append(groups[k], p)
	}
	for _, paths := range groups {
		if len(paths) < 2 {
			continue
		}
		sort.Strings(paths)
		for _, p := range paths {
			var others []string
			for _, o := range paths {
				if o != p {
					others = append(others, quotePath(o))
				}
			}
			w.s.Nodes[p].Links = strings.Join(others, ",")
		}
	}
}

// NormalizeUpper removes from a snapshot of an upper dir what the kernel
// leaves undefined or writes for its own bookkeeping. It is the only place
// where upper dirs are normalised:
//
//   - the private xattrs overlay.origin (file handle of the lower object:
//     differs per filesystem and mount), overlay.impure (a readdir cache
//     hint for dirs holding copied-up objects), overlay.uuid (on the upper
//     root, uuid=on) and overlay.nlink (index=on bookkeeping) are dropped;
//     overlay.opaque and every other xattr are kept;
//   - whiteouts (char 0/0) get nlink 1 and no link group: the kernel creates
//     one whiteout inode per mount and hard-links it wherever a whiteout is
//     needed (fs/overlayfs/dir.c:ovl_whiteout, unless the upper fs refuses
//     links), so its nlink counts unrelated whiteouts. Other link groups are
//     compared as they are.
func NormalizeUpper(ns whiteout.NS, s *Snapshot) {
	drop := map[string]bool{}
	for _, suffix := range []string{"origin", "impure", "uuid", "nlink"} {
		drop[ns.Prefix()+suffix] = true
	}
	for _, n := range s.Nodes {
		kept := n.Xattrs[:0]
		for _, x := range n.Xattrs {
			name, _, _ := strings.Cut(x, "=")
			if !drop[name] {
				kept = append(kept, x)
			}
		}
		n.Xattrs = kept
		if n.Type == "char" && n.Rdev == "0:0" {
			n.Nlink, n.Links = "1", ""
		}
	}
}

// timeClass renders a timestamp for comparison: "fixture" for
// FixtureMtime, "fixture-atime" for FixtureAtime, "recent" for a time at or
// after since (set during the test), else the exact time.
func timeClass(ts unix.Timespec, since time.Time) string {
	t := time.Unix(ts.Sec, ts.Nsec).UTC()
	switch {
	case t.Equal(FixtureMtime):
		return "fixture"
	case t.Equal(FixtureAtime):
		return "fixture-atime"
	case !since.IsZero() && !t.Before(since.Add(-2*time.Second)) && t.Before(time.Now().Add(time.Minute)):
		return "recent"
	}
	return t.Format(time.RFC3339Nano)
}

// allocClass tells a file with holes from one without: "sparse" when the
// allocated blocks cover less than the size.
func allocClass(st *unix.Stat_t) string {
	if st.Blocks*512 < st.Size {
		return "sparse"
	}
	return "full"
}

// digestAt reads a regular file and renders its content: short printable
// text as a quoted string, anything else as its size and sha256 prefix.
func digestAt(dirfd int, name string) (string, error) {
	path := name
	if path == "" {
		path = "."
	}
	fd, err := unix.Openat(dirfd, path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NOATIME|unix.O_CLOEXEC, 0)
	if err != nil {
		// O_NOATIME needs ownership or CAP_FOWNER; try without.
		fd, err = unix.Openat(dirfd, path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return "", err
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	h := sha256.New()
	var short []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			h.Write(buf[:n])
			if len(short) <= 64 {
				short = append(short, buf[:min(n, 65)]...)
			}
		}
		if err != nil {
			break
		}
	}
	return renderData(short, h.Sum(nil)), nil
}

// renderData shows content: quoted if short printable text, else a digest.
func renderData(prefix, sum []byte) string {
	if len(prefix) <= 64 && printable(prefix) {
		return strconv.Quote(string(prefix))
	}
	return "sha256:" + hex.EncodeToString(sum)[:16]
}

// printable reports whether b is valid UTF-8 text without control
// characters other than newline and tab.
func printable(b []byte) bool {
	if !utf8.Valid(b) {
		return false
	}
	for _, r := range string(b) {
		if !strconv.IsPrint(r) && r != '\n' && r != '\t' {
			return false
		}
	}
	return true
}

// DataString renders bytes the way snapshots and op logs show content.
func DataString(b []byte) string {
	sum := sha256.Sum256(b)
	if len(b) > 64 {
		return fmt.Sprintf("len=%d sha256:%s", len(b), hex.EncodeToString(sum[:])[:16])
	}
	return renderData(b, sum[:])
}

// xattrsAt lists every xattr of name in dirfd (not following symlinks) as
// sorted "name=value" strings.
func xattrsAt(dirfd int, name string) ([]string, error) {
	names, err := sysx.ListxattrAll(dirfd, name)
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	out := make([]string, 0, len(names))
	for _, x := range names {
		v, err := sysx.GetxattrAll(dirfd, name, x)
		if err != nil {
			out = append(out, x+"=<"+errnoName(err)+">")
			continue
		}
		out = append(out, x+"="+DataString(v))
	}
	return out, nil
}

// quotePath shows a path as is when it is plain, else quoted (newlines,
// invalid UTF-8, spaces...).
func quotePath(p string) string {
	if len(p) > 120 {
		return fmt.Sprintf("...%q(%d bytes)", p[len(p)-80:], len(p))
	}
	if strconv.Quote(p) == `"`+p+`"` && !strings.ContainsAny(p, " ,:=") {
		return p
	}
	return strconv.Quote(p)
}
