package cow_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"strata/cow"
	"strata/internal/testenv"
	"strata/whiteout"
)

// env is a source dir, an upper dir and a work dir on one filesystem.
type env struct {
	src, upper, work  string
	srcFd, upFd, wkFd int
	c                 *cow.Copier
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	e := &env{src: filepath.Join(dir, "src"), upper: filepath.Join(dir, "upper"), work: filepath.Join(dir, "work")}
	for _, d := range []string{e.src, e.upper, e.work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	open := func(p string) int {
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	e.srcFd, e.upFd = open(e.src), open(e.upper)
	wk, err := cow.PrepareWork(open(e.work))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(wk) })
	e.wkFd = wk
	ns := whiteout.User
	if os.Geteuid() == 0 {
		ns = whiteout.Trusted
	}
	e.c = cow.New(cow.Options{WorkFd: wk, NS: ns})
	return e
}

func (e *env) copy(t *testing.T, name string) error {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstatat(e.srcFd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		t.Fatal(err)
	}
	return e.c.Object(context.Background(), e.srcFd, name, &st, e.upFd, name)
}

func (e *env) workEmpty(t *testing.T) {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(e.work, "work"))
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 0 {
		t.Errorf("work dir not empty: %v", ents)
	}
}

func TestCopyFileKeepsDataModeTimesXattrs(t *testing.T) {
	e := newEnv(t)
	p := filepath.Join(e.src, "f")
	data := bytes.Repeat([]byte("strata"), 100000)
	if err := os.WriteFile(p, data, 0o640); err != nil {
		t.Fatal(err)
	}
	unix.Setxattr(p, "user.color", []byte("blue"), 0)
	priv := "user.overlay.opaque"
	if os.Geteuid() == 0 {
		priv = "trusted.overlay.origin"
	}
	unix.Setxattr(p, priv, []byte("private"), 0)
	ts := []unix.Timespec{{Sec: 1000000000, Nsec: 5}, {Sec: 981173106, Nsec: 7}}
	if err := unix.UtimesNano(p, ts); err != nil {
		t.Fatal(err)
	}
	if err := e.copy(t, "f"); err != nil {
		t.Fatal(err)
	}
	q := filepath.Join(e.upper, "f")
	var s1, s2 unix.Stat_t
	unix.Lstat(p, &s1)
	unix.Lstat(q, &s2)
	got, err := os.ReadFile(q)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data differs (%v)", err)
	}
	if s1.Mode != s2.Mode || s1.Uid != s2.Uid || s1.Gid != s2.Gid {
		t.Errorf("mode/owner: got %o %d:%d, want %o %d:%d", s2.Mode, s2.Uid, s2.Gid, s1.Mode, s1.Uid, s1.Gid)
	}
	if s1.Mtim != s2.Mtim || s1.Atim != s2.Atim {
		t.Errorf("times: got %v %v, want %v %v", s2.Atim, s2.Mtim, s1.Atim, s1.Mtim)
	}
	buf := make([]byte, 64)
	if n, err := unix.Lgetxattr(q, "user.color", buf); err != nil || string(buf[:n]) != "blue" {
		t.Errorf("user.color: %q, %v", buf[:n], err)
	}
	if _, err := unix.Lgetxattr(q, priv, buf); !errors.Is(err, unix.ENODATA) {
		t.Errorf("private xattr %s copied (err %v)", priv, err)
	}
	e.workEmpty(t)
}

func TestCopyKeepsHoles(t *testing.T) {
	e := newEnv(t)
	p := filepath.Join(e.src, "sparse")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	// 64 MiB file with 4 KiB of data at 1 MiB and at the end.
	if _, err := f.WriteAt(bytes.Repeat([]byte{1}, 4096), 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{2}, 4096), 64<<20-4096); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := e.copy(t, "sparse"); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	unix.Stat(filepath.Join(e.upper, "sparse"), &st)
	if st.Size != 64<<20 {
		t.Fatalf("size %d", st.Size)
	}
	if st.Blocks*512 > 1<<20 {
		t.Errorf("copy uses %d bytes of disk for 8 KiB of data: holes were filled", st.Blocks*512)
	}
	got, _ := os.ReadFile(filepath.Join(e.upper, "sparse"))
	want, _ := os.ReadFile(p)
	if !bytes.Equal(got, want) {
		t.Errorf("sparse data differs")
	}
	// A hole is reported where the source had one.
	fd, _ := unix.Open(filepath.Join(e.upper, "sparse"), unix.O_RDONLY, 0)
	defer unix.Close(fd)
	if off, err := unix.Seek(fd, 0, unix.SEEK_DATA); err != nil || off < 1<<19 {
		t.Errorf("SEEK_DATA from 0 = %d, %v; want the data at 1 MiB (a hole before it)", off, err)
	}
}

func TestCopySpecialFiles(t *testing.T) {
	e := newEnv(t)
	if err := os.Symlink("../target", filepath.Join(e.src, "link")); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(e.src, "fifo"), 0o620); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Join(e.src, "fifo"), 0o620)
	if err := os.Mkdir(filepath.Join(e.src, "dir"), 0o1750); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Join(e.src, "dir"), 0o1750|os.ModeSticky)
	os.WriteFile(filepath.Join(e.src, "dir", "inside"), []byte("x"), 0o644)
	for _, n := range []string{"link", "fifo", "dir"} {
		if err := e.copy(t, n); err != nil {
			t.Fatalf("%s: %v", n, err)
		}
	}
	if tgt, err := os.Readlink(filepath.Join(e.upper, "link")); err != nil || tgt != "../target" {
		t.Errorf("symlink: %q, %v", tgt, err)
	}
	var st unix.Stat_t
	unix.Lstat(filepath.Join(e.upper, "fifo"), &st)
	if st.Mode != unix.S_IFIFO|0o620 {
		t.Errorf("fifo mode %o", st.Mode)
	}
	unix.Lstat(filepath.Join(e.upper, "dir"), &st)
	if st.Mode&0o7777 != 0o1750 {
		t.Errorf("dir mode %o, want 1750", st.Mode&0o7777)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.upper, "dir")); len(ents) != 0 {
		t.Errorf("directory copied with its contents: %v", ents)
	}
	e.workEmpty(t)
}

func TestCopySetuidKeptAfterChown(t *testing.T) {
	testenv.RequireRoot(t)
	e := newEnv(t)
	p := filepath.Join(e.src, "suid")
	os.WriteFile(p, []byte("#!/bin/sh\n"), 0o755)
	os.Chown(p, 1000, 1000)
	os.Chmod(p, 0o6755|os.ModeSetuid|os.ModeSetgid)
	if err := e.copy(t, "suid"); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	unix.Lstat(filepath.Join(e.upper, "suid"), &st)
	if st.Mode&0o7777 != 0o6755 || st.Uid != 1000 || st.Gid != 1000 {
		t.Errorf("got mode %o owner %d:%d, want 6755 1000:1000", st.Mode&0o7777, st.Uid, st.Gid)
	}
}

func TestFailureLeavesNothing(t *testing.T) {
	e := newEnv(t)
	os.WriteFile(filepath.Join(e.src, "f"), []byte("data"), 0o644)
	// The destination name exists: the rename into place must fail, and
	// the half-built copy must not stay behind in the work dir.
	os.WriteFile(filepath.Join(e.upper, "f"), []byte("other"), 0o644)
	if err := e.copy(t, "f"); !errors.Is(err, unix.EEXIST) {
		t.Fatalf("got %v, want EEXIST", err)
	}
	if got, _ := os.ReadFile(filepath.Join(e.upper, "f")); string(got) != "other" {
		t.Errorf("existing upper file changed: %q", got)
	}
	e.workEmpty(t)

	// An unreadable source (as a non-owner without privilege) fails before
	// anything shows in the upper dir.
	os.WriteFile(filepath.Join(e.src, "g"), []byte("data"), 0o644)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var st unix.Stat_t
	unix.Fstatat(e.srcFd, "g", &st, 0)
	if err := e.c.Object(ctx, e.srcFd, "g", &st, e.upFd, "g"); err == nil {
		t.Fatal("copy with a cancelled context succeeded")
	}
	if _, err := os.Lstat(filepath.Join(e.upper, "g")); !os.IsNotExist(err) {
		t.Errorf("partial copy visible in upper: %v", err)
	}
	e.workEmpty(t)
}

func TestPrepareWorkClearsLeftovers(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "work", "#stale-dir", "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "work", "#stale-dir", "sub", "f"), nil, 0o644)
	os.WriteFile(filepath.Join(dir, "work", "#stale-file"), []byte("half"), 0o644)
	os.Chmod(filepath.Join(dir, "work", "#stale-dir"), 0)
	fd, _ := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	defer unix.Close(fd)
	wk, err := cow.PrepareWork(fd)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(wk)
	if ents, _ := os.ReadDir(filepath.Join(dir, "work")); len(ents) != 0 {
		t.Errorf("leftovers kept: %v", ents)
	}
}

func BenchmarkCopyData(b *testing.B) {
	dir := b.TempDir()
	src := filepath.Join(dir, "src")
	os.WriteFile(src, bytes.Repeat([]byte("0123456789abcdef"), 1<<16), 0o644) // 1 MiB
	sfd, _ := unix.Open(src, unix.O_RDONLY, 0)
	defer unix.Close(sfd)
	b.SetBytes(1 << 20)
	for i := 0; i < b.N; i++ {
		dst := filepath.Join(dir, "dst")
		dfd, err := unix.Open(dst, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC, 0o644)
		if err != nil {
			b.Fatal(err)
		}
		if err := cow.CopyData(context.Background(), dfd, sfd, 1<<20); err != nil {
			b.Fatal(err)
		}
		unix.Close(dfd)
		os.Remove(dst)
	}
}
