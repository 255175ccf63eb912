package inspect_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/inspect"
	"strata/internal/uniontest"
	"strata/unionfs"
)

// lines renders changes as the CLI prints them.
func lines(changes []inspect.Change) []string {
	var out []string
	for _, c := range changes {
		l := string(c.Kind) + "  " + c.Path
		if c.MetadataOnly {
			l += " (metadata)"
		}
		out = append(out, l)
	}
	return out
}

func checkLines(t *testing.T, got []inspect.Change, want []string) {
	t.Helper()
	g := lines(got)
	if strings.Join(g, "\n") != strings.Join(want, "\n") {
		t.Errorf("diff:\n  %s\nwant:\n  %s", strings.Join(g, "\n  "), strings.Join(want, "\n  "))
	}
}

func TestDiffZoo(t *testing.T) {
	o := build(t, testNS(), zoo())
	changes, err := open(t, o).Diff()
	if err != nil {
		t.Fatal(err)
	}
	checkLines(t, changes, []string{
		"C  /d/a",
		"A  /d/new",
		"D  /f2d", // a type change: D then A
		"A  /f2d",
		"A  /f2d/c",
		"D  /op/hidden", // the opaque dir deletes what it hides, one D each
		"D  /op/mid",
		"A  /op/v",
		"D  /sym",
		"A  /uh1",
		"A  /uh2",
	})
	for _, c := range changes {
		if c.Path == "/d/a" && (strings.Join(c.Fields, ",") != "content,xattrs" || c.Type != "file") {
			t.Errorf("/d/a: fields %v type %s, want content,xattrs file", c.Fields, c.Type)
		}
	}
}

func TestDiffNeedsUpper(t *testing.T) {
	o := build(t, testNS(), stackSpec{lowers: []uniontest.Layer{{uniontest.File("f", "", 0o644)}}})
	if _, err := open(t, o).Diff(); err == nil {
		t.Errorf("Diff without an upper dir did not fail")
	}
}

// diffLowers is the lower side of TestDiffAfterMountOps.
func diffLowers() []uniontest.Layer {
	return []uniontest.Layer{
		{
			uniontest.File("a", "a", 0o644),
			uniontest.File("b", "b", 0o644),
			uniontest.File("c", "c", 0o644),
			uniontest.File("e", "e", 0o644),
			uniontest.File("g", "g", 0o644),
			uniontest.File("od/x", "x", 0o644),
			uniontest.File("od/y", "y", 0o644),
		},
		{
			uniontest.File("dir/1", "1", 0o644),
			uniontest.File("dir/sub/2", "2", 0o644),
			uniontest.File("tf", "tf", 0o644),
			uniontest.File("r", "r", 0o644),
			uniontest.File("s/x", "sx", 0o644),
			uniontest.File("s/keep", "k", 0o644),
		},
	}
}

// diffOps changes a mounted stack; diffWant is what diff must list
// afterwards.
func diffOps(t *testing.T, mnt string) {
	t.Helper()
	p := func(s string) string { return filepath.Join(mnt, s) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	f, err := os.OpenFile(p("a"), os.O_WRONLY|os.O_APPEND, 0)
	must(err)
	_, err = f.WriteString("more")
	must(err)
	must(f.Close())
	must(os.Chmod(p("b"), 0o600))
	must(os.WriteFile(p("new"), []byte("new"), 0o644))
	must(os.Remove(p("c")))
	must(os.RemoveAll(p("dir")))
	must(os.Mkdir(p("nd"), 0o755))
	must(os.WriteFile(p("nd/f"), []byte("f"), 0o644))
	must(os.RemoveAll(p("od")))
	must(os.Mkdir(p("od"), 0o755))
	must(os.WriteFile(p("od/x"), []byte("other x"), 0o644))
	must(os.Remove(p("tf")))
	must(os.Mkdir(p("tf"), 0o755))
	must(os.Symlink("a", p("sl")))
	must(os.Link(p("new"), p("a2")))
	must(unix.Lsetxattr(p("e"), "user.k", []byte("v"), 0))
	must(os.Rename(p("r"), p("r2")))
	old := time.Date(2010, 1, 1, 0, 0, 0, 0, time.UTC)
	must(os.Chtimes(p("g"), old, old))
	must(os.Remove(p("s/x")))
}

var diffWant = []string{
	"C  /a",
	"A  /a2",
	"C  /b (metadata)",
	"D  /c",
	"D  /dir",
	"C  /e (metadata)",
	"C  /g (metadata)",
	"A  /nd",
	"A  /nd/f",
	"A  /new",
	"C  /od/x",
	"D  /od/y",
	"D  /r",
	"A  /r2",
	"D  /s/x",
	"A  /sl",
	"D  /tf",
	"A  /tf",
}

// TestDiffAfterMountOps: known operations through a real kernel overlay
// mount and a real strata mount; diff of the upper dir they leave lists
// exactly those changes, the same for both.
func TestDiffAfterMountOps(t *testing.T) {
	for _, target := range targets {
		t.Run(target.Name(), func(t *testing.T) {
			target.Require(t)
			o := build(t, testNS(), stackSpec{lowers: diffLowers(), upper: uniontest.Layer{}})
			m := target.Mount(t, o)
			diffOps(t, m.Dir)
			m.Unmount(t)
			changes, err := open(t, o).Diff()
			if err != nil {
				t.Fatal(err)
			}
			checkLines(t, changes, diffWant)
		})
	}
}

// TestDiffMatchesTrees: every A/C/D line is a real difference between the
// merged trees with and without the upper dir, and every difference is
// covered by a line (the tree of an added or deleted directory by its own
// line).
func TestDiffMatchesTrees(t *testing.T) {
	o := build(t, testNS(), zoo())
	s := open(t, o)
	changes, err := s.Diff()
	if err != nil {
		t.Fatal(err)
	}
	with, err := s.Tree()
	if err != nil {
		t.Fatal(err)
	}
	lo := open(t, unionfs.Options{Lowers: o.Lowers, UserXattr: o.UserXattr, SquashUID: -1, SquashGID: -1})
	without, err := lo.Tree()
	if err != nil {
		t.Fatal(err)
	}
	covered := func(p string) bool {
		for _, c := range changes {
			if c.Path == p || (c.Kind == inspect.Deleted && strings.HasPrefix(p, c.Path+"/")) {
				return true
			}
		}
		return false
	}
	for _, d := range without.Compare(with) {
		p, _, _ := strings.Cut(d, ": ")
		if strings.HasPrefix(d, "/: ") || strings.Contains(d, "mtime") && !strings.Contains(d, "digest") && isDir(with, p) {
			continue // directory times are not compared
		}
		if !covered(p) {
			t.Errorf("difference not listed: %s", d)
		}
	}
}

func isDir(t inspect.Tree, p string) bool {
	for _, n := range t {
		if n.Path == p {
			return n.Type == "directory"
		}
	}
	return false
}
