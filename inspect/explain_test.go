package inspect_test

import (
	"strings"
	"testing"

	"strata/inspect"
	"strata/internal/uniontest"
)

// want is what one layer must show in an explanation: its state, what it
// holds, and a piece of the reason.
type want struct {
	holds  inspect.Kind
	state  string
	reason string
}

func TestExplainZoo(t *testing.T) {
	o := build(t, testNS(), zoo())
	s := open(t, o)
	const (
		vis = inspect.StateVisible
		mrg = inspect.StateMerged
		wh  = inspect.StateWhiteout
		hid = inspect.StateHidden
		abs = inspect.StateAbsent
	)
	cases := []struct {
		path    string
		found   bool
		typ     string
		layer   int
		whLayer int
		missing string
		merged  []inspect.MergedDir
		layers  []want // upper, l1, l2, l3
	}{
		{path: "/d/gone", whLayer: 2, layer: -1, layers: []want{
			{inspect.None, abs, ""}, {inspect.None, abs, ""},
			{inspect.Whiteout, wh, "hides the layers below"},
			{inspect.File, hid, "hidden by a whiteout at /d/gone in layer 2 (lower "}}},
		{path: "/xo/f", whLayer: 2, layer: -1, layers: []want{
			{inspect.None, abs, ""}, {inspect.None, abs, ""},
			{inspect.XattrWhiteout, wh, ""},
			{inspect.File, hid, "hidden by an xattr whiteout at /xo/f in layer 2"}}},
		{path: "/op/hidden", whLayer: -1, layer: -1, layers: []want{
			{inspect.None, abs, ""}, {inspect.None, abs, ""}, {inspect.None, abs, ""},
			{inspect.File, hid, "hidden: parent /op is opaque in layer 0 (upper "}}},
		{path: "/op/mid", whLayer: -1, layer: -1, layers: []want{
			{inspect.None, abs, ""}, {inspect.None, abs, ""},
			{inspect.File, hid, "parent /op is opaque in layer 0"}, {inspect.None, abs, ""}}},
		{path: "/op", found: true, typ: "directory", layer: 0, whLayer: -1,
			merged: []inspect.MergedDir{{Layer: 0, Opacity: "y"}}, layers: []want{
				{inspect.Dir, vis, ""}, {inspect.None, abs, ""},
				{inspect.Dir, hid, "hidden: /op is opaque in layer 0"},
				{inspect.Dir, hid, "hidden: /op is opaque in layer 0"}}},
		{path: "/t2f/inner", whLayer: -1, layer: -1, missing: "/t2f", layers: []want{
			{inspect.None, abs, ""}, {inspect.None, abs, "/t2f is a file in this layer"}, {inspect.None, abs, ""},
			{inspect.File, hid, "has a non-directory (file) at /t2f above"}}},
		{path: "/t2f", found: true, typ: "file", layer: 1, whLayer: -1, layers: []want{
			{inspect.None, abs, ""}, {inspect.File, vis, ""}, {inspect.None, abs, ""},
			{inspect.Dir, hid, "layer 1 (lower "}}},
		{path: "/f2d", found: true, typ: "directory", layer: 0, whLayer: -1,
			merged: []inspect.MergedDir{{Layer: 0, Opacity: "-"}}, layers: []want{
				{inspect.Dir, vis, ""}, {inspect.None, abs, ""}, {inspect.None, abs, ""},
				{inspect.File, hid, "the directory at /f2d in layer 0 (upper "}}},
		{path: "/ydir/old", whLayer: -1, layer: -1, layers: []want{
			{inspect.None, abs, ""}, {inspect.None, abs, ""}, {inspect.None, abs, ""},
			{inspect.File, hid, "parent /ydir is opaque in layer 2"}}},
		{path: "/x", found: true, typ: "directory", layer: 2, whLayer: -1,
			merged: []inspect.MergedDir{{Layer: 2, Opacity: "x"}, {Layer: 3, Opacity: "-"}}, layers: []want{
				{inspect.None, abs, ""}, {inspect.None, abs, ""}, {inspect.Dir, vis, ""}, {inspect.Dir, mrg, ""}}},
		{path: "/d", found: true, typ: "directory", layer: 0, whLayer: -1,
			merged: []inspect.MergedDir{{Layer: 0, Opacity: "-"}, {Layer: 1, Opacity: "-"}, {Layer: 2, Opacity: "-"}, {Layer: 3, Opacity: "-"}},
			layers: []want{{inspect.Dir, vis, ""}, {inspect.Dir, mrg, ""}, {inspect.Dir, mrg, ""}, {inspect.Dir, mrg, ""}}},
		{path: "/d/a", found: true, typ: "file", layer: 0, whLayer: -1, layers: []want{
			{inspect.File, vis, ""}, {inspect.None, abs, ""}, {inspect.None, abs, ""},
			{inspect.File, hid, "layer 0 (upper "}}},
		{path: "/lnk/top", whLayer: -1, layer: -1, missing: "/lnk", layers: []want{
			{inspect.None, abs, ""}, {inspect.None, abs, "/lnk is a symlink in this layer"},
			{inspect.None, abs, ""}, {inspect.None, abs, ""}}},
		{path: "/sym", whLayer: 0, layer: -1, layers: []want{
			{inspect.Whiteout, wh, ""}, {inspect.None, abs, ""}, {inspect.None, abs, ""},
			{inspect.Symlink, hid, "hidden by a whiteout at /sym in layer 0"}}},
		{path: "/hl2", found: true, typ: "file", layer: 3, whLayer: -1, layers: []want{
			{inspect.None, abs, ""}, {inspect.None, abs, ""}, {inspect.None, abs, ""}, {inspect.File, vis, ""}}},
		{path: "nope/deeper", whLayer: -1, layer: -1, missing: "/nope", layers: []want{
			{inspect.None, abs, ""}, {inspect.None, abs, ""}, {inspect.None, abs, ""}, {inspect.None, abs, ""}}},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(strings.Trim(c.path, "/"), "/", "_"), func(t *testing.T) {
			ex, err := s.Explain(c.path)
			if err != nil {
				t.Fatal(err)
			}
			e := ex[0]
			if e.Found != c.found || e.Type != c.typ || e.Layer != c.layer || e.WhiteoutLayer != c.whLayer || e.MissingAt != c.missing {
				t.Errorf("got found=%v type=%q layer=%d whiteout=%d missing=%q, want %v %q %d %d %q (%s)",
					e.Found, e.Type, e.Layer, e.WhiteoutLayer, e.MissingAt, c.found, c.typ, c.layer, c.whLayer, c.missing, e.Verdict)
			}
			if c.merged != nil && !equalMerged(e.Merged, c.merged) {
				t.Errorf("merged %v, want %v", e.Merged, c.merged)
			}
			if len(e.Layers) != len(c.layers) {
				t.Fatalf("%d layers, want %d", len(e.Layers), len(c.layers))
			}
			for i, w := range c.layers {
				l := e.Layers[i]
				if l.Holds != w.holds || l.State != w.state || !strings.Contains(l.Reason, w.reason) {
					t.Errorf("layer %d: holds %s, %s %q; want %s, %s %q", i, l.Holds, l.State, l.Reason, w.holds, w.state, w.reason)
				}
			}
		})
	}
}

func equalMerged(a, b []inspect.MergedDir) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestExplainNeverFollowsSymlinks: a symlink in a layer where the path
// continues is reported as what blocks the path, even when its target
// exists (inside the layer or outside it).
func TestExplainNeverFollowsSymlinks(t *testing.T) {
	outside := t.TempDir()
	o := build(t, testNS(), stackSpec{lowers: []uniontest.Layer{
		{uniontest.Symlink("etc", outside), uniontest.Symlink("rel", "real"), uniontest.File("real/f", "f", 0o644)},
	}})
	s := open(t, o)
	for _, p := range []string{"/etc/f", "/rel/f"} {
		ex, err := s.Explain(p)
		if err != nil {
			t.Fatal(err)
		}
		l := ex[0].Layers[0]
		if ex[0].Found || l.Holds != inspect.None || l.BlockedBy != inspect.Symlink {
			t.Errorf("%s: found=%v holds %s blocked by %q; want nothing, blocked by a symlink", p, ex[0].Found, l.Holds, l.BlockedBy)
		}
	}
	if _, err := s.Explain("/../etc"); err == nil {
		t.Errorf("Explain(/../etc) did not fail")
	}
}

// TestExplainNotes: markers that do not mean what they seem carry a note.
func TestExplainNotes(t *testing.T) {
	ns := testNS()
	other := "user"
	if ns.String() == "user" {
		other = "trusted"
	}
	uniontest.RequireRoot(t) // trusted.* xattrs in one of the two namespaces
	o := build(t, ns, stackSpec{lowers: []uniontest.Layer{
		{uniontest.Dir("od", 0o755), uniontest.Xattr("od", other+".overlay.opaque", "y"),
			uniontest.XattrWhiteoutOnly("un/f"), uniontest.File(".wh.x", "", 0o644)},
		{uniontest.File("od/f", "f", 0o644), uniontest.File("un/f", "f", 0o644)},
	}})
	s := open(t, o)
	for p, note := range map[string]string{
		"/od":    other + ".overlay.opaque=y, ignored",
		"/un/f":  "not marked",
		"/.wh.x": "OCI/AUFS whiteout marker",
	} {
		ex, err := s.Explain(p)
		if err != nil {
			t.Fatal(err)
		}
		if notes := strings.Join(ex[0].Layers[0].Notes, "; "); !strings.Contains(notes, note) {
			t.Errorf("%s: notes %q, want one containing %q", p, notes, note)
		}
	}
}

// TestExplainAgreesWithMounts: for every path any layer holds (and one
// level below each), explain's verdict is what lstat through a kernel
// overlay mount and through a strata mount finds; and every hidden layer
// has a reason.
func TestExplainAgreesWithMounts(t *testing.T) {
	o := build(t, testNS(), zoo())
	s := open(t, o)
	paths := allPaths(t, o)
	ex, err := s.Explain(paths...)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ex {
		for _, l := range e.Layers {
			if l.State == inspect.StateHidden && (l.Reason == "" || strings.Contains(l.Reason, "no marker above explains it")) {
				t.Errorf("%s layer %d: hidden without a reason: %q", e.Path, l.Index, l.Reason)
			}
		}
	}
	for _, target := range targets {
		t.Run(target.Name(), func(t *testing.T) {
			target.Require(t)
			m := target.Mount(t, o)
			for _, e := range ex {
				got := lstatType(t, m.Dir, e.Path)
				if (got != "") != e.Found || got != e.Type {
					t.Errorf("%s: the mount shows %q, explain says found=%v %q (%s)", e.Path, got, e.Found, e.Type, e.Verdict)
				}
			}
		})
	}
}
