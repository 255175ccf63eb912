package whiteout_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"strata/internal/testenv"
	"strata/whiteout"
)

func openDir(t *testing.T, dir string) int {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func lstat(t *testing.T, p string) *unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// namespaces returns the namespaces this process may write.
func namespaces(t *testing.T) []whiteout.NS {
	if os.Geteuid() == 0 {
		return whiteout.Both
	}
	return []whiteout.NS{whiteout.User}
}

func TestCharWhiteout(t *testing.T) {
	testenv.RequireMknod(t)
	dir := t.TempDir()
	fd := openDir(t, dir)
	if err := whiteout.Create(fd, "gone"); err != nil {
		t.Fatal(err)
	}
	st := lstat(t, filepath.Join(dir, "gone"))
	if st.Mode != unix.S_IFCHR || st.Rdev != 0 {
		t.Fatalf("got mode %o rdev %d, want character device 0/0 with mode 0", st.Mode, st.Rdev)
	}
	for _, ns := range whiteout.Both {
		if wh, err := whiteout.IsWhiteout(fd, "gone", st, ns); err != nil || !wh {
			t.Errorf("%s: IsWhiteout = %v, %v; want true", ns, wh, err)
		}
	}
	if err := whiteout.Create(fd, "gone"); !errors.Is(err, unix.EEXIST) {
		t.Errorf("second Create: got %v, want EEXIST", err)
	}
}

func TestOtherCharDeviceIsNotWhiteout(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	fd := openDir(t, dir)
	if err := unix.Mknod(filepath.Join(dir, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	st := lstat(t, filepath.Join(dir, "null"))
	if wh, err := whiteout.IsWhiteout(fd, "null", st, whiteout.Trusted); err != nil || wh {
		t.Errorf("IsWhiteout(c 1/3) = %v, %v; want false", wh, err)
	}
}

func TestXattrWhiteout(t *testing.T) {
	for _, ns := range namespaces(t) {
		t.Run(ns.String(), func(t *testing.T) {
			dir := t.TempDir()
			fd := openDir(t, dir)
			if err := whiteout.CreateXattr(fd, "x", ns); err != nil {
				t.Fatal(err)
			}
			st := lstat(t, filepath.Join(dir, "x"))
			if wh, err := whiteout.IsWhiteout(fd, "x", st, ns); err != nil || !wh {
				t.Errorf("IsWhiteout = %v, %v; want true", wh, err)
			}
			// The other namespace does not see it.
			other := whiteout.Trusted
			if ns == whiteout.Trusted {
				other = whiteout.User
			}
			if wh, _ := whiteout.IsWhiteout(fd, "x", st, other); wh {
				t.Errorf("IsWhiteout in %s = true, want false", other)
			}
			// A non-empty file with the xattr is not a whiteout.
			if err := os.WriteFile(filepath.Join(dir, "x"), []byte("data"), 0o644); err != nil {
				t.Fatal(err)
			}
			st = lstat(t, filepath.Join(dir, "x"))
			if wh, _ := whiteout.IsWhiteout(fd, "x", st, ns); wh {
				t.Errorf("non-empty file: IsWhiteout = true, want false")
			}
			// A plain empty file is not either.
			if err := os.WriteFile(filepath.Join(dir, "plain"), nil, 0o644); err != nil {
				t.Fatal(err)
			}
			st = lstat(t, filepath.Join(dir, "plain"))
			if wh, _ := whiteout.IsWhiteout(fd, "plain", st, ns); wh {
				t.Errorf("empty file without xattr: IsWhiteout = true, want false")
			}
		})
	}
}

func TestOpacity(t *testing.T) {
	for _, ns := range namespaces(t) {
		t.Run(ns.String(), func(t *testing.T) {
			dir := t.TempDir()
			fd := openDir(t, dir)
			if err := os.Mkdir(filepath.Join(dir, "d"), 0o755); err != nil {
				t.Fatal(err)
			}
			check := func(want whiteout.Opacity) {
				t.Helper()
				got, err := whiteout.GetOpacity(fd, "d", ns)
				if err != nil || got != want {
					t.Fatalf("GetOpacity = %v, %v; want %v", got, err, want)
				}
			}
			check(whiteout.NotOpaque)
			if err := whiteout.SetOpaque(fd, "d", ns); err != nil {
				t.Fatal(err)
			}
			check(whiteout.Opaque)
			raw, err := unix.Lgetxattr(filepath.Join(dir, "d"), ns.Opaque(), make([]byte, 8))
			if err != nil || raw != 1 {
				t.Fatalf("raw %s: %d bytes, %v; want 1 byte", ns.Opaque(), raw, err)
			}
			if err := whiteout.SetOpacity(fd, "d", ns, whiteout.XattrWhiteouts); err != nil {
				t.Fatal(err)
			}
			check(whiteout.XattrWhiteouts)
			if err := whiteout.SetOpacity(fd, "d", ns, whiteout.NotOpaque); err != nil {
				t.Fatal(err)
			}
			check(whiteout.NotOpaque)
			// The directory itself, through its own fd.
			dfd := openDir(t, filepath.Join(dir, "d"))
			if err := whiteout.SetOpaque(dfd, "", ns); err != nil {
				t.Fatal(err)
			}
			check(whiteout.Opaque)
			// Values the kernel ignores.
			for _, v := range []string{"n", "yes", "Y", ""} {
				if err := unix.Lsetxattr(filepath.Join(dir, "d"), ns.Opaque(), []byte(v), 0); err != nil {
					t.Fatal(err)
				}
				check(whiteout.NotOpaque)
			}
		})
	}
}

func TestParseOpacity(t *testing.T) {
	for in, want := range map[string]whiteout.Opacity{"y": whiteout.Opaque, "x": whiteout.XattrWhiteouts, "": whiteout.NotOpaque, "yy": whiteout.NotOpaque, "z": whiteout.NotOpaque} {
		if got := whiteout.ParseOpacity([]byte(in)); got != want {
			t.Errorf("ParseOpacity(%q) = %v, want %v", in, got, want)
		}
	}
}

func TestPrivateXattrs(t *testing.T) {
	cases := []struct {
		name          string
		trusted, user bool
	}{
		{"trusted.overlay.opaque", true, false},
		{"trusted.overlay.origin", true, false},
		{"user.overlay.opaque", false, true},
		{"user.overlay.whiteout", false, true},
		{"trusted.overlayx", false, false},
		{"user.foo", false, false},
		{"security.capability", false, false},
	}
	for _, c := range cases {
		if got := whiteout.Trusted.IsPrivate(c.name); got != c.trusted {
			t.Errorf("Trusted.IsPrivate(%q) = %v, want %v", c.name, got, c.trusted)
		}
		if got := whiteout.User.IsPrivate(c.name); got != c.user {
			t.Errorf("User.IsPrivate(%q) = %v, want %v", c.name, got, c.user)
		}
		if got := whiteout.IsPrivateXattr(c.name); got != (c.trusted || c.user) {
			t.Errorf("IsPrivateXattr(%q) = %v", c.name, got)
		}
	}
	if whiteout.Trusted.Opaque() != "trusted.overlay.opaque" || whiteout.User.Whiteout() != "user.overlay.whiteout" {
		t.Errorf("attribute names: %s %s", whiteout.Trusted.Opaque(), whiteout.User.Whiteout())
	}
}

func TestCheckName(t *testing.T) {
	ok := []string{"a", "-x", "with space", "new\nline", "\xff\xfe", strings.Repeat("n", 255)}
	for _, n := range ok {
		if err := whiteout.CheckName(n); err != nil {
			t.Errorf("CheckName(%q) = %v, want nil", n, err)
		}
	}
	bad := map[string]unix.Errno{"": unix.EINVAL, ".": unix.EINVAL, "..": unix.EINVAL, "a/b": unix.EINVAL, "a\x00": unix.EINVAL, strings.Repeat("n", 256): unix.ENAMETOOLONG}
	for n, want := range bad {
		if err := whiteout.CheckName(n); !errors.Is(err, want) {
			t.Errorf("CheckName(%q) = %v, want %v", n, err, want)
		}
	}
}

func TestXattrEscaping(t *testing.T) {
	ns := whiteout.Trusted
	cases := []struct{ shown, stored string }{
		{"user.a", "user.a"},
		{"trusted.overlay.x", "trusted.overlay.overlay.x"},
		{"trusted.overlay.overlay.x", "trusted.overlay.overlay.overlay.x"},
		{"user.overlay.opaque", "user.overlay.opaque"}, // not private in the trusted format
	}
	for _, c := range cases {
		if got := ns.Escape(c.shown); got != c.stored {
			t.Errorf("Escape(%q) = %q, want %q", c.shown, got, c.stored)
		}
		if got := ns.Shown(c.stored); got != c.shown {
			t.Errorf("Shown(%q) = %q, want %q", c.stored, got, c.shown)
		}
	}
	for _, hidden := range []string{"trusted.overlay.opaque", "trusted.overlay.origin", "trusted.overlay.overlay."} {
		if got := ns.Shown(hidden); got != "" {
			t.Errorf("Shown(%q) = %q, want hidden", hidden, got)
		}
	}
	if !whiteout.User.IsEscaped("user.overlay.overlay.q") || whiteout.User.IsEscaped("user.overlay.q") {
		t.Errorf("User.IsEscaped wrong")
	}
}
