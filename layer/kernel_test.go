package layer_test

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"strata/internal/testenv"
	"strata/layer"
	"strata/whiteout"
)

// TestImportedLayersMountInKernel: layers imported from OCI tars are
// understood by kernel overlay as lower dirs: whiteouts hide, opaque dirs
// hide what is below. And exporting kernel overlay's own upper dir gives
// the OCI change set.
func TestImportedLayersMountInKernel(t *testing.T) {
	testenv.RequireKernelOverlay(t)
	dir := t.TempDir()
	base := mkTar(t,
		ent{name: "a", data: "a"}, ent{name: "keep", data: "k"},
		ent{name: "d/", typ: tar.TypeDir}, ent{name: "d/x", data: "x"}, ent{name: "d/y", data: "y"},
		ent{name: "e/", typ: tar.TypeDir}, ent{name: "e/old", data: "o"},
		ent{name: "r/", typ: tar.TypeDir}, ent{name: "r/old", data: "o"})
	top := mkTar(t,
		ent{name: ".wh.a"},
		ent{name: "d/", typ: tar.TypeDir}, ent{name: "d/.wh..wh..opq"}, ent{name: "d/z", data: "z"},
		ent{name: "e/", typ: tar.TypeDir}, ent{name: "e/.wh.old"}, ent{name: "e/new", data: "n"},
		ent{name: ".wh.r"}, ent{name: "r/new", data: "n"})
	for name, tb := range map[string][]byte{"base": base, "top": top} {
		if _, err := layer.Import(ctx, bytes.NewReader(tb), filepath.Join(dir, name), layer.ImportOptions{NS: whiteout.Trusted}); err != nil {
			t.Fatal(err)
		}
	}
	mnt, upper, work := filepath.Join(dir, "mnt"), filepath.Join(dir, "upper"), filepath.Join(dir, "work")
	for _, d := range []string{mnt, upper, work} {
		os.Mkdir(d, 0o755)
	}
	data := "lowerdir=" + dir + "/top:" + dir + "/base,upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount("overlay", mnt, "overlay", 0, data); err != nil {
		t.Fatalf("mount overlay: %v", err)
	}
	mounted := true
	umount := func() {
		if mounted {
			if err := unix.Unmount(mnt, 0); err != nil {
				t.Errorf("umount: %v", err)
			}
			mounted = false
		}
	}
	t.Cleanup(umount)
	if got, want := tree(t, mnt), "d/ d/z e/ e/new keep r/ r/new"; got != want {
		t.Errorf("merged tree: %q, want %q", got, want)
	}
	// Change the mount: the kernel writes its own whiteouts and opaque
	// dirs into upper; exporting it gives the OCI markers.
	if err := os.Remove(filepath.Join(mnt, "keep")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(mnt, "e")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(mnt, "e"), 0o755); err != nil {
		t.Fatal(err)
	}
	umount()
	var buf bytes.Buffer
	if _, err := layer.Export(ctx, upper, &buf, layer.ExportOptions{NS: []whiteout.NS{whiteout.Trusted}}); err != nil {
		t.Fatal(err)
	}
	// Entries follow the on-disk names in byte order ("e" < "keep").
	var names []string
	tr := tar.NewReader(&buf)
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		names = append(names, h.Name)
	}
	if got, want := strings.Join(names, " "), "e/ e/.wh..wh..opq .wh.keep"; got != want {
		t.Errorf("exported kernel upper: %q, want %q", got, want)
	}
}

// tree lists the names below dir, directories with a trailing slash.
func tree(t *testing.T, dir string) string {
	t.Helper()
	var names []string
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if fi.IsDir() {
			rel += "/"
		}
		names = append(names, rel)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(names)
	return strings.Join(names, " ")
}
