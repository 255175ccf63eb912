package cmd

import (
	"archive/tar"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	it "strata/image/imagetest"
	"strata/internal/testenv"
	"strata/unionfs"
)

// imageSource writes an OCI layout with two images sharing two layers,
// with whiteouts and an opaque dir across the layers.
func imageSource(t *testing.T) (src string, a, b []it.Layer) {
	t.Helper()
	base := it.Layer{Tar: it.Tar(t,
		it.Entry{Name: "etc/passwd", Data: "root\n"}, it.Entry{Name: "etc/group", Data: "g\n"},
		it.Entry{Name: "lib/", Type: tar.TypeDir}, it.Entry{Name: "lib/old", Data: "o"}), Compression: it.Gzip}
	mid := it.Layer{Tar: it.Tar(t, it.Entry{Name: "etc/.wh.group"}, it.Entry{Name: "lib/.wh..wh..opq"},
		it.Entry{Name: "lib/new", Data: "n"})}
	topA := it.Layer{Tar: it.Tar(t, it.Entry{Name: "app", Data: "a"}), Compression: it.Zstd}
	topB := it.Layer{Tar: it.Tar(t, it.Entry{Name: "app", Data: "b"})}
	a, b = []it.Layer{base, mid, topA}, []it.Layer{base, mid, topB}
	src = filepath.Join(t.TempDir(), "oci")
	os.Mkdir(src, 0o755)
	it.WriteOCI(t, src, it.Image{Name: "example.com/a:1", Layers: a}, it.Image{Name: "b:2", Layers: b})
	return src, a, b
}

func TestImageCLI(t *testing.T) {
	testenv.RequireMknod(t)
	src, _, _ := imageSource(t)
	store := filepath.Join(t.TempDir(), "store")
	code, stdout, stderr := runMain("image", "unpack", "--store", store, "--ref", "a:1", src)
	if code != 0 || !strings.Contains(stdout, "example.com/a:1 ") || !strings.Contains(stdout, "3 layers (3 new, 0 already stored)") {
		t.Fatalf("unpack a: exit %d, %q %q", code, stdout, stderr)
	}
	code, stdout, stderr = runMain("image", "unpack", "--store", store, "--ref", "b:2", src)
	if code != 0 || !strings.Contains(stdout, "3 layers (1 new, 2 already stored)") {
		t.Fatalf("unpack b: exit %d, %q %q", code, stdout, stderr)
	}
	code, stdout, stderr = runMain("image", "ls", "--store", store)
	if code != 0 {
		t.Fatalf("ls: exit %d %s", code, stderr)
	}
	for _, want := range []string{"IMAGE", "example.com/a:1", "b:2", "LAYER (chainID)", "b:2,example.com/a:1"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("ls output lacks %q:\n%s", want, stdout)
		}
	}
	var ls struct {
		Xattr  string
		Images []struct {
			Name   string
			Size   int64
			Shared int64
		}
		Layers []struct{ Images []string }
	}
	code, stdout, _ = runMain("image", "ls", "--store", store, "--json")
	if err := json.Unmarshal([]byte(stdout), &ls); err != nil || code != 0 {
		t.Fatalf("ls --json: %v %q", err, stdout)
	}
	if len(ls.Images) != 2 || len(ls.Layers) != 4 || ls.Images[0].Shared == 0 || ls.Images[0].Shared >= ls.Images[0].Size {
		t.Errorf("ls --json: %+v", ls)
	}
	code, stdout, stderr = runMain("image", "rm", "--store", store, "a:1")
	if code != 0 || !strings.Contains(stdout, "1 layers removed, 2 kept") {
		t.Errorf("rm: exit %d %q %q", code, stdout, stderr)
	}
	code, stdout, _ = runMain("image", "ls", "--store", store)
	if code != 0 || strings.Contains(stdout, "a:1") || !strings.Contains(stdout, "b:2") {
		t.Errorf("ls after rm:\n%s", stdout)
	}
	code, _, stderr = runMain("image", "rm", "--store", store, "a:1")
	if code != 1 || !strings.Contains(stderr, "image not found") {
		t.Errorf("rm again: exit %d %q", code, stderr)
	}
	code, stdout, _ = runMain("image", "prune", "--store", store)
	if code != 0 || !strings.Contains(stdout, "removed 0 unused layers") {
		t.Errorf("prune: %d %q", code, stdout)
	}
}

func TestImageCLIBadInput(t *testing.T) {
	src, a, _ := imageSource(t)
	store := filepath.Join(t.TempDir(), "store")
	corrupt := filepath.Join(t.TempDir(), "corrupt")
	os.Mkdir(corrupt, 0o755)
	w := it.WriteOCI(t, corrupt, it.Image{Layers: a})
	p := it.BlobPath(corrupt, w[0].Layers[1])
	data, _ := os.ReadFile(p)
	data[600] ^= 1
	os.WriteFile(p, data, 0o644)
	os.Unsetenv("STRATA_STORE")
	for _, c := range []struct {
		args  []string
		code  int
		words string
	}{
		{[]string{"image"}, 2, "missing SUBCOMMAND"},
		{[]string{"image", "bogus"}, 2, "unknown subcommand"},
		{[]string{"image", "unpack", src}, 2, "missing --store"},
		{[]string{"image", "unpack", "--store", store}, 2, "exactly one SOURCE"},
		{[]string{"image", "unpack", "--store", store, "--bogus", src}, 2, "unknown flag"},
		{[]string{"image", "unpack", "--store", store, src}, 1, "choose one"},
		{[]string{"image", "unpack", "--store", store, "--ref", "nope", src}, 1, "no image \"nope\""},
		{[]string{"image", "unpack", "--store", store, corrupt}, 1, "digest mismatch"},
		{[]string{"image", "unpack", "--store", store, filepath.Join(src, "missing")}, 1, "no such file"},
		{[]string{"image", "ls", "--store", store, "x"}, 2, "takes no arguments"},
		{[]string{"image", "rm", "--store", store}, 2, "at least one"},
		{[]string{"image", "mount", "--store", store, "x"}, 2, "IMAGE and MOUNTPOINT"},
		{[]string{"image", "mount", "--store", store, "nope", "/mnt"}, 1, "image not found"},
		{[]string{"image", "ls", "--store", store, "--log-level", "loud"}, 2, "log-level"},
	} {
		code, _, stderr := runMain(c.args...)
		if code != c.code || !strings.Contains(stderr, c.words) || strings.Count(stderr, "\n") != 1 {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and one line with %q", c.args, code, stderr, c.code, c.words)
		}
	}
	// Nothing got into the store.
	if ents, _ := os.ReadDir(filepath.Join(store, "layers")); len(ents) != 0 {
		t.Errorf("layers after failed unpacks: %v", ents)
	}
	// Sub-command help: exit 0, usage on stdout.
	for _, sub := range []string{"unpack", "ls", "rm", "prune", "mount"} {
		code, stdout, _ := runMain("image", sub, "--help")
		if code != 0 || !strings.Contains(stdout, "Usage: strata image "+sub) {
			t.Errorf("image %s --help: exit %d, %q", sub, code, stdout)
		}
	}
}

// TestImageMount mounts an image with the built binary (the mount daemon
// needs its own process): read-only, then writable, then with the kernel
// engine; rm refuses while mounted.
func TestImageMount(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireMknod(t)
	src, a, _ := imageSource(t)
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	if code, _, stderr := runMain("image", "unpack", "--store", store, "--ref", "a:1", src); code != 0 {
		t.Fatalf("unpack: %s", stderr)
	}
	ref := filepath.Join(dir, "ref")
	it.Apply(t, ref, a[0].Tar, a[1].Tar, a[2].Tar)
	want := it.Tree(t, ref)
	m, u, w := filepath.Join(dir, "m"), filepath.Join(dir, "u"), filepath.Join(dir, "w")
	for _, d := range []string{m, u, w} {
		os.Mkdir(d, 0o755)
	}
	strata := func(args ...string) (string, error) {
		out, err := exec.Command(strataBin, args...).CombinedOutput()
		return string(out), err
	}
	t.Cleanup(func() { exec.Command(strataBin, "umount", "--lazy", m).Run() })

	out, err := strata("image", "mount", "--store", store, "--dry-run", "a:1", m)
	if err != nil || !strings.Contains(out, "would mount") || !strings.Contains(out, filepath.Join(store, "layers")) {
		t.Fatalf("dry run: %v %s", err, out)
	}
	if out, err := strata("image", "mount", "--store", store, "example.com/a:1", m); err != nil {
		t.Fatalf("image mount: %v %s", err, out)
	}
	if got := it.Tree(t, m); got != want {
		t.Errorf("mounted image differs from the reference:\nwant:\n%s\ngot:\n%s", want, got)
	}
	mounts, _ := unionfs.ReadMounts()
	for _, mi := range mounts {
		if mi.Mountpoint == m && mi.Source != "strata:example.com/a:1" {
			t.Errorf("mount source %q, want the image name", mi.Source)
		}
	}
	if err := os.WriteFile(filepath.Join(m, "x"), nil, 0o644); err == nil {
		t.Errorf("read-only image mount took a write")
	}
	code, _, stderr := runMain("image", "rm", "--store", store, "a:1")
	if code != 1 || !strings.Contains(stderr, "in use by the mount") {
		t.Errorf("rm while mounted: exit %d %q", code, stderr)
	}
	if out, err := strata("umount", m); err != nil {
		t.Fatalf("umount: %v %s", err, out)
	}

	// Writable: changes land in the upper dir, and export as a layer.
	if out, err := strata("image", "mount", "--store", store, "--upper", u, "--work", w, "a:1", m); err != nil {
		t.Fatalf("image mount --upper: %v %s", err, out)
	}
	os.Remove(filepath.Join(m, "etc", "passwd"))
	os.WriteFile(filepath.Join(m, "added"), []byte("+"), 0o644)
	if out, err := strata("umount", m); err != nil {
		t.Fatalf("umount: %v %s", err, out)
	}
	code, stdout, stderr := runMain("export", "--upper", u)
	if code != 0 {
		t.Fatalf("export: %s", stderr)
	}
	if got := tarNames(t, []byte(stdout)); !strings.Contains(got, "etc/.wh.passwd") || !strings.Contains(got, "added") {
		t.Errorf("exported changes: %q", got)
	}

	// The kernel engine mounts the same layers.
	testenv.RequireKernelOverlay(t)
	if out, err := strata("image", "mount", "--store", store, "--mode", "kernel", "a:1", m); err != nil {
		t.Fatalf("image mount --mode=kernel: %v %s", err, out)
	}
	got := it.Tree(t, m)
	if out, err := strata("umount", m); err != nil {
		t.Fatalf("umount: %v %s", err, out)
	}
	if got != want {
		t.Errorf("kernel mount of the image differs:\nwant:\n%s\ngot:\n%s", want, got)
	}
	if code, _, stderr := runMain("image", "rm", "--store", store, "a:1"); code != 0 {
		t.Errorf("rm after umount: %s", stderr)
	}
}

// TestImageRootless: an unprivileged user unpacks into a store of its own:
// the store takes the userxattr format, layers keep the user's ids, and
// ls and rm work.
func TestImageRootless(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		testenv.Need(t, "setpriv", err.Error())
	}
	testenv.RequireFUSE(t)
	var fst unix.Stat_t
	if err := unix.Stat("/dev/fuse", &fst); err != nil {
		t.Fatal(err)
	}
	// /dev/fuse usable by users, as on every distribution.
	os.Chmod("/dev/fuse", 0o666)
	t.Cleanup(func() { os.Chmod("/dev/fuse", os.FileMode(fst.Mode&0o777)) })
	src, a, _ := imageSource(t)
	dir, err := os.MkdirTemp("/tmp", "strata-image-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	os.Chown(dir, testUID, testUID)
	os.Chmod(filepath.Dir(strataBin), 0o755)
	// The source must be readable by the user.
	for p := src; p != "/" && p != "/tmp"; p = filepath.Dir(p) {
		os.Chmod(p, 0o755)
	}
	store := filepath.Join(dir, "store")
	// The README's promise: a user with an image and no root gets a
	// mounted, writable rootfs in two commands.
	c := filepath.Join(dir, "c1")
	script := `
$STRATA image unpack --store ` + store + ` --ref a:1 ` + src + `
mkdir -p ` + c + `/up ` + c + `/work ` + c + `/rootfs
$STRATA image mount --store ` + store + ` --upper ` + c + `/up --work ` + c + `/work a:1 ` + c + `/rootfs
find ` + c + `/rootfs | sort > ` + dir + `/tree.txt
echo hello > ` + c + `/rootfs/etc/motd
rm ` + c + `/rootfs/etc/passwd
cat ` + c + `/rootfs/etc/motd
$STRATA umount ` + c + `/rootfs
$STRATA image ls --store ` + store + `
$STRATA image rm --store ` + store + ` a:1
`
	out, err := asUser(t, script)
	if err != nil {
		t.Fatalf("rootless image commands: %v\n%s", err, out)
	}
	if !strings.Contains(out, "3 layers (3 new") || !strings.Contains(out, "example.com/a:1") || !strings.Contains(out, "3 layers removed") || !strings.Contains(out, "hello") {
		t.Errorf("output:\n%s", out)
	}
	ref := filepath.Join(t.TempDir(), "ref")
	it.Apply(t, ref, a[0].Tar, a[1].Tar, a[2].Tar)
	var want []string
	filepath.Walk(ref, func(p string, _ os.FileInfo, err error) error {
		if err == nil {
			want = append(want, filepath.Join(c, "rootfs", strings.TrimPrefix(p, ref)))
		}
		return nil
	})
	sort.Strings(want)
	got, _ := os.ReadFile(filepath.Join(dir, "tree.txt"))
	if strings.TrimSpace(string(got)) != strings.Join(want, "\n") {
		t.Errorf("rootless rootfs:\n%s\nwant:\n%s", got, strings.Join(want, "\n"))
	}
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(c, "up", "etc", "passwd"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR {
		t.Errorf("upper etc/passwd: %v mode %o, want a whiteout", err, st.Mode)
	}
	meta, _ := os.ReadFile(filepath.Join(store, "store.json"))
	if !strings.Contains(string(meta), `"xattr":"user"`) {
		t.Errorf("store.json %s: want the user format", meta)
	}
	if ents, _ := os.ReadDir(filepath.Join(store, "layers")); len(ents) != 0 {
		t.Errorf("layers left: %v", ents)
	}
	// Root may use the user's store too (reading user.* is not
	// privileged), and keeps its format.
	code, _, stderr := runMain("image", "unpack", "--store", store, "--ref", "b:2", src)
	if code != 0 {
		t.Errorf("root unpack into a user store: %s", stderr)
	}
}
