package unionfs_test

import (
	"bytes"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"strata/internal/testenv"
	"strata/unionfs"
)

// TestCopyUpIdentityUnderInodeReuse guards a fixed strata bug (found by
// internal/stress as "append: got ENXIO" and "read: ENOENT" of paths that
// exist, about once per 50k operations): strata keeps a copied-up object's
// st_ino (the lower one) in a map keyed by the upper inode number, and
// dropped the entry of a removed object only after the removal, when the
// inode was already free. ext4 gives a freed inode number to the next new
// inode at once, so a copy-up in another directory could record its own
// identity under that number in between, and lose it to the late delete.
// The next operation that compared identities then took the copied-up
// object for a different one: rename moved a node the kernel does not use,
// and the kernel's node kept the old name, where RENAME_WHITEOUT had left
// a whiteout (ENXIO on open) or nothing (ENOENT). Now the entry goes before
// the inode can be freed.
//
// Whether ext4 reuses a number within that window is up to its allocator,
// so the test checks the invariant instead: by the time remove has taken a
// copied-up file out of the upper dir (and its inode may be free), its
// identity record must be gone. It also checks, for every removal kind
// that frees a copied-up inode (unlink with and without a whiteout, rmdir),
// that the record is gone afterwards and that other copied-up files keep
// theirs: each is renamed and read under its new name.
func TestCopyUpIdentityUnderInodeReuse(t *testing.T) {
	testenv.RequireRoot(t)
	s := newRelStack(t, 1)
	for _, p := range []string{"d/f", "d/g", "keep"} {
		if err := os.MkdirAll(filepath.Join(s.lowers[0], filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(s.lowers[0], p), []byte(p), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(s.lowers[0], "d/sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	srv, _ := s.mount(t, "")
	st := srv.Stack()

	copyUp := func(p string) uint64 {
		t.Helper()
		if err := unix.Chmod(s.m(p), 0o700); err != nil {
			t.Fatal(err)
		}
		var ust unix.Stat_t
		if err := unix.Lstat(filepath.Join(s.upper, p), &ust); err != nil {
			t.Fatal(err)
		}
		if _, ok := st.CopiedIdentity(ust.Ino); !ok {
			t.Fatalf("%s: no identity recorded for its upper copy after copy-up", p)
		}
		return ust.Ino
	}
	keepIno := copyUp("keep")
	// "d/f" is removed with a whiteout (the lower holds it); "d/g" is
	// first made pure upper by a rename, then removed without one; the
	// directory "d/sub" is removed with a whiteout.
	copyUp("d/g")
	if err := unix.Rename(s.m("d/g"), s.m("g2")); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path  string
		rmdir bool
	}{{"d/f", false}, {"g2", false}, {"d/sub", true}} {
		ino := copyUp(c.path)
		// The hook runs in a server goroutine; the kernel orders it before
		// the syscall returns, which the race detector cannot see.
		var inHook, recorded atomic.Bool
		name := filepath.Base(c.path)
		unionfs.SetTestHookRemoved(func(n string) {
			if n == name {
				_, ok := st.CopiedIdentity(ino)
				recorded.Store(ok)
				inHook.Store(true)
			}
		})
		var err error
		if c.rmdir {
			err = unix.Rmdir(s.m(c.path))
		} else {
			err = unix.Unlink(s.m(c.path))
		}
		unionfs.SetTestHookRemoved(nil)
		if err != nil {
			t.Fatalf("remove %s: %v", c.path, err)
		}
		if !inHook.Load() {
			t.Fatalf("remove %s: the test hook was not called", c.path)
		}
		if recorded.Load() {
			t.Errorf("remove %s: the identity of its upper inode %d was still recorded after the object left the upper dir; a copy-up that gets the freed number loses its own record to the late delete", c.path, ino)
		}
		if _, ok := st.CopiedIdentity(ino); ok {
			t.Errorf("remove %s: the identity of its upper inode %d is still recorded", c.path, ino)
		}
	}
	if _, ok := st.CopiedIdentity(keepIno); !ok {
		t.Errorf("keep lost its identity record")
	}
	if err := unix.Rename(s.m("keep"), s.m("kept")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(s.m("kept")); err != nil || !bytes.Equal(b, []byte("keep")) {
		t.Errorf("read keep after rename: %q, %v", b, err)
	}
}
