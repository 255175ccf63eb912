package layer_test

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"strata/layer"
)

// FuzzImport: any input either imports or fails, never panics, and never
// writes beside the target (containerd contrib/fuzz FuzzApply, on a temp
// dir). Refused entries are skipped so that the rest of the archive is
// exercised too.
func FuzzImport(f *testing.F) {
	f.Add(mkTar(f, ent{name: "a", typ: tar.TypeSymlink, link: "../outside"}, ent{name: "a/x", data: "x"}))
	f.Add(mkTar(f, ent{name: "d/", typ: tar.TypeDir}, ent{name: "d/.wh..wh..opq"}, ent{name: ".wh.e"},
		ent{name: "l", typ: tar.TypeLink, link: "d/../x"}))
	f.Add(mkTar(f, ent{name: "f", data: "1"}, ent{name: "f/g", data: "2"}, ent{name: "h", typ: tar.TypeLink, link: "f"}))
	f.Fuzz(func(t *testing.T, data []byte) {
		base := t.TempDir()
		out := filepath.Join(base, "outside")
		os.Mkdir(out, 0o755)
		os.WriteFile(filepath.Join(out, "secret"), []byte("s"), 0o600)
		before := listing(t, base)
		target := filepath.Join(base, "target")
		_, err := layer.Import(ctx, bytes.NewReader(data), target, layer.ImportOptions{SkipRefused: true, SkipDevices: true, NoSync: true})
		if err == nil {
			if err := layer.RemoveAll(target); err != nil {
				t.Fatal(err)
			}
		}
		if after := listing(t, base); after != before {
			t.Fatalf("outside changed:\n%s\n%s", before, after)
		}
	})
}
