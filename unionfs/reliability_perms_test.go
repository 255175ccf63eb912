package unionfs_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"strata/internal/stress"
	"strata/internal/testenv"
	"strata/unionfs"
)

// Permissions: the same ops, run as an unprivileged user (65534) through
// kernel overlay and through strata (allow_other) over identical layers,
// must give the same result for every op; copy-up must not grant more than
// the lower object had; setuid/setgid go on a write by a non-owner, as
// with kernel overlay; trusted.* cannot be set by that user.

const nobody = 65534

// permEntry is one lower object of the permission matrix.
type permEntry struct {
	path      string
	dir       bool
	mode      uint32
	uid, gid  int
	inSticky  bool
	lowerData string
}

var permEntries = []permEntry{
	{path: "d755", dir: true, mode: 0o755},
	{path: "d777", dir: true, mode: 0o777},
	{path: "d700", dir: true, mode: 0o700},
	{path: "d1777", dir: true, mode: 0o1777},
	{path: "dnobody", dir: true, mode: 0o755, uid: nobody, gid: nobody},
	{path: "d755/f644", mode: 0o644, lowerData: "f644"},
	{path: "d755/f600", mode: 0o600, lowerData: "f600"},
	{path: "d755/f666", mode: 0o666, lowerData: "f666"},
	{path: "d777/f666", mode: 0o666, lowerData: "f666"},
	{path: "d777/f604", mode: 0o604, lowerData: "f604"},
	{path: "d777/suid", mode: 0o4777, lowerData: "suid"},
	{path: "d777/sgid", mode: 0o2777, gid: 100, lowerData: "sgid"},
	{path: "d777/suidown", mode: 0o4755, uid: nobody, gid: nobody, lowerData: "suid owned"},
	{path: "d700/f666", mode: 0o666, lowerData: "hidden"},
	{path: "d1777/rootf", mode: 0o666, lowerData: "root's", inSticky: true},
	{path: "d1777/nobodyf", mode: 0o644, uid: nobody, gid: nobody, lowerData: "nobody's", inSticky: true},
	{path: "dnobody/f644", mode: 0o644, uid: nobody, gid: nobody, lowerData: "mine"},
	{path: "dnobody/rootf", mode: 0o644, lowerData: "root's in mine"},
}

func buildPermLower(t *testing.T, l string) {
	t.Helper()
	for _, e := range permEntries {
		p := filepath.Join(l, e.path)
		var err error
		if e.dir {
			err = os.Mkdir(p, 0o700)
		} else {
			err = os.WriteFile(p, []byte(e.lowerData), 0o600)
		}
		if err == nil {
			err = os.Chown(p, e.uid, e.gid)
		}
		if err == nil {
			err = unix.Chmod(p, e.mode)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Lsetxattr(filepath.Join(l, "d777/f666"), "user.color", []byte("red"), 0); err != nil {
		t.Fatal(err)
	}
}

// permOps lists the ops the unprivileged helper runs, in order, against a
// mount root: "op<TAB>path[<TAB>arg]".
func permOps() []string {
	var ops []string
	add := func(f string, a ...any) { ops = append(ops, fmt.Sprintf(f, a...)) }
	for _, e := range permEntries {
		p := e.path
		add("stat\t%s", p)
		if e.dir {
			add("readdir\t%s", p)
			add("create\t%s/new", p)
			add("mkdir\t%s/newdir", p)
			add("symlink\t%s/newlink", p)
			add("setxattr\t%s\tuser.x", p)
			add("setxattr\t%s\ttrusted.x", p)
			add("chmod\t%s", p)
			continue
		}
		add("read\t%s", p)
		add("getxattr\t%s\tuser.color", p)
		add("append\t%s", p) // copy-up by a write, setuid/sgid cleared
		add("stat\t%s", p)
		add("truncate\t%s", p)
		add("setxattr\t%s\tuser.x", p)
		add("setxattr\t%s\ttrusted.x", p)
		add("chmod\t%s", p)
		add("chown\t%s", p)
		add("utimes\t%s", p)
		add("link\t%s\t%s.lnk", p, p)
		add("rename\t%s\t%s.mv", p, p)
		add("unlink\t%s.mv", p)
		add("unlink\t%s", p)
		add("stat\t%s", p)
	}
	for _, e := range permEntries {
		if e.dir {
			add("rmdir\t%s/newdir", e.path)
			add("rmdir\t%s", e.path)
		}
	}
	return ops
}

// TestPermHelperProcess is not a test: it is the unprivileged side of
// TestPermissionsMatchKernel, run as a child with STRATA_PERM_HELPER set
// to a mount root; it reads ops on stdin and prints one result each.
func TestPermHelperProcess(t *testing.T) {
	root := os.Getenv("STRATA_PERM_HELPER")
	if root == "" {
		return
	}
	out := bufio.NewWriter(os.Stdout)
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Split(sc.Text(), "\t")
		p := filepath.Join(root, f[1])
		var err error
		res := ""
		switch f[0] {
		case "stat":
			var st unix.Stat_t
			if err = unix.Lstat(p, &st); err == nil {
				res = fmt.Sprintf("mode=%o uid=%d gid=%d size=%d", st.Mode, st.Uid, st.Gid, st.Size)
			}
		case "readdir":
			var ents []os.DirEntry
			if ents, err = os.ReadDir(p); err == nil {
				var names []string
				for _, e := range ents {
					names = append(names, e.Name())
				}
				sort.Strings(names)
				res = strings.Join(names, ",")
			}
		case "read":
			var b []byte
			if b, err = os.ReadFile(p); err == nil {
				res = string(b)
			}
		case "getxattr":
			buf := make([]byte, 256)
			var n int
			if n, err = unix.Lgetxattr(p, f[2], buf); err == nil {
				res = string(buf[:n])
			}
		case "append":
			var fl *os.File
			if fl, err = os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0); err == nil {
				_, err = fl.Write([]byte("+"))
				fl.Close()
			}
		case "truncate":
			err = unix.Truncate(p, 1)
		case "create":
			err = os.WriteFile(p, []byte("new"), 0o640)
		case "mkdir":
			err = unix.Mkdir(p, 0o750)
		case "symlink":
			err = unix.Symlink("target", p)
		case "setxattr":
			err = unix.Lsetxattr(p, f[2], []byte("v"), 0)
		case "chmod":
			err = unix.Chmod(p, 0o777)
		case "chown":
			err = unix.Lchown(p, nobody, nobody)
		case "utimes":
			err = unix.UtimesNano(p, []unix.Timespec{{Sec: 1}, {Sec: 2}})
		case "link":
			err = unix.Link(p, filepath.Join(root, f[2]))
		case "rename":
			err = unix.Rename(p, filepath.Join(root, f[2]))
		case "unlink":
			err = unix.Unlink(p)
		case "rmdir":
			err = unix.Rmdir(p)
		default:
			err = fmt.Errorf("unknown op %q", f[0])
		}
		if err != nil {
			var en unix.Errno
			if errors.As(err, &en) {
				res = unix.ErrnoName(en)
			} else {
				res = "error " + err.Error()
			}
		} else if res == "" {
			res = "ok"
		}
		fmt.Fprintf(out, "%s\t%s\n", sc.Text(), res)
	}
	out.Flush()
	os.Exit(0)
}

// publicDir makes a directory that other users can traverse (t.TempDir
// is 0700), removed when the test ends.
func publicDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "strata-perms-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(d, 0o755)
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// runAsNobody runs the helper as uid/gid 65534 against root.
func runAsNobody(t *testing.T, bin, root string, ops []string) []string {
	t.Helper()
	cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bin, "-test.run=^TestPermHelperProcess$")
	cmd.Env = append(os.Environ(), "STRATA_PERM_HELPER="+root)
	cmd.Dir = "/"
	cmd.Stdin = strings.NewReader(strings.Join(ops, "\n") + "\n")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper as nobody: %v: %s", err, stderr.String())
	}
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	if len(lines) != len(ops) {
		t.Fatalf("helper printed %d lines for %d ops: %s", len(lines), len(ops), out)
	}
	return lines
}

// TestPermissionsMatchKernel runs the op matrix as nobody through kernel
// overlay and through strata (allow_other) on identical layers and
// compares every result, then the upper dirs both left (copy-up metadata:
// mode, owner; setuid/setgid cleared by writes).
func TestPermissionsMatchKernel(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireFUSE(t)
	testenv.RequireKernelOverlay(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		testenv.Need(t, "setpriv (util-linux)", err.Error())
	}
	base := publicDir(t)
	// The helper binary must be executable by nobody.
	bin := filepath.Join(base, "helper.test")
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	type side struct{ l, u, w, m string }
	mk := func(name string) side {
		s := side{filepath.Join(base, name, "l"), filepath.Join(base, name, "u"), filepath.Join(base, name, "w"), filepath.Join(base, name, "m")}
		for _, d := range []string{s.l, s.u, s.w, s.m} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		os.Chmod(filepath.Join(base, name), 0o755)
		buildPermLower(t, s.l)
		return s
	}
	k, s := mk("kernel"), mk("strata")
	if err := unix.Mount("overlay", k.m, "overlay", 0, "lowerdir="+k.l+",upperdir="+k.u+",workdir="+k.w); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if unix.Unmount(k.m, 0) != nil {
			stress.LazyUnmount(k.m)
		}
	})
	o, err := unionfs.ParseOptions("lowerdir=" + s.l + ",upperdir=" + s.u + ",workdir=" + s.w + ",allow_other")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := unionfs.Mount(s.m, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			stress.AbortFUSE(s.m)
			stress.LazyUnmount(s.m)
		}
	})
	ops := permOps()
	kres := runAsNobody(t, bin, k.m, ops)
	sres := runAsNobody(t, bin, s.m, ops)
	diffs := 0
	for i := range ops {
		if kres[i] != sres[i] {
			diffs++
			t.Errorf("as nobody: kernel %q, strata %q", kres[i], sres[i])
		}
	}
	t.Logf("%d ops as uid 65534 compared, %d differ", len(ops), diffs)
	if testing.Verbose() {
		t.Logf("kernel results:\n%s", strings.Join(kres, "\n"))
	}

	// What copy-up left in the upper dirs must agree too.
	upperMeta := func(u string) map[string]string {
		out := map[string]string{}
		filepath.Walk(u, func(p string, fi os.FileInfo, err error) error {
			if err != nil || p == u {
				return nil
			}
			var st unix.Stat_t
			unix.Lstat(p, &st)
			rel, _ := filepath.Rel(u, p)
			v := fmt.Sprintf("mode=%o uid=%d gid=%d", st.Mode, st.Uid, st.Gid)
			if fi.Mode().IsRegular() {
				b, _ := os.ReadFile(p)
				v += " data=" + string(b)
			}
			out[rel] = v
			return nil
		})
		return out
	}
	km, sm := upperMeta(k.u), upperMeta(s.u)
	var keys []string
	for p := range km {
		keys = append(keys, p)
	}
	for p := range sm {
		if _, ok := km[p]; !ok {
			keys = append(keys, p)
		}
	}
	sort.Strings(keys)
	for _, p := range keys {
		if km[p] != sm[p] {
			t.Errorf("upper %s: kernel %q, strata %q", p, km[p], sm[p])
		}
	}
	// The lower layers are untouched.
	for _, e := range permEntries {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(s.l, e.path), &st); err != nil || st.Mode&0o7777 != e.mode {
			t.Errorf("lower %s changed: mode %o, %v", e.path, st.Mode&0o7777, err)
		}
	}
	_ = io.Discard
}
