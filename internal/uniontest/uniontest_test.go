package uniontest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/internal/sysx"
	"strata/unionfs"
	"strata/whiteout"
)

// kernelSelf compares kernel overlay with itself: any difference is a bug
// of the harness (nondeterminism, a field that should have been
// normalised).
var kernelSelf = Config{Oracle: Kernel, Subject: KernelNamed("kernel#2"), NS: whiteout.Trusted}

// richCase exercises most of what the harness records: every fixture
// kind, whiteouts of both forms, opaque dirs, hard links, xattrs, and
// writes that copy up, whiteout, rename and link.
var richCase = Case{
	Name: "rich",
	Lowers: []Layer{
		{
			File("a/top", "top", 0o644),
			Whiteout("a/gone"),
			XattrWhiteout("x/gone"),
			Opaque("o"),
			File("o/new", "new", 0o600),
			Symlink("a/link", "../b"),
		},
		{
			File("a/gone", "hidden", 0o644),
			File("a/bottom", "bottom", 0o640),
			File("x/gone", "hidden", 0o644),
			File("x/kept", "kept", 0o644),
			File("o/old", "hidden", 0o644),
			File("b", "b\n", 0o4755),
			Link("b2", "b"),
			Fifo("fifo"),
			CharDev("null", 1, 3),
			Xattr("b", "user.k", "v"),
			Chown("a/bottom", 1000, 1000),
			Times("a/bottom", FixtureAtime, time.Date(2010, 1, 1, 0, 0, 0, 0, time.UTC)),
		},
	},
	Upper: Layer{Dir("u", 0o755), File("u/f", "upper", 0o644)},
	Ops: func(r *Recorder, mnt string) {
		r.ReadDir("")
		r.ReadDir("a")
		r.ReadDir("x")
		r.ReadFile("a/top")
		r.Lstat("a/gone")
		r.Lstat("x/gone")
		r.Readlink("a/link")
		r.Listxattr("b")
		r.Getxattr("b", "user.k")
		r.WriteFlags("a/bottom", unix.O_WRONLY|unix.O_APPEND, 0, "+more")
		r.Chmod("b", 0o755)
		r.Unlink("a/top")
		r.Rename("x/kept", "u/kept")
		r.Link("b2", "u/b3")
		r.Mkdir("a/gone", 0o700)
		r.Rmdir("o")
		r.Lstat("b2")
	},
}

func TestKernelAgainstKernel(t *testing.T) {
	for _, c := range []Case{richCase, {Name: "readonly", Lowers: richCase.Lowers,
		Ops: func(r *Recorder, mnt string) { r.ReadDir(""); r.ReadFile("b") }}} {
		t.Run(c.Name, func(t *testing.T) { kernelSelf.Run(t, c) })
	}
}

// tweaked is the kernel target with deliberate changes, to prove that the
// comparison catches each kind of difference.
type tweaked struct {
	Target
	name       string
	before     func(t testing.TB, o unionfs.Options) // on the layers, before mounting
	afterMount func(t testing.TB, mnt string) func() // returns an undo, run before unmount
	afterUmnt  func(t testing.TB, o unionfs.Options) // on the layers, after unmount
}

func (w tweaked) Name() string { return w.name }

func (w tweaked) Mount(t testing.TB, o unionfs.Options) *Mounted {
	t.Helper()
	if w.before != nil {
		w.before(t, o)
	}
	m := w.Target.Mount(t, o)
	undo := func() {}
	if w.afterMount != nil {
		undo = w.afterMount(t, m.Dir)
	}
	inner := m.unmount
	m.unmount = func() error {
		undo()
		err := inner()
		if err == nil && w.afterUmnt != nil {
			w.afterUmnt(t, o)
		}
		return err
	}
	return m
}

// hasDiff reports whether res has a difference in a section whose title
// starts with section, at a path containing path, in field.
func hasDiff(res *Result, section, path, field string) bool {
	for _, s := range res.Sections {
		if !strings.HasPrefix(s.Title, section) {
			continue
		}
		for _, d := range s.Diffs {
			if strings.Contains(d.Path, path) && d.Field == field {
				return true
			}
		}
	}
	return false
}

func TestDeliberateDifferences(t *testing.T) {
	base := Case{
		Name: "base",
		Lowers: []Layer{{
			File("f", "content", 0o644),
			File("g", "g", 0o644),
			Dir("d", 0o755),
			File("d/h", "h", 0o644),
		}},
		Upper: Layer{},
		Ops: func(r *Recorder, mnt string) {
			r.Lstat("extra")
			r.WriteFile("w", "written")
			r.Chmod("g", 0o600)
		},
	}
	top := func(o unionfs.Options) string { return o.Lowers[0] }
	type want struct{ section, path, field string }
	for _, tc := range []struct {
		name  string
		tweak tweaked
		wants []want
	}{
		{
			name: "extra-lower-file",
			tweak: tweaked{before: func(t testing.TB, o unionfs.Options) {
				os.WriteFile(filepath.Join(top(o), "extra"), []byte("x"), 0o644)
			}},
			wants: []want{{"(a)", "extra", "result"}, {"(b)", "extra", "exists"}},
		},
		{
			name: "content-mode-owner-xattr-mtime",
			tweak: tweaked{before: func(t testing.TB, o unionfs.Options) {
				l := top(o)
				os.WriteFile(filepath.Join(l, "f"), []byte("changed"), 0o644)
				os.Chmod(filepath.Join(l, "d"), 0o700)
				os.Lchown(filepath.Join(l, "d/h"), 7, 7)
				unix.Lsetxattr(filepath.Join(l, "g"), "user.extra", []byte("1"), 0)
			}},
			wants: []want{{"(b)", "f", "content"}, {"(b)", "f", "mtime"}, {"(b)", "d", "mode"},
				{"(b)", "d/h", "owner"}, {"(b)", "g", "xattrs"}},
		},
		{
			name: "hard-link",
			tweak: tweaked{before: func(t testing.TB, o unionfs.Options) {
				os.Remove(filepath.Join(top(o), "d/h"))
				os.Link(filepath.Join(top(o), "f"), filepath.Join(top(o), "d/h"))
			}},
			wants: []want{{"(b)", "d/h", "links"}, {"(b)", "f", "links"}, {"(b)", "f", "nlink"}},
		},
		{
			name: "upper-after-unmount",
			tweak: tweaked{afterUmnt: func(t testing.TB, o unionfs.Options) {
				os.Chmod(filepath.Join(o.Upper, "w"), 0o700)
				sysx.Setxattr(unix.AT_FDCWD, filepath.Join(o.Upper, "w"), "trusted.overlay.origin", []byte("x"), 0)
				whiteout.Create(unix.AT_FDCWD, filepath.Join(o.Upper, "ghost"))
			}},
			// The stray whiteout hides nothing, so only (c) sees it.
			wants: []want{{"(c)", "w", "mode"}, {"(c)", "ghost", "exists"}, {"(d) kernel#2's upper", "w", "mode"}},
		},
		{
			name: "identity",
			tweak: tweaked{afterMount: func(t testing.TB, mnt string) func() {
				// A tmpfs over a directory of the mount: another st_dev, and
				// a d_ino that is not the st_ino stat returns.
				if err := unix.Mount("tmpfs", filepath.Join(mnt, "d"), "tmpfs", 0, "mode=0755"); err != nil {
					t.Fatalf("mount tmpfs: %v", err)
				}
				return func() { unix.Unmount(filepath.Join(mnt, "d"), 0) }
			}},
			wants: []want{{"(b)", "d", "identity"}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tw := tc.tweak
			tw.Target, tw.name = Kernel, "kernel#2"
			cfg := Config{Oracle: Kernel, Subject: tw, NS: whiteout.Trusted}
			res := cfg.Execute(t, base)
			if res.Equal() {
				t.Fatalf("deliberate difference not detected")
			}
			for _, w := range tc.wants {
				if !hasDiff(res, w.section, w.path, w.field) {
					t.Errorf("no %s difference at %q in %s; got:\n%s", w.field, w.path, w.section, res)
				}
			}
			t.Logf("detected:\n%s", res)
		})
	}
}

func TestBuildLayer(t *testing.T) {
	RequireRoot(t)
	dir := t.TempDir()
	deep := strings.Repeat(strings.Repeat("d", 200)+"/", 25) + "leaf"
	BuildLayer(t, dir, whiteout.Trusted, Layer{
		File("s", "x", 0o4755),
		Chown("s", 12, 34),
		File(deep, "deep", 0o600),
		Symlink("l", "s"),
		Times("l", FixtureAtime, time.Unix(5, 0)),
		Opaque("o"),
		XattrWhiteout("xw/gone"),
	})
	snap, err := TakeSnapshot(dir, SnapshotOptions{Since: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	n := snap.Nodes["s"]
	if n == nil || n.Mode != 0o4755 || n.UID != 12 || n.GID != 34 || n.Mtime != "fixture" {
		t.Errorf("s: got %v, want mode 04755 owner 12:34 mtime fixture", n)
	}
	if n := snap.Nodes[deep]; n == nil || n.Digest != `"deep"` || n.Mtime != "fixture" {
		t.Errorf("path of %d bytes: got %v", len(deep), n)
	}
	if n := snap.Nodes["l"]; n == nil || n.Mtime != "1970-01-01T00:00:05Z" {
		t.Errorf("l: got %v, want mtime 1970-01-01T00:00:05Z", n)
	}
	if n := snap.Nodes["."]; n.Mtime != "fixture" {
		t.Errorf("root: got mtime %s, want fixture", n.Mtime)
	}
	if n := snap.Nodes["o"]; n == nil || strings.Join(n.Xattrs, " ") != `trusted.overlay.opaque="y"` {
		t.Errorf("o: got %v, want opaque y", n)
	}
	if n := snap.Nodes["xw"]; n == nil || strings.Join(n.Xattrs, " ") != `trusted.overlay.opaque="x"` {
		t.Errorf("xw: got %v, want opaque x", n)
	}
}

func TestNormalizeUpper(t *testing.T) {
	s := &Snapshot{Nodes: map[string]*Node{
		"wh1": {Type: "char", Rdev: "0:0", Nlink: "3", Links: "wh2"},
		"f":   {Type: "file", Nlink: "2", Links: "g", Xattrs: []string{`trusted.overlay.origin="x"`, `user.a="b"`}},
		"d": {Type: "dir", Xattrs: []string{`trusted.overlay.impure="y"`, `trusted.overlay.opaque="y"`,
			`trusted.overlay.uuid="u"`, `trusted.overlay.nlink="n"`, `user.overlay.origin="kept"`}},
	}}
	NormalizeUpper(whiteout.Trusted, s)
	if n := s.Nodes["wh1"]; n.Nlink != "1" || n.Links != "" {
		t.Errorf("whiteout: got nlink %s links %q, want 1 and none", n.Nlink, n.Links)
	}
	if n := s.Nodes["f"]; n.Nlink != "2" || n.Links != "g" || strings.Join(n.Xattrs, " ") != `user.a="b"` {
		t.Errorf("file: got %v", n)
	}
	if got, want := strings.Join(s.Nodes["d"].Xattrs, " "), `trusted.overlay.opaque="y" user.overlay.origin="kept"`; got != want {
		t.Errorf("dir xattrs: got %s, want %s", got, want)
	}
}

func TestTimeClass(t *testing.T) {
	since := time.Now()
	for _, tc := range []struct {
		t    time.Time
		want string
	}{
		{FixtureMtime, "fixture"},
		{FixtureAtime, "fixture-atime"},
		{since.Add(time.Second), "recent"},
		{time.Date(2020, 1, 2, 3, 4, 5, 6, time.UTC), "2020-01-02T03:04:05.000000006Z"},
	} {
		if got := timeClass(TS(tc.t), since); got != tc.want {
			t.Errorf("timeClass(%v): got %s, want %s", tc.t, got, tc.want)
		}
	}
}
