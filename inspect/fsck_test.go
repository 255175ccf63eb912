package inspect_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"strata/inspect"
	"strata/internal/uniontest"
	"strata/unionfs"
	"strata/whiteout"
)

// other returns the namespace the stack does not read.
func other(ns whiteout.NS) whiteout.NS {
	if ns == whiteout.User {
		return whiteout.Trusted
	}
	return whiteout.User
}

// problemStack has one of (almost) every problem fsck knows.
func problemStack(t *testing.T) unionfs.Options {
	t.Helper()
	uniontest.RequireRoot(t) // markers of both namespaces
	ns := testNS()
	o := build(t, ns, stackSpec{
		lowers: []uniontest.Layer{
			{
				uniontest.XattrWhiteoutOnly("ux/f"),
				uniontest.File(".wh.bar", "", 0o644),
				uniontest.Dir("wrongns", 0o755),
				uniontest.Xattr("wrongns", other(ns).Opaque(), "y"),
				// Redirects: followed (no problem), malformed, with a ".."
				// component, and a metacopy file (not followed).
				uniontest.Dir("redir", 0o755),
				uniontest.PrivateXattr("redir", "redirect", "/elsewhere"),
				uniontest.Dir("badredir", 0o755),
				uniontest.PrivateXattr("badredir", "redirect", "a/b"),
				uniontest.Dir("dotredir", 0o755),
				uniontest.PrivateXattr("dotredir", "redirect", "/x/../y"),
				uniontest.File("mc", "", 0o644),
				uniontest.PrivateXattr("mc", "metacopy", ""),
			},
			{
				uniontest.File("ux/f", "f", 0o644),
				uniontest.File("bar", "bar", 0o644),
				uniontest.File("foo", "foo", 0o644),
				uniontest.File("hid/z", "z", 0o644),
				uniontest.File("d/x", "x", 0o644),
				uniontest.File("xu/h", "h", 0o644),
				uniontest.File("op/lower", "l", 0o644),
				uniontest.File("fo/lf", "lf", 0o644),
				uniontest.File("keep", "k", 0o644),
				uniontest.File("old/x", "x", 0o644),
				uniontest.Dir("bot", 0o755), // the bottom layer: its redirect is never read
				uniontest.PrivateXattr("bot", "redirect", "a/b"),
			},
		},
		upper: uniontest.Layer{
			uniontest.Whiteout("d/orph"),
			uniontest.Whiteout("pu/w"),
			uniontest.Opaque("op"),
			uniontest.Whiteout("op/w"),
			uniontest.XattrWhiteout("xu/h"),
			uniontest.File(".wh.foo", "", 0o644),
			uniontest.File("hid/.wh..wh..opq", "", 0o644),
			uniontest.Dir("fo", 0o755),
			uniontest.Xattr("fo", "user.fuseoverlayfs.opaque", "y"),
			uniontest.File("orig", "o", 0o644),
			uniontest.Xattr("orig", "user.fuseoverlayfs.origin", "xyz"),
			uniontest.Dir("bad", 0o755),
			uniontest.PrivateXattr("bad", "opaque", "z"),
			uniontest.File("ofile", "", 0o644),
			uniontest.PrivateXattr("ofile", "opaque", "y"),
			// A directory renamed with redirect_dir=on: the whiteout inside
			// hides what its redirect finds.
			uniontest.Dir("rd", 0o755),
			uniontest.PrivateXattr("rd", "redirect", "/old"),
			uniontest.Whiteout("rd/x"),
			uniontest.Whiteout("old"),
			// Redirects the kernel ignores.
			uniontest.File("rfile", "", 0o644),
			uniontest.PrivateXattr("rfile", "redirect", "/old"),
			uniontest.Opaque("ropq"),
			uniontest.PrivateXattr("ropq", "redirect", "/old"),
		},
	})
	work := filepath.Join(o.Work, "work")
	for _, d := range []string{work, filepath.Join(work, "incompat", "volatile")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(work, "#strata.1.1"), []byte("half a copy"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(filepath.Join(work, "#1a"), unix.S_IFCHR, 0); err != nil {
		t.Fatal(err)
	}
	return o
}

// codes renders problems as "layer path CODE" lines, sorted.
func codes(ps []inspect.Problem) []string {
	var out []string
	for _, p := range ps {
		out = append(out, fmt.Sprintf("%s %s %s", p.Role, p.Path, p.Code))
	}
	sort.Strings(out)
	return out
}

func checkCodes(t *testing.T, what string, got []inspect.Problem, want []string) {
	t.Helper()
	sort.Strings(want)
	if g := codes(got); strings.Join(g, "\n") != strings.Join(want, "\n") {
		t.Errorf("%s:\n  %s\nwant:\n  %s", what, strings.Join(g, "\n  "), strings.Join(want, "\n  "))
	}
}

var lowerProblems = []string{
	"lower /.wh.bar FOREIGN_MARKER",
	"lower /badredir BAD_REDIRECT",
	"lower /dotredir BAD_REDIRECT",
	"lower /mc UNSUPPORTED_FEATURE",
	"lower /ux/f XWHITEOUT_UNMARKED",
	"lower /wrongns WRONG_NS",
}

func TestFsckFindsAndRepairs(t *testing.T) {
	o := problemStack(t)
	before := layerDump(t, stackDirs(o)...)
	treeBefore, err := open(t, o).Tree()
	if err != nil {
		t.Fatal(err)
	}

	rep, err := inspect.Check(o, inspect.CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := append([]string{
		"upper /d/orph ORPHAN_WHITEOUT",
		"upper /pu/w ORPHAN_WHITEOUT",
		"upper /op/w WHITEOUT_IN_OPAQUE",
		"upper /xu/h XWHITEOUT_IN_UPPER",
		"upper /.wh.foo FOREIGN_MARKER",
		"upper /hid/.wh..wh..opq FOREIGN_MARKER",
		"upper /fo FOREIGN_MARKER",
		"upper /orig FOREIGN_MARKER",
		"upper /bad BAD_MARKER",
		"upper /ofile BAD_MARKER",
		"upper /rfile BAD_MARKER",
		"upper /ropq BAD_MARKER",
		"work work/#strata.1.1 WORK_LEFTOVER",
		"work work/incompat/volatile VOLATILE_DIRTY",
	}, lowerProblems...)
	checkCodes(t, "dry run", rep.Problems, want)
	if rep.ExitCode() != 4 || len(rep.Repairs) != 0 {
		t.Errorf("dry run: exit %d, %d repairs; want 4, none", rep.ExitCode(), len(rep.Repairs))
	}
	for _, p := range rep.Problems {
		if p.Path == "/pu/w" && p.Severity != inspect.SeverityError || p.Path == "/d/orph" && p.Severity != inspect.SeverityWarning {
			t.Errorf("%s: severity %s", p.Path, p.Severity)
		}
	}
	sameDumps(t, before, layerDump(t, stackDirs(o)...)) // a dry run changes nothing

	rep, err = inspect.Check(o, inspect.CheckOptions{Repair: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rep.Repairs {
		if r.Error != "" {
			t.Errorf("repair %s %s: %s", r.Code, r.Path, r.Error)
		}
	}
	if rep.Corrected() != 12 || rep.ExitCode() != 5 {
		t.Errorf("repair: %d corrected, exit %d; want 12, 5 (1 corrected + 4 left)", rep.Corrected(), rep.ExitCode())
	}
	checkCodes(t, "left after repair", rep.Remaining, append([]string{
		"upper /orig FOREIGN_MARKER",
		"work work/incompat/volatile VOLATILE_DIRTY",
	}, lowerProblems...))

	// Lowers are never changed; the work dir keeps the kernel's shared
	// whiteout and the volatile marker.
	after := layerDump(t, o.Lowers...)
	for _, d := range o.Lowers {
		if diff := before[d].Compare(after[d]); len(diff) > 0 {
			t.Errorf("repair changed lower %s: %v", d, diff)
		}
	}
	for _, name := range []string{"#1a", "incompat/volatile"} {
		if _, err := os.Lstat(filepath.Join(o.Work, "work", name)); err != nil {
			t.Errorf("repair removed work/%s: %v", name, err)
		}
	}
	if _, err := os.Lstat(filepath.Join(o.Work, "work", "#strata.1.1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("work leftover still there: %v", err)
	}

	// The merged tree changed only where a foreign marker now means what
	// its writer meant.
	s := open(t, o)
	treeAfter, err := s.Tree()
	if err != nil {
		t.Fatal(err)
	}
	var diffs []string
	for _, d := range treeBefore.Compare(treeAfter) {
		p, rest, _ := strings.Cut(d, ": ")
		if strings.HasPrefix(rest, "mtime ") && !strings.Contains(rest, ", ") && isDir(treeAfter, p) {
			continue // removing a marker touches its directory
		}
		diffs = append(diffs, d)
	}
	wantDiffs := []string{
		"/.wh.foo: only in the first tree (file)",
		"/fo: xattrs map[user.fuseoverlayfs.opaque:y] != map[]", // converted to the kernel's marker
		"/fo/lf: only in the first tree (file)",
		"/foo: only in the first tree (file)",
		"/hid/.wh..wh..opq: only in the first tree (file)",
		"/hid/z: only in the first tree (file)",
		// An xattr whiteout in an upper subdirectory is listed by readdir
		// (as the kernel does) but resolves to nothing; as a char 0/0
		// whiteout it is no longer listed.
		"/xu/h: only in the first tree (unresolvable)",
	}
	if strings.Join(diffs, "\n") != strings.Join(wantDiffs, "\n") {
		t.Errorf("merged tree changes:\n  %s\nwant:\n  %s", strings.Join(diffs, "\n  "), strings.Join(wantDiffs, "\n  "))
	}
	ex, err := s.Explain("/foo", "/xu/h")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ex {
		if e.WhiteoutLayer != 0 || e.Layers[0].Holds != inspect.Whiteout {
			t.Errorf("%s: whiteout layer %d holding %s; want a 0/0 whiteout in the upper dir", e.Path, e.WhiteoutLayer, e.Layers[0].Holds)
		}
	}
}

// TestFsckRepairsToClean: a stack whose every problem is repairable ends
// clean: exit 1, then 0.
func TestFsckRepairsToClean(t *testing.T) {
	o := build(t, testNS(), stackSpec{
		lowers: []uniontest.Layer{{uniontest.File("d/x", "x", 0o644)}},
		upper:  uniontest.Layer{uniontest.Whiteout("d/orph"), uniontest.Whiteout("new/w"), uniontest.Opaque("d2"), uniontest.Whiteout("d2/w")},
	})
	rep, err := inspect.Check(o, inspect.CheckOptions{Repair: true})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ExitCode() != 1 || rep.Corrected() != 3 || len(rep.Remaining) != 0 {
		t.Errorf("repair: exit %d, %d corrected, remaining %v; want 1, 3, none", rep.ExitCode(), rep.Corrected(), codes(rep.Remaining))
	}
	rep, err = inspect.Check(o, inspect.CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ExitCode() != 0 {
		t.Errorf("after repair: exit %d, problems %v", rep.ExitCode(), codes(rep.Problems))
	}
}

// TestFsckCleanOnRealStacks: what kernel overlay and strata write through
// a mount (copy-ups, whiteouts, opaque dirs, renames, the kernel's shared
// whiteout in the work dir, its origin/impure xattrs) is not a problem.
func TestFsckCleanOnRealStacks(t *testing.T) {
	for _, target := range targets {
		t.Run(target.Name(), func(t *testing.T) {
			target.Require(t)
			o := build(t, testNS(), stackSpec{lowers: diffLowers(), upper: uniontest.Layer{}})
			m := target.Mount(t, o)
			diffOps(t, m.Dir)
			m.Unmount(t)
			rep, err := inspect.Check(o, inspect.CheckOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Problems) > 0 || rep.ExitCode() != 0 {
				t.Errorf("problems on a stack %s wrote: %v", target.Name(), rep.Problems)
			}
		})
	}
}

func TestFsckRefusesRepairWhileMounted(t *testing.T) {
	for _, target := range targets {
		t.Run(target.Name(), func(t *testing.T) {
			target.Require(t)
			o := build(t, testNS(), stackSpec{lowers: diffLowers(), upper: uniontest.Layer{uniontest.Whiteout("orph")}})
			target.Mount(t, o)
			before := layerDump(t, o.Upper)
			_, err := inspect.Check(o, inspect.CheckOptions{Repair: true})
			if !errors.Is(err, inspect.ErrInUse) {
				t.Errorf("repair while mounted: %v, want ErrInUse", err)
			}
			sameDumps(t, before, layerDump(t, o.Upper))
			rep, err := inspect.Check(o, inspect.CheckOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Notes) == 0 || !strings.Contains(rep.Notes[0], "in use") {
				t.Errorf("dry run while mounted: notes %q, want one saying it is in use", rep.Notes)
			}
		})
	}
}

func TestFsckStackLevel(t *testing.T) {
	ns := testNS()
	t.Run("work-other-fs", func(t *testing.T) {
		shm, err := os.MkdirTemp("/dev/shm", "strata-fsck-")
		if err != nil {
			t.Skipf("no second filesystem: %v", err)
		}
		t.Cleanup(func() { os.RemoveAll(shm) })
		o := build(t, ns, stackSpec{lowers: []uniontest.Layer{{uniontest.File("f", "f", 0o644)}}, upper: uniontest.Layer{}})
		o.Upper = filepath.Join(shm, "u")
		uniontest.BuildLayer(t, o.Upper, ns, uniontest.Layer{uniontest.Whiteout("pure/w")})
		var a, b unix.Stat_t
		if unix.Stat(o.Upper, &a) != nil || unix.Stat(o.Work, &b) != nil || a.Dev == b.Dev {
			t.Skip("/dev/shm is not another filesystem here")
		}
		rep, err := inspect.Check(o, inspect.CheckOptions{})
		if err != nil {
			t.Fatal(err)
		}
		checkCodes(t, "problems", rep.Problems, []string{"stack " + o.Work + " WORK_OTHER_FS", "upper /pure/w ORPHAN_WHITEOUT"})
	})
	t.Run("overlap", func(t *testing.T) {
		o := build(t, ns, stackSpec{lowers: []uniontest.Layer{{uniontest.File("f", "f", 0o644)}}, upper: uniontest.Layer{uniontest.Dir("w", 0o755)}})
		o.Work = filepath.Join(o.Upper, "w")
		rep, err := inspect.Check(o, inspect.CheckOptions{})
		if err != nil {
			t.Fatal(err)
		}
		checkCodes(t, "problems", rep.Problems, []string{"stack  LAYER_OVERLAP"})
	})
	t.Run("wrong-namespace", func(t *testing.T) {
		uniontest.RequireRoot(t)
		// Written in the privileged format, read with userxattr.
		o := build(t, whiteout.Trusted, stackSpec{
			lowers: []uniontest.Layer{{uniontest.File("d/f", "f", 0o644)}},
			upper:  uniontest.Layer{uniontest.Opaque("d"), uniontest.File("d/g", "g", 0o644)},
		})
		o.UserXattr = true
		rep, err := inspect.Check(o, inspect.CheckOptions{})
		if err != nil {
			t.Fatal(err)
		}
		checkCodes(t, "problems", rep.Problems, []string{"upper /d WRONG_NS"})
		if len(rep.Notes) != 1 || !strings.Contains(rep.Notes[0], "privileged format") {
			t.Errorf("notes %q, want the privileged-format hint", rep.Notes)
		}
	})
	t.Run("missing-layer", func(t *testing.T) {
		o := build(t, ns, stackSpec{lowers: []uniontest.Layer{{}}, upper: uniontest.Layer{}})
		o.Lowers = append(o.Lowers, filepath.Join(t.TempDir(), "missing"))
		if _, err := inspect.Check(o, inspect.CheckOptions{}); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("missing lower: %v, want ENOENT (an operational error)", err)
		}
	})
}
