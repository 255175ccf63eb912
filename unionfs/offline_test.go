package unionfs_test

import (
	"os"
	"path/filepath"
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
