package unionfs_test

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"strata/internal/testenv"
)

// owner returns the uid and gid lstat shows for p.
func owner(t *testing.T, p string) (uint32, uint32) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Uid, st.Gid
}

// ownerStack is a stack whose lower holds files of host owners 0, 1005
// and 200000, and a new mount point.
func ownerStack(t *testing.T) *relStack {
	t.Helper()
	testenv.RequireRoot(t)
	s := newRelStack(t, 1)
	for name, id := range map[string]int{"root": 0, "mapped": 1005, "outside": 200000} {
		p := s.lowers[0] + "/" + name
		if err := os.WriteFile(p, []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(p, id, id); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// TestSquashOptions: squash_to_uid/gid show every object, lower or new, as
// owned by one id, and leave the layers' owners alone.
func TestSquashOptions(t *testing.T) {
	s := ownerStack(t)
	s.mount(t, "squash_to_uid=4321,squash_to_gid=8765")
	if err := os.WriteFile(s.m("new"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"", "root", "mapped", "outside", "new"} {
		if u, g := owner(t, s.m(name)); u != 4321 || g != 8765 {
			t.Errorf("%q shows %d:%d, want 4321:8765", name, u, g)
		}
	}
	if u, g := owner(t, s.lowers[0]+"/mapped"); u != 1005 || g != 1005 {
		t.Errorf("lower file changed owner: %d:%d", u, g)
	}
	if u, _ := owner(t, s.upper+"/new"); u != 0 {
		t.Errorf("new upper file owned by %d, want the creator (root)", u)
	}
}

// TestIDMappingOptions: uidmapping/gidmapping (container:host:count, as
// fuse-overlayfs) show host ids as container ids (unmapped ones as
// 65534), and turn container ids given to chown, and the creator's, into
// host ids in the upper dir.
func TestIDMappingOptions(t *testing.T) {
	s := ownerStack(t)
	s.mount(t, "uidmapping=0:1000:100,gidmapping=0:1000:100")
	for name, want := range map[string]uint32{"mapped": 5, "outside": 65534} {
		if u, g := owner(t, s.m(name)); u != want || g != want {
			t.Errorf("%s shows %d:%d, want %d:%d", name, u, g, want, want)
		}
	}
	// Host root is outside the mapping too.
	if u, _ := owner(t, s.m("root")); u != 65534 {
		t.Errorf("root-owned lower file shows uid %d, want 65534", u)
	}
	// chown to container ids stores host ids (after a copy-up).
	if err := os.Lchown(s.m("root"), 7, 8); err != nil {
		t.Fatal(err)
	}
	if u, g := owner(t, s.m("root")); u != 7 || g != 8 {
		t.Errorf("after chown 7:8 the mount shows %d:%d", u, g)
	}
	if u, g := owner(t, s.upper+"/root"); u != 1007 || g != 1008 {
		t.Errorf("after chown 7:8 the upper file is owned by %d:%d, want 1007:1008", u, g)
	}
	// A file created by host root (container id 0 by the mapping's
	// reverse, which the caller's id is taken as) is owned by host 1000.
	if err := os.WriteFile(s.m("new"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if u, g := owner(t, s.upper+"/new"); u != 1000 || g != 1000 {
		t.Errorf("new file owned by %d:%d in the upper dir, want 1000:1000", u, g)
	}
	if u, g := owner(t, s.m("new")); u != 0 || g != 0 {
		t.Errorf("new file shows %d:%d, want 0:0", u, g)
	}
}
