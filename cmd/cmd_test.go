package cmd

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/internal/testenv"
	"strata/unionfs"
)

// strataBin is the strata binary built for tests that need a separate
// process (the daemon): tests must not exec the test binary itself.
var strataBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "strata-cmd-test-")
	if err != nil {
		panic(err)
	}
	strataBin = filepath.Join(dir, "strata")
	out, err := exec.Command("go", "build", "-o", strataBin, "strata").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// runMain runs Main in-process.
func runMain(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := Main(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

// stack makes lower, upper, work and mountpoint dirs.
func stack(t *testing.T) (dir, l, u, w, m string) {
	t.Helper()
	dir = t.TempDir()
	l, u, w, m = filepath.Join(dir, "l"), filepath.Join(dir, "u"), filepath.Join(dir, "w"), filepath.Join(dir, "m")
	for _, d := range []string{l, u, w, m} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return
}

func isMounted(t *testing.T, mnt string) bool {
	t.Helper()
	mounts, err := unionfs.ReadMounts()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mounts {
		if m.Mountpoint == mnt {
			return true
		}
	}
	return false
}

func TestHelpEverywhere(t *testing.T) {
	for name := range commands {
		code, out, _ := runMain(name, "--help")
		if code != 0 || !strings.Contains(out, "Usage: strata "+name) {
			t.Errorf("%s --help: exit %d, output %q", name, code, out)
		}
	}
	if code, out, _ := runMain("--help"); code != 0 || !strings.Contains(out, "mount") {
		t.Errorf("strata --help: %d %q", code, out)
	}
	if code, out, _ := runMain("version"); code != 0 || !strings.HasPrefix(out, "strata ") {
		t.Errorf("version: %d %q", code, out)
	}
}

func TestMountBadInput(t *testing.T) {
	dir, l, u, w, m := stack(t)
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o644)
	shm := ""
	if d, err := os.MkdirTemp("/dev/shm", "strata-test-"); err == nil {
		shm = d
		defer os.RemoveAll(d)
	}
	cases := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"mount", m}, 2, "missing -o"},
		{[]string{"mount", "-o", "lowerdir=" + l}, 2, "MOUNTPOINT"},
		{[]string{"mount", "-o", "lowerdir=" + l + ",bogus", m}, 2, `"bogus": unknown option`},
		{[]string{"mount", "-o", "lowerdir=" + l + "::" + u, m}, 2, "data-only"},
		{[]string{"mount", "-o", "lowerdir=", m}, 2, "lowerdir"},
		{[]string{"mount", "-o", "upperdir=" + u + ",workdir=" + w, m}, 2, "lowerdir"},
		{[]string{"mount", "-o", "lowerdir=" + l + ",upperdir=" + u, m}, 2, "together"},
		{[]string{"mount", "-o", "lowerdir=" + l + ",redirect_dir=on", m}, 2, "redirect_dir"},
		{[]string{"mount", "-o", "lowerdir=" + filepath.Join(dir, "nope"), m}, 1, "no such file"},
		{[]string{"mount", "-o", "lowerdir=" + file, m}, 1, "not a directory"},
		{[]string{"mount", "-o", "lowerdir=" + l + ",upperdir=" + u + ",workdir=" + u, m}, 1, "same directory"},
		{[]string{"mount", "-o", "lowerdir=" + u + ",upperdir=" + u + ",workdir=" + w, m}, 1, "inside"},
		{[]string{"mount", "-o", "lowerdir=" + l, filepath.Join(dir, "nomnt")}, 1, "mountpoint"},
		{[]string{"mount", "--mode=bogus", "-o", "lowerdir=" + l, m}, 2, "--mode"},
		{[]string{"mount", "--bogus-flag", "-o", "lowerdir=" + l, m}, 2, "unknown flag"},
		{[]string{"frobnicate"}, 2, "unknown command"},
	}
	if shm != "" {
		cases = append(cases, struct {
			args []string
			code int
			msg  string
		}{[]string{"mount", "-o", "lowerdir=" + l + ",upperdir=" + u + ",workdir=" + shm, m}, 1, "same filesystem"})
	}
	before := snapshotDirs(t, dir)
	for _, c := range cases {
		code, _, stderr := runMain(c.args...)
		if code != c.code || !strings.Contains(stderr, c.msg) {
			t.Errorf("%q: exit %d, stderr %q; want exit %d and %q", c.args, code, stderr, c.code, c.msg)
		}
		if n := strings.Count(strings.TrimSpace(stderr), "\n"); code != 0 && n > 0 && !strings.Contains(stderr, "Usage") {
			t.Errorf("%q: error is %d lines, want one: %q", c.args, n+1, stderr)
		}
	}
	if isMounted(t, m) {
		t.Fatalf("a failed mount left %s mounted", m)
	}
	if after := snapshotDirs(t, dir); after != before {
		t.Errorf("failed mounts changed the disk:\nbefore %s\nafter  %s", before, after)
	}
}

// snapshotDirs lists every path under dir (names only).
func snapshotDirs(t *testing.T, dir string) string {
	var b strings.Builder
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil {
			fmt.Fprintf(&b, "%s:%o ", strings.TrimPrefix(p, dir), fi.Mode())
		}
		return nil
	})
	return b.String()
}

func TestMountDaemonAndUmount(t *testing.T) {
	testenv.RequireFUSE(t)
	_, l, u, w, m := stack(t)
	os.WriteFile(filepath.Join(l, "hello"), []byte("world"), 0o644)
	out, err := exec.Command(strataBin, "mount", "-o", "lowerdir="+l+",upperdir="+u+",workdir="+w, m).CombinedOutput()
	if err != nil {
		t.Fatalf("strata mount: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command(strataBin, "umount", "--lazy", m).Run() })
	// The mount is live when the command returns.
	if got, err := os.ReadFile(filepath.Join(m, "hello")); err != nil || string(got) != "world" {
		t.Fatalf("read through the mount: %q, %v", got, err)
	}
	// Mounting again on the same mount point is refused.
	out, err = exec.Command(strataBin, "mount", "-o", "lowerdir="+l, m).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "busy") {
		t.Errorf("second mount on %s: %v %s; want a busy error", m, err, out)
	}
	if out, err := exec.Command(strataBin, "umount", m).CombinedOutput(); err != nil {
		t.Fatalf("strata umount: %v: %s", err, out)
	}
	if isMounted(t, m) {
		t.Fatal("still mounted after strata umount")
	}
}

func TestMountHelperForm(t *testing.T) {
	testenv.RequireFUSE(t)
	_, l, _, _, m := stack(t)
	os.WriteFile(filepath.Join(l, "f"), []byte("x"), 0o644)
	// The argv mount.fuse gives a filesystem helper.
	out, err := exec.Command(strataBin, "mysource", m, "-o", "rw,nodev,lowerdir="+l).CombinedOutput()
	if err != nil {
		t.Fatalf("strata SRC MNT -o: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command(strataBin, "umount", "--lazy", m).Run() })
	mounts, _ := unionfs.ReadMounts()
	found := false
	for _, mi := range mounts {
		if mi.Mountpoint == m {
			found = true
			if mi.Source != "mysource" || mi.Engine != unionfs.EngineFUSE {
				t.Errorf("mount table shows source %q engine %s", mi.Source, mi.Engine)
			}
		}
	}
	if !found {
		t.Fatalf("%s not in the mount table", m)
	}
	if _, err := os.Stat(filepath.Join(m, "f")); err != nil {
		t.Error(err)
	}
	if out, err := exec.Command(strataBin, "umount", m).CombinedOutput(); err != nil {
		t.Fatalf("umount: %v %s", err, out)
	}
}

func TestSignalUnmounts(t *testing.T) {
	testenv.RequireFUSE(t)
	_, l, u, w, m := stack(t)
	cmd := exec.Command(strataBin, "mount", "-f", "-o", "lowerdir="+l+",upperdir="+u+",workdir="+w, m)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		exec.Command(strataBin, "umount", "--lazy", m).Run()
	})
	waitMounted(t, m, true)
	cmd.Process.Signal(unix.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("strata exited with %v after SIGTERM", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("strata did not exit after SIGTERM")
	}
	if isMounted(t, m) {
		t.Error("still mounted after SIGTERM")
	}
}

func waitMounted(t *testing.T, m string, want bool) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if isMounted(t, m) == want {
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("mounted(%s) never became %v", m, want)
}

// TestKill9DuringCopyUp kills the daemon while it copies a large file up:
// the upper dir must not show a partial file, strata umount must clear the
// dead mount, and the next mount must work and show the lower file.
func TestKill9DuringCopyUp(t *testing.T) {
	testenv.RequireFUSE(t)
	_, l, u, w, m := stack(t)
	big := filepath.Join(l, "big")
	f, err := os.Create(big)
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	for i := 0; i < 768; i++ {
		if _, err := f.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	opts := "lowerdir=" + l + ",upperdir=" + u + ",workdir=" + w
	cmd := exec.Command(strataBin, "mount", "-f", "-o", opts, m)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		exec.Command(strataBin, "umount", "--lazy", m).Run()
	})
	waitMounted(t, m, true)
	go func() {
		// Blocks until the daemon answers; it gets ENOTCONN when killed.
		if f, err := os.OpenFile(filepath.Join(m, "big"), os.O_WRONLY|os.O_APPEND, 0); err == nil {
			f.Close()
		}
	}()
	// Kill as soon as the copy is under way in the work dir.
	killed := false
	for i := 0; i < 2000 && !killed; i++ {
		ents, _ := os.ReadDir(filepath.Join(w, "work"))
		if len(ents) > 0 {
			cmd.Process.Signal(unix.SIGKILL)
			killed = true
		}
		time.Sleep(time.Millisecond)
	}
	cmd.Wait()
	if !killed {
		t.Skip("copy-up finished before it could be interrupted")
	}
	if _, err := os.Lstat(filepath.Join(u, "big")); !os.IsNotExist(err) {
		t.Fatalf("partial copy visible in the upper dir: %v", err)
	}
	if out, err := exec.Command(strataBin, "umount", m).CombinedOutput(); err != nil {
		t.Fatalf("strata umount of the dead mount: %v: %s", err, out)
	}
	waitMounted(t, m, false)
	if out, err := exec.Command(strataBin, "mount", "-o", opts, m).CombinedOutput(); err != nil {
		t.Fatalf("remount: %v: %s", err, out)
	}
	defer exec.Command(strataBin, "umount", m).Run()
	if ents, _ := os.ReadDir(filepath.Join(w, "work")); len(ents) != 0 {
		t.Errorf("work dir leftovers after remount: %v", ents)
	}
	st, err := os.Stat(filepath.Join(m, "big"))
	if err != nil || st.Size() != 768<<20 {
		t.Fatalf("after remount: %v, size %d", err, st.Size())
	}
}
