// Package imagetest builds container images for tests: layer tars, OCI
// image layouts and docker-save archives written by the test itself,
// plus a reference applier (layers applied one by one the naive way, as
// docker's vfs driver does) and a model of overlay's merge of
// kernel-format layer dirs, to check what a layer store produces.
//
// It is imported only by tests.
package imagetest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// Entry is one entry of a test layer tar.
type Entry struct {
	Name string
	// Type is a tar type flag; 0 means a regular file.
	Type byte
	Data string
	// Link is the target of a symlink or hard link.
	Link string
	// Mode defaults to 0644 for files, 0755 for directories.
	Mode int64
	PAX  map[string]string
	// Major and Minor are a device's numbers.
	Major, Minor int64
}

// Tar writes entries as an uncompressed layer tar.
func Tar(t testing.TB, ents ...Entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		typ := e.Type
		if typ == 0 {
			typ = tar.TypeReg
		}
		mode := e.Mode
		if mode == 0 {
			mode = 0o644
			if typ == tar.TypeDir {
				mode = 0o755
			}
		}
		hdr := &tar.Header{Name: e.Name, Typeflag: typ, Linkname: e.Link, Mode: mode, PAXRecords: e.PAX,
			ModTime: time1, Devmajor: e.Major, Devminor: e.Minor}
		if typ == tar.TypeReg {
			hdr.Size = int64(len(e.Data))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatalf("tar %q: %v", e.Name, err)
		}
		if typ == tar.TypeReg {
			tw.Write([]byte(e.Data))
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// time1 is the modification time of every test entry.
var time1 = time.Unix(1700000000, 0)

// Compression of a test layer blob.
type Compression int

// Compressions of test blobs.
const (
	None Compression = iota
	Gzip
	Zstd
)

// Layer is one layer of a test image.
type Layer struct {
	Tar         []byte
	Compression Compression
}

// Blob returns the layer as stored: compressed as asked.
func (l Layer) Blob(t testing.TB) []byte {
	t.Helper()
	var buf bytes.Buffer
	switch l.Compression {
	case None:
		return l.Tar
	case Gzip:
		zw := gzip.NewWriter(&buf)
		zw.Write(l.Tar)
		zw.Close()
	case Zstd:
		zw, err := zstd.NewWriter(&buf)
		if err != nil {
			t.Fatal(err)
		}
		zw.Write(l.Tar)
		zw.Close()
	}
	return buf.Bytes()
}

// MediaType returns the OCI media type of the blob.
func (l Layer) MediaType() string {
	switch l.Compression {
	case Gzip:
		return "application/vnd.oci.image.layer.v1.tar+gzip"
	case Zstd:
		return "application/vnd.oci.image.layer.v1.tar+zstd"
	}
	return "application/vnd.oci.image.layer.v1.tar"
}

// Image is a test image.
type Image struct {
	// Name is the OCI ref name annotation / docker RepoTag ("" for none).
	Name   string
	Layers []Layer
	// DiffIDs overrides the config's rootfs.diff_ids (nil: the right
	// ones).
	DiffIDs []string
	// Platform is "os/arch" in the index (OCI only; "" for none).
	Platform string
}

// Digest returns "sha256:<hex>" of b.
func Digest(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// DiffIDs returns the diffIDs of img's layers.
func (img Image) diffIDs() []string {
	if img.DiffIDs != nil {
		return img.DiffIDs
	}
	var out []string
	for _, l := range img.Layers {
		out = append(out, Digest(l.Tar))
	}
	return out
}

// Config returns the image config JSON.
func (img Image) Config() []byte {
	cfg := map[string]any{
		"architecture": "amd64", "os": "linux",
		"config": map[string]any{"Cmd": []string{"/bin/sh"}},
		"rootfs": map[string]any{"type": "layers", "diff_ids": img.diffIDs()},
	}
	b, _ := json.Marshal(cfg)
	return b
}

// Written describes what WriteOCI wrote for one image, so that tests can
// corrupt it.
type Written struct {
	Manifest, Config string   // digests
	Layers           []string // blob digests, bottom first
}

// BlobPath returns the path of a blob in an OCI layout.
func BlobPath(dir, digest string) string {
	return filepath.Join(dir, "blobs", "sha256", strings.TrimPrefix(digest, "sha256:"))
}

func writeBlob(t testing.TB, dir string, data []byte) (string, int64) {
	t.Helper()
	d := Digest(data)
	p := BlobPath(dir, d)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return d, int64(len(data))
}

// WriteOCI writes an OCI image layout holding imgs into dir.
func WriteOCI(t testing.TB, dir string, imgs ...Image) []Written {
	t.Helper()
	var out []Written
	var manifests []map[string]any
	for _, img := range imgs {
		var w Written
		cd, cs := writeBlob(t, dir, img.Config())
		w.Config = cd
		var layers []map[string]any
		for _, l := range img.Layers {
			d, s := writeBlob(t, dir, l.Blob(t))
			w.Layers = append(w.Layers, d)
			layers = append(layers, map[string]any{"mediaType": l.MediaType(), "digest": d, "size": s})
		}
		m, _ := json.Marshal(map[string]any{
			"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
			"config": map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
			"layers": layers,
		})
		md, ms := writeBlob(t, dir, m)
		w.Manifest = md
		desc := map[string]any{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms}
		if img.Name != "" {
			desc["annotations"] = map[string]string{"org.opencontainers.image.ref.name": img.Name}
		}
		if img.Platform != "" {
			os, arch, _ := strings.Cut(img.Platform, "/")
			desc["platform"] = map[string]string{"os": os, "architecture": arch}
		}
		manifests = append(manifests, desc)
		out = append(out, w)
	}
	idx, _ := json.Marshal(map[string]any{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests})
	if err := os.WriteFile(filepath.Join(dir, "index.json"), idx, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

// WriteDockerSave writes what "docker save" writes into dir. Old format:
// <config hex>.json and <id>/layer.tar (uncompressed, as docker < 25
// wrote them; a layer shared by two images is stored once and linked
// from the second by a relative symlink, as docker does). New format: the
// config and layers as blobs/sha256/<hex> (docker >= 25).
func WriteDockerSave(t testing.TB, dir string, oldFormat bool, imgs ...Image) {
	t.Helper()
	type entry struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	var ms []entry
	seen := map[string]string{}
	for _, img := range imgs {
		var e entry
		if img.Name != "" {
			e.RepoTags = []string{img.Name}
		}
		cfg := img.Config()
		if oldFormat {
			e.Config = strings.TrimPrefix(Digest(cfg), "sha256:") + ".json"
			os.WriteFile(filepath.Join(dir, e.Config), cfg, 0o644)
		} else {
			d, _ := writeBlob(t, dir, cfg)
			e.Config = "blobs/sha256/" + strings.TrimPrefix(d, "sha256:")
		}
		for i, l := range img.Layers {
			if !oldFormat {
				d, _ := writeBlob(t, dir, l.Blob(t))
				e.Layers = append(e.Layers, "blobs/sha256/"+strings.TrimPrefix(d, "sha256:"))
				continue
			}
			diff := Digest(l.Tar)
			id := strings.TrimPrefix(Digest([]byte(fmt.Sprintf("%s %d %s", img.Name, i, diff))), "sha256:")
			p := id + "/layer.tar"
			os.MkdirAll(filepath.Join(dir, id), 0o755)
			if first, ok := seen[diff]; ok {
				if err := os.Symlink("../"+first, filepath.Join(dir, p)); err != nil {
					t.Fatal(err)
				}
			} else {
				if err := os.WriteFile(filepath.Join(dir, p), l.Tar, 0o644); err != nil {
					t.Fatal(err)
				}
				seen[diff] = p
			}
			e.Layers = append(e.Layers, p)
		}
		ms = append(ms, e)
	}
	data, _ := json.Marshal(ms)
	if err := os.WriteFile(filepath.Join(dir, "manifest.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TarDir writes the tree dir as a tar file out (what "docker save -o"
// produces, or a tarred OCI layout). Symlinks stay symlinks.
func TarDir(t testing.TB, dir, out string) {
	t.Helper()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	err = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		link := ""
		if fi.Mode()&os.ModeSymlink != 0 {
			link, _ = os.Readlink(p)
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return err
		}
		hdr.Name = rel
		if fi.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			tw.Write(data)
		}
		return nil
	})
	if err == nil {
		err = tw.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
}

// Apply is the reference applier: it applies OCI layer tars, bottom
// first, to the plain directory root the naive way (whiteouts delete,
// opaque markers empty the directory of what lower layers put there).
// Only for trusted test archives.
func Apply(t testing.TB, root string, tars ...[]byte) {
	t.Helper()
	for _, tb := range tars {
		type item struct {
			hdr  *tar.Header
			data []byte
		}
		var items []item
		tr := tar.NewReader(bytes.NewReader(tb))
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			data, _ := io.ReadAll(tr)
			h.Name = path.Clean(h.Name)
			items = append(items, item{h, data})
		}
		// Whiteouts and opaque markers delete what lower layers put
		// there, never what this layer adds: delete first, then add.
		for _, it := range items {
			dir, base := path.Split(it.hdr.Name)
			dir = path.Clean(dir)
			switch {
			case base == ".wh..wh..opq":
				ents, _ := os.ReadDir(filepath.Join(root, dir))
				for _, e := range ents {
					os.RemoveAll(filepath.Join(root, dir, e.Name()))
				}
			case strings.HasPrefix(base, ".wh."):
				os.RemoveAll(filepath.Join(root, dir, base[4:]))
			}
		}
		for _, it := range items {
			h := it.hdr
			if strings.HasPrefix(path.Base(h.Name), ".wh.") {
				continue
			}
			p := filepath.Join(root, h.Name)
			os.MkdirAll(filepath.Dir(p), 0o755)
			st, err := os.Lstat(p)
			if err == nil && !(st.IsDir() && h.Typeflag == tar.TypeDir) {
				os.RemoveAll(p)
			}
			switch h.Typeflag {
			case tar.TypeDir:
				os.MkdirAll(p, 0o755)
				os.Chmod(p, os.FileMode(h.Mode&0o777))
			case tar.TypeReg:
				os.WriteFile(p, it.data, 0o644)
				os.Chmod(p, os.FileMode(h.Mode&0o777))
			case tar.TypeSymlink:
				os.Symlink(h.Linkname, p)
			case tar.TypeLink:
				os.Link(filepath.Join(root, h.Linkname), p)
			}
		}
	}
}

// Tree describes every entry below root as "path type mode [content]"
// lines, for comparisons.
func Tree(t testing.TB, root string) string {
	t.Helper()
	var lines []string
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		lines = append(lines, describe(t, p, rel, fi))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func describe(t testing.TB, p, rel string, fi os.FileInfo) string {
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		target, _ := os.Readlink(p)
		return rel + " symlink -> " + target
	case fi.IsDir():
		return fmt.Sprintf("%s dir %o", rel, fi.Mode().Perm())
	case fi.Mode().IsRegular():
		data, _ := os.ReadFile(p)
		return fmt.Sprintf("%s file %o %q", rel, fi.Mode().Perm(), data)
	}
	return rel + " other " + fi.Mode().String()
}

// Merge models kernel overlay's read-only merge of kernel-format layer
// dirs (top first), with opaque dirs in the xattr namespace prefix
// ("trusted.overlay." or "user.overlay."), and describes the result like
// [Tree].
func Merge(t testing.TB, lowers []string, prefix string) string {
	t.Helper()
	var lines []string
	var walk func(layers []string, rel string)
	walk = func(layers []string, rel string) {
		// Layers below the first opaque one do not show.
		for i, l := range layers {
			if i < len(layers)-1 && isOpaque(filepath.Join(l, rel), prefix) {
				layers = layers[:i+1]
				break
			}
		}
		seen := map[string]bool{}
		for i, l := range layers {
			ents, _ := os.ReadDir(filepath.Join(l, rel))
			for _, e := range ents {
				name := e.Name()
				if seen[name] {
					continue
				}
				seen[name] = true
				p := filepath.Join(l, rel, name)
				var st unix.Stat_t
				if err := unix.Lstat(p, &st); err != nil {
					t.Fatal(err)
				}
				if st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0 {
					continue // whiteout
				}
				fi, _ := os.Lstat(p)
				child := filepath.Join(rel, name)
				lines = append(lines, describe(t, p, child, fi))
				if !fi.IsDir() {
					continue
				}
				sub := []string{l}
				for _, lower := range layers[i+1:] {
					var lst unix.Stat_t
					if err := unix.Lstat(filepath.Join(lower, child), &lst); err != nil {
						continue
					}
					if lst.Mode&unix.S_IFMT != unix.S_IFDIR {
						break // a file or whiteout ends the merge
					}
					sub = append(sub, lower)
				}
				walk(sub, child)
			}
		}
	}
	walk(lowers, "")
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func isOpaque(dir, prefix string) bool {
	buf := make([]byte, 8)
	n, err := unix.Lgetxattr(dir, prefix+"opaque", buf)
	return err == nil && string(buf[:n]) == "y"
}
