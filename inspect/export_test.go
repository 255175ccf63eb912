package inspect_test

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"strata/inspect"
	"strata/internal/uniontest"
	"strata/layer"
	"strata/unionfs"
	"strata/whiteout"
)

// roundTrip exports the layer dir to an OCI tar and imports it again into
// a fresh directory, which it returns.
func roundTrip(t *testing.T, dir string, ns whiteout.NS) string {
	t.Helper()
	var buf bytes.Buffer
	if _, err := layer.Export(context.Background(), dir, &buf, layer.ExportOptions{NS: []whiteout.NS{ns}}); err != nil {
		t.Fatalf("export %s: %v", dir, err)
	}
	out := filepath.Join(t.TempDir(), "imported")
	if _, err := layer.Import(context.Background(), &buf, out, layer.ImportOptions{NS: ns}); err != nil {
		t.Fatalf("import %s: %v", dir, err)
	}
	return out
}

// ociComparable drops what an OCI layer cannot carry from a merged tree:
// the root directory's own attributes (a layer tar has no entry for its
// root) and sub-second times (tars keep seconds).
func ociComparable(tr inspect.Tree) inspect.Tree {
	out := make(inspect.Tree, 0, len(tr))
	for _, n := range tr {
		if n.Path == "/" {
			continue
		}
		n.Mtime -= n.Mtime % 1e9
		out = append(out, n)
	}
	return out
}

// TestExportImportRoundTrip: a stack's merged tree equals the tree of the
// same stack after export → import of each layer, and the tree of the
// layer merge makes after export → import, mounted on kernel overlay.
func TestExportImportRoundTrip(t *testing.T) {
	uniontest.Kernel.Require(t)
	ns := testNS()
	o := build(t, ns, zoo())
	want := ociComparable(mountTree(t, uniontest.Kernel, o))

	t.Run("each-layer", func(t *testing.T) {
		data := "lowerdir="
		for i, l := range o.Lowers {
			if i > 0 {
				data += ":"
			}
			data += roundTrip(t, l, ns)
		}
		data += fmt.Sprintf(",upperdir=%s,workdir=%s", roundTrip(t, o.Upper, ns), t.TempDir())
		if ns == whiteout.User {
			data += ",userxattr"
		}
		imported, err := unionfs.ParseOptions(data)
		if err != nil {
			t.Fatal(err)
		}
		got := ociComparable(mountTree(t, uniontest.Kernel, imported))
		if d := want.Compare(got); len(d) > 0 {
			t.Errorf("export → import → mount shows another tree:\n  %s", strings.Join(d, "\n  "))
		}
	})
	t.Run("merged-layer", func(t *testing.T) {
		plan, err := inspect.Merge(context.Background(), o, inspect.MergeOptions{Apply: true, Output: filepath.Join(t.TempDir(), "merged")})
		if err != nil {
			t.Fatal(err)
		}
		lowers := append([]string{roundTrip(t, plan.Target, ns)}, o.Lowers[1:]...)
		got := ociComparable(mountTree(t, uniontest.Kernel, readOnly(t, lowers...)))
		if d := want.Compare(got); len(d) > 0 {
			t.Errorf("merge → export → import → mount shows another tree:\n  %s", strings.Join(d, "\n  "))
		}
	})
}
