package unionfs_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/internal/testenv"
	"strata/unionfs"
)

// Hostile layers: symlinks that point out of a layer, awkward names, and
// lower layers that change under a live mount.

// outside is a directory outside every layer that hostile symlinks point
// at; strata must never read or change it.
func outside(t *testing.T) (dir string, check func()) {
	t.Helper()
	dir = t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "secret"), []byte("outside"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	return dir, func() {
		t.Helper()
		ents, _ := os.ReadDir(dir)
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		if strings.Join(names, ",") != "secret,sub" {
			t.Errorf("the directory outside the layers changed: %v", names)
		}
		if b, _ := os.ReadFile(filepath.Join(dir, "secret")); string(b) != "outside" {
			t.Errorf("outside/secret changed: %q", b)
		}
		if ents, _ := os.ReadDir(filepath.Join(dir, "sub")); len(ents) != 0 {
			t.Errorf("outside/sub gained entries: %v", ents)
		}
	}
}

// TestHostileSymlinksNeverFollowed builds lowers whose symlinks point
// outside (absolute, relative with .., /etc) and whose intermediate path
// components are such symlinks, and a directory in one layer shadowed by
// a symlink in another. Lookups, readdir, copy-up (of the link and of
// files "below" a link component) and the offline Resolve must treat the
// links as links: never reach the target.
func TestHostileSymlinksNeverFollowed(t *testing.T) {
	testenv.RequireMknod(t)
	out, checkOut := outside(t)
	s := newRelStack(t, 2)
	l1, l2 := s.lowers[0], s.lowers[1]
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	// l2 (bottom): a real dir "d" with a file; "esc" a real dir too.
	must(os.MkdirAll(filepath.Join(l2, "d"), 0o755))
	must(os.WriteFile(filepath.Join(l2, "d", "f"), []byte("lower d/f"), 0o644))
	must(os.MkdirAll(filepath.Join(l2, "esc"), 0o755))
	must(os.WriteFile(filepath.Join(l2, "esc", "secret"), []byte("l2 esc/secret"), 0o644))
	// l1 (top): "esc" is a symlink to the outside dir, shadowing l2's
	// directory; links of every flavour.
	must(os.Symlink(out, filepath.Join(l1, "esc")))
	must(os.Symlink("../../../../../../"+strings.TrimPrefix(out, "/"), filepath.Join(l1, "rel")))
	must(os.Symlink("/etc", filepath.Join(l1, "etc")))
	must(os.Symlink(filepath.Join(out, "secret"), filepath.Join(l1, "abs")))
	must(os.Symlink("..", filepath.Join(l1, "dotdot")))
	must(os.MkdirAll(filepath.Join(l1, "d"), 0o755))
	must(os.Symlink(out, filepath.Join(l1, "d", "link")))
	s.mount(t, "")

	// A symlink shadowing a directory: the link decides, nothing merges.
	var st unix.Stat_t
	must(unix.Lstat(s.m("esc"), &st))
	if st.Mode&unix.S_IFMT != unix.S_IFLNK {
		t.Errorf("esc: mode %o, want the top layer's symlink", st.Mode)
	}
	if tgt, err := os.Readlink(s.m("esc")); err != nil || tgt != out {
		t.Errorf("readlink esc = %q, %v; want %q", tgt, err, out)
	}
	// Walking through the link is the kernel's job (it follows the
	// symlink strata returns, to a path outside the mount): strata must
	// not resolve "esc/secret" inside its layers to l2's esc/secret.
	if b, err := os.ReadFile(s.m("esc") + "/secret"); err == nil && string(b) == "l2 esc/secret" {
		t.Errorf("esc/secret read the shadowed l2 directory's file")
	}
	// No lookup below a symlink component inside the layers.
	r, err := s.openStack(t).Resolve("esc/secret")
	if err != nil || r.Found || r.MissingAt != "esc" {
		t.Errorf("offline Resolve(esc/secret) = %+v, %v; want missing at the symlink esc", r, err)
	}
	r, err = s.openStack(t).Resolve("d/link/secret")
	if err != nil || r.Found || r.MissingAt != "d/link" {
		t.Errorf("offline Resolve(d/link/secret) = %+v, %v; want missing at d/link", r, err)
	}
	for _, p := range []string{"etc/passwd", "rel/secret", "dotdot/x", "abs/x"} {
		r, err := s.openStack(t).Resolve(p)
		if err != nil || r.Found {
			t.Errorf("offline Resolve(%s) = %+v, %v; want not found (never followed)", p, r, err)
		}
	}
	// readdir of the merged d shows the link as a link.
	ents, err := os.ReadDir(s.m("d"))
	must(err)
	var names []string
	for _, e := range ents {
		names = append(names, fmt.Sprintf("%s:%v", e.Name(), e.Type()))
	}
	sort.Strings(names)
	if got := strings.Join(names, " "); got != "f:---------- link:L---------" {
		t.Errorf("readdir d = %q", got)
	}

	// Copy-up of a symlink copies the link, never the target.
	for _, name := range []string{"esc", "rel", "etc", "abs", "dotdot", "d/link"} {
		// lchown is a metadata change that copies the link up.
		must(unix.Lchown(s.m(name), 0, 0))
		var ust unix.Stat_t
		must(unix.Lstat(filepath.Join(s.upper, name), &ust))
		if ust.Mode&unix.S_IFMT != unix.S_IFLNK {
			t.Errorf("copy-up of symlink %s made a %o in the upper dir", name, ust.Mode&unix.S_IFMT)
		}
		want, _ := os.Readlink(filepath.Join(l1, name))
		if got, _ := os.Readlink(filepath.Join(s.upper, name)); got != want {
			t.Errorf("upper %s -> %q, want %q", name, got, want)
		}
	}
	// Creating "under" a symlink component goes to the link's target only
	// through the kernel's own path walk; strata must not create inside
	// its layers below a link. Use a symlink to a dir inside the mount's
	// own lower to see where a create lands.
	must(os.WriteFile(s.m("d/new"), []byte("new"), 0o644))
	if _, err := os.Lstat(filepath.Join(s.upper, "d", "new")); err != nil {
		t.Errorf("create in merged d: %v", err)
	}
	// Removing and renaming the links works on the links.
	must(os.Remove(s.m("etc")))
	must(os.Rename(s.m("rel"), s.m("rel2")))
	if _, err := os.Stat("/etc/passwd"); err != nil {
		t.Errorf("/etc/passwd: %v", err)
	}
	checkOut()
}

// openStack opens the stack offline (no mount) and closes it at the end.
func (s *relStack) openStack(t *testing.T) *unionfs.Stack {
	t.Helper()
	o, err := unionfs.ParseOptions("lowerdir=" + strings.Join(append([]string{s.upper}, s.lowers...), ":"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := unionfs.OpenStack(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// TestHostileSymlinkAsLayerPathComponent: an intermediate path component
// of the lower is a symlink to a directory outside; lookups through the
// mount see a symlink and nothing of what is behind it, and a copy-up
// under a real directory next to it stays inside the upper dir.
func TestHostileSymlinkIntermediateInLower(t *testing.T) {
	out, checkOut := outside(t)
	s := newRelStack(t, 1)
	l := s.lowers[0]
	os.MkdirAll(filepath.Join(l, "a", "b"), 0o755)
	os.WriteFile(filepath.Join(l, "a", "b", "f"), []byte("real"), 0o644)
	// a/c -> outside; a/b/up -> ../../.. (the layer's parent)
	os.Symlink(out, filepath.Join(l, "a", "c"))
	os.Symlink("../../..", filepath.Join(l, "a", "b", "up"))
	s.mount(t, "")
	// Changes through paths that the kernel resolves inside the mount.
	if err := os.WriteFile(s.m("a/b/f"), []byte("changed"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(s.upper, "a", "b", "f")); string(b) != "changed" {
		t.Errorf("copy-up of a/b/f: upper has %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(l, "a", "b", "f")); string(b) != "real" {
		t.Errorf("lower a/b/f changed: %q", b)
	}
	// chmod of the link's lower name copies the link.
	if err := unix.Lchown(s.m("a/b/up"), 0, 0); err != nil {
		t.Fatal(err)
	}
	if tgt, _ := os.Readlink(filepath.Join(s.upper, "a", "b", "up")); tgt != "../../.." {
		t.Errorf("upper a/b/up -> %q", tgt)
	}
	// The kernel follows a/c (to outside) itself: writes there are the
	// caller's business, not strata's; strata's upper must not gain a/c/*.
	if _, err := os.Lstat(filepath.Join(s.upper, "a", "c")); err == nil {
		var st unix.Stat_t
		unix.Lstat(filepath.Join(s.upper, "a", "c"), &st)
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			t.Errorf("upper a/c became a directory")
		}
	}
	checkOut()
}

// awkwardNames are names that must work for every operation.
var awkwardNames = []string{
	"new\nline", "tab\there", "\xff\xfe\xfd", "caf\xc3\xa9", strings.Repeat("n", 255),
	" leading space", "trailing space ", "-dash", "back\\slash", "\x01\x1f ctl",
	strings.Repeat("\xe2\x82\xac", 85), // 255 bytes of a 3-byte UTF-8 rune
}

// TestHostileNames: names with newlines, invalid UTF-8 and exactly 255
// bytes work for create, stat, readdir, rename and unlink, both as new
// upper names and as names in a lower layer (copy-up, whiteout); 256
// bytes is ENAMETOOLONG everywhere.
func TestHostileNames(t *testing.T) {
	testenv.RequireMknod(t)
	s := newRelStack(t, 1)
	for _, n := range awkwardNames {
		if err := os.WriteFile(filepath.Join(s.lowers[0], "L"+n[:min(len(n), 254)]), []byte("lower "+n), 0o644); err != nil {
			t.Fatalf("lower %q: %v", n, err)
		}
	}
	s.mount(t, "")
	for _, n := range awkwardNames {
		p := s.m(n)
		if err := os.WriteFile(p, []byte(n), 0o644); err != nil {
			t.Errorf("create %q: %v", n, err)
			continue
		}
		if b, err := os.ReadFile(p); err != nil || string(b) != n {
			t.Errorf("read %q: %q, %v", n, b, err)
		}
		if err := os.Rename(p, p[:len(p)-1]+"R"); err != nil {
			t.Errorf("rename %q: %v", n, err)
			continue
		}
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("old name %q after rename: %v", n, err)
		}
		// Lower names: copy-up by write, then rename (whiteout at the old
		// name), then unlink.
		ln := "L" + n[:min(len(n), 254)]
		f, err := os.OpenFile(s.m(ln), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Errorf("open lower %q for write: %v", ln, err)
			continue
		}
		f.Write([]byte("+"))
		f.Close()
		if err := os.Rename(s.m(ln), s.m(ln+"2"[:min(1, 255-len(ln))])); err != nil && len(ln) < 255 {
			t.Errorf("rename lower %q: %v", ln, err)
		}
	}
	ents, err := os.ReadDir(s.mnt)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, e := range ents {
		seen[e.Name()] = true
	}
	for _, n := range awkwardNames {
		if r := n[:len(n)-1] + "R"; !seen[r] {
			t.Errorf("readdir misses %q", r)
		}
	}
	for name := range seen {
		if err := os.Remove(s.m(name)); err != nil {
			t.Errorf("unlink %q: %v", name, err)
		}
	}
	if ents, _ := os.ReadDir(s.mnt); len(ents) != 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("after unlinking everything readdir shows %q", names)
	}
	long := strings.Repeat("x", 256)
	for what, err := range map[string]error{
		"create": os.WriteFile(s.m(long), nil, 0o644),
		"stat":   func() error { _, err := os.Lstat(s.m(long)); return err }(),
		"mkdir":  os.Mkdir(s.m(long), 0o755),
		"unlink": os.Remove(s.m(long)),
	} {
		if !errors.Is(err, unix.ENAMETOOLONG) {
			t.Errorf("%s of a 256-byte name: %v, want ENAMETOOLONG", what, err)
		}
	}
	// The upper dir holds whiteouts for the renamed lower names and
	// nothing strata-specific; the kernel reads it the same way.
	var buf bytes.Buffer
	uents, _ := os.ReadDir(s.upper)
	for _, e := range uents {
		fmt.Fprintf(&buf, "%q ", e.Name())
	}
	t.Logf("upper dir: %s", buf.String())
}

// TestHostileLowerChangesUnderLiveMount changes a lower layer while the
// mount is live and busy: files added and removed, files replaced by
// directories and back, directories removed. Stale answers are allowed;
// crashes, hangs and wrong errors (EIO) are not, and the mount must
// unmount.
func TestHostileLowerChangesUnderLiveMount(t *testing.T) {
	s := newRelStack(t, 1)
	l := s.lowers[0]
	for i := 0; i < 20; i++ {
		os.MkdirAll(filepath.Join(l, fmt.Sprintf("d%d", i)), 0o755)
		os.WriteFile(filepath.Join(l, fmt.Sprintf("d%d", i), "f"), []byte("x"), 0o644)
	}
	s.mount(t, "timeout=0")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	errs := map[string]int{}
	note := func(op string, err error) {
		if err == nil || errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOTDIR) ||
			errors.Is(err, unix.EISDIR) || errors.Is(err, unix.ENOTEMPTY) || errors.Is(err, unix.EEXIST) ||
			errors.Is(err, unix.ESTALE) || errors.Is(err, unix.EXDEV) {
			return
		}
		mu.Lock()
		errs[op+": "+err.Error()]++
		mu.Unlock()
	}
	// The mutator changes the lower behind strata's back.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			d := filepath.Join(l, fmt.Sprintf("d%d", i%20))
			switch i % 4 {
			case 0:
				os.RemoveAll(d)
				os.WriteFile(d, []byte("now a file"), 0o644)
			case 1:
				os.Remove(d)
				os.MkdirAll(filepath.Join(d, "sub"), 0o755)
			case 2:
				os.WriteFile(filepath.Join(d, "f"), []byte("again"), 0o644)
			case 3:
				os.RemoveAll(d)
			}
		}
	}()
	// Clients walk, read, and write (copy-up) through the mount.
	for c := 0; c < 3; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				d := s.m(fmt.Sprintf("d%d", (i*7+c)%20))
				_, err := os.ReadDir(d)
				note("readdir", err)
				_, err = os.ReadFile(filepath.Join(d, "f"))
				note("read", err)
				_, err = os.ReadFile(d)
				note("read dir-or-file", err)
				if c == 0 {
					err = os.WriteFile(filepath.Join(d, "f"), []byte("client"), 0o644)
					note("write", err)
				}
				if c == 1 {
					err = os.Remove(filepath.Join(d, "f"))
					note("unlink", err)
					err = os.Mkdir(filepath.Join(d, "m"), 0o755)
					note("mkdir", err)
				}
				filepath.Walk(s.mnt, func(string, os.FileInfo, error) error { return nil })
			}
		}()
	}
	time.Sleep(3 * time.Second)
	close(stop)
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(30 * time.Second):
		t.Fatal("clients hung after the lower changed under the mount")
	}
	for e, n := range errs {
		t.Logf("%dx %s", n, e)
		if strings.Contains(e, "input/output error") {
			t.Errorf("EIO under lower changes (%dx %s): strata treats a changed lower as an internal error", n, e)
		}
	}
	// Still serving.
	if _, err := os.ReadDir(s.mnt); err != nil {
		t.Errorf("readdir of the root after the storm: %v", err)
	}
}
