package cmd

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"strata/internal/testenv"
	"strata/unionfs"
)

// fixture fills a lower and an upper dir with a small stack: a whiteout,
// an opaque dir, shadowing, a symlink.
func fixture(t *testing.T, l, u string, ns string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(l, "d", "sub"), 0o755))
	must(os.WriteFile(filepath.Join(l, "d", "sub", "deep"), []byte("deep"), 0o644))
	must(os.WriteFile(filepath.Join(l, "d", "a"), []byte("lower a"), 0o644))
	must(os.WriteFile(filepath.Join(l, "gone"), []byte("hidden by a whiteout"), 0o644))
	must(os.MkdirAll(filepath.Join(l, "op"), 0o755))
	must(os.WriteFile(filepath.Join(l, "op", "hidden"), []byte("x"), 0o644))
	must(os.Symlink("d/a", filepath.Join(l, "link")))
	must(os.MkdirAll(filepath.Join(u, "d"), 0o755))
	must(os.WriteFile(filepath.Join(u, "d", "a"), []byte("upper a"), 0o644))
	must(unix.Mknod(filepath.Join(u, "gone"), unix.S_IFCHR, 0))
	must(os.MkdirAll(filepath.Join(u, "op"), 0o755))
	must(unix.Setxattr(filepath.Join(u, "op"), ns+".overlay.opaque", []byte("y"), 0))
	must(os.WriteFile(filepath.Join(u, "op", "visible"), []byte("y"), 0o644))
}

// listing renders a tree: path, type, size, content of small files.
func listing(t *testing.T, root string) string {
	t.Helper()
	var lines []string
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		line := fmt.Sprintf("%s %s", rel, fi.Mode().Type())
		if fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			line += " " + string(b)
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			tgt, _ := os.Readlink(p)
			line += " -> " + tgt
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", root, err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func engineOf(t *testing.T, mnt string) unionfs.Engine {
	t.Helper()
	mounts, _ := unionfs.ReadMounts()
	for _, m := range mounts {
		if m.Mountpoint == mnt {
			return m.Engine
		}
	}
	return ""
}

func strata(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command(strataBin, args...).CombinedOutput()
	return string(out), err
}

func TestModeAutoAndFallback(t *testing.T) {
	testenv.RequireKernelOverlay(t)
	testenv.RequireFUSE(t)
	_, l, u, w, m := stack(t)
	fixture(t, l, u, "trusted")
	opts := "lowerdir=" + l + ",upperdir=" + u + ",workdir=" + w

	out, err := strata(t, "mount", "--mode=auto", "-o", opts, m)
	if err != nil {
		t.Fatalf("auto: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command(strataBin, "umount", "--lazy", m).Run() })
	if engineOf(t, m) != unionfs.EngineKernel || !strings.Contains(out, "engine kernel") {
		t.Fatalf("auto as root: engine %q, output %q; want kernel", engineOf(t, m), out)
	}
	kernelTree := listing(t, m)
	if out, err := strata(t, "umount", m); err != nil {
		t.Fatalf("umount kernel mount: %v %s", err, out)
	}

	// An option only FUSE honours: auto falls back and says why.
	out, err = strata(t, "mount", "--mode=auto", "-o", opts+",squash_to_root", m)
	if err != nil {
		t.Fatalf("auto with squash: %v %s", err, out)
	}
	if engineOf(t, m) != unionfs.EngineFUSE || !strings.Contains(out, "squash") {
		t.Fatalf("auto with squash_to_root: engine %q, output %q; want fuse and the reason", engineOf(t, m), out)
	}
	if fuseTree := listing(t, m); fuseTree != kernelTree {
		t.Errorf("trees differ:\nkernel:\n%s\nfuse:\n%s", kernelTree, fuseTree)
	}
	if out, err := strata(t, "umount", m); err != nil {
		t.Fatalf("umount fuse mount: %v %s", err, out)
	}

	// --mode=kernel refuses FUSE-only options by name and mounts nothing.
	out, err = strata(t, "mount", "--mode=kernel", "-o", opts+",allow_other", m)
	if err == nil || !strings.Contains(out, "allow_other") {
		t.Errorf("kernel with allow_other: %v %q; want a refusal naming allow_other", err, out)
	}
	if engineOf(t, m) != "" {
		t.Errorf("refused mount left %s mounted", m)
	}
}

func TestStatusListsBothEngines(t *testing.T) {
	testenv.RequireKernelOverlay(t)
	testenv.RequireFUSE(t)
	_, l, u, w, m := stack(t)
	_, l2, _, _, m2 := stack(t)
	if out, err := strata(t, "mount", "--mode=kernel", "-o", "lowerdir="+l+",upperdir="+u+",workdir="+w, m); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	t.Cleanup(func() { exec.Command(strataBin, "umount", "--lazy", m).Run() })
	if out, err := strata(t, "mount", "-o", "lowerdir="+l2, m2); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	t.Cleanup(func() { exec.Command(strataBin, "umount", "--lazy", m2).Run() })
	out, err := strata(t, "status")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{m + " ", "kernel", l + " ", m2 + " ", "fuse", l2 + " "} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	strata(t, "umount", m)
	strata(t, "umount", m2)
}

// asUser runs a shell script as an unprivileged user, the way a rootless
// user runs strata: /dev/fuse mode 0666, fusermount3 setuid.
const testUID = 65534

func asUser(t *testing.T, script string) (string, error) {
	t.Helper()
	cmd := exec.Command("setpriv", fmt.Sprintf("--reuid=%d", testUID), fmt.Sprintf("--regid=%d", testUID), "--clear-groups",
		"--inh-caps=-all", "sh", "-ec", script)
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "STRATA=" + strataBin, "HOME=/tmp"}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// rootlessEnv prepares what a normal distribution gives users: /dev/fuse
// 0666, and a test directory the user owns, reachable from /.
func rootlessEnv(t *testing.T) string {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireFUSE(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		testenv.Need(t, "setpriv", err.Error())
	}
	var st unix.Stat_t
	if err := unix.Stat("/dev/fuse", &st); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod("/dev/fuse", 0o666); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod("/dev/fuse", os.FileMode(st.Mode&0o777)) })
	dir, err := os.MkdirTemp("/tmp", "strata-rootless-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(strataBin), 0o755)
	os.Chmod(strataBin, 0o755)
	for _, d := range []string{"l", "u", "w", "m", "kw", "km"} {
		p := filepath.Join(dir, d)
		os.Mkdir(p, 0o755)
	}
	fixture(t, filepath.Join(dir, "l"), filepath.Join(dir, "u"), "user")
	if err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil {
			err = os.Lchown(p, testUID, testUID)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestRootlessMountChangeAndHandOver: an unprivileged user mounts, changes
// the tree (whiteouts, opaque dir, copy-up), unmounts with strata umount and
// with fusermount3 -u; the mount shows as fuse.strata; the upper dir uses
// the userxattr format and kernel overlay, mounted by the same user in a
// user namespace with -o userxattr, shows the same tree.
func TestRootlessMountChangeAndHandOver(t *testing.T) {
	dir := rootlessEnv(t)
	testenv.RequireKernelOverlay(t)
	script := `
cd ` + dir + `
$STRATA mount -o lowerdir=l,upperdir=u,workdir=w m
grep -q ' fuse.strata ' /proc/self/mountinfo
echo changed >> m/d/sub/deep
rm m/d/sub/deep
rm -r m/op
mkdir m/op
echo new > m/op/new
echo more >> m/link
mkdir m/newdir
$STRATA umount m
! grep -q " $PWD/m " /proc/self/mountinfo
$STRATA mount -o lowerdir=l,upperdir=u,workdir=w m
find m | sort > fuse.txt
fusermount3 -u m
! grep -q " $PWD/m " /proc/self/mountinfo
unshare -Urm sh -ec 'mount -t overlay overlay -o lowerdir=l,upperdir=u,workdir=kw,userxattr km && find km | sed s/^km/m/ | sort > kernel.txt'
`
	out, err := asUser(t, script)
	if err != nil {
		t.Fatalf("rootless script: %v\n%s", err, out)
	}
	fuseTree, _ := os.ReadFile(filepath.Join(dir, "fuse.txt"))
	kernelTree, _ := os.ReadFile(filepath.Join(dir, "kernel.txt"))
	if string(fuseTree) != string(kernelTree) || len(fuseTree) == 0 {
		t.Errorf("trees differ:\nstrata:\n%s\nkernel (userxattr, user namespace):\n%s", fuseTree, kernelTree)
	}
	// The upper dir is in the userxattr format, whiteouts are 0/0 devices,
	// and strata wrote no other marker.
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(dir, "u", "d", "sub", "deep"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Errorf("d/sub/deep in upper: %v mode %o rdev %d, want a 0/0 whiteout", err, st.Mode, st.Rdev)
	}
	buf := make([]byte, 8)
	if n, err := unix.Lgetxattr(filepath.Join(dir, "u", "op"), "user.overlay.opaque", buf); err != nil || string(buf[:n]) != "y" {
		t.Errorf("op: user.overlay.opaque = %q, %v; want y", buf[:n], err)
	}
	filepath.Walk(filepath.Join(dir, "u"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && strings.HasPrefix(fi.Name(), ".wh.") {
			t.Errorf("OCI marker in upper: %s", p)
		}
		return nil
	})
}

// TestRootlessKernelUpperInStrata: the other way round, kernel overlay in a
// user namespace changes the tree, strata mounted by the same user shows
// what the kernel showed.
func TestRootlessKernelUpperInStrata(t *testing.T) {
	dir := rootlessEnv(t)
	testenv.RequireKernelOverlay(t)
	script := `
cd ` + dir + `
unshare -Urm sh -ec '
mount -t overlay overlay -o lowerdir=l,upperdir=u,workdir=kw,userxattr km
rm km/d/a; rm -r km/op; mkdir km/op; echo k > km/op/k; echo x >> km/link; mkdir km/d/new
find km | sed s/^km/m/ | sort > kernel.txt'
$STRATA mount -o lowerdir=l,upperdir=u,workdir=w m
find m | sort > fuse.txt
$STRATA umount m
`
	out, err := asUser(t, script)
	if err != nil {
		t.Fatalf("rootless script: %v\n%s", err, out)
	}
	fuseTree, _ := os.ReadFile(filepath.Join(dir, "fuse.txt"))
	kernelTree, _ := os.ReadFile(filepath.Join(dir, "kernel.txt"))
	if string(fuseTree) != string(kernelTree) || len(fuseTree) == 0 {
		t.Errorf("trees differ:\nkernel:\n%s\nstrata:\n%s", kernelTree, fuseTree)
	}
}

// TestRootlessModeAuto: without privilege the kernel refuses, and auto
// falls back to FUSE saying why.
func TestRootlessModeAuto(t *testing.T) {
	dir := rootlessEnv(t)
	out, err := asUser(t, `cd `+dir+`
$STRATA mount --mode=auto -o lowerdir=l,upperdir=u,workdir=w m
grep ' fuse.strata ' /proc/self/mountinfo >/dev/null
$STRATA umount m`)
	if err != nil || !strings.Contains(out, "engine fuse") {
		t.Fatalf("rootless auto: %v\n%s", err, out)
	}
}

// TestAllowOtherPermissions: with allow_other, another user gets exactly
// what the layers' permissions allow, checked by the kernel.
func TestAllowOtherPermissions(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireFUSE(t)
	dir, err := os.MkdirTemp("/tmp", "strata-allow-other-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	l, u, w, m := filepath.Join(dir, "l"), filepath.Join(dir, "u"), filepath.Join(dir, "w"), filepath.Join(dir, "m")
	for _, d := range []string{l, u, w, m} {
		os.Mkdir(d, 0o755)
	}
	os.WriteFile(filepath.Join(l, "public"), []byte("public"), 0o644)
	os.WriteFile(filepath.Join(l, "secret"), []byte("secret"), 0o600)
	os.Mkdir(filepath.Join(l, "private"), 0o700)
	os.WriteFile(filepath.Join(l, "private", "f"), []byte("f"), 0o644)
	if out, err := strata(t, "mount", "-o", "lowerdir="+l+",upperdir="+u+",workdir="+w+",allow_other", m); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	t.Cleanup(func() { exec.Command(strataBin, "umount", "--lazy", m).Run() })
	out, err := asUser(t, `cd `+m+`
cat public
! cat secret 2>/dev/null
! ls private 2>/dev/null
! cat private/f 2>/dev/null
! touch newfile 2>/dev/null
! rm public 2>/dev/null
! chmod 777 public 2>/dev/null
echo ok`)
	if err != nil || !strings.Contains(out, "public") || !strings.Contains(out, "ok") {
		t.Fatalf("second user: %v\n%s", err, out)
	}
	if entries, _ := os.ReadDir(u); len(entries) != 0 {
		t.Errorf("refused operations changed the upper dir: %v", entries)
	}
	strata(t, "umount", m)
}
