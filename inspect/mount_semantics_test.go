package inspect_test

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"strata/internal/uniontest"
	"strata/unionfs"
)

// TestVolatileMarkerRefused: after a volatile kernel mount, the kernel
// refuses to mount the stack until workdir/work/incompat/volatile is removed
// by hand (the upper dir may have lost writes). strata refuses too, and
// keeps the marker.
func TestVolatileMarkerRefused(t *testing.T) {
	uniontest.FUSE.Require(t)
	o := build(t, testNS(), stackSpec{lowers: []uniontest.Layer{{uniontest.File("f", "f", 0o644)}}, upper: uniontest.Layer{}})
	marker := filepath.Join(o.Work, "work", "incompat", "volatile")
	if err := os.MkdirAll(marker, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(marker, "dirty"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if srv, err := unionfs.Mount(mnt, o); err == nil {
		srv.Unmount()
		t.Errorf("strata mounted a stack with the volatile marker; the kernel refuses it")
	}
	if _, err := os.Stat(marker); err != nil {
		t.Errorf("the volatile marker is gone after a strata mount: %v", err)
	}
}

// TestXattrWhiteoutListedInUpper: kernel readdir filters xattr
// whiteouts only in lower layers (fs/overlayfs/readdir.c: check_xwhiteout
// is never set for the upper layer); in an upper dir marked opaque=x it
// lists them (as names that cannot be looked up). strata's readdir filters
// them in the upper dir too.
func TestXattrWhiteoutListedInUpper(t *testing.T) {
	o := build(t, testNS(), stackSpec{
		lowers: []uniontest.Layer{{uniontest.File("du/f", "f", 0o644), uniontest.File("du/g", "g", 0o644)}},
		upper:  uniontest.Layer{uniontest.XattrWhiteout("du/f")},
	})
	names := map[string][]string{}
	for _, target := range targets {
		target.Require(t)
		m := target.Mount(t, o)
		ents, err := os.ReadDir(filepath.Join(m.Dir, "du"))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			names[target.Name()] = append(names[target.Name()], e.Name())
		}
		m.Unmount(t)
	}
	if !slices.Equal(names["kernel"], names["strata"]) {
		t.Errorf("readdir of du: kernel %v, strata %v", names["kernel"], names["strata"])
	}
}
