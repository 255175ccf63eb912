package unionfs_test

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"strata/internal/testenv"
	"strata/unionfs"
	"strata/whiteout"
)

func TestOfflineResolve(t *testing.T) {
	testenv.RequireMknod(t)
	dir := t.TempDir()
	l1, l2, u := filepath.Join(dir, "l1"), filepath.Join(dir, "l2"), filepath.Join(dir, "u")
	for _, p := range []string{l1 + "/d", l2 + "/d/sub", l2 + "/op", u + "/op"} {
		os.MkdirAll(p, 0o755)
	}
	os.WriteFile(l2+"/d/sub/f", []byte("f"), 0o644)
	os.WriteFile(l2+"/d/gone", nil, 0o644)
	os.WriteFile(l2+"/op/hidden", nil, 0o644)
	os.WriteFile(l1+"/d/top", nil, 0o644)
	unix.Mknod(l1+"/d/gone", unix.S_IFCHR, 0)
	ns := whiteout.User
	if os.Geteuid() == 0 {
		ns = whiteout.Trusted
	}
	fd, _ := unix.Open(u, unix.O_PATH|unix.O_DIRECTORY, 0)
	whiteout.SetOpaque(fd, "op", ns)
	unix.Close(fd)
	o := unionfs.Options{Lowers: []string{l1, l2}, Upper: u, UserXattr: ns == whiteout.User, SquashUID: -1, SquashGID: -1}
	s, err := unionfs.OpenStack(o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	r, err := s.Resolve("d/sub/f")
	if err != nil || !r.Found || r.Layer != 2 {
		t.Errorf("d/sub/f: %+v %v; want found in layer 2", r, err)
	}
	r, _ = s.Resolve("d")
	if !r.Found || len(r.Dirs) != 2 || r.Dirs[0].Layer != 1 || r.Dirs[1].Layer != 2 {
		t.Errorf("d: %+v; want merged from layers 1 and 2", r)
	}
	r, _ = s.Resolve("d/gone")
	if r.Found || r.WhiteoutLayer != 1 {
		t.Errorf("d/gone: %+v; want hidden by the whiteout in layer 1", r)
	}
	r, _ = s.Resolve("op/hidden")
	if r.Found || r.WhiteoutLayer != -1 {
		t.Errorf("op/hidden: %+v; want not found (opaque dir)", r)
	}
	r, _ = s.Resolve("d/top/x")
	if r.Found || r.MissingAt != "d/top" {
		t.Errorf("d/top/x: %+v; want missing at d/top", r)
	}
	names := map[string]bool{}
	ents, err := s.ReadDir("d")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		names[e.Name] = true
	}
	if len(names) != 2 || !names["sub"] || !names["top"] {
		t.Errorf("ReadDir(d) = %v, want sub and top", names)
	}
	if _, err := s.Resolve("../etc"); err == nil {
		t.Errorf("Resolve(../etc) did not fail")
	}
	if ents, _ := os.ReadDir(u); len(ents) != 1 {
		t.Errorf("OpenStack changed the upper dir: %v", ents)
	}
}

// TestOfflineRedirect: the offline resolution follows redirects as a
// mount does and says where: each merged copy's path in its layer, where
// the lookup looks in each layer, and the redirects followed.
func TestOfflineRedirect(t *testing.T) {
	testenv.RequireMknod(t)
	dir := t.TempDir()
	l1, l2, u := filepath.Join(dir, "l1"), filepath.Join(dir, "l2"), filepath.Join(dir, "u")
	for _, p := range []string{l1 + "/old/sub", l2 + "/old", u + "/new/inner", u + "/bad"} {
		os.MkdirAll(p, 0o755)
	}
	os.WriteFile(l1+"/old/sub/f", []byte("f"), 0o644)
	os.WriteFile(l2+"/old/g", []byte("g"), 0o644)
	unix.Mknod(u+"/old", unix.S_IFCHR, 0)
	ns := whiteout.User
	if os.Geteuid() == 0 {
		ns = whiteout.Trusted
	}
	set := func(p, v string) {
		if err := unix.Lsetxattr(p, ns.Redirect(), []byte(v), 0); err != nil {
			t.Fatal(err)
		}
	}
	set(u+"/new", "/old")
	set(u+"/new/inner", "sub")
	set(u+"/bad", "a/b")
	o := unionfs.Options{Lowers: []string{l1, l2}, Upper: u, UserXattr: ns == whiteout.User, SquashUID: -1, SquashGID: -1}
	s, err := unionfs.OpenStack(o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if ns == whiteout.User {
		// userxattr implies redirect_dir=nofollow: a redirect that is
		// read fails the lookup.
		if _, err := s.Resolve("new"); !errors.Is(err, unix.EPERM) {
			t.Errorf("Resolve(new) with userxattr: %v, want EPERM", err)
		}
		return
	}
	r, err := s.Resolve("new/inner/f")
	if err != nil || !r.Found || r.Layer != 1 || r.LayerPath != "/old/sub/f" {
		t.Errorf("new/inner/f: %+v %v; want found in layer 1 at /old/sub/f", r, err)
	}
	if want := []string{"/new/inner/f", "/old/sub/f", "/old/sub/f"}; !slices.Equal(r.Looked, want) {
		t.Errorf("new/inner/f looked at %q, want %q", r.Looked, want)
	}
	want := []unionfs.RedirectHop{{Path: "/new", Layer: 0, Value: "/old"}, {Path: "/new/inner", Layer: 0, Value: "sub"}}
	if !slices.Equal(r.Redirects, want) {
		t.Errorf("new/inner/f redirects %+v, want %+v", r.Redirects, want)
	}
	r, err = s.Resolve("new")
	if err != nil || len(r.Dirs) != 3 || r.Dirs[1].Path != "/old" || r.Dirs[2].Path != "/old" || r.Dirs[0].Redirect != "/old" {
		t.Errorf("new: %+v %v; want merged from /new, /old and /old", r, err)
	}
	if st, err := os.Stat(l1 + "/old"); err != nil || r.Ino != st.Sys().(*syscall.Stat_t).Ino {
		t.Errorf("new: st_ino %d, want its origin's (%s/old)", r.Ino, l1)
	}
	ents, err := s.ReadDir("new")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name)
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"g", "inner", "sub"}) {
		t.Errorf("ReadDir(new) = %v, want g, inner, sub", names)
	}
	if _, err := s.Resolve("bad"); !errors.Is(err, unix.EINVAL) {
		t.Errorf("Resolve(bad): %v, want EINVAL (malformed redirect)", err)
	}
}
