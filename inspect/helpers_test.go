package inspect_test

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/inspect"
	"strata/internal/testenv"
	"strata/internal/uniontest"
	"strata/unionfs"
	"strata/whiteout"
)

// stackSpec is a fixture stack: lowers top first, and the upper dir (nil:
// none).
type stackSpec struct {
	lowers []uniontest.Layer
	upper  uniontest.Layer
}

// testNS is the xattr namespace fixtures are written in: the privileged
// one as root, userxattr otherwise.
func testNS() whiteout.NS {
	if os.Geteuid() == 0 {
		return whiteout.Trusted
	}
	return whiteout.User
}

// build builds spec under a fresh temp dir (l1..ln, u, w) and returns the
// stack's options, parsed the way the CLI parses them.
func build(t *testing.T, ns whiteout.NS, spec stackSpec) unionfs.Options {
	t.Helper()
	testenv.RequireMknod(t)
	if ns == whiteout.Trusted {
		testenv.RequireRoot(t)
	}
	dir := t.TempDir()
	var lowers []string
	for i, l := range spec.lowers {
		p := filepath.Join(dir, fmt.Sprintf("l%d", i+1))
		uniontest.BuildLayer(t, p, ns, l)
		lowers = append(lowers, p)
	}
	data := "lowerdir=" + strings.Join(lowers, ":")
	if spec.upper != nil {
		u, w := filepath.Join(dir, "u"), filepath.Join(dir, "w")
		uniontest.BuildLayer(t, u, ns, spec.upper)
		if err := os.Mkdir(w, 0o755); err != nil {
			t.Fatal(err)
		}
		data += ",upperdir=" + u + ",workdir=" + w
	}
	if ns == whiteout.User {
		data += ",userxattr"
	}
	o, err := unionfs.ParseOptions(data)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// open opens o for inspection, closed with the test.
func open(t *testing.T, o unionfs.Options) *inspect.Stack {
	t.Helper()
	s, err := inspect.Open(o)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// readOnly returns the stack of lowers only (no upper dir), as a
// read-only mount takes it. The kernel needs two lower layers for a mount
// without an upper dir: a single one gets an empty bottom layer, which
// changes nothing in the merged tree.
func readOnly(t *testing.T, lowers ...string) unionfs.Options {
	t.Helper()
	if len(lowers) == 1 {
		empty := t.TempDir()
		uniontest.BuildLayer(t, empty, testNS(), nil)
		lowers = append(lowers, empty)
	}
	data := "lowerdir=" + strings.Join(lowers, ":")
	if testNS() == whiteout.User {
		data += ",userxattr"
	}
	o, err := unionfs.ParseOptions(data)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// targets are the engines a merged tree is checked on.
var targets = []uniontest.Target{uniontest.Kernel, uniontest.FUSE}

// mountTree mounts o with target and returns what a program sees there.
func mountTree(t *testing.T, target uniontest.Target, o unionfs.Options) inspect.Tree {
	t.Helper()
	target.Require(t)
	m := target.Mount(t, o)
	tree, err := inspect.DirTree(m.Dir)
	if err != nil {
		t.Fatalf("%s: snapshot: %v", target.Name(), err)
	}
	m.Unmount(t)
	return tree
}

// mountSnapshot mounts o with target and takes the differential suite's
// snapshot of it: an oracle independent of package inspect.
func mountSnapshot(t *testing.T, target uniontest.Target, o unionfs.Options, since time.Time) *uniontest.Snapshot {
	t.Helper()
	target.Require(t)
	m := target.Mount(t, o)
	s, err := uniontest.TakeSnapshot(m.Dir, uniontest.SnapshotOptions{Since: since})
	if err != nil {
		t.Fatalf("%s: snapshot: %v", target.Name(), err)
	}
	m.Unmount(t)
	return s
}

// snapshotDiff compares two of the suite's snapshots, nlink aside: a lower
// file whose other name is hidden keeps its on-disk link count in the old
// stack, while the merged layer holds the visible name only. Link groups
// among visible names are compared.
func snapshotDiff(a, b *uniontest.Snapshot) []string {
	var out []string
	paths := map[string]bool{}
	for _, p := range a.Paths {
		paths[p] = true
	}
	for _, p := range b.Paths {
		paths[p] = true
	}
	var all []string
	for p := range paths {
		all = append(all, p)
	}
	sort.Strings(all)
	for _, p := range all {
		x, y := a.Nodes[p], b.Nodes[p]
		switch {
		case x == nil:
			out = append(out, p+": only after")
		case y == nil:
			out = append(out, p+": only before")
		default:
			xc, yc := *x, *y
			xc.Nlink, yc.Nlink = "", ""
			if xs, ys := xc.String(), yc.String(); xs != ys {
				out = append(out, fmt.Sprintf("%s: %s != %s", p, xs, ys))
			}
		}
	}
	return out
}

// layerDump snapshots a layer directory as it is on disk (markers and
// private xattrs included), to prove that something did not change it.
func layerDump(t *testing.T, dirs ...string) map[string]inspect.Tree {
	t.Helper()
	out := map[string]inspect.Tree{}
	for _, d := range dirs {
		if d == "" {
			continue
		}
		tree, err := inspect.DirTree(d)
		if err != nil {
			t.Fatalf("dump %s: %v", d, err)
		}
		out[d] = tree
	}
	return out
}

func stackDirs(o unionfs.Options) []string {
	return append(append([]string{}, o.Lowers...), o.Upper, o.Work)
}

// sameDumps fails t if two dumps of the same directories differ.
func sameDumps(t *testing.T, before, after map[string]inspect.Tree) {
	t.Helper()
	for d, b := range before {
		if diff := b.Compare(after[d]); len(diff) > 0 {
			t.Errorf("%s changed:\n  %s", d, strings.Join(diff, "\n  "))
		}
	}
}

// zoo is a stack with every marker: three lowers and an upper dir, char
// and xattr whiteouts, opaque "y" and "x" directories, type changes in both
// directions, hard links, symlinks (one standing where a directory path
// continues), an xattr on a changed file.
func zoo() stackSpec {
	l3 := uniontest.Layer{
		uniontest.File("d/a", "a3", 0o644),
		uniontest.File("d/gone", "g3", 0o644),
		uniontest.File("d/sub/deep", "deep", 0o600),
		uniontest.File("op/hidden", "h", 0o644),
		uniontest.File("xo/f", "x3", 0o644),
		uniontest.File("xo/keep", "k3", 0o644),
		uniontest.File("t2f/inner", "i", 0o644),
		uniontest.File("f2d", "was a file", 0o644),
		uniontest.File("hl1", "hard", 0o644),
		uniontest.Link("hl2", "hl1"),
		uniontest.Symlink("sym", "d/a"),
		uniontest.File("ydir/old", "o", 0o644),
		uniontest.File("x/one", "1", 0o644),
		uniontest.Xattr("d/a", "user.color", "blue"),
	}
	l2 := uniontest.Layer{
		uniontest.Dir("d", 0o755),
		uniontest.Whiteout("d/gone"),
		uniontest.XattrWhiteout("xo/f"),
		uniontest.File("op/mid", "m", 0o644),
		uniontest.Dir("x", 0o755),
		uniontest.PrivateXattr("x", "opaque", "x"),
		uniontest.File("x/two", "2", 0o644),
		uniontest.Opaque("ydir"),
		uniontest.File("ydir/new", "n", 0o644),
		uniontest.Whiteout("wdir"),
	}
	l1 := uniontest.Layer{
		uniontest.File("d/top", "t1", 0o644),
		uniontest.File("t2f", "now a file", 0o644),
		uniontest.Symlink("sym2", "../outside"),
		uniontest.Symlink("lnk", "d"),
	}
	upper := uniontest.Layer{
		uniontest.File("d/a", "upper a", 0o644),
		uniontest.File("d/new", "n", 0o644),
		uniontest.Opaque("op"),
		uniontest.File("op/v", "v", 0o644),
		uniontest.File("f2d/c", "c", 0o644),
		uniontest.File("uh1", "u", 0o644),
		uniontest.Link("uh2", "uh1"),
		uniontest.Whiteout("sym"),
	}
	return stackSpec{lowers: []uniontest.Layer{l1, l2, l3}, upper: upper}
}

// allPaths lists every path any layer of o holds, and a few more below
// them, for property tests.
func allPaths(t *testing.T, o unionfs.Options) []string {
	t.Helper()
	seen := map[string]bool{"/": true}
	for _, d := range append(append([]string{}, o.Lowers...), o.Upper) {
		if d == "" {
			continue
		}
		tree, err := inspect.DirTree(d)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range tree {
			seen[n.Path] = true
			seen[n.Path+"/below"] = true
		}
	}
	var out []string
	for p := range seen {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

// lstatType returns the type of path in a mounted tree, or "" when lstat
// fails with ENOENT or ENOTDIR.
func lstatType(t *testing.T, mnt, p string) string {
	t.Helper()
	var st unix.Stat_t
	err := unix.Lstat(filepath.Join(mnt, p), &st)
	if err == unix.ENOENT || err == unix.ENOTDIR {
		return ""
	}
	if err != nil {
		t.Fatalf("lstat %s: %v", p, err)
	}
	return typeOf(st.Mode)
}

func typeOf(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFREG:
		return "file"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFCHR:
		return "char device"
	case unix.S_IFBLK:
		return "block device"
	case unix.S_IFIFO:
		return "fifo"
	case unix.S_IFSOCK:
		return "socket"
	}
	return "?"
}
