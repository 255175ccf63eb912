package cmd

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	it "strata/image/imagetest"
	"strata/internal/testenv"
)

// upperDir makes a small upper dir: a file, a whiteout, an opaque dir.
func upperDir(t *testing.T, ns string) string {
	t.Helper()
	testenv.RequireMknod(t)
	u := filepath.Join(t.TempDir(), "upper")
	os.MkdirAll(filepath.Join(u, "opq"), 0o755)
	os.WriteFile(filepath.Join(u, "f"), []byte("data"), 0o644)
	os.WriteFile(filepath.Join(u, "opq", "new"), []byte("n"), 0o644)
	if err := unix.Mknod(filepath.Join(u, "gone"), unix.S_IFCHR, 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(filepath.Join(u, "opq"), ns+".overlay.opaque", []byte("y"), 0); err != nil {
		t.Fatal(err)
	}
	return u
}

// field returns the value of a "key value" line.
func field(out, key string) string {
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, key+" "); ok {
			return v
		}
	}
	return ""
}

func tarNames(t *testing.T, data []byte) string {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(data))
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
	return strings.Join(names, " ")
}

func TestExportImportCLI(t *testing.T) {
	testenv.RequireTrustedXattr(t)
	u := upperDir(t, "trusted")
	dir := t.TempDir()
	out := filepath.Join(dir, "layer.tar.gz")
	code, stdout, stderr := runMain("export", "-o", "lowerdir=/x:/y,upperdir="+u+",workdir=/w", "--gzip", "-O", out)
	if code != 0 {
		t.Fatalf("export: exit %d: %s", code, stderr)
	}
	diffID, digest := field(stdout, "diffid"), field(stdout, "digest")
	if !strings.HasPrefix(diffID, "sha256:") || !strings.HasPrefix(digest, "sha256:") || diffID == digest {
		t.Fatalf("export printed %q", stdout)
	}
	if _, err := os.Stat(out); err != nil {
		t.Fatal(err)
	}
	// Import it back, checking both digests on the way.
	target := filepath.Join(dir, "imported")
	code, stdout, stderr = runMain("import", "--diffid", diffID, "--digest", digest, out, target)
	if code != 0 {
		t.Fatalf("import: exit %d: %s", code, stderr)
	}
	if field(stdout, "diffid") != diffID {
		t.Errorf("import diffid %q, export %q", stdout, diffID)
	}
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(target, "gone"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Errorf("gone is not a whiteout: %v", err)
	}
	buf := make([]byte, 8)
	if n, err := unix.Lgetxattr(filepath.Join(target, "opq"), "trusted.overlay.opaque", buf); err != nil || string(buf[:n]) != "y" {
		t.Errorf("opq not opaque: %v", err)
	}
	// Same again, but a wrong expected diffID: exit 1, one line, no target.
	target2 := filepath.Join(dir, "imported2")
	code, _, stderr = runMain("import", "--diffid", "sha256:"+strings.Repeat("0", 64), out, target2)
	if code != 1 || !strings.Contains(stderr, "diffID mismatch") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("wrong diffid: exit %d, %q", code, stderr)
	}
	if _, err := os.Stat(target2); !os.IsNotExist(err) {
		t.Errorf("failed import left %s", target2)
	}
}

// TestExportToStdout: the tar goes to stdout, the digests to stderr; the
// userxattr format is honoured; the output is deterministic.
func TestExportToStdout(t *testing.T) {
	u := upperDir(t, "user")
	code, stdout, stderr := runMain("export", "-o", "upperdir="+u+",userxattr")
	if code != 0 {
		t.Fatalf("export: exit %d: %s", code, stderr)
	}
	if got, want := tarNames(t, []byte(stdout)), "f .wh.gone opq/ opq/.wh..wh..opq opq/new"; got != want {
		t.Errorf("tar entries %q, want %q", got, want)
	}
	if field(stderr, "diffid") != it.Digest([]byte(stdout)) {
		t.Errorf("stderr %q: want the diffid of the output", stderr)
	}
	_, again, _ := runMain("export", "--upper", u, "--xattr", "user")
	if again != stdout {
		t.Errorf("export not deterministic")
	}
	// Read as trusted, the user.overlay.opaque mark means nothing.
	_, trusted, _ := runMain("export", "--upper", u, "--xattr", "trusted")
	if strings.Contains(tarNames(t, []byte(trusted)), ".wh..wh..opq") {
		t.Errorf("--xattr=trusted honoured user.overlay.opaque")
	}
}

func TestLayerCmdsBadInput(t *testing.T) {
	dir := t.TempDir()
	hostile := filepath.Join(dir, "hostile.tar")
	os.WriteFile(hostile, it.Tar(t, it.Entry{Name: "a", Type: tar.TypeSymlink, Link: "/etc"},
		it.Entry{Name: "a/strata-pwned", Data: "x"}), 0o644)
	truncated := filepath.Join(dir, "truncated.tar")
	good := it.Tar(t, it.Entry{Name: "f", Data: strings.Repeat("x", 2000)})
	os.WriteFile(truncated, good[:1500], 0o644)
	for _, c := range []struct {
		args  []string
		code  int
		words string
	}{
		{[]string{"export"}, 2, "missing the layer"},
		{[]string{"export", dir}, 2, "takes no arguments"},
		{[]string{"export", "-o", "lowerdir=/x"}, 2, "needs upperdir"},
		{[]string{"export", "-o", "upperdir=/x,bogus"}, 2, "unknown option"},
		{[]string{"export", "--upper", dir, "--compress", "lz4"}, 2, "unknown compression"},
		{[]string{"export", "--upper", dir, "--xattr", "both"}, 2, "--xattr"},
		{[]string{"export", "--upper", dir, "--gzip", "--compress", "zstd"}, 2, "contradict"},
		{[]string{"export", "--upper", filepath.Join(dir, "missing"), "-O", filepath.Join(dir, "o.tar")}, 1, "no such file"},
		{[]string{"import", hostile}, 2, "want TAR"},
		{[]string{"import", "--diffid", "md5:x", hostile, filepath.Join(dir, "t")}, 2, "algorithm"},
		{[]string{"import", hostile, filepath.Join(dir, "t")}, 1, "refused 1 unsafe archive entry"},
		{[]string{"import", truncated, filepath.Join(dir, "t")}, 1, "truncated"},
		{[]string{"import", filepath.Join(dir, "missing.tar"), filepath.Join(dir, "t")}, 1, "no such file"},
		{[]string{"import", "--bogus"}, 2, "unknown flag"},
	} {
		code, _, stderr := runMain(c.args...)
		if code != c.code || !strings.Contains(stderr, c.words) || strings.Count(stderr, "\n") != 1 {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and one line with %q", c.args, code, stderr, c.code, c.words)
		}
	}
	if _, err := os.Stat("/etc/strata-pwned"); err == nil {
		os.Remove("/etc/strata-pwned")
		t.Errorf("/etc/strata-pwned written")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 2 {
		t.Errorf("left behind: %v", ents)
	}
	// --skip-refused imports the rest and lists what it refused.
	code, _, stderr := runMain("import", "--skip-refused", hostile, filepath.Join(dir, "t"))
	if code != 0 || !strings.Contains(stderr, `refused "a/strata-pwned"`) {
		t.Errorf("--skip-refused: exit %d, %q", code, stderr)
	}
}

// TestImportStdinAndRootless runs the built binary: the tar on stdin, as
// an unprivileged user (rootless defaults: own ids, devices skipped,
// userxattr).
func TestImportStdinAndRootless(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		testenv.Need(t, "setpriv", err.Error())
	}
	dir, err := os.MkdirTemp("/tmp", "strata-import-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	os.Chown(dir, testUID, testUID)
	os.Chmod(filepath.Dir(strataBin), 0o755)
	tb := it.Tar(t, it.Entry{Name: "dev/null", Type: tar.TypeChar, Mode: 0o666, Major: 1, Minor: 3},
		it.Entry{Name: "d/.wh..wh..opq"}, it.Entry{Name: ".wh.x"}, it.Entry{Name: "f", Data: "x"})
	cmd := exec.Command("setpriv", fmt.Sprintf("--reuid=%d", testUID), fmt.Sprintf("--regid=%d", testUID), "--clear-groups",
		"--inh-caps=-all", strataBin, "import", "-", filepath.Join(dir, "l"))
	cmd.Stdin = bytes.NewReader(tb)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("rootless import: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), `skipped "dev/null"`) || !strings.Contains(string(out), "diffid "+it.Digest(tb)) {
		t.Errorf("output %q", out)
	}
	buf := make([]byte, 8)
	if n, err := unix.Lgetxattr(filepath.Join(dir, "l", "d"), "user.overlay.opaque", buf); err != nil || string(buf[:n]) != "y" {
		t.Errorf("d: user.overlay.opaque: %v", err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(dir, "l", "f"), &st); err != nil || st.Uid != testUID {
		t.Errorf("f owned by %d: %v", st.Uid, err)
	}
}

// TestExportRefusesLiveUpper: a kernel overlay mount uses the upper dir.
func TestExportRefusesLiveUpper(t *testing.T) {
	testenv.RequireKernelOverlay(t)
	_, l, u, w, m := stack(t)
	if err := unix.Mount("overlay", m, "overlay", 0, "lowerdir="+l+",upperdir="+u+",workdir="+w); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(m, unix.MNT_DETACH) })
	code, _, stderr := runMain("export", "--upper", u, "-O", filepath.Join(t.TempDir(), "x.tar"))
	if code != 1 || !strings.Contains(stderr, "live mount") {
		t.Errorf("export of a live upper: exit %d, %q", code, stderr)
	}
	if code, _, stderr := runMain("export", "--force", "--upper", u, "-O", filepath.Join(t.TempDir(), "x.tar")); code != 0 {
		t.Errorf("--force: exit %d, %q", code, stderr)
	}
	if err := unix.Unmount(m, 0); err != nil {
		t.Error(err)
	}
}
