package inspect_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"strata/inspect"
	"strata/internal/uniontest"
	"strata/unionfs"
)

// markers is a stack where the new layer needs markers of its own and
// carries others over: a directory over a whiteout over a directory, a
// whiteout for a name only the layers below hold, opaque directories in the
// upper dir and in the top lower, xattr whiteouts to convert, a type change
// over a directory, a hard link whose other name is deleted, special files,
// xattrs (escaped private ones too), set-id modes, owners, a sparse file.
func markers() stackSpec {
	bottom := uniontest.Layer{
		uniontest.File("w/x", "x", 0o644),
		uniontest.File("nd/r", "r", 0o644),
		uniontest.File("nd/s", "s", 0o644),
		uniontest.File("o/old", "old", 0o644),
		uniontest.File("p/old", "old", 0o644),
		uniontest.File("xw/gone", "gone", 0o644),
		uniontest.File("xw/stay", "stay", 0o644),
		uniontest.File("tc/inner", "i", 0o644),
		uniontest.File("deep/a/b/c", "c", 0o644),
	}
	top := uniontest.Layer{
		uniontest.Whiteout("w"),
		uniontest.File("o/mid", "mid", 0o644),
		uniontest.Opaque("p"),
		uniontest.File("p/new", "new", 0o644),
		uniontest.XattrWhiteout("xw/gone"),
		uniontest.Dir("tc", 0o755),
		uniontest.File("hl/a", "linked", 0o644),
		uniontest.Link("hl/b", "hl/a"),
		uniontest.Link("hl/c", "hl/a"),
		uniontest.Fifo("fifo"),
		uniontest.CharDev("null", 1, 3),
		uniontest.File("suid", "#!", 0o4755),
		uniontest.Chown("suid", 1000, 1001),
		uniontest.SparseFile("sparse", 1<<20, map[int64]string{4096: "data", 900000: "more"}, 0o644),
		uniontest.File("attrs", "a", 0o644),
		uniontest.Xattr("attrs", "user.one", "1"),
		uniontest.Symlink("deep/link", "../attrs"),
	}
	upper := uniontest.Layer{
		uniontest.File("w/y", "y", 0o644), // a plain dir where the top lower has a whiteout
		uniontest.Dir("nd", 0o700),
		uniontest.Whiteout("nd/r"), // only the bottom layer holds nd/r
		uniontest.Opaque("o"),
		uniontest.File("o/v", "v", 0o644),
		uniontest.File("tc", "now a file", 0o644),
		uniontest.Whiteout("hl/b"),
		uniontest.File("u1", "u", 0o640),
		uniontest.Link("u2", "u1"),
		uniontest.Socket("sock"),
		uniontest.Xattr("u1", "user.two", "2"),
		uniontest.PrivateXattr("u1", "overlay.escaped", "e"), // user data: shows as <ns>.overlay.escaped
		uniontest.Chown("nd", 1000, 1000),
		uniontest.Symlink("deep/a/up", "b/c"),
	}
	return stackSpec{lowers: []uniontest.Layer{top, bottom}, upper: upper}
}

// checkKernelFormat fails t if the layer dir holds anything but the
// kernel's own markers: ".wh." names, xattr whiteouts, private xattrs
// other than opaque=y.
func checkKernelFormat(t *testing.T, dir string, ns string) {
	t.Helper()
	tree, err := inspect.DirTree(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range tree {
		if strings.HasPrefix(filepath.Base(n.Path), ".wh.") {
			t.Errorf("new layer holds %s", n.Path)
		}
		for x, v := range n.Xattrs {
			p := ns + ".overlay."
			if strings.HasPrefix(x, p) && !strings.HasPrefix(x, p+"overlay.") && (x != p+"opaque" || v != "y") {
				t.Errorf("new layer: %s has %s=%q", n.Path, x, v)
			}
		}
	}
}

// TestMergeRoundTrip: merging, then mounting the result and the remaining
// lowers without the upper dir, shows the same tree as the whole stack did,
// on kernel overlay and on strata; with --output and with --into.
func TestMergeRoundTrip(t *testing.T) {
	uniontest.RequireRoot(t) // owners, devices, trusted.* in the fixtures
	fixtures := map[string]func() stackSpec{
		"zoo":     zoo,
		"markers": markers,
		"one-lower": func() stackSpec {
			return stackSpec{
				lowers: []uniontest.Layer{{uniontest.File("a", "a", 0o644), uniontest.File("d/b", "b", 0o644)}},
				upper:  uniontest.Layer{uniontest.Whiteout("a"), uniontest.Opaque("d"), uniontest.File("d/c", "c", 0o644)},
			}
		},
	}
	for name, fixture := range fixtures {
		for _, into := range []bool{false, true} {
			mode := "output"
			if into {
				mode = "into"
			}
			t.Run(name+"/"+mode, func(t *testing.T) {
				since := time.Now()
				o := build(t, testNS(), fixture())
				want := mountSnapshot(t, uniontest.Kernel, o, since)
				wantTree, err := open(t, o).Tree()
				if err != nil {
					t.Fatal(err)
				}
				mo := inspect.MergeOptions{Apply: true, Into: into}
				if !into {
					mo.Output = filepath.Join(t.TempDir(), "merged")
				}
				plan, err := inspect.Merge(context.Background(), o, mo)
				if err != nil {
					t.Fatal(err)
				}
				if !plan.Applied || !plan.Verified {
					t.Errorf("plan: applied %v verified %v", plan.Applied, plan.Verified)
				}
				checkKernelFormat(t, plan.Target, testNS().String())
				after := readOnly(t, plan.NewLowers...)
				for _, target := range targets {
					got := mountSnapshot(t, target, after, since)
					if d := snapshotDiff(want, got); len(d) > 0 {
						t.Errorf("%s: the merged layer shows another tree:\n  %s", target.Name(), strings.Join(d, "\n  "))
					}
				}
				gotTree, err := open(t, after).Tree()
				if err != nil {
					t.Fatal(err)
				}
				if d := wantTree.Compare(gotTree); len(d) > 0 {
					t.Errorf("offline trees differ:\n  %s", strings.Join(d, "\n  "))
				}
				// Nothing is left beside the target.
				ents, _ := os.ReadDir(filepath.Dir(plan.Target))
				for _, e := range ents {
					if strings.HasPrefix(e.Name(), ".strata-merge-") {
						t.Errorf("left behind: %s", e.Name())
					}
				}
			})
		}
	}
}

// TestMergePlan: the dry run changes nothing and lists the upper dir's
// objects and the new layer's own markers; the top lower's are counted.
func TestMergePlan(t *testing.T) {
	o := build(t, testNS(), markers())
	before := layerDump(t, stackDirs(o)...)
	out := filepath.Join(t.TempDir(), "merged")
	plan, err := inspect.Merge(context.Background(), o, inspect.MergeOptions{Output: out})
	if err != nil {
		t.Fatal(err)
	}
	sameDumps(t, before, layerDump(t, stackDirs(o)...))
	if _, err := os.Lstat(out); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("dry run created %s", out)
	}
	var got []string
	for _, s := range plan.Steps {
		got = append(got, s.Op+" "+s.Path)
	}
	for _, want := range []string{
		"dir /w", "opaque /w", // over the top lower's whiteout, the bottom's w/ must stay hidden
		"whiteout /nd/r", // only the bottom holds nd/r
		"dir /o", "opaque /o",
		"copy /tc",
		"whiteout /xw/gone", // the xattr whiteout, converted
		"copy /u1", "link /u2",
	} {
		found := false
		for _, g := range got {
			found = found || g == want
		}
		if !found {
			t.Errorf("plan lacks %q; steps: %v", want, got)
		}
	}
	for _, s := range plan.Steps {
		if s.Path == "/p" || s.Path == "/hl/a" {
			t.Errorf("plan lists %s %s, which the top lower has as it is", s.Op, s.Path)
		}
	}
	if plan.Carried == 0 || plan.Applied {
		t.Errorf("plan: carried %d applied %v", plan.Carried, plan.Applied)
	}
	if !strings.HasPrefix(plan.NewOptions, "lowerdir="+out+":"+o.Lowers[1]) {
		t.Errorf("new options %q", plan.NewOptions)
	}
}

// TestMergeRealStacks: stacks written by kernel overlay and by strata
// (ops through a mount) merge into a layer that shows the same tree.
func TestMergeRealStacks(t *testing.T) {
	for _, writer := range targets {
		t.Run(writer.Name(), func(t *testing.T) {
			writer.Require(t)
			since := time.Now()
			o := build(t, testNS(), stackSpec{lowers: diffLowers(), upper: uniontest.Layer{}})
			m := writer.Mount(t, o)
			diffOps(t, m.Dir)
			m.Unmount(t)
			want := mountSnapshot(t, uniontest.Kernel, o, since)
			plan, err := inspect.Merge(context.Background(), o, inspect.MergeOptions{Apply: true, Output: filepath.Join(t.TempDir(), "n")})
			if err != nil {
				t.Fatal(err)
			}
			got := mountSnapshot(t, uniontest.Kernel, readOnly(t, plan.NewLowers...), since)
			if d := snapshotDiff(want, got); len(d) > 0 {
				t.Errorf("merged layer shows another tree:\n  %s", strings.Join(d, "\n  "))
			}
		})
	}
}

// TestMergeResetUpper: --into --reset-upper leaves an empty upper dir (same
// owner, mode, xattrs) over the rebuilt layer: the stack, mounted again
// with its upper and work dirs, shows the same tree and keeps working.
func TestMergeResetUpper(t *testing.T) {
	uniontest.Kernel.Require(t)
	since := time.Now()
	o := build(t, testNS(), zoo())
	want := mountSnapshot(t, uniontest.Kernel, o, since)
	rootBefore, err := inspect.DirTree(o.Upper)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := inspect.Merge(context.Background(), o, inspect.MergeOptions{Apply: true, Into: true, ResetUpper: true})
	if err != nil {
		t.Fatal(err)
	}
	if !plan.UpperReset {
		t.Errorf("upper not reset")
	}
	rootAfter, err := inspect.DirTree(o.Upper)
	if err != nil {
		t.Fatal(err)
	}
	a, b := rootAfter[0], rootBefore[0]
	if len(rootAfter) != 1 || a.Mode != b.Mode || a.UID != b.UID || a.GID != b.GID || a.Mtime != b.Mtime {
		t.Errorf("upper after reset: %+v; root before: %+v", rootAfter, b)
	}
	for _, target := range targets {
		got := mountSnapshot(t, target, o, since)
		if d := snapshotDiff(want, got); len(d) > 0 {
			t.Errorf("%s: the stack shows another tree after the reset:\n  %s", target.Name(), strings.Join(d, "\n  "))
		}
	}
}

func TestMergeRefusals(t *testing.T) {
	o := build(t, testNS(), zoo())
	ctx := context.Background()
	for name, mo := range map[string]inspect.MergeOptions{
		"no-target":     {Apply: true},
		"both":          {Into: true, Output: filepath.Join(t.TempDir(), "x")},
		"output-inside": {Output: filepath.Join(o.Upper, "x")},
		"output-busy":   {Output: o.Lowers[1]},
	} {
		if _, err := inspect.Merge(ctx, o, mo); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	lowerOnly := unionfs.Options{Lowers: o.Lowers, UserXattr: o.UserXattr}
	if _, err := inspect.Merge(ctx, lowerOnly, inspect.MergeOptions{Into: true}); err == nil {
		t.Errorf("merge without an upper dir did not fail")
	}
	t.Run("mounted", func(t *testing.T) {
		for _, target := range targets {
			target.Require(t)
			m := target.Mount(t, o)
			before := layerDump(t, stackDirs(o)...)
			_, err := inspect.Merge(ctx, o, inspect.MergeOptions{Apply: true, Into: true})
			if !errors.Is(err, inspect.ErrInUse) {
				t.Errorf("%s: merge while mounted: %v, want ErrInUse", target.Name(), err)
			}
			m.Unmount(t)
			sameDumps(t, before, layerDump(t, stackDirs(o)...))
		}
	})
}
