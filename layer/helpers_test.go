package layer_test

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// ent is one entry of a test archive.
type ent struct {
	name     string
	typ      byte
	data     string
	link     string
	mode     int64
	uid, gid int
	pax      map[string]string
	major    int64
	minor    int64
}

// mkTar writes the entries as a tar archive.
func mkTar(t testing.TB, ents ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		typ := e.typ
		if typ == 0 {
			typ = tar.TypeReg
		}
		mode := e.mode
		if mode == 0 {
			mode = 0o644
			if typ == tar.TypeDir {
				mode = 0o755
			}
		}
		hdr := &tar.Header{Name: e.name, Typeflag: typ, Linkname: e.link, Mode: mode, Uid: e.uid, Gid: e.gid,
			PAXRecords: e.pax, Devmajor: e.major, Devminor: e.minor}
		if typ == tar.TypeReg {
			hdr.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatalf("tar header %q: %v", e.name, err)
		}
		if typ == tar.TypeReg {
			if _, err := tw.Write([]byte(e.data)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// snapshot describes every entry below root, one line each: type, mode,
// owner, size, data digest, link target, device, extended attributes and
// hard-link group. mtimes are included to the second, except for
// whiteouts (their times carry no meaning).
func snapshot(t testing.TB, root string) string {
	t.Helper()
	var lines []string
	groups := map[[2]uint64]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		line := fmt.Sprintf("%s %s %04o %d:%d", rel, typeName(st.Mode), st.Mode&0o7777, st.Uid, st.Gid)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(data)
			line += fmt.Sprintf(" size=%d sha=%s", st.Size, hex.EncodeToString(sum[:6]))
		case unix.S_IFLNK:
			target, _ := os.Readlink(p)
			line += " -> " + target
		case unix.S_IFCHR, unix.S_IFBLK:
			line += fmt.Sprintf(" dev=%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		}
		if !(st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0) && rel != "." {
			line += fmt.Sprintf(" mtime=%d", st.Mtim.Sec)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR && st.Nlink > 1 && !(st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0) {
			id := [2]uint64{st.Dev, st.Ino}
			if groups[id] == "" {
				groups[id] = rel
			}
			line += " linkgroup=" + groups[id]
		}
		line += xattrDesc(t, p)
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		t.Fatalf("snapshot %s: %v", root, err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func typeName(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "dir"
	case unix.S_IFREG:
		return "file"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFCHR:
		return "char"
	case unix.S_IFBLK:
		return "block"
	case unix.S_IFIFO:
		return "fifo"
	}
	return "other"
}

func xattrDesc(t testing.TB, p string) string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		return ""
	}
	var names []string
	for _, a := range strings.Split(string(buf[:n]), "\x00") {
		if a != "" {
			names = append(names, a)
		}
	}
	sort.Strings(names)
	var out string
	for _, a := range names {
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, a, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, a, err)
		}
		out += fmt.Sprintf(" %s=%q", a, v[:m])
	}
	return out
}

// listing names every entry below dir (for "nothing changed" checks).
func listing(t testing.TB, dir string) string {
	t.Helper()
	return snapshot(t, dir)
}
