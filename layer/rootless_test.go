package layer_test

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

	"strata/internal/testenv"
	"strata/layer"
	"strata/whiteout"
)

const rootlessUID = 65534

// TestRootlessImport runs TestRootlessChild as an unprivileged user: a
// copy of this test binary under setpriv, in a directory that user owns.
func TestRootlessImport(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireMknod(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		testenv.Need(t, "setpriv", err.Error())
	}
	dir, err := os.MkdirTemp("/tmp", "strata-layer-rootless-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin := filepath.Join(dir, "layer.test")
	self, err := os.Open("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	out, err := os.OpenFile(bin, os.O_WRONLY|os.O_CREATE, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, self); err != nil {
		t.Fatal(err)
	}
	out.Close()
	work := filepath.Join(dir, "work")
	os.Mkdir(work, 0o755)
	for _, p := range []string{dir, work} {
		os.Chmod(p, 0o755)
		os.Chown(p, rootlessUID, rootlessUID)
	}
	cmd := exec.Command("setpriv", fmt.Sprintf("--reuid=%d", rootlessUID), fmt.Sprintf("--regid=%d", rootlessUID),
		"--clear-groups", "--inh-caps=-all", bin, "-test.run=^TestRootlessChild$", "-test.v", "-test.count=1")
	cmd.Env = []string{"STRATA_LAYER_ROOTLESS_DIR=" + work, "PATH=/usr/bin:/bin", "HOME=/tmp"}
	output, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(output), "--- PASS: TestRootlessChild") {
		t.Fatalf("rootless child: %v\n%s", err, output)
	}
}

// TestRootlessChild is the unprivileged half of TestRootlessImport.
func TestRootlessChild(t *testing.T) {
	dir := os.Getenv("STRATA_LAYER_ROOTLESS_DIR")
	if dir == "" {
		t.Skip("run by TestRootlessImport")
	}
	if os.Geteuid() == 0 {
		t.Fatal("child runs as root")
	}
	tarball := mkTar(t,
		ent{name: "dev/null", typ: tar.TypeChar, major: 1, minor: 3, mode: 0o666},
		ent{name: "owned", data: "x", uid: 1234, gid: 1234},
		ent{name: "attrs", data: "x", pax: map[string]string{
			"SCHILY.xattr.trusted.t":           "1",
			"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
			"SCHILY.xattr.user.u":              "2"}},
		ent{name: "bin/su", data: "x", mode: 0o4755},
		ent{name: ".wh.gone"},
		ent{name: "opq/.wh..wh..opq"},
		ent{name: "ro/", typ: tar.TypeDir, mode: 0o555},
		ent{name: "ro/f", data: "x", mode: 0o400},
	)
	rootless := layer.ImportOptions{NS: whiteout.User, Rootless: true, SkipDevices: true}
	target := filepath.Join(dir, "l")
	res, err := layer.Import(ctx, bytes.NewReader(tarball), target, rootless)
	if err != nil {
		t.Fatalf("rootless import: %v", err)
	}
	skipped := fmt.Sprint(res.Skipped)
	for _, want := range []string{"dev/null", "trusted.t", "security.capability"} {
		if !strings.Contains(skipped, want) {
			t.Errorf("skipped %s, want %s listed", skipped, want)
		}
	}
	got := snapshot(t, target)
	for _, want := range []string{
		fmt.Sprintf("owned file 0644 %d:%d", rootlessUID, rootlessUID),
		`attrs file 0644 65534:65534 size=1`, `user.u="2"`,
		"bin/su file 4755", "gone char 0000", "dev=0:0", `opq dir 0755 65534:65534`, `user.overlay.opaque="y"`,
		"ro dir 0555", "ro/f file 0400",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("missing %q in\n%s", want, got)
		}
	}
	if strings.Contains(got, "dev/null") {
		t.Errorf("device created without privilege?\n%s", got)
	}
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(target, "gone"), &st); err != nil || st.Rdev != 0 {
		t.Errorf("whiteout: %v", err)
	}
	// Read-only directories do not stop the owner from removing the tree.
	if err := layer.RemoveAll(target); err != nil {
		t.Errorf("RemoveAll: %v", err)
	}

	// Devices without SkipDevices: a clear error, nothing left.
	_, err = layer.Import(ctx, bytes.NewReader(tarball), target, layer.ImportOptions{NS: whiteout.User, Rootless: true})
	if err == nil || !strings.Contains(err.Error(), "device 1:3") || !strings.Contains(err.Error(), "CAP_MKNOD") {
		t.Errorf("device without privilege: %v", err)
	}
	// Owners without Rootless: a clear error.
	_, err = layer.Import(ctx, bytes.NewReader(tarball), target, layer.ImportOptions{NS: whiteout.User, SkipDevices: true})
	if err == nil || !strings.Contains(err.Error(), "chown") {
		t.Errorf("chown without privilege: %v", err)
	}
	if _, err := os.Lstat(target); !os.IsNotExist(err) {
		t.Errorf("failed imports left %s", target)
	}
	names, _ := os.ReadDir(dir)
	if len(names) != 0 {
		t.Errorf("left behind: %v", names)
	}
}
