package layer_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
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

// hostileEnv makes base/ with an "outside" dir holding a secret, next to
// where the target goes. It returns base, the target path and a function
// that checks base (and /etc) are unchanged and that no target or
// temporary directory was left.
func hostileEnv(t *testing.T) (base, target string, unchanged func()) {
	t.Helper()
	base = t.TempDir()
	out := filepath.Join(base, "outside")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(out, "secret"), []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := listing(t, base)
	target = filepath.Join(base, "target")
	return base, target, func() {
		t.Helper()
		if after := listing(t, base); after != before {
			t.Errorf("directory beside the target changed:\nbefore:\n%s\nafter:\n%s", before, after)
		}
		for _, p := range []string{"/etc/strata-pwned", "/strata-pwned", "/tmp/strata-pwned"} {
			if _, err := os.Lstat(p); err == nil {
				os.Remove(p)
				t.Errorf("%s was written", p)
			}
		}
	}
}

// TestImportRefusesEscapes: each archive tries to write or link outside
// the target. Import fails with a RefusedError naming the entry, writes
// nothing outside, and leaves no target.
func TestImportRefusesEscapes(t *testing.T) {
	testenv.RequireMknod(t)
	cases := []struct {
		name    string
		ents    []ent
		refused string // the refused entry
		reason  string // part of the reason
	}{
		{"dotdot", []ent{{name: "../strata-pwned", data: "x"}}, "../strata-pwned", `".."`},
		{"dotdot-inside-name", []ent{{name: "a/", typ: tar.TypeDir}, {name: "a/../../strata-pwned", data: "x"}}, "a/../../strata-pwned", `".."`},
		{"absolute-dotdot", []ent{{name: "/../strata-pwned", data: "x"}}, "/../strata-pwned", `".."`},
		{"symlink-parent-relative", []ent{
			{name: "a", typ: tar.TypeSymlink, link: "../outside"},
			{name: "a/pwned", data: "x"}}, "a/pwned", "symlink"},
		{"symlink-parent-etc", []ent{
			{name: "etc", typ: tar.TypeSymlink, link: "/etc"},
			{name: "etc/strata-pwned", data: "x"}}, "etc/strata-pwned", "symlink"},
		{"symlink-parent-deep", []ent{
			{name: "d/", typ: tar.TypeDir},
			{name: "d/s", typ: tar.TypeSymlink, link: "../../outside"},
			{name: "d/s/sub/pwned", data: "x"}}, "d/s/sub/pwned", "symlink"},
		{"dir-replaced-by-symlink", []ent{
			{name: "d/", typ: tar.TypeDir},
			{name: "d/f", data: "ok"},
			{name: "d", typ: tar.TypeSymlink, link: "../outside"},
			{name: "d/pwned", data: "x"}}, "d/pwned", "symlink"},
		{"symlink-then-dir-entry", []ent{
			{name: "a", typ: tar.TypeSymlink, link: "../outside"},
			{name: "a/newdir/", typ: tar.TypeDir}}, "a/newdir/", "symlink"},
		{"symlink-then-whiteout", []ent{
			{name: "a", typ: tar.TypeSymlink, link: "../outside"},
			{name: "a/.wh.secret"}}, "a/.wh.secret", "symlink"},
		{"symlink-then-opaque", []ent{
			{name: "a", typ: tar.TypeSymlink, link: "../outside"},
			{name: "a/.wh..wh..opq"}}, "a/.wh..wh..opq", "symlink"},
		{"symlink-then-hardlink-into", []ent{
			{name: "f", data: "x"},
			{name: "a", typ: tar.TypeSymlink, link: "../outside"},
			{name: "a/pwned", typ: tar.TypeLink, link: "f"}}, "a/pwned", "symlink"},
		{"hardlink-dotdot", []ent{{name: "l", typ: tar.TypeLink, link: "../outside/secret"}}, "l", `".."`},
		{"hardlink-via-symlink", []ent{
			{name: "s", typ: tar.TypeSymlink, link: "../outside"},
			{name: "l", typ: tar.TypeLink, link: "s/secret"}}, "l", "symlink"},
		{"hardlink-absolute", []ent{{name: "l", typ: tar.TypeLink, link: "/etc/passwd"}}, "l", "not in the archive"},
		{"hardlink-to-symlink-target", []ent{
			{name: "s", typ: tar.TypeSymlink, link: "/etc/passwd"},
			{name: "l", typ: tar.TypeLink, link: "s"},
			{name: "l/x", data: "x"}}, "l/x", "symlink"},
		{"whiteout-dot", []ent{{name: ".wh.."}}, ".wh..", "invalid"},
		{"whiteout-dotdot", []ent{{name: "a/.wh..."}}, "a/.wh...", "invalid"},
		{"private-xattr", []ent{{name: "f", data: "x",
			pax: map[string]string{"SCHILY.xattr.trusted.overlay.redirect": "/etc"}}}, "f", "overlay-private"},
		{"private-user-xattr", []ent{{name: "d/", typ: tar.TypeDir,
			pax: map[string]string{"SCHILY.xattr.user.overlay.opaque": "y"}}}, "d/", "overlay-private"},
		{"dir-named-whiteout", []ent{{name: ".wh.x/f", data: "x"}}, ".wh.x/f", "whiteout"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, target, unchanged := hostileEnv(t)
			res, err := layer.Import(ctx, bytes.NewReader(mkTar(t, c.ents...)), target, layer.ImportOptions{})
			var re *layer.RefusedError
			if !errors.As(err, &re) {
				t.Fatalf("got %v, want a RefusedError", err)
			}
			if len(res.Refused) == 0 || res.Refused[0].Name != c.refused || !strings.Contains(res.Refused[0].Reason, c.reason) {
				t.Errorf("refused %v, want %q (%s)", res.Refused, c.refused, c.reason)
			}
			if strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), c.refused) {
				t.Errorf("error %q: want one line naming %q", err, c.refused)
			}
			unchanged()
		})
	}
}

// TestImportSkipRefused: with SkipRefused the safe entries arrive, the
// unsafe ones are listed, nothing escapes.
func TestImportSkipRefused(t *testing.T) {
	_, target, unchanged := hostileEnv(t)
	tarball := mkTar(t,
		ent{name: "good", data: "g"},
		ent{name: "../strata-pwned", data: "x"},
		ent{name: "a", typ: tar.TypeSymlink, link: "../outside"},
		ent{name: "a/pwned", data: "x"},
		ent{name: "l", typ: tar.TypeLink, link: "a/secret"},
		ent{name: "also-good/f", data: "g"},
	)
	res, err := layer.Import(ctx, bytes.NewReader(tarball), target, layer.ImportOptions{SkipRefused: true})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range res.Refused {
		names = append(names, r.Name)
	}
	if strings.Join(names, ",") != "../strata-pwned,a/pwned,l" {
		t.Errorf("refused %v", res.Refused)
	}
	for _, p := range []string{"good", "a", "also-good/f"} {
		if _, err := os.Lstat(filepath.Join(target, p)); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
	os.RemoveAll(target)
	unchanged()
}

// TestImportAbsoluteNames: absolute names are made relative (GNU tar,
// containerd), and land inside the target.
func TestImportAbsoluteNames(t *testing.T) {
	_, target, unchanged := hostileEnv(t)
	tarball := mkTar(t, ent{name: "/strata-pwned", data: "x"}, ent{name: "//etc/strata-pwned", data: "y"},
		ent{name: "/l", typ: tar.TypeLink, link: "/strata-pwned"})
	if _, err := layer.Import(ctx, bytes.NewReader(tarball), target, layer.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"strata-pwned", "etc/strata-pwned", "l"} {
		if _, err := os.Lstat(filepath.Join(target, p)); err != nil {
			t.Errorf("%s not inside the target: %v", p, err)
		}
	}
	os.RemoveAll(target)
	unchanged()
}

// TestImportBrokenArchives: oversized headers, truncation anywhere,
// garbage: a clear error, nothing left.
func TestImportBrokenArchives(t *testing.T) {
	good := mkTar(t, ent{name: "d/", typ: tar.TypeDir}, ent{name: "d/f", data: strings.Repeat("x", 3000)},
		ent{name: "g", data: "y"})
	gz := func(b []byte) []byte {
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		zw.Write(b)
		zw.Close()
		return buf.Bytes()
	}
	// Offsets: d/ header 0, d/f header 512, data 1024..4024 (padded to
	// 4096), g header 4096, data 4608, end marker 5120.
	// archive/tar refuses to write what it refuses to read: build the
	// oversized records by hand.
	hugePAX := append(rawHeader("PaxHeaders/f", 'x', 2<<20+20), paxRecord("path", strings.Repeat("n/", 1<<20)+"f")...)
	longName := append(rawHeader("././@LongLink", 'L', 2<<20), bytes.Repeat([]byte("n/"), 1<<20)...)
	cases := []struct {
		name  string
		data  []byte
		is    error
		words string
	}{
		{"huge-pax-header", hugePAX, layer.ErrHeaderTooLarge, "too large"},
		{"huge-long-name", longName, layer.ErrHeaderTooLarge, "too large"},
		{"cut-in-header", good[:700], layer.ErrTruncated, "truncated"},
		{"cut-in-data", good[:2000], layer.ErrTruncated, "truncated"},
		{"cut-in-padding", good[:4050], layer.ErrTruncated, "truncated"},
		{"cut-between-entries", good[:4096], layer.ErrTruncated, "end-of-archive"},
		{"cut-before-end-marker", good[:5120], layer.ErrTruncated, "end-of-archive"},
		{"empty", nil, layer.ErrTruncated, "empty"},
		{"gzip-cut", gz(good)[:100], layer.ErrTruncated, "truncated"},
		{"gzip-cut-at-end", func() []byte { z := gz(good); return z[:len(z)-4] }(), layer.ErrTruncated, "truncated"},
		{"garbage", bytes.Repeat([]byte("garbage!"), 200), nil, "invalid tar header"},
		{"xz", []byte{0xfd, '7', 'z', 'X', 'Z', 0, 1, 2, 3}, nil, "xz"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, target, unchanged := hostileEnv(t)
			_, err := layer.Import(ctx, bytes.NewReader(c.data), target, layer.ImportOptions{})
			if err == nil || (c.is != nil && !errors.Is(err, c.is)) || !strings.Contains(err.Error(), c.words) {
				t.Fatalf("got %v, want an error with %q", err, c.words)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("multi-line error %q", err)
			}
			unchanged()
		})
	}
	// The uncut archive with the lone zero block that some writers
	// produce is fine.
	t.Run("one-zero-block", func(t *testing.T) {
		_, target, _ := hostileEnv(t)
		if _, err := layer.Import(ctx, bytes.NewReader(good[:5632]), target, layer.ImportOptions{}); err != nil {
			t.Fatal(err)
		}
	})
}

// TestImportDigests: a wrong expected diffID or digest fails after the
// whole archive was read, and leaves nothing.
func TestImportDigests(t *testing.T) {
	tarball := mkTar(t, ent{name: "f", data: "x"})
	right := layer.DigestOf(tarball)
	wrong := layer.DigestOf([]byte("something else"))
	for _, o := range []layer.ImportOptions{{DiffID: wrong}, {Digest: wrong}, {DiffID: right, Digest: wrong}} {
		_, target, unchanged := hostileEnv(t)
		_, err := layer.Import(ctx, bytes.NewReader(tarball), target, o)
		var de *layer.DigestError
		if !errors.As(err, &de) || de.Got != right || de.Want != wrong {
			t.Errorf("%+v: got %v, want a DigestError", o, err)
		}
		unchanged()
	}
	_, target, _ := hostileEnv(t)
	if _, err := layer.Import(ctx, bytes.NewReader(tarball), target, layer.ImportOptions{DiffID: right, Digest: right}); err != nil {
		t.Errorf("right digests: %v", err)
	}
	if _, err := layer.Import(ctx, bytes.NewReader(tarball), target, layer.ImportOptions{DiffID: "md5:abc"}); err == nil {
		t.Errorf("bad expected digest accepted")
	}
}

// TestImportTarget: an existing empty dir is replaced, a non-empty one or
// a file refused before anything is read; stale temporary dirs of a
// crashed import are removed.
func TestImportTarget(t *testing.T) {
	dir := t.TempDir()
	tarball := mkTar(t, ent{name: "f", data: "x"})
	empty := filepath.Join(dir, "empty")
	os.Mkdir(empty, 0o755)
	if _, err := layer.Import(ctx, bytes.NewReader(tarball), empty, layer.ImportOptions{}); err != nil {
		t.Errorf("empty dir target: %v", err)
	}
	if _, err := layer.Import(ctx, bytes.NewReader(tarball), empty, layer.ImportOptions{}); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Errorf("non-empty target: %v", err)
	}
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o644)
	if _, err := layer.Import(ctx, bytes.NewReader(tarball), file, layer.ImportOptions{}); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("file target: %v", err)
	}
	// A crash leftover with a read-only dir inside. While young it stays
	// (it may belong to an import that has not locked it yet).
	stale := filepath.Join(dir, ".strata-import-new-123")
	os.MkdirAll(filepath.Join(stale, "ro", "sub"), 0o755)
	os.Chmod(filepath.Join(stale, "ro"), 0o500)
	if _, err := layer.Import(ctx, bytes.NewReader(tarball), filepath.Join(dir, "new"), layer.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); err != nil {
		t.Errorf("young temporary dir removed: %v", err)
	}
	// Once old, and unlocked, the next import to that target removes it;
	// a locked one (a live import) stays.
	defer layer.SetStaleAge(0)()
	live := filepath.Join(dir, ".strata-import-new-456")
	os.Mkdir(live, 0o755)
	fd, err := unix.Open(live, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Flock(fd, unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(filepath.Join(dir, "new"))
	if _, err := layer.Import(ctx, bytes.NewReader(tarball), filepath.Join(dir, "new"), layer.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale temporary dir left: %v", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("locked temporary dir removed: %v", err)
	}
	if err := layer.RemoveAll(live); err != nil {
		t.Errorf("RemoveAll: %v", err)
	}
}

// TestImportOverlayNamespaces: the opaque marker goes to the namespace the
// caller picks.
func TestImportOverlayNamespaces(t *testing.T) {
	testenv.RequireTrustedXattr(t)
	tarball := mkTar(t, ent{name: "d/.wh..wh..opq"})
	for _, ns := range whiteout.Both {
		dst := filepath.Join(t.TempDir(), "l")
		if _, err := layer.Import(ctx, bytes.NewReader(tarball), dst, layer.ImportOptions{NS: ns}); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 8)
		n, err := unix.Lgetxattr(filepath.Join(dst, "d"), ns.Opaque(), buf)
		if err != nil || string(buf[:n]) != "y" {
			t.Errorf("%s: %q, %v", ns.Opaque(), buf[:n], err)
		}
		other := whiteout.User
		if ns == whiteout.User {
			other = whiteout.Trusted
		}
		if _, err := unix.Lgetxattr(filepath.Join(dst, "d"), other.Opaque(), buf); err == nil {
			t.Errorf("%s set too", other.Opaque())
		}
	}
}

// rawHeader builds a ustar header block.
func rawHeader(name string, typ byte, size int64) []byte {
	b := make([]byte, 512)
	copy(b[0:100], name)
	copy(b[100:108], fmt.Sprintf("%07o", 0o644))
	copy(b[108:116], "0000000")
	copy(b[116:124], "0000000")
	copy(b[124:136], fmt.Sprintf("%011o", size))
	copy(b[136:148], "00000000000")
	b[156] = typ
	copy(b[257:263], "ustar\x00")
	copy(b[263:265], "00")
	copy(b[148:156], "        ")
	sum := 0
	for _, c := range b {
		sum += int(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

// paxRecord formats one PAX record ("LEN key=value\n").
func paxRecord(k, v string) []byte {
	rest := " " + k + "=" + v + "\n"
	n := len(rest)
	for l := len(fmt.Sprint(n)); ; l++ {
		if len(fmt.Sprint(n+l)) == l {
			return []byte(fmt.Sprint(n+l) + rest)
		}
	}
}

// gnuSparseHeader is a tar header block of an old-GNU sparse file ('S')
// named name, declaring realSize bytes in total and no data at all.
func gnuSparseHeader(name string, realSize uint64) []byte {
	h := make([]byte, 512)
	copy(h, name)
	copy(h[100:], "0000644\x00")
	copy(h[108:], "0000000\x00")
	copy(h[116:], "0000000\x00")
	copy(h[124:], "00000000000\x00") // size in the archive: 0
	copy(h[136:], "00000000000\x00")
	h[156] = tar.TypeGNUSparse
	copy(h[257:], "ustar  \x00")
	copy(h[386:], "00000000000\x00") // sparse map: one fragment, offset 0 ...
	copy(h[398:], "00000000000\x00") // ... of 0 bytes
	h[483] = 0x80                    // real size, base-256
	for i := 0; i < 8; i++ {
		h[483+11-i] = byte(realSize >> (8 * i))
	}
	for i := 148; i < 156; i++ {
		h[i] = ' '
	}
	sum := 0
	for _, c := range h {
		sum += int(c)
	}
	copy(h[148:], fmt.Sprintf("%06o\x00 ", sum))
	return h
}

// TestImportRefusesHugeSparse: a sparse entry declaring a petabyte of
// holes is refused at once, by name, instead of making the unpacker write
// (or skip) zeros for ever; skipped, it is not read as zeros either.
func TestImportRefusesHugeSparse(t *testing.T) {
	tarball := append(gnuSparseHeader("huge", 1<<50), make([]byte, 1024)...)
	for _, skip := range []bool{false, true} {
		_, target, unchanged := hostileEnv(t)
		c, cancel := context.WithTimeout(ctx, time.Minute)
		res, err := layer.Import(c, bytes.NewReader(tarball), target, layer.ImportOptions{SkipRefused: skip, NoSync: true})
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("skip=%v: import still busy after a minute", skip)
		}
		if !skip {
			if err == nil || !strings.Contains(err.Error(), "huge") || !strings.Contains(err.Error(), "sparse") {
				t.Errorf("import: %v, want a refusal of the sparse file huge", err)
			}
			unchanged()
			continue
		}
		if err != nil {
			t.Fatalf("import with SkipRefused: %v", err)
		}
		if len(res.Refused) != 1 || !strings.Contains(res.Refused[0].Name, "huge") {
			t.Errorf("refused: %+v, want huge", res.Refused)
		}
		if _, err := os.Lstat(filepath.Join(target, "huge")); !os.IsNotExist(err) {
			t.Errorf("huge was created: %v", err)
		}
	}
}
