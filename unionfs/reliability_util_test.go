package unionfs_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"strata/internal/stress"
	"strata/internal/testenv"
	"strata/unionfs"
)

// relStack is a layer stack for the reliability tests: lowers (top first),
// upper, work and a mount point, all under one temp dir.
type relStack struct {
	dir, upper, work, mnt string
	lowers                []string
}

func newRelStack(t *testing.T, nLowers int) *relStack {
	t.Helper()
	dir := t.TempDir()
	s := &relStack{dir: dir, upper: filepath.Join(dir, "upper"), work: filepath.Join(dir, "work"), mnt: filepath.Join(dir, "mnt")}
	for i := 0; i < nLowers; i++ {
		s.lowers = append(s.lowers, filepath.Join(dir, "l"+string(rune('1'+i))))
	}
	for _, d := range append([]string{s.upper, s.work, s.mnt}, s.lowers...) {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func (s *relStack) data(extra string) string {
	d := "lowerdir=" + strings.Join(s.lowers, ":") + ",upperdir=" + s.upper + ",workdir=" + s.work
	if extra != "" {
		d += "," + extra
	}
	return d
}

// mount mounts strata in this process and unmounts it when the test ends
// (aborting the connection and detaching if a clean unmount fails). It
// returns the unmount function for tests that unmount earlier.
func (s *relStack) mount(t *testing.T, extra string) (srv *unionfs.Server, unmount func() error) {
	t.Helper()
	testenv.RequireFUSE(t)
	o, err := unionfs.ParseOptions(s.data(extra))
	if err != nil {
		t.Fatal(err)
	}
	srv, err = unionfs.Mount(s.mnt, o)
	if err != nil {
		t.Fatal(err)
	}
	done := false
	unmount = func() error {
		if done {
			return nil
		}
		done = true
		return srv.Unmount()
	}
	t.Cleanup(func() {
		if err := unmount(); err != nil {
			t.Errorf("unmount: %v; aborting and detaching", err)
			stress.AbortFUSE(s.mnt)
			stress.LazyUnmount(s.mnt)
		}
	})
	return srv, unmount
}

func (s *relStack) m(p string) string { return filepath.Join(s.mnt, p) }
