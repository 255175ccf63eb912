package layer_test

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/internal/testenv"
	"strata/layer"
	"strata/whiteout"
)

var ctx = context.Background()

// upperFixture builds what an overlay upper dir holds: every file type,
// modes with set-id bits, foreign owners, xattrs, a sparse file, hard
// links, whiteouts, an opaque dir, a read-only dir, private overlay
// attributes that must not travel.
func upperFixture(t *testing.T, dir string, ns whiteout.NS) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	p := func(rel string) string { return filepath.Join(dir, rel) }
	write := func(rel, data string, mode os.FileMode) {
		t.Helper()
		must(os.MkdirAll(filepath.Dir(p(rel)), 0o755))
		must(os.WriteFile(p(rel), []byte(data), mode))
		must(os.Chmod(p(rel), mode))
	}
	write("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644)
	must(os.Lchown(p("etc/passwd"), 1000, 1001))
	write("bin/sh", "#!shell", 0o755)
	must(os.Chmod(p("bin/sh"), 0o4755|os.ModeSetuid))
	must(unix.Chmod(p("bin/sh"), 0o4755))
	must(os.Symlink("sh", p("bin/ls")))
	must(os.Symlink("/etc/passwd", p("abs")))
	must(os.Lchown(p("abs"), 7, 8))
	write("a/x", "hard linked", 0o640)
	must(os.Link(p("a/x"), p("a/y")))
	must(os.MkdirAll(p("b"), 0o755))
	must(os.Link(p("a/x"), p("b/z")))
	must(unix.Mkfifo(p("fifo"), 0o620))
	must(os.MkdirAll(p("dev"), 0o755))
	must(unix.Mknod(p("dev/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(unix.Chmod(p("dev/null"), 0o666))
	must(unix.Mknod(p("dev/sda"), unix.S_IFBLK|0o660, int(unix.Mkdev(8, 0))))
	must(unix.Chmod(p("dev/sda"), 0o660))
	// Whiteouts: top level and nested.
	must(unix.Mknod(p("gone"), unix.S_IFCHR, 0))
	must(unix.Mknod(p("etc/shadow"), unix.S_IFCHR, 0))
	// Opaque dir with content.
	write("opq/new", "fresh", 0o600)
	must(unix.Setxattr(p("opq"), ns.Opaque(), []byte("y"), 0))
	// Extended attributes, including binary values.
	must(unix.Setxattr(p("etc/passwd"), "user.mime", []byte("text/plain"), 0))
	must(unix.Setxattr(p("bin/sh"), "trusted.strata-test", []byte{0, 1, 2, 0}, 0))
	must(unix.Setxattr(p("a"), "user.dir-attr", []byte("d"), 0))
	// Private overlay attributes are never exported.
	must(unix.Setxattr(p("etc/passwd"), ns.Prefix()+"origin", []byte{1, 2, 3}, 0))
	must(unix.Setxattr(p("a"), ns.Prefix()+"impure", []byte("y"), 0))
	// A sparse file: a hole, then data.
	f, err := os.Create(p("sparse"))
	must(err)
	_, err = f.WriteAt([]byte("end"), 1<<20)
	must(err)
	must(f.Close())
	// Long and non-ASCII names.
	long := strings.Repeat("long-name-", 15)
	write("deep/"+long+"/ünïcødé", "utf8", 0o644)
	// A read-only directory with a file in it.
	write("ro/f", "in a read-only dir", 0o444)
	must(os.Chmod(p("ro"), 0o555))
	// Times: whole seconds, so that the comparison is exact.
	mt := time.Unix(1700000000, 0)
	must(filepath.Walk(dir, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		ts := []unix.Timespec{unix.NsecToTimespec(mt.UnixNano()), unix.NsecToTimespec(mt.UnixNano())}
		return unix.UtimesNanoAt(unix.AT_FDCWD, path, ts, unix.AT_SYMLINK_NOFOLLOW)
	}))
}

// withoutPrivate drops the overlay-private attributes that export drops,
// from a snapshot line list (opacity travels as a marker and comes back).
func withoutPrivate(s string, ns whiteout.NS) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		for _, a := range []string{"origin", "impure"} {
			i := strings.Index(line, " "+ns.Prefix()+a+"=")
			if i >= 0 {
				j := strings.Index(line[i+1:], " ")
				if j < 0 {
					line = line[:i]
				} else {
					line = line[:i] + line[i+1+j:]
				}
			}
		}
		out = append(out, line)
	}
	return strings.Join(out, "\n")
}

func TestRoundTrip(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTrustedXattr(t)
	for _, ns := range whiteout.Both {
		for _, c := range []layer.Compression{layer.Uncompressed, layer.Gzip, layer.Zstd} {
			t.Run(ns.String()+"-"+c.String(), func(t *testing.T) {
				dir := t.TempDir()
				src := filepath.Join(dir, "upper")
				os.Mkdir(src, 0o755)
				upperFixture(t, src, ns)
				var buf bytes.Buffer
				exp, err := layer.Export(ctx, src, &buf, layer.ExportOptions{NS: []whiteout.NS{ns}, Compression: c})
				if err != nil {
					t.Fatalf("Export: %v", err)
				}
				if int64(buf.Len()) != exp.Size {
					t.Errorf("Size = %d, wrote %d", exp.Size, buf.Len())
				}
				if (exp.Digest == exp.DiffID) != (c == layer.Uncompressed) {
					t.Errorf("digest %s vs diffID %s for %s", exp.Digest, exp.DiffID, c)
				}
				dst := filepath.Join(dir, "imported")
				imp, err := layer.Import(ctx, &buf, dst, layer.ImportOptions{NS: ns, DiffID: exp.DiffID, Digest: exp.Digest})
				if err != nil {
					t.Fatalf("Import: %v", err)
				}
				if imp.Compression != c || imp.DiffID != exp.DiffID || imp.Digest != exp.Digest {
					t.Errorf("import saw %s %s %s, export wrote %s %s %s", imp.Compression, imp.DiffID, imp.Digest, c, exp.DiffID, exp.Digest)
				}
				if len(imp.Refused)+len(imp.Skipped) > 0 {
					t.Errorf("refused %v, skipped %v", imp.Refused, imp.Skipped)
				}
				want, got := withoutPrivate(snapshot(t, src), ns), snapshot(t, dst)
				if want != got {
					t.Errorf("tree after export+import differs\nwant:\n%s\ngot:\n%s", want, got)
				}
				// The sparse file stays sparse.
				var st unix.Stat_t
				if err := unix.Stat(filepath.Join(dst, "sparse"), &st); err != nil || st.Blocks*512 >= 1<<20 {
					t.Errorf("sparse: %v, %d blocks", err, st.Blocks)
				}
			})
		}
	}
}

// TestExportFormat checks the OCI side: marker names, hard links, PAX
// xattrs, no private attributes, sorted order, determinism.
func TestExportFormat(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTrustedXattr(t)
	src := filepath.Join(t.TempDir(), "upper")
	os.Mkdir(src, 0o755)
	upperFixture(t, src, whiteout.Trusted)
	// An xattr whiteout in a dir marked "x", as image tools write them.
	os.Mkdir(filepath.Join(src, "xw"), 0o755)
	fd, err := unix.Open(filepath.Join(src, "xw"), unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := whiteout.CreateXattr(fd, "hidden", whiteout.Trusted); err != nil {
		t.Fatal(err)
	}
	if err := whiteout.SetOpacity(fd, "", whiteout.Trusted, whiteout.XattrWhiteouts); err != nil {
		t.Fatal(err)
	}
	var a, b bytes.Buffer
	r1, err := layer.Export(ctx, src, &a, layer.ExportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r2, err := layer.Export(ctx, src, &b, layer.ExportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if r1.DiffID != r2.DiffID || !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Errorf("export not deterministic: %s vs %s", r1.DiffID, r2.DiffID)
	}
	tr := tar.NewReader(&a)
	var names []string
	hdrs := map[string]*tar.Header{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		hdrs[h.Name] = h
		for k := range h.PAXRecords {
			if strings.Contains(k, "overlay.") {
				t.Errorf("%s: private attribute exported: %s", h.Name, k)
			}
		}
	}
	for _, want := range []string{".wh.gone", "etc/.wh.shadow", "opq/", "opq/.wh..wh..opq", "xw/", "xw/.wh.hidden"} {
		if hdrs[want] == nil {
			t.Errorf("missing entry %q in %q", want, names)
		}
	}
	if h := hdrs["xw/.wh..wh..opq"]; h != nil {
		t.Errorf("dir with opacity x exported as opaque")
	}
	if h := hdrs["opq/.wh..wh..opq"]; h != nil && names[indexOf(names, "opq/")+1] != "opq/.wh..wh..opq" {
		t.Errorf("opaque marker does not follow its directory: %q", names)
	}
	links := 0
	for _, n := range []string{"a/x", "a/y", "b/z"} {
		if h := hdrs[n]; h != nil && h.Typeflag == tar.TypeLink {
			links++
			if h.Linkname != "a/x" {
				t.Errorf("%s links to %q, want a/x", n, h.Linkname)
			}
		}
	}
	if links != 2 || hdrs["a/x"].Typeflag != tar.TypeReg {
		t.Errorf("hard link group: %d links, a/x type %c", links, hdrs["a/x"].Typeflag)
	}
	if v := hdrs["etc/passwd"].PAXRecords["SCHILY.xattr.user.mime"]; v != "text/plain" {
		t.Errorf("etc/passwd user.mime = %q", v)
	}
	if v := hdrs["bin/sh"].PAXRecords["SCHILY.xattr.trusted.strata-test"]; v != "\x00\x01\x02\x00" {
		t.Errorf("bin/sh trusted.strata-test = %q", v)
	}
	if h := hdrs["bin/sh"]; h.Mode != 0o4755 {
		t.Errorf("bin/sh mode %o", h.Mode)
	}
	if h := hdrs["etc/passwd"]; h.Uid != 1000 || h.Gid != 1001 {
		t.Errorf("etc/passwd owner %d:%d", h.Uid, h.Gid)
	}
	// Directory entries precede their children, in byte order.
	for i := 1; i < len(names); i++ {
		if strings.TrimSuffix(names[i-1], "/") == strings.TrimSuffix(names[i], "/") {
			t.Errorf("duplicate %q", names[i])
		}
	}
}

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

// TestExportRefusesWhiteoutNames: a real file named .wh.x cannot be told
// from a whiteout in OCI form.
func TestExportRefusesWhiteoutNames(t *testing.T) {
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, ".wh.x"), nil, 0o644)
	_, err := layer.Export(ctx, src, io.Discard, layer.ExportOptions{})
	if err == nil || !strings.Contains(err.Error(), "cannot be expressed") {
		t.Errorf("got %v, want a refusal", err)
	}
}

// TestExportRefusesRedirect: redirect_dir layers would lose meaning.
func TestExportRefusesRedirect(t *testing.T) {
	testenv.RequireTrustedXattr(t)
	src := t.TempDir()
	os.Mkdir(filepath.Join(src, "d"), 0o755)
	if err := unix.Setxattr(filepath.Join(src, "d"), "trusted.overlay.redirect", []byte("/x"), 0); err != nil {
		t.Fatal(err)
	}
	_, err := layer.Export(ctx, src, io.Discard, layer.ExportOptions{})
	if err == nil || !strings.Contains(err.Error(), "redirect") {
		t.Errorf("got %v, want a refusal naming redirect", err)
	}
}

// TestImportOCIRules: same-layer whiteouts are ignored, later entries
// replace earlier ones, implied parents get 0755, an entry over a
// whiteout replaces it, aufs metadata is skipped.
func TestImportOCIRules(t *testing.T) {
	testenv.RequireMknod(t)
	tarball := mkTar(t,
		ent{name: "keep", data: "1"},
		ent{name: ".wh.keep"},
		ent{name: ".wh.later"},
		ent{name: "later", data: "2"},
		ent{name: "implied/deep/file", data: "3"},
		ent{name: "dup", data: "first"},
		ent{name: "dup", typ: tar.TypeSymlink, link: "target"},
		ent{name: "d/", typ: tar.TypeDir},
		ent{name: "d/f", data: "4"},
		ent{name: "d", typ: tar.TypeSymlink, link: "elsewhere"},
		ent{name: ".wh..wh.plnk"},
		ent{name: "./", typ: tar.TypeDir, mode: 0o711},
		ent{name: "o/.wh..wh..opq"},
		ent{name: "o/", typ: tar.TypeDir, mode: 0o700},
		// Whiteout and directory of one name in one layer: the lower
		// one is gone, this one replaces it: an opaque directory,
		// whichever comes first, implied or explicit.
		ent{name: ".wh.w1"}, ent{name: "w1/f", data: "5"},
		ent{name: "w2/", typ: tar.TypeDir}, ent{name: ".wh.w2"},
		ent{name: ".wh.w3"}, ent{name: "w3/", typ: tar.TypeDir},
		ent{name: ".wh.w4"}, ent{name: "w4", data: "a file hides anyway"},
	)
	dst := filepath.Join(t.TempDir(), "l")
	res, err := layer.Import(ctx, bytes.NewReader(tarball), dst, layer.ImportOptions{NS: whiteout.User})
	if err != nil {
		t.Fatal(err)
	}
	got := snapshot(t, dst)
	for _, want := range []string{
		"keep file 0644", "later file 0644", "implied dir 0755", "implied/deep dir 0755",
		"dup symlink", "-> target", "d symlink", "-> elsewhere", ". dir 0711", `o dir 0700`, `user.overlay.opaque="y"`,
		"w4 file 0644",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("missing %q in\n%s", want, got)
		}
	}
	for _, d := range []string{"o", "w1", "w2", "w3"} {
		if !strings.Contains(got, "\n"+d+" dir ") || !strings.Contains(strings.Split(got[strings.Index(got, "\n"+d+" dir "):], "\n")[1], `user.overlay.opaque="y"`) {
			t.Errorf("%s is not an opaque dir:\n%s", d, got)
		}
	}
	if len(res.Skipped) != 1 {
		t.Errorf("skipped %v, want the aufs entry", res.Skipped)
	}
}
