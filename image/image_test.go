package image_test

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"strata/image"
	it "strata/image/imagetest"
	"strata/internal/testenv"
	"strata/layer"
)

var ctx = context.Background()

// TestChainIDVector checks the brief's test vector against a chainID
// computed here independently.
func TestChainIDVector(t *testing.T) {
	d0 := "sha256:9f54eef412758095c8079ac465d494a2872e02e90bf1fb5f12a1641c0d1bb78b"
	d1 := "sha256:b3cce2ce0405ffbb4971b872588c5b7fc840514b807f18047bf7d486af79884c"
	sum := sha256.Sum256([]byte(d0 + " " + d1))
	independent := "sha256:" + hex.EncodeToString(sum[:])
	const want = "sha256:6613b10b697b0a267c9573ee23e54c0373ccf72e7991cf4479bd0b66609a631c"
	if independent != want {
		t.Fatalf("independent computation %s, want %s", independent, want)
	}
	got, err := image.ChainIDs([]string{d0, d1})
	if err != nil {
		t.Fatal(err)
	}
	if got[0] != d0 || got[1] != want {
		t.Errorf("ChainIDs = %v, want [%s %s]", got, d0, want)
	}
	if _, err := image.ChainIDs([]string{"sha256:abc"}); err == nil {
		t.Errorf("malformed diffID accepted")
	}
}

// Three layers with whiteouts and opaque dirs across them.
func layers(t testing.TB) []it.Layer {
	base := it.Tar(t,
		it.Entry{Name: "etc/", Type: tar.TypeDir},
		it.Entry{Name: "etc/passwd", Data: "root\n"},
		it.Entry{Name: "etc/group", Data: "root\n"},
		it.Entry{Name: "bin/", Type: tar.TypeDir},
		it.Entry{Name: "bin/sh", Data: "sh", Mode: 0o755},
		it.Entry{Name: "bin/ls", Type: tar.TypeSymlink, Link: "sh"},
		it.Entry{Name: "usr/lib/", Type: tar.TypeDir},
		it.Entry{Name: "usr/lib/a", Data: "a"},
		it.Entry{Name: "usr/lib/b", Data: "b"},
		it.Entry{Name: "var/cache/x/", Type: tar.TypeDir},
		it.Entry{Name: "var/cache/x/1", Data: "1"},
		it.Entry{Name: "opt/keep", Data: "k"},
		it.Entry{Name: "opt/link", Type: tar.TypeLink, Link: "opt/keep"},
	)
	mid := it.Tar(t,
		it.Entry{Name: "etc/passwd", Data: "root\nuser\n"},
		it.Entry{Name: "etc/.wh.group"},
		it.Entry{Name: "usr/lib/", Type: tar.TypeDir},
		it.Entry{Name: "usr/lib/.wh..wh..opq"},
		it.Entry{Name: "usr/lib/c", Data: "c"},
		it.Entry{Name: "var/.wh.cache"},
		it.Entry{Name: "home/user/f", Data: "f"},
	)
	top := it.Tar(t,
		it.Entry{Name: "var/cache/", Type: tar.TypeDir, Mode: 0o700},
		it.Entry{Name: "var/cache/new", Data: "n"},
		it.Entry{Name: "usr/lib/d", Data: "d"},
		it.Entry{Name: ".wh.home"},
		it.Entry{Name: "bin/ls", Data: "a real ls now", Mode: 0o755},
		// Whiteout and new content of one dir in one layer.
		it.Entry{Name: ".wh.opt"},
		it.Entry{Name: "opt/fresh", Data: "f"},
	)
	return []it.Layer{{Tar: base, Compression: it.Gzip}, {Tar: mid, Compression: it.None}, {Tar: top, Compression: it.Zstd}}
}

func tars(ls []it.Layer) [][]byte {
	var out [][]byte
	for _, l := range ls {
		out = append(out, l.Tar)
	}
	return out
}

// reference applies the layers by hand and describes the rootfs.
func reference(t *testing.T, ls []it.Layer) string {
	t.Helper()
	root := t.TempDir()
	it.Apply(t, root, tars(ls)...)
	return it.Tree(t, root)
}

func openStore(t *testing.T) (*image.Store, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "store")
	s, err := image.Open(dir, image.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s, dir
}

func unpack(t *testing.T, s *image.Store, src string, opts image.UnpackOptions) (*image.UnpackResult, error) {
	t.Helper()
	source, err := image.OpenSource(src)
	if err != nil {
		return nil, err
	}
	defer source.Close()
	return s.Unpack(ctx, source, opts)
}

// checkRootfs compares the store's view of img (the overlay merge model,
// and kernel overlay when it can be mounted) with the reference.
func checkRootfs(t *testing.T, s *image.Store, img *image.Image, want string) {
	t.Helper()
	lowers := s.LowerDirs(img)
	if got := it.Merge(t, lowers, s.NS().Prefix()); got != want {
		t.Errorf("merged layers differ from the reference applier\nwant:\n%s\ngot:\n%s", want, got)
	}
	if os.Getenv("STRATA_REQUIRE_MOUNT") != "1" && os.Geteuid() != 0 {
		return
	}
	testenv.RequireKernelOverlay(t)
	dir := t.TempDir()
	mnt, up, wk := filepath.Join(dir, "m"), filepath.Join(dir, "u"), filepath.Join(dir, "w")
	for _, d := range []string{mnt, up, wk} {
		os.Mkdir(d, 0o755)
	}
	data := "lowerdir=" + strings.Join(lowers, ":") + ",upperdir=" + up + ",workdir=" + wk
	if err := unix.Mount("overlay", mnt, "overlay", 0, data); err != nil {
		t.Fatalf("mount overlay: %v", err)
	}
	got := it.Tree(t, mnt)
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Errorf("umount: %v", err)
	}
	if got != want {
		t.Errorf("kernel overlay of the store's layers differs from the reference\nwant:\n%s\ngot:\n%s", want, got)
	}
}

func TestUnpackOCI(t *testing.T) {
	testenv.RequireMknod(t)
	ls := layers(t)
	want := reference(t, ls)
	for _, form := range []string{"dir", "tar"} {
		t.Run(form, func(t *testing.T) {
			s, dir := openStore(t)
			src := filepath.Join(t.TempDir(), "oci")
			os.Mkdir(src, 0o755)
			w := it.WriteOCI(t, src, it.Image{Name: "example.com/app:1", Layers: ls})
			if form == "tar" {
				it.TarDir(t, src, src+".tar")
				src += ".tar"
			}
			res, err := unpack(t, s, src, image.UnpackOptions{})
			if err != nil {
				t.Fatal(err)
			}
			img := res.Image
			if img.Name != "example.com/app:1" || img.ManifestDigest != w[0].Manifest || img.ID != w[0].Config {
				t.Errorf("image %s %s %s, want names/digests of %+v", img.Name, img.ManifestDigest, img.ID, w[0])
			}
			if len(res.New) != 3 || len(res.Reused) != 0 {
				t.Errorf("new %v reused %v", res.New, res.Reused)
			}
			checkRootfs(t, s, img, want)
			checkLayout(t, dir, img, ls)
			// A second unpack reuses every layer.
			res2, err := unpack(t, s, src, image.UnpackOptions{Name: "again"})
			if err != nil {
				t.Fatal(err)
			}
			if len(res2.New) != 0 || len(res2.Reused) != 3 {
				t.Errorf("second unpack: new %v reused %v", res2.New, res2.Reused)
			}
		})
	}
}

// checkLayout checks the files of the store against the brief's layout.
func checkLayout(t *testing.T, dir string, img *image.Image, ls []it.Layer) {
	t.Helper()
	var diffIDs []string
	for _, l := range ls {
		diffIDs = append(diffIDs, it.Digest(l.Tar))
	}
	chains, _ := image.ChainIDs(diffIDs)
	for i, c := range chains {
		ldir := filepath.Join(dir, "layers", strings.TrimPrefix(c, "sha256:"))
		read := func(name string) string {
			b, _ := os.ReadFile(filepath.Join(ldir, name))
			return string(b)
		}
		if read("diffid") != diffIDs[i] {
			t.Errorf("layer %d diffid %q, want %s", i, read("diffid"), diffIDs[i])
		}
		wantParent := ""
		if i > 0 {
			wantParent = chains[i-1]
		}
		if read("parent") != wantParent {
			t.Errorf("layer %d parent %q, want %q", i, read("parent"), wantParent)
		}
		if read("size") == "" {
			t.Errorf("layer %d: no size", i)
		}
		if img.Layers[i].ChainID != c {
			t.Errorf("image layer %d chainID %s, want %s", i, img.Layers[i].ChainID, c)
		}
		// lowerdirs are top first.
		if want := filepath.Join("layers", strings.TrimPrefix(c, "sha256:"), "diff"); img.LowerDirs[len(chains)-1-i] != want {
			t.Errorf("lowerdirs %v: position %d want %s", img.LowerDirs, len(chains)-1-i, want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "images", img.Name[:len("example.com")]+"%2Fapp:1.json")); err != nil {
		t.Errorf("image record: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(ents) != 0 {
		t.Errorf("tmp not empty: %v", ents)
	}
}

func TestUnpackDockerSave(t *testing.T) {
	testenv.RequireMknod(t)
	ls := layers(t)
	want := reference(t, ls)
	for _, old := range []bool{true, false} {
		for _, form := range []string{"dir", "tar"} {
			t.Run(fmt.Sprintf("old=%v/%s", old, form), func(t *testing.T) {
				s, _ := openStore(t)
				src := filepath.Join(t.TempDir(), "save")
				os.Mkdir(src, 0o755)
				// Two images sharing the base: the old format stores it
				// once and links it.
				other := []it.Layer{ls[0], {Tar: it.Tar(t, it.Entry{Name: "other", Data: "o"})}}
				it.WriteDockerSave(t, src, old, it.Image{Name: "app:1", Layers: ls}, it.Image{Name: "other:2", Layers: other})
				if form == "tar" {
					it.TarDir(t, src, src+".tar")
					src += ".tar"
				}
				if _, err := unpack(t, s, src, image.UnpackOptions{}); err == nil || !strings.Contains(err.Error(), "choose one") {
					t.Fatalf("two images, no ref: %v", err)
				}
				res, err := unpack(t, s, src, image.UnpackOptions{Ref: "app:1"})
				if err != nil {
					t.Fatal(err)
				}
				checkRootfs(t, s, res.Image, want)
				res2, err := unpack(t, s, src, image.UnpackOptions{Ref: "other:2"})
				if err != nil {
					t.Fatal(err)
				}
				if len(res2.Reused) != 1 || len(res2.New) != 1 {
					t.Errorf("other: new %v reused %v, want the base reused", res2.New, res2.Reused)
				}
			})
		}
	}
}

// storeState describes what counts as the store's content.
func storeState(t *testing.T, dir string) string {
	t.Helper()
	var lines []string
	for _, sub := range []string{"layers", "images", "tmp"} {
		filepath.Walk(filepath.Join(dir, sub), func(p string, fi os.FileInfo, err error) error {
			if err == nil {
				rel, _ := filepath.Rel(dir, p)
				lines = append(lines, fmt.Sprintf("%s %v %d", rel, fi.Mode(), fi.Size()))
			}
			return nil
		})
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// TestUnpackRefusesBadImages: corrupt blobs, wrong diffIDs, escaping
// entries, truncated layers, missing blobs. Each gives a clear one-line
// error and leaves the store as it was (after a good image was
// unpacked into it, so that layers shared with it are at stake too).
func TestUnpackRefusesBadImages(t *testing.T) {
	testenv.RequireMknod(t)
	ls := layers(t)
	good := t.TempDir()
	it.WriteOCI(t, good, it.Image{Name: "good", Layers: ls[:1]})
	escaping := it.Tar(t, it.Entry{Name: "a", Type: tar.TypeSymlink, Link: "../../../../outside"}, it.Entry{Name: "a/pwned", Data: "x"})
	truncated := ls[1].Tar[:len(ls[1].Tar)-1024-300]
	cases := []struct {
		name  string
		build func(t *testing.T, dir string)
		words string
		is    error
	}{
		{"corrupt-layer-blob", func(t *testing.T, dir string) {
			w := it.WriteOCI(t, dir, it.Image{Layers: ls})
			flip(t, it.BlobPath(dir, w[0].Layers[2]), 40) // the last layer: the first two are already unpacked by then
		}, "digest mismatch", nil},
		{"wrong-diffid", func(t *testing.T, dir string) {
			ids := []string{it.Digest(ls[0].Tar), it.Digest(ls[1].Tar), it.Digest([]byte("nope"))}
			it.WriteOCI(t, dir, it.Image{Layers: ls, DiffIDs: ids})
		}, "diffID mismatch", nil},
		{"corrupt-manifest", func(t *testing.T, dir string) {
			w := it.WriteOCI(t, dir, it.Image{Layers: ls})
			flip(t, it.BlobPath(dir, w[0].Manifest), 5)
		}, "digest mismatch", nil},
		{"corrupt-config", func(t *testing.T, dir string) {
			w := it.WriteOCI(t, dir, it.Image{Layers: ls})
			flip(t, it.BlobPath(dir, w[0].Config), 3)
		}, "digest mismatch", nil},
		{"escaping-entry", func(t *testing.T, dir string) {
			it.WriteOCI(t, dir, it.Image{Layers: []it.Layer{ls[0], {Tar: escaping}}})
		}, "refused", nil},
		{"truncated-layer-docker", func(t *testing.T, dir string) {
			it.WriteDockerSave(t, dir, true, it.Image{Layers: []it.Layer{ls[0], {Tar: truncated}}})
		}, "truncated", layer.ErrTruncated},
		{"truncated-layer-oci", func(t *testing.T, dir string) {
			it.WriteOCI(t, dir, it.Image{Layers: []it.Layer{ls[0], {Tar: truncated}}})
		}, "truncated", layer.ErrTruncated},
		{"missing-blob", func(t *testing.T, dir string) {
			w := it.WriteOCI(t, dir, it.Image{Layers: ls})
			os.Remove(it.BlobPath(dir, w[0].Layers[1]))
		}, "missing", nil},
		{"diffid-count", func(t *testing.T, dir string) {
			it.WriteOCI(t, dir, it.Image{Layers: ls, DiffIDs: []string{it.Digest(ls[0].Tar)}})
		}, "diff_ids", nil},
		{"docker-config-digest", func(t *testing.T, dir string) {
			it.WriteDockerSave(t, dir, true, it.Image{Layers: ls})
			m, _ := filepath.Glob(filepath.Join(dir, "*.json"))
			for _, p := range m {
				if filepath.Base(p) != "manifest.json" {
					flip(t, p, 2)
				}
			}
		}, "digest mismatch", nil},
		{"not-an-image", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, "hello"), []byte("x"), 0o644)
		}, "neither an OCI image layout", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, dir := openStore(t)
			if _, err := unpack(t, s, good, image.UnpackOptions{}); err != nil {
				t.Fatal(err)
			}
			before := storeState(t, dir)
			parent := filepath.Dir(dir)
			os.MkdirAll(filepath.Join(parent, "outside"), 0o755)
			outside := func() string {
				var names []string
				filepath.Walk(parent, func(p string, fi os.FileInfo, err error) error {
					if p == dir {
						return filepath.SkipDir
					}
					names = append(names, p)
					return nil
				})
				return strings.Join(names, "\n")
			}
			outsideBefore := outside()
			src := filepath.Join(t.TempDir(), "src")
			os.Mkdir(src, 0o755)
			c.build(t, src)
			_, err := unpack(t, s, src, image.UnpackOptions{})
			if err == nil || !strings.Contains(err.Error(), c.words) || (c.is != nil && !errors.Is(err, c.is)) {
				t.Fatalf("got %v, want an error with %q", err, c.words)
			}
			t.Logf("error: %v", err)
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("multi-line error: %q", err)
			}
			if after := storeState(t, dir); after != before {
				t.Errorf("store changed:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			// Also as a tar of the same layout.
			it.TarDir(t, src, src+".tar")
			if _, err := unpack(t, s, src+".tar", image.UnpackOptions{}); err == nil {
				t.Errorf("tar form accepted")
			}
			os.Remove(src + ".tar")
			if after := storeState(t, dir); after != before {
				t.Errorf("store changed (tar form):\nbefore:\n%s\nafter:\n%s", before, after)
			}
			if got := outside(); got != outsideBefore {
				t.Errorf("outside the store changed:\n%s\n%s", outsideBefore, got)
			}
		})
	}
}

// flip inverts one byte of a file.
func flip(t *testing.T, p string, off int) {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[off%len(b)] ^= 0xff
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestSharingAndRemove: images share layers; ls shows it; rm removes only
// what no other image uses.
func TestSharingAndRemove(t *testing.T) {
	testenv.RequireMknod(t)
	ls := layers(t)
	s, dir := openStore(t)
	src := t.TempDir()
	own := it.Layer{Tar: it.Tar(t, it.Entry{Name: "b-only", Data: "b"})}
	it.WriteOCI(t, src, it.Image{Name: "a:1", Layers: ls}, it.Image{Name: "b:1", Layers: []it.Layer{ls[0], ls[1], own}})
	if _, err := unpack(t, s, src, image.UnpackOptions{Ref: "a:1"}); err != nil {
		t.Fatal(err)
	}
	res, err := unpack(t, s, src, image.UnpackOptions{Ref: "b:1"})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Reused) != 2 || len(res.New) != 1 {
		t.Fatalf("b: new %v reused %v", res.New, res.Reused)
	}
	infos, err := s.Layers()
	if err != nil {
		t.Fatal(err)
	}
	shared := 0
	for _, l := range infos {
		if len(l.Images) == 2 {
			shared++
		}
	}
	if len(infos) != 4 || shared != 2 {
		t.Errorf("layers %+v: want 4, 2 shared", infos)
	}
	rm, err := s.Remove(ctx, "a:1", image.RemoveOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rm.Removed) != 1 || len(rm.Kept) != 2 {
		t.Errorf("rm a: removed %v kept %v", rm.Removed, rm.Kept)
	}
	b, err := s.Get("b:1")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range s.LowerDirs(b) {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("b's layer gone: %v", err)
		}
	}
	// A live mount of b's layers stops rm.
	inUse := errors.New("in use by a mount")
	if _, err := s.Remove(ctx, "b:1", image.RemoveOptions{InUse: func([]string) error { return inUse }}); !errors.Is(err, inUse) {
		t.Errorf("rm with InUse: %v", err)
	}
	if _, err := s.Remove(ctx, "b:1", image.RemoveOptions{}); err != nil {
		t.Fatal(err)
	}
	if infos, _ := s.Layers(); len(infos) != 0 {
		t.Errorf("layers left: %+v", infos)
	}
	if _, err := s.Remove(ctx, "b:1", image.RemoveOptions{}); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("rm twice: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(ents) != 0 {
		t.Errorf("tmp not empty: %v", ents)
	}
}

// TestGet: names with and without tags and registries, IDs, prefixes.
func TestGet(t *testing.T) {
	s, _ := openStore(t)
	src := t.TempDir()
	l := []it.Layer{{Tar: it.Tar(t, it.Entry{Name: "f", Data: "1"})}}
	l2 := []it.Layer{{Tar: it.Tar(t, it.Entry{Name: "f", Data: "2"})}}
	w := it.WriteOCI(t, src, it.Image{Name: "docker.io/library/alpine:latest", Layers: l}, it.Image{Name: "busybox:1", Layers: l2})
	for _, ref := range []string{"alpine", "busybox:1"} {
		if _, err := unpack(t, s, src, image.UnpackOptions{Ref: ref}); err != nil {
			t.Fatalf("unpack %s: %v", ref, err)
		}
	}
	for ref, want := range map[string]string{
		"alpine": "docker.io/library/alpine:latest", "alpine:latest": "docker.io/library/alpine:latest",
		"library/alpine": "docker.io/library/alpine:latest", "busybox:1": "busybox:1",
		w[1].Config: "busybox:1", w[1].Config[7:15]: "busybox:1", w[0].Manifest: "docker.io/library/alpine:latest",
	} {
		img, err := s.Get(ref)
		if err != nil || img.Name != want {
			t.Errorf("Get(%q) = %v, %v; want %s", ref, img, err, want)
		}
	}
	for _, ref := range []string{"busybox", "nginx", "sha256:00"} {
		if _, err := s.Get(ref); !errors.Is(err, image.ErrNotFound) {
			t.Errorf("Get(%q): %v, want not found", ref, err)
		}
	}
}

// TestPlatformChoice: an index with several platforms of one image picks
// this machine's.
func TestPlatformChoice(t *testing.T) {
	s, _ := openStore(t)
	src := t.TempDir()
	mine := []it.Layer{{Tar: it.Tar(t, it.Entry{Name: "mine", Data: "1"})}}
	theirs := []it.Layer{{Tar: it.Tar(t, it.Entry{Name: "theirs", Data: "2"})}}
	it.WriteOCI(t, src, it.Image{Name: "x:1", Layers: theirs, Platform: "linux/s390x"},
		it.Image{Name: "x:1", Layers: mine, Platform: "linux/" + goarch()})
	res, err := unpack(t, s, src, image.UnpackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Image.Layers[0].DiffID != it.Digest(mine[0].Tar) {
		t.Errorf("picked the other platform")
	}
}
