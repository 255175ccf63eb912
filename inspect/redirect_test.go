package inspect_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/inspect"
	"strata/internal/uniontest"
	"strata/layer"
	"strata/unionfs"
	"strata/whiteout"
)

// redirects is a stack whose upper dir a kernel mount with
// redirect_dir=on wrote: /new is the renamed /old (absolute redirect),
// /d/rel the renamed /d/o (relative), /new/in a renamed subdirectory, with
// changes inside. With below, the layer under the top lower holds part of
// /old too.
func redirects(below bool) stackSpec {
	top := uniontest.Layer{
		uniontest.File("old/x", "x", 0o644),
		uniontest.File("old/gone", "g", 0o644),
		uniontest.File("old/sub/s", "s", 0o644),
		uniontest.File("d/o/f", "f", 0o644),
		uniontest.File("keep", "k", 0o644),
	}
	bottom := uniontest.Layer{uniontest.File("other/b", "b", 0o644)}
	if below {
		bottom = append(bottom, uniontest.File("old/y", "y", 0o644))
	}
	upper := uniontest.Layer{
		uniontest.Dir("new", 0o750),
		uniontest.PrivateXattr("new", "redirect", "/old"),
		uniontest.Whiteout("old"),
		uniontest.File("new/u", "u", 0o644),
		uniontest.Whiteout("new/gone"),
		uniontest.Dir("new/in", 0o755),
		uniontest.PrivateXattr("new/in", "redirect", "sub"),
		uniontest.Whiteout("new/sub"),
		uniontest.File("new/x", "changed", 0o600), // a copy-up, changed
		uniontest.Dir("d/rel", 0o755),
		uniontest.PrivateXattr("d/rel", "redirect", "o"),
		uniontest.Whiteout("d/o"),
	}
	return stackSpec{lowers: []uniontest.Layer{top, bottom}, upper: upper}
}

// requireFollowed skips where redirects are not followed: a userxattr
// stack (the kernel's redirect_dir=nofollow).
func requireFollowed(t *testing.T) {
	t.Helper()
	if testNS() == whiteout.User {
		t.Skip("with userxattr redirects are not followed (lookups fail with EPERM)")
	}
}

// TestRedirectTreesAgreeWithMounts: offline, a stack with redirects shows
// the tree kernel overlay and strata show.
func TestRedirectTreesAgreeWithMounts(t *testing.T) {
	requireFollowed(t)
	for _, below := range []bool{false, true} {
		t.Run(fmt.Sprint("below=", below), func(t *testing.T) {
			o := build(t, testNS(), redirects(below))
			tree, err := open(t, o).Tree()
			if err != nil {
				t.Fatal(err)
			}
			var paths []string
			for _, n := range tree {
				paths = append(paths, n.Path)
			}
			want := []string{"/", "/d", "/d/rel", "/d/rel/f", "/keep", "/new", "/new/in", "/new/in/s", "/new/u", "/new/x", "/other", "/other/b"}
			if below {
				want = slices.Insert(want, 10, "/new/y")
			}
			if !slices.Equal(paths, want) {
				t.Errorf("offline tree %q, want %q", paths, want)
			}
			for _, target := range targets {
				if d := tree.Compare(mountTree(t, target, o)); len(d) > 0 {
					t.Errorf("%s shows another tree:\n  %s", target.Name(), strings.Join(d, "\n  "))
				}
			}
		})
	}
}

// TestRedirectExplain: explain says which redirects a lookup follows and
// shows each layer where the lookup looks there.
func TestRedirectExplain(t *testing.T) {
	requireFollowed(t)
	o := build(t, testNS(), redirects(true))
	s := open(t, o)
	ex, err := s.Explain("/new/in/s", "/new/y", "/d/rel")
	if err != nil {
		t.Fatal(err)
	}
	e := ex[0]
	if !e.Found || e.Layer != 1 || e.Layers[1].At != "/old/sub/s" || e.Layers[1].State != inspect.StateVisible || e.Layers[1].Holds != inspect.File {
		t.Errorf("/new/in/s: %+v; want the file of layer 1 at /old/sub/s", e)
	}
	want := []inspect.Redirect{{Path: "/new", Layer: 0, Value: "/old"}, {Path: "/new/in", Layer: 0, Value: "sub"}}
	if !slices.Equal(e.Redirects, want) {
		t.Errorf("/new/in/s redirects %+v, want %+v", e.Redirects, want)
	}
	if !strings.Contains(e.Verdict, "redirect followed: /new (layer 0) -> /old, /new/in (layer 0) -> sub") {
		t.Errorf("/new/in/s verdict %q does not name the redirects", e.Verdict)
	}
	e = ex[1]
	if !e.Found || e.Layer != 2 || e.Layers[2].At != "/old/y" || e.Layers[1].At != "/old/y" || e.Layers[1].State != inspect.StateAbsent {
		t.Errorf("/new/y: %+v; want layer 2's file at /old/y, nothing in layer 1 at /old/y", e)
	}
	e = ex[2]
	if len(e.Merged) != 2 || e.Merged[1].At != "/d/o" || e.Layers[0].Redirect != "o" || len(e.Layers[0].Notes) == 0 ||
		!strings.Contains(e.Layers[0].Notes[0], `redirect "o" followed`) {
		t.Errorf("/d/rel: %+v; want merged with /d/o of layer 1 and a note on layer 0's redirect", e)
	}
}

// TestRedirectDiff: a renamed directory is a D of the old name and an A
// of the new one and everything in it, as docker diff shows a rename.
func TestRedirectDiff(t *testing.T) {
	requireFollowed(t)
	o := build(t, testNS(), redirects(true))
	changes, err := open(t, o).Diff()
	if err != nil {
		t.Fatal(err)
	}
	checkLines(t, changes, []string{
		"D  /d/o", "A  /d/rel", "A  /d/rel/f",
		"A  /new", "A  /new/in", "A  /new/in/s", "A  /new/u", "A  /new/x", "A  /new/y",
		"D  /old",
	})
}

// TestRedirectMerge: a redirect that the upper dir and the top lower
// resolve among themselves is folded into a new layer without it; one
// that reaches the layers staying below is refused, clearly and without
// changes.
func TestRedirectMerge(t *testing.T) {
	requireFollowed(t)
	uniontest.RequireRoot(t)
	t.Run("within", func(t *testing.T) {
		since := time.Now()
		o := build(t, testNS(), redirects(false))
		want := mountSnapshot(t, uniontest.Kernel, o, since)
		plan, err := inspect.Merge(context.Background(), o, inspect.MergeOptions{Apply: true, Output: filepath.Join(t.TempDir(), "merged")})
		if err != nil {
			t.Fatal(err)
		}
		if !plan.Verified {
			t.Errorf("merge not verified")
		}
		checkKernelFormat(t, plan.Target, testNS().String())
		after := readOnly(t, plan.NewLowers...)
		for _, target := range targets {
			if d := snapshotDiff(want, mountSnapshot(t, target, after, since)); len(d) > 0 {
				t.Errorf("%s: the merged layer shows another tree:\n  %s", target.Name(), strings.Join(d, "\n  "))
			}
		}
	})
	t.Run("below", func(t *testing.T) {
		o := build(t, testNS(), redirects(true))
		before := layerDump(t, stackDirs(o)...)
		for _, apply := range []bool{false, true} {
			out := filepath.Join(t.TempDir(), "merged")
			_, err := inspect.Merge(context.Background(), o, inspect.MergeOptions{Apply: apply, Output: out})
			if err == nil || !strings.Contains(err.Error(), "/new") || !strings.Contains(err.Error(), "redirect") {
				t.Errorf("apply=%v: %v; want a refusal naming /new and its redirect", apply, err)
			}
			if _, err := os.Lstat(out); err == nil {
				t.Errorf("apply=%v: %s was created", apply, out)
			}
		}
		sameDumps(t, before, layerDump(t, stackDirs(o)...))
	})
}

// TestRedirectExportRefused: an upper dir with redirects is not a layer
// the OCI format can express: export refuses it by name.
func TestRedirectExportRefused(t *testing.T) {
	o := build(t, testNS(), redirects(false))
	var buf bytes.Buffer
	_, err := layer.Export(context.Background(), o.Upper, &buf, layer.ExportOptions{NS: []whiteout.NS{testNS()}})
	if err == nil || !strings.Contains(err.Error(), "redirect") {
		t.Errorf("export of an upper dir with redirects: %v; want a refusal naming the redirect", err)
	}
}

// TestFsckCleanOnKernelRedirects: an upper dir a kernel mount with
// redirect_dir=on wrote has no problem: its redirects are followed, and
// the whiteouts inside renamed directories hide what the redirects find.
func TestFsckCleanOnKernelRedirects(t *testing.T) {
	requireFollowed(t)
	uniontest.RequireRoot(t)
	uniontest.Kernel.Require(t)
	o := build(t, testNS(), stackSpec{
		lowers: []uniontest.Layer{
			{uniontest.File("old/x", "x", 0o644), uniontest.File("old/sub/s", "s", 0o644), uniontest.File("a/b/f", "f", 0o644)},
			{uniontest.File("old/y", "y", 0o644), uniontest.File("a/b/g", "g", 0o644)},
		},
		upper: uniontest.Layer{},
	})
	kernelRenames(t, o, func(mnt string) error {
		p := func(rel string) string { return filepath.Join(mnt, rel) }
		for _, err := range []error{
			os.Rename(p("old"), p("new")),
			os.Remove(p("new/x")),
			os.Remove(p("new/y")),
			os.Rename(p("new/sub"), p("new/sub2")),
			os.MkdirAll(p("q/r"), 0o755),
			os.Rename(p("a/b"), p("q/r/b")),
			os.Remove(p("q/r/b/g")),
		} {
			if err != nil {
				return err
			}
		}
		return nil
	})
	rep, err := inspect.Check(o, inspect.CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Problems) > 0 {
		t.Errorf("problems on an upper dir a kernel mount with redirect_dir=on wrote: %v", rep.Problems)
	}
	tree, err := open(t, o).Tree()
	if err != nil {
		t.Fatal(err)
	}
	if d := tree.Compare(mountTree(t, uniontest.Kernel, o)); len(d) > 0 {
		t.Errorf("offline tree differs from the kernel's:\n  %s", strings.Join(d, "\n  "))
	}
}

// kernelRenames mounts o on kernel overlay with redirect_dir=on, runs f on
// the mount and unmounts it.
func kernelRenames(t *testing.T, o unionfs.Options, f func(mnt string) error) {
	t.Helper()
	work, mnt := t.TempDir(), t.TempDir()
	data := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s,redirect_dir=on", strings.Join(o.Lowers, ":"), o.Upper, work)
	if err := unix.Mount("overlay", mnt, "overlay", 0, data); err != nil {
		t.Fatalf("mount overlay -o %s: %v", data, err)
	}
	ferr := f(mnt)
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatalf("unmount %s: %v", mnt, err)
	}
	if ferr != nil {
		t.Fatal(ferr)
	}
}
