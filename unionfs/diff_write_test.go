package unionfs_test

import (
	"fmt"
	"path"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	ut "strata/internal/uniontest"
)

// TestDiffWrite runs the write-side differential cases: every operation on
// every kind of target (lower-only at several depths and layers,
// upper-only, merged, whiteout-shadowed), then the hand-written scenarios
// of the overlay rules (copy-up, whiteouts, opaque dirs, rename, links,
// special files, locks, sparse files).
func TestDiffWrite(t *testing.T) {
	ut.RunAll(t, append(matrixCases(), writeCases()...))
}

// stdLowers is the fixture of the operation matrix: three lowers, topmost
// first, with a merged dir m, files in one layer each, a file in every
// layer, whiteouts in a lower and in the upper, a lower-only chain of
// depth 6, and dirs of every kind.
func stdLowers() []ut.Layer {
	return []ut.Layer{
		{
			ut.File("m/top", "top", 0o644), ut.Xattr("m/top", "user.x", "top"),
			ut.File("m/all", "all-l0", 0o640), ut.Xattr("m/all", "user.x", "l0"),
			ut.Whiteout("m/wo"),
			ut.Dir("md", 0o755), ut.File("md/l0", "l0", 0o644),
		},
		{
			ut.File("m/all", "all-l1", 0o600),
			ut.File("m/wo", "hidden", 0o644), ut.Xattr("m/wo", "user.x", "hidden"),
			ut.Dir("md", 0o700), ut.File("md/l1", "l1", 0o644), ut.Xattr("md/l1", "user.x", "l1"),
		},
		{
			ut.File("m/bot", "bot", 0o600), ut.Xattr("m/bot", "user.x", "bot"), ut.Chown("m/bot", 5, 6),
			ut.File("m/all", "all-l2", 0o666),
			ut.File("m/uwo", "hidden", 0o644), ut.Xattr("m/uwo", "user.x", "hidden"),
			ut.File("deep/a/b/c/d/e/f", "deep", 0o644), ut.Xattr("deep/a/b/c/d/e/f", "user.x", "deep"),
			ut.Chown("deep/a/b", 7, 8), ut.Xattr("deep/a/b/c", "user.c", "1"), ut.Chmod("deep/a/b/c/d", 0o700),
			ut.Dir("m/dbot", 0o755), ut.File("m/dbot/y", "y", 0o644), ut.Xattr("m/dbot", "user.x", "dbot"),
			ut.Dir("m/empty", 0o755), ut.Xattr("m/empty", "user.x", "empty"),
			ut.Dir("m/wdir", 0o755), ut.File("m/wdir/z", "z", 0o644),
			ut.Dir("md", 0o755), ut.File("md/l2", "l2", 0o644), ut.Xattr("md", "user.x", "md"),
			ut.Dir("o", 0o755), ut.File("o/hidden", "h", 0o644),
		},
	}
}

func stdUpper() ut.Layer {
	return ut.Layer{
		ut.File("m/all", "all-upper", 0o604), ut.Xattr("m/all", "user.x", "upper"),
		ut.File("u/f", "upper only", 0o644), ut.Xattr("u/f", "user.x", "u"), ut.Xattr("u", "user.x", "u"),
		ut.Whiteout("m/uwo"), ut.Whiteout("m/wdir"),
		ut.Opaque("o"), ut.File("o/new", "n", 0o644), ut.Xattr("o", "user.x", "o"),
	}
}

// fileTargets are the non-directory names of the matrix, by kind.
var fileTargets = []struct{ kind, path string }{
	{"lower-top", "m/top"},
	{"lower-bottom", "m/bot"},
	{"lower-deep", "deep/a/b/c/d/e/f"},
	{"lower-merged-parent", "md/l1"},
	{"upper-only", "u/f"},
	{"merged", "m/all"},
	{"whiteout-in-lower", "m/wo"},
	{"whiteout-in-upper", "m/uwo"},
}

// dirTargets are the directories of the matrix, by kind.
var dirTargets = []struct{ kind, path string }{
	{"lower", "m/dbot"},
	{"lower-empty", "m/empty"},
	{"lower-deep", "deep/a/b/c"},
	{"merged-lowers", "md"},
	{"merged-upper", "m"},
	{"upper-only", "u"},
	{"opaque-upper", "o"},
	{"whiteout-in-upper", "m/wdir"},
}

var (
	t1 = time.Date(2005, 6, 7, 8, 9, 10, 111, time.UTC)
	t2 = time.Date(2006, 7, 8, 9, 10, 11, 222, time.UTC)
)

// fileOps are applied to every file target.
var fileOps = []struct {
	name string
	do   func(r *ut.Recorder, p string)
}{
	{"open-wronly", func(r *ut.Recorder, p string) {
		f := r.Open(p, unix.O_WRONLY, 0)
		f.Write("W")
		f.Close()
	}},
	{"open-rdwr", func(r *ut.Recorder, p string) {
		f := r.Open(p, unix.O_RDWR, 0)
		f.Read(2)
		f.Write("RW")
		f.Fstat()
		f.Pread(100, 0)
		f.Close()
	}},
	{"open-trunc", func(r *ut.Recorder, p string) {
		f := r.Open(p, unix.O_WRONLY|unix.O_TRUNC, 0)
		f.Fstat()
		f.Write("T")
		f.Close()
	}},
	{"open-append", func(r *ut.Recorder, p string) {
		f := r.Open(p, unix.O_WRONLY|unix.O_APPEND, 0)
		f.Write("+A")
		f.Lseek(0, unix.SEEK_CUR)
		f.Close()
	}},
	{"open-rdonly", func(r *ut.Recorder, p string) {
		f := r.Open(p, unix.O_RDONLY, 0)
		f.Read(100)
		f.Write("x") // EBADF
		f.Close()
	}},
	{"create-excl", func(r *ut.Recorder, p string) { r.Create(p, 0o600) }},
	{"create-trunc", func(r *ut.Recorder, p string) { r.WriteFile(p, "created") }},
	{"chmod", func(r *ut.Recorder, p string) { r.Chmod(p, 0o751) }},
	{"chown", func(r *ut.Recorder, p string) { r.Chown(p, 42, 43) }},
	{"truncate-shrink", func(r *ut.Recorder, p string) { r.Truncate(p, 1) }},
	{"truncate-grow", func(r *ut.Recorder, p string) { r.Truncate(p, 3<<20); r.Extents(p) }},
	{"utimens", func(r *ut.Recorder, p string) { r.Utimens(p, ut.TS(t1), ut.TS(t2), 0); r.Times(p) }},
	{"utimens-now", func(r *ut.Recorder, p string) { r.Utimens(p, ut.UTimeNow, ut.UTimeNow, 0); r.Times(p) }},
	{"utimens-omit", func(r *ut.Recorder, p string) {
		r.Utimens(p, ut.TS(t1), ut.UTimeOmit, 0)
		r.Times(p)
		r.Utimens(p, ut.UTimeOmit, ut.TS(t2), 0)
		r.Times(p)
	}},
	{"setxattr", func(r *ut.Recorder, p string) {
		r.Setxattr(p, "user.new", "v", 0)
		r.Setxattr(p, "user.x", "replaced", unix.XATTR_REPLACE)
		r.Setxattr(p, "user.x", "again", unix.XATTR_CREATE)
	}},
	{"removexattr", func(r *ut.Recorder, p string) { r.Removexattr(p, "user.x"); r.Removexattr(p, "user.x") }},
	{"unlink", func(r *ut.Recorder, p string) { r.Unlink(p); r.Unlink(p) }},
	{"rename-same-dir", func(r *ut.Recorder, p string) { r.Rename(p, p+".renamed") }},
	{"rename-to-upper-dir", func(r *ut.Recorder, p string) { r.Rename(p, "u/moved") }},
	{"rename-to-merged-dir", func(r *ut.Recorder, p string) { r.Rename(p, "m/moved") }},
	{"rename-over-lower", func(r *ut.Recorder, p string) { r.Rename(p, "m/bot") }},
	{"rename-over-upper", func(r *ut.Recorder, p string) { r.Rename(p, "u/f") }},
	{"link", func(r *ut.Recorder, p string) {
		r.Link(p, p+".link")
		r.Lstat(p + ".link")
		r.SameFile(p, p+".link")
	}},
	{"link-to-upper-dir", func(r *ut.Recorder, p string) { r.Link(p, "u/linked"); r.Lstat("u/linked") }},
	{"link-onto", func(r *ut.Recorder, p string) { r.Link("m/top", p) }},
	{"mkdir-over", func(r *ut.Recorder, p string) { r.Mkdir(p, 0o700); r.Explore(p) }},
	{"mknod-over", func(r *ut.Recorder, p string) { r.Mknod(p, unix.S_IFIFO|0o640, 0) }},
	{"symlink-over", func(r *ut.Recorder, p string) { r.Symlink("target", p); r.Readlink(p) }},
	{"fsync", func(r *ut.Recorder, p string) {
		f := r.Open(p, unix.O_RDONLY, 0)
		f.Fsync()
		f.Close()
		g := r.Open(p, unix.O_RDWR, 0)
		g.Pwrite("S", 0)
		g.Fsync()
		g.Fdatasync()
		g.Close()
	}},
	{"fallocate", func(r *ut.Recorder, p string) {
		f := r.Open(p, unix.O_RDWR, 0)
		f.Fallocate(0, 0, 8192)
		f.Fallocate(unix.FALLOC_FL_KEEP_SIZE, 8192, 8192)
		f.Fstat()
		f.Fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
		f.Extents()
		f.Close()
	}},
	{"copy-file-range", func(r *ut.Recorder, p string) {
		in := r.Open(p, unix.O_RDONLY, 0)
		out := r.Open("u/copy", unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, 0o644)
		in.CopyFileRange(0, out, 0, 1000)
		out.Close()
		in.Close()
		back := r.Open(p, unix.O_RDWR, 0)
		src := r.Open("u/f", unix.O_RDONLY, 0)
		src.CopyFileRange(0, back, 2, 5)
		src.Close()
		back.Close()
	}},
	{"locks", func(r *ut.Recorder, p string) {
		a := r.Open(p, unix.O_RDWR, 0)
		b := r.Open(p, unix.O_RDONLY, 0)
		a.Flock(unix.LOCK_EX | unix.LOCK_NB)
		b.Flock(unix.LOCK_SH | unix.LOCK_NB)
		a.Flock(unix.LOCK_UN)
		b.Flock(unix.LOCK_SH | unix.LOCK_NB)
		a.SetLk(unix.F_WRLCK, 0, 10)
		b.SetLk(unix.F_RDLCK, 5, 10)
		b.GetLk(unix.F_RDLCK, 0, 0)
		a.SetLk(unix.F_UNLCK, 0, 10)
		b.SetLk(unix.F_RDLCK, 5, 10)
		a.Close()
		b.Close()
	}},
}

// dirOps are applied to every directory target.
var dirOps = []struct {
	name string
	do   func(r *ut.Recorder, p string)
}{
	{"rmdir", func(r *ut.Recorder, p string) { r.Rmdir(p) }},
	{"empty-then-rmdir", func(r *ut.Recorder, p string) {
		for _, n := range listNames(r, p) {
			r.Unlink(p + "/" + n)
		}
		r.ReadDir(p)
		r.Rmdir(p)
		r.Lstat(p)
	}},
	{"rename-sibling", func(r *ut.Recorder, p string) { r.Rename(p, p+".renamed") }},
	{"rename-into-upper-dir", func(r *ut.Recorder, p string) { r.Rename(p, "u/movedir") }},
	{"rename-over-empty-lower-dir", func(r *ut.Recorder, p string) { r.Rename(p, "m/empty") }},
	{"chmod", func(r *ut.Recorder, p string) { r.Chmod(p, 0o711) }},
	{"chown", func(r *ut.Recorder, p string) { r.Chown(p, 44, 45) }},
	{"utimens", func(r *ut.Recorder, p string) { r.Utimens(p, ut.TS(t1), ut.TS(t2), 0); r.Times(p) }},
	{"setxattr", func(r *ut.Recorder, p string) { r.Setxattr(p, "user.new", "v", 0); r.Removexattr(p, "user.x") }},
	{"create-child", func(r *ut.Recorder, p string) { r.Create(p+"/new", 0o640); r.ReadDir(p) }},
	{"mkdir-child", func(r *ut.Recorder, p string) { r.Mkdir(p+"/newdir", 0o750); r.ReadDir(p) }},
	{"symlink-child", func(r *ut.Recorder, p string) { r.Symlink("x", p+"/sym"); r.ReadDir(p) }},
	{"mkdir-over", func(r *ut.Recorder, p string) { r.Mkdir(p, 0o700); r.ReadDir(p) }},
	{"unlink-dir", func(r *ut.Recorder, p string) { r.Unlink(p) }},
	{"move-children-out", func(r *ut.Recorder, p string) {
		for i, n := range listNames(r, p) {
			r.Rename(p+"/"+n, fmt.Sprintf("u/out%d", i))
		}
		r.ReadDir(p)
		r.Rmdir(p)
	}},
}

// listNames lists a directory of the mount (for ops that act on each
// entry); the listing itself is logged.
func listNames(r *ut.Recorder, p string) []string {
	r.ReadDir(p)
	fd, err := unix.Open(r.Path(p), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	defer unix.Close(fd)
	buf := make([]byte, 64<<10)
	var names []string
	for {
		n, err := unix.Getdents(fd, buf)
		if err != nil || n == 0 {
			break
		}
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
	sort.Strings(names)
	return names
}

// matrixCases crosses every operation with every target kind.
func matrixCases() []ut.Case {
	var cases []ut.Case
	for _, op := range fileOps {
		for _, tg := range fileTargets {
			cases = append(cases, ut.Case{
				Name:   "file-" + op.name + "-" + tg.kind,
				Lowers: stdLowers(),
				Upper:  stdUpper(),
				Ops: func(r *ut.Recorder, mnt string) {
					op.do(r, tg.path)
					r.Explore(tg.path, path.Dir(tg.path))
				},
			})
		}
	}
	for _, op := range dirOps {
		for _, tg := range dirTargets {
			cases = append(cases, ut.Case{
				Name:   "dir-" + op.name + "-" + tg.kind,
				Lowers: stdLowers(),
				Upper:  stdUpper(),
				Ops: func(r *ut.Recorder, mnt string) {
					op.do(r, tg.path)
					r.Explore(tg.path, path.Dir(tg.path))
				},
			})
		}
	}
	return cases
}

// writeCases are scenarios of the overlay rules that a matrix does not
// reach.
func writeCases() []ut.Case {
	var cases []ut.Case
	add := func(c ut.Case) { cases = append(cases, c) }
	long := deepDirs(24, 200)

	add(ut.Case{
		Name:   "create-deep-copies-parent-chain",
		Lowers: []ut.Layer{{ut.File("a/b/c/d/e/f/g/h/old", "old", 0o644), ut.Chmod("a/b/c", 0o750), ut.Chown("a/b/c/d", 3, 4), ut.Xattr("a/b", "user.b", "b"), ut.Xattr("a/b/c/d/e", "trusted.e", "e")}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Create("a/b/c/d/e/f/g/h/new", 0o644)
			r.Explore("a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e/f/g/h")
		},
	})
	add(ut.Case{
		Name: "create-parent-chain-across-three-lowers",
		Lowers: []ut.Layer{
			{ut.File("a/b/c/top", "t", 0o644), ut.Chmod("a/b/c", 0o700)},
			{ut.File("a/b/mid", "m", 0o644), ut.Chmod("a/b", 0o711), ut.Chown("a/b", 9, 9)},
			{ut.File("a/bot", "b", 0o644), ut.Chmod("a", 0o751), ut.File("a/b/c/bot", "b", 0o644)},
		},
		Upper: ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.WriteFile("a/b/c/new", "new")
			r.Explore("a", "a/b", "a/b/c")
		},
	})
	add(ut.Case{
		Name:   "create-past-PATH_MAX",
		Lowers: []ut.Layer{{ut.File(long+"/old", "old", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Do("openat walk, create and write new, read old", func() (string, error) {
				fd, err := r.OpenDirs(long)
				if err != nil {
					return "", err
				}
				defer unix.Close(fd)
				f, err := unix.Openat(fd, "new", unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o640)
				if err != nil {
					return "", err
				}
				unix.Write(f, []byte("deep new"))
				unix.Close(f)
				if err := unix.Fchmodat(fd, "old", 0o600, 0); err != nil {
					return "", err
				}
				if err := unix.Mkdirat(fd, "sub", 0o755); err != nil {
					return "", err
				}
				return "", unix.Renameat(fd, "old", fd, "sub/moved")
			})
			r.Do("fchdir to the deepest dir, unlink and symlink relative", func() (string, error) {
				fd, err := r.OpenDirs(long)
				if err != nil {
					return "", err
				}
				defer unix.Close(fd)
				return ut.InDir(fd, func() (string, error) {
					if err := unix.Symlink("new", "sym"); err != nil {
						return "", err
					}
					return "", unix.Link("new", "hard")
				})
			})
		},
	})
	add(ut.Case{
		Name:   "create-over-whiteout-in-middle-lower",
		Lowers: []ut.Layer{{ut.File("d/t", "t", 0o644)}, {ut.Whiteout("d/f"), ut.Whiteout("d/g")}, {ut.File("d/f", "hidden", 0o644), ut.Dir("d/g", 0o755), ut.File("d/g/x", "x", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.WriteFile("d/f", "new")
			r.Mkdir("d/g", 0o755)
			r.Explore("d", "d/f", "d/g")
		},
	})
	add(ut.Case{
		Name:   "create-in-whiteout-shadowed-dir",
		Lowers: []ut.Layer{{ut.Whiteout("gone")}, {ut.File("gone/f", "hidden", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Create("gone/new", 0o644)
			r.Mkdir("gone/newdir", 0o755)
			r.Lstat("gone")
		},
	})
	add(ut.Case{
		Name:   "create-in-opaque-lower-dir",
		Lowers: []ut.Layer{{ut.Opaque("o"), ut.File("o/top", "t", 0o644)}, {ut.File("o/hidden", "h", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Create("o/hidden", 0o644)
			r.Explore("o")
		},
	})
	add(ut.Case{
		Name:   "mkdir-over-whiteout-is-opaque",
		Lowers: []ut.Layer{{ut.File("d/f", "f", 0o644), ut.File("d/sub/x", "x", 0o644)}},
		Upper:  ut.Layer{ut.Whiteout("d")},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Mkdir("d", 0o750)
			r.Explore("d")
			r.Lstat("d/f")
			r.Create("d/f", 0o600)
			r.ReadDir("d")
		},
	})
	add(ut.Case{
		Name:   "unlink-rmdir-then-recreate",
		Lowers: []ut.Layer{{ut.File("f", "lower", 0o644), ut.File("d/x", "x", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Unlink("f")
			r.WriteFile("f", "again")
			r.Unlink("f")
			r.Lstat("f")
			r.Mkdir("f", 0o700)
			r.Unlink("d/x")
			r.Rmdir("d")
			r.Mkdir("d", 0o755)
			r.ReadDir("d")
			r.Rmdir("d")
			r.WriteFile("d", "file where a dir was")
			r.Explore("", "f", "d")
		},
	})
	add(ut.Case{
		Name: "mknod-kinds",
		Lowers: []ut.Layer{
			{ut.File("d/f", "", 0o644)},
		},
		Upper: ut.Layer{ut.Whiteout("wo")},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Mknod("d/fifo", unix.S_IFIFO|0o640, 0)
			r.Mknod("d/wh", unix.S_IFCHR, 0)        // a whiteout: EPERM through overlay
			r.Mknod("d/wh2", unix.S_IFCHR|0o644, 0) // same with a mode
			r.Mknod("d/null", unix.S_IFCHR|0o666, unix.Mkdev(1, 3))
			r.Mknod("d/blk", unix.S_IFBLK|0o600, unix.Mkdev(7, 9))
			r.Mknod("d/sock", unix.S_IFSOCK|0o755, 0)
			r.Mknod("d/reg", unix.S_IFREG|0o604, 0)
			r.Mknod("wo", unix.S_IFIFO|0o600, 0)
			r.Mknod("d/f", unix.S_IFIFO|0o600, 0)
			r.Explore("d", "wo")
		},
	})
	add(ut.Case{
		Name:   "link-lower-file-nlink-two",
		Lowers: []ut.Layer{{ut.File("a/f", "content", 0o640), ut.Chown("a/f", 3, 4)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.InoOf("f", "a/f")
			r.Link("a/f", "b/f") // ENOENT: no dir b
			r.Link("a/f", "a/g")
			r.Link("a/f", "h")
			r.Lstat("a/f")
			r.Lstat("a/g")
			r.Lstat("h")
			r.SameFile("a/f", "h")
			r.SameIno("f", "a/g")
			r.WriteFlags("a/g", unix.O_WRONLY|unix.O_APPEND, 0, "+g")
			r.ReadFile("h")
			r.Unlink("a/f")
			r.Lstat("h")
		},
	})
	add(ut.Case{
		Name:   "link-breaks-lower-hard-links",
		Lowers: []ut.Layer{{ut.File("a", "shared", 0o644), ut.Link("b", "a"), ut.Link("c", "a")}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Link("a", "a2")
			r.Explore("a", "a2", "b", "c")
			r.SameFile("a", "b")
			r.WriteFlags("b", unix.O_WRONLY|unix.O_APPEND, 0, "+b")
			r.Explore("a", "b", "c")
			r.SameFile("b", "c")
		},
	})
	add(ut.Case{
		Name:   "link-special-files-and-dirs",
		Lowers: []ut.Layer{{ut.Symlink("s", "t"), ut.Fifo("p"), ut.CharDev("c", 1, 3), ut.Dir("d", 0o755)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Link("s", "s2")
			r.Link("p", "p2")
			r.Link("c", "c2")
			r.Link("d", "d2") // EPERM
			r.Explore("s2", "p2", "c2")
		},
	})
	add(ut.Case{
		Name:   "unlink-open-lower-file-nlink-zero",
		Lowers: []ut.Layer{{ut.File("f", "still readable", 0o644)}, {ut.File("g", "gg", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			f := r.Open("f", unix.O_RDONLY, 0)
			g := r.Open("g", unix.O_RDWR, 0)
			r.Unlink("f")
			r.Unlink("g")
			f.Fstat()
			f.Pread(100, 0)
			g.Fstat()
			g.Pwrite("written after unlink", 0)
			g.Pread(100, 0)
			f.Close()
			g.Close()
			r.ReadDir("")
		},
	})
	add(ut.Case{
		Name: "remove-open-dirs-fstat",
		Lowers: []ut.Layer{
			{ut.Dir("lower", 0o750), ut.Dir("merged", 0o755), ut.Dir("victim", 0o711), ut.Chmod("victim", 0o711)},
			{ut.Dir("merged", 0o700), ut.File("merged/.keep", "", 0o644)},
		},
		Upper: ut.Layer{ut.Dir("upper", 0o705), ut.Dir("src", 0o755)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Unlink("merged/.keep")
			dirs := []string{"lower", "merged", "upper", "victim"}
			var hs []*ut.Handle
			for _, d := range dirs {
				hs = append(hs, r.Open(d, unix.O_RDONLY|unix.O_DIRECTORY, 0))
			}
			r.Rmdir("lower")
			r.Rmdir("merged")
			r.Rmdir("upper")
			r.Rename("src", "victim")
			for _, h := range hs {
				h.Fstat()
				h.Close()
			}
			r.ReadDir("")
		},
	})
	add(ut.Case{
		Name:   "unlink-one-of-lower-hard-links",
		Lowers: []ut.Layer{{ut.File("a", "x", 0o644), ut.Link("b", "a")}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Unlink("a")
			r.Explore("", "b")
		},
	})
	add(ut.Case{
		Name: "rmdir-merged-only-whiteouts-left",
		Lowers: []ut.Layer{
			{ut.File("d/a", "a", 0o644), ut.Whiteout("d/gone")},
			{ut.File("d/b", "b", 0o644), ut.File("d/gone", "g", 0o644), ut.Dir("d/sub", 0o755)},
		},
		Upper: ut.Layer{ut.File("d/u", "u", 0o644)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Unlink("d/a")
			r.Rmdir("d") // ENOTEMPTY
			r.Unlink("d/b")
			r.Unlink("d/u")
			r.Rmdir("d") // ENOTEMPTY: sub
			r.Rmdir("d/sub")
			r.ReadDir("d")
			r.Rmdir("d")
			r.Lstat("d")
			r.ReadDir("")
		},
	})
	add(ut.Case{
		Name:   "rmdir-opaque-dir-over-lower",
		Lowers: []ut.Layer{{ut.File("d/hidden", "h", 0o644)}},
		Upper:  ut.Layer{ut.Opaque("d"), ut.File("d/x", "x", 0o644)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Rmdir("d")
			r.Unlink("d/x")
			r.Rmdir("d")
			r.Lstat("d")
		},
	})
	add(ut.Case{
		Name:   "rmdir-deep-lower-chain",
		Lowers: []ut.Layer{{ut.Dir("a/b/c/d/e", 0o755)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Rmdir("a/b/c/d/e")
			r.Rmdir("a/b/c/d")
			r.Rmdir("a/b")
			r.Explore("a", "a/b", "a/b/c")
		},
	})
	add(ut.Case{
		Name:   "rename-noreplace-and-exchange",
		Lowers: []ut.Layer{{ut.File("a", "A", 0o644), ut.File("b", "B", 0o600), ut.Dir("dl", 0o755), ut.File("dl/x", "x", 0o644)}, {ut.File("c", "C", 0o644)}},
		Upper:  ut.Layer{ut.File("u", "U", 0o644), ut.Dir("du", 0o700), ut.File("du/y", "y", 0o644), ut.Whiteout("w")},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Rename2("a", "b", unix.RENAME_NOREPLACE) // EEXIST
			r.Rename2("a", "w", unix.RENAME_NOREPLACE) // over a whiteout: ok
			r.Rename2("b", "c", unix.RENAME_EXCHANGE)
			r.Rename2("u", "nothing", unix.RENAME_EXCHANGE) // ENOENT
			r.Rename2("u", "du", unix.RENAME_EXCHANGE)      // file <-> upper dir
			r.Rename2("du", "dl", unix.RENAME_EXCHANGE)     // lower dir: EXDEV
			r.Rename2("c", "c", unix.RENAME_EXCHANGE)
			r.Rename2("b", "w", unix.RENAME_EXCHANGE) // w is gone now? (renamed over)
			r.Rename2("b", "x", unix.RENAME_WHITEOUT)
			r.Explore("", "a", "b", "c", "w", "u", "du")
		},
	})
	add(ut.Case{
		Name:   "rename-dirs-EXDEV-and-upper",
		Lowers: []ut.Layer{{ut.File("lower/x", "x", 0o644), ut.File("merged/l", "l", 0o644)}},
		Upper:  ut.Layer{ut.File("merged/u", "u", 0o644), ut.File("up/sub/f", "f", 0o644), ut.Dir("up/sub2", 0o755)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Rename("lower", "lower2")
			r.Rename("merged", "merged2")
			r.Rename("up", "up2")
			r.Rename("up2/sub", "lower/sub") // into a lower dir: copies it up
			r.Rename("up2/sub2", "merged/sub2")
			r.Rename("up2", "merged/up2") // upper dir into a merged dir
			r.Explore("", "lower", "merged", "merged/up2")
		},
	})
	add(ut.Case{
		Name:   "rename-file-over-deleted-dir-name",
		Lowers: []ut.Layer{{ut.Dir("d", 0o755), ut.File("d/x", "x", 0o644), ut.File("f", "f", 0o644)}},
		Upper:  ut.Layer{ut.File("g", "g", 0o644)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Unlink("d/x")
			r.Rmdir("d")
			r.Rename("f", "d")
			r.Explore("", "d")
			r.Rename("g", "f") // over the whiteout f left behind
			r.Explore("f")
		},
	})
	add(ut.Case{
		Name:   "rename-dir-over-deleted-file-name",
		Lowers: []ut.Layer{{ut.File("f", "f", 0o644), ut.File("g", "g", 0o644)}},
		Upper:  ut.Layer{ut.File("nd/x", "x", 0o644)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Unlink("f")
			r.Rename("nd", "f")
			r.Explore("", "f")
			r.Mkdir("nd2", 0o755)
			r.Rename("nd2", "g") // ENOTDIR: g is a file
			r.Unlink("g")
			r.Rename("nd2", "g")
			r.Rmdir("g")
			r.Explore("")
		},
	})
	add(ut.Case{
		Name:   "rename-errors",
		Lowers: []ut.Layer{{ut.File("f", "f", 0o644), ut.Dir("d", 0o755), ut.Dir("e/sub", 0o755), ut.File("e/f", "", 0o644)}},
		Upper:  ut.Layer{ut.Dir("ud/in", 0o755), ut.Dir("ue", 0o755)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Rename("f", "d")        // EISDIR
			r.Rename("ud", "f")       // ENOTDIR
			r.Rename("ud", "ud/in/x") // EINVAL
			r.Rename("ud", "e")       // ENOTEMPTY (or EXDEV)
			r.Rename("ue", "d")       // over an empty lower dir
			r.Rename("missing", "x")
			r.Rename("f", "f")
			r.Explore("", "d")
		},
	})
	add(ut.Case{
		Name:   "rename-hard-link-onto-itself",
		Lowers: []ut.Layer{{ut.File("a", "a", 0o644), ut.Link("b", "a")}},
		Upper:  ut.Layer{ut.File("u1", "u", 0o644), ut.Link("u2", "u1")},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Rename("u1", "u2")
			r.Rename("a", "b")
			r.Explore("", "a", "b", "u1", "u2")
		},
	})
	add(ut.Case{
		Name:   "rename-within-opaque-and-new-dirs",
		Lowers: []ut.Layer{{ut.File("o/hidden", "h", 0o644), ut.File("n/hidden", "h", 0o644)}},
		Upper:  ut.Layer{ut.Opaque("o"), ut.File("o/f", "f", 0o644)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Rename("o/f", "o/g")
			r.Rename("o", "o2") // an opaque upper dir whose name a lower has
			r.Unlink("n/hidden")
			r.Rmdir("n")
			r.Mkdir("n", 0o755) // opaque: over a whiteout
			r.Create("n/f", 0o644)
			r.Rename("n", "n2")
			r.Explore("", "o", "o2", "n2")
		},
	})
	add(ut.Case{
		Name:   "metadata-copy-up-preserves-times",
		Lowers: []ut.Layer{{ut.File("f", "f", 0o644), ut.File("g", "g", 0o644), ut.File("h", "h", 0o644), ut.Dir("d", 0o755), ut.File("d/x", "x", 0o644), ut.Times("g", time.Date(2002, 1, 1, 0, 0, 0, 7, time.UTC), time.Date(2003, 1, 1, 0, 0, 0, 9, time.UTC))}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Chmod("f", 0o600)
			r.Chown("g", 1, 1)
			r.Setxattr("h", "user.a", "b", 0)
			r.Chmod("d/x", 0o600) // parent d copied up: its times too
			r.Times("f")
			r.Times("g")
			r.Times("h")
			r.Times("d")
		},
	})
	add(ut.Case{
		Name:   "utimens-symlink-and-special",
		Lowers: []ut.Layer{{ut.Symlink("s", "target"), ut.Fifo("p"), ut.File("target", "t", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Utimens("s", ut.TS(t1), ut.TS(t2), unix.AT_SYMLINK_NOFOLLOW)
			r.Times("s")
			r.Times("target")
			r.Utimens("p", ut.UTimeOmit, ut.TS(t2), 0)
			r.Times("p")
			r.Utimens("s", ut.TS(t1), ut.UTimeNow, 0) // follows to target
			r.Times("target")
		},
	})
	add(ut.Case{
		Name:   "setuid-setgid-kept-by-copy-up",
		Lowers: []ut.Layer{{ut.File("suid", "s", 0o4755), ut.File("sgid", "g", 0o2755), ut.File("both", "b", 0o6711), ut.Dir("sgd", 0o2775), ut.Dir("sticky", 0o1777), ut.File("sgd/x", "x", 0o644), ut.Chown("suid", 12, 13)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.WriteFlags("suid", unix.O_WRONLY|unix.O_APPEND, 0, "+") // root writes: bits kept (CAP_FSETID)
			r.Setxattr("sgid", "user.a", "b", 0)
			r.Utimens("both", ut.TS(t1), ut.TS(t2), 0)
			r.Create("sgd/new", 0o644) // inherits the group of a setgid dir
			r.Mkdir("sgd/newdir", 0o755)
			r.Create("sticky/new", 0o644)
			r.Explore("suid", "sgid", "both", "sgd", "sgd/new", "sgd/newdir", "sticky")
			r.Chown("suid", 12, 14) // chown clears setuid
			r.Lstat("suid")
		},
	})
	add(ut.Case{
		Name:   "symlink-copy-up-lchown",
		Lowers: []ut.Layer{{ut.Symlink("d/s", "../t"), ut.Chown("d/s", 5, 5), ut.File("t", "t", 0o644), ut.Symlink("s2", "t")}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Lchown("d/s", 6, 7)
			r.Chown("s2", 8, 9) // follows: the target is copied up
			r.Setxattr("d/s", "trusted.l", "v", 0)
			r.Explore("d", "d/s", "s2", "t")
		},
	})
	add(ut.Case{
		Name:   "fifo-and-device-copy-up",
		Lowers: []ut.Layer{{ut.Fifo("p"), ut.CharDev("c", 1, 5), ut.BlockDev("b", 7, 3), ut.Socket("s")}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Chmod("p", 0o600)
			r.Chown("c", 3, 3)
			r.Utimens("b", ut.TS(t1), ut.TS(t2), 0)
			r.Setxattr("s", "trusted.s", "v", 0)
			r.Rename("p", "p2")
			r.Explore("", "p2", "c", "b", "s")
		},
	})
	add(ut.Case{
		Name:   "sparse-file-copy-up",
		Lowers: []ut.Layer{{ut.SparseFile("s", 16<<20, map[int64]string{0: "head", 8 << 20: "middle", 16<<20 - 4: "tail"}, 0o644), ut.SparseFile("t", 1<<20, map[int64]string{}, 0o644)}},
		Upper:  ut.Layer{},
		// Where exactly a copy keeps holes depends on the copier's chunk
		// size (the kernel copies 1 MiB chunks, fs/overlayfs/copy_up.c
		// OVL_COPY_UP_CHUNK_SIZE) and is not compared: only that the
		// copy is still sparse, and its content.
		Ops: func(r *ut.Recorder, mnt string) {
			r.Extents("s")
			f := r.Open("s", unix.O_RDWR, 0)
			f.Pwrite("X", 4<<20)
			f.Pread(5, 8<<20)
			f.Close()
			r.Chmod("t", 0o600)
			r.Extents("t")
			r.Blocks("s")
			r.Blocks("t")
		},
	})
	add(ut.Case{
		Name: "xattrs-private-through-mount",
		Lowers: []ut.Layer{
			{ut.File("f", "f", 0o644), ut.Xattr("f", "user.l", "l"), ut.Xattr("f", "trusted.t", "t"), ut.Dir("d", 0o755), ut.Opaque("o")},
			{ut.File("o/x", "x", 0o644)},
		},
		Upper: ut.Layer{ut.File("u", "u", 0o644)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Setxattr("u", "trusted.overlay.opaque", "y", 0)
			r.Setxattr("d", "trusted.overlay.opaque", "y", 0)
			r.Setxattr("f", "trusted.overlay.foo", "bar", 0)
			r.Removexattr("o", "trusted.overlay.opaque")
			r.Getxattr("o", "trusted.overlay.opaque")
			r.Setxattr("u", "user.overlay.opaque", "y", 0)
			r.Setxattr("f", "trusted.t", "t2", 0)
			r.Removexattr("f", "user.l")
			r.Setxattr("f", "security.x", "s", 0)
			r.Setxattr("f", "bogus.x", "b", 0)
			r.Setxattr("f", "user.empty", "", 0)
			r.Explore("f", "d", "o", "u")
		},
	})
	add(ut.Case{
		Name:   "xattrs-kept-by-data-copy-up",
		Lowers: []ut.Layer{{ut.File("f", "f", 0o644), ut.Xattr("f", "user.a", "1"), ut.Xattr("f", "trusted.b", "2"), ut.Xattr("f", "user.big", strings.Repeat("z", 2000)), ut.Dir("d", 0o711), ut.Xattr("d", "user.d", "d"), ut.File("d/g", "g", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.WriteFlags("f", unix.O_WRONLY|unix.O_APPEND, 0, "+")
			r.Truncate("d/g", 0)
			r.Explore("f", "d", "d/g")
		},
	})
	add(ut.Case{
		Name:   "fd-opened-before-copy-up",
		Lowers: []ut.Layer{{ut.File("f", "old content", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			ro := r.Open("f", unix.O_RDONLY, 0)
			ro.Pread(3, 0)
			r.WriteFlags("f", unix.O_WRONLY, 0, "NEW")
			ro.Pread(100, 0)
			ro.Fstat()
			ro.Close()
			r.ReadFile("f")
		},
	})
	add(ut.Case{
		Name:   "ino-stable-across-copy-up",
		Lowers: []ut.Layer{{ut.File("a/f", "f", 0o644), ut.Dir("a/d", 0o755), ut.Symlink("a/s", "f")}, {ut.File("b", "b", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			for _, p := range []string{"a", "a/f", "a/d", "a/s", "b"} {
				r.InoOf(p, p)
			}
			r.Chmod("a/f", 0o600)
			r.Chmod("a/d", 0o700)
			r.Lchown("a/s", 1, 1)
			r.WriteFlags("b", unix.O_WRONLY|unix.O_APPEND, 0, "+")
			r.Rename("b", "a/b")
			for _, p := range []string{"a", "a/f", "a/d", "a/s"} {
				r.SameIno(p, p)
			}
			r.SameIno("b", "a/b")
		},
	})
	add(ut.Case{
		Name:   "tmpfile-in-lower-dir",
		Lowers: []ut.Layer{{ut.File("d/x", "x", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			f := r.Open("d", unix.O_TMPFILE|unix.O_RDWR, 0o600)
			f.Pwrite("tmp", 0)
			f.Fstat()
			f.Close()
			r.ReadDir("d")
		},
	})
	add(ut.Case{
		Name:   "write-then-rename-then-link",
		Lowers: []ut.Layer{{ut.File("a/f", "f", 0o644)}, {ut.File("b/g", "g", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.WriteFlags("a/f", unix.O_WRONLY|unix.O_APPEND, 0, "1")
			r.Rename("a/f", "b/f")
			r.Link("b/f", "a/f")
			r.WriteFlags("a/f", unix.O_WRONLY|unix.O_APPEND, 0, "2")
			r.Rename("b/g", "a/g")
			r.Rename("a/g", "b/g")
			r.Explore("a", "b", "a/f", "b/f", "b/g")
		},
	})
	add(ut.Case{
		Name:   "upper-only-tree-operations",
		Lowers: []ut.Layer{{}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Mkdir("a", 0o755)
			r.Mkdir("a/b", 0o700)
			r.WriteFile("a/b/f", "f")
			r.Symlink("b/f", "a/s")
			r.Link("a/b/f", "a/h")
			r.Rename("a/b", "a/c")
			r.Rename("a", "z")
			r.Unlink("z/h")
			r.Rmdir("z/c")
			r.Explore("z", "z/c", "z/c/f")
		},
	})
	add(ut.Case{
		Name:   "chmod-chown-directories-copy-up-only-the-dir",
		Lowers: []ut.Layer{{ut.File("d/x", "x", 0o644), ut.Dir("d/sub", 0o755), ut.Xattr("d", "user.d", "d")}, {ut.File("d/y", "y", 0o644)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Chmod("d", 0o700)
			r.Chown("d/sub", 1, 2)
			r.Stat("d")
			r.ReadDir("d")
		},
	})
	add(ut.Case{
		Name:   "truncate-via-open-handle-and-path",
		Lowers: []ut.Layer{{ut.File("f", "0123456789", 0o644), ut.File("g", "0123456789", 0o444)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			f := r.Open("f", unix.O_RDWR, 0)
			f.Ftruncate(4)
			f.Fstat()
			f.Ftruncate(20)
			f.Pread(30, 0)
			f.Close()
			r.Truncate("g", 3) // root ignores the mode
			r.Explore("f", "g")
		},
	})
	add(ut.Case{
		Name:   "fchmod-fchown-fsetxattr-on-lower-fds",
		Lowers: []ut.Layer{{ut.File("f", "f", 0o644), ut.File("g", "g", 0o640)}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			f := r.Open("f", unix.O_RDONLY, 0)
			f.Fchmod(0o600)
			f.Fchown(2, 3)
			f.Fsetxattr("user.f", "v")
			f.Fstat()
			f.Close()
			g := r.Open("g", unix.O_PATH, 0)
			g.Fstat()
			g.Close()
			r.Explore("f", "g")
		},
	})
	add(ut.Case{
		Name:   "many-whiteouts-share-nothing-visible",
		Lowers: []ut.Layer{manyFiles("d", 50)},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			for i := 0; i < 50; i++ {
				r.Unlink(fmt.Sprintf("d/f%02d", i))
			}
			r.ReadDir("d")
			r.Rmdir("d")
			r.ReadDir("")
		},
	})
	add(ut.Case{
		Name:   "append-and-o_excl-over-lower-symlink",
		Lowers: []ut.Layer{{ut.Symlink("s", "t"), ut.File("t", "t", 0o644), ut.Symlink("dangling", "nothere")}},
		Upper:  ut.Layer{},
		Ops: func(r *ut.Recorder, mnt string) {
			r.WriteFlags("s", unix.O_WRONLY|unix.O_APPEND, 0, "+s")          // follows to t
			r.WriteFlags("dangling", unix.O_WRONLY|unix.O_CREAT, 0o600, "c") // creates nothere
			r.Create("s", 0o644)                                             // EEXIST
			r.WriteFlags("s", unix.O_WRONLY|unix.O_NOFOLLOW, 0, "x")         // ELOOP
			r.Explore("", "t", "nothere", "s")
		},
	})
	add(ut.Case{
		// Changes inside a directory renamed by a kernel mount with
		// redirect_dir=on reach the lower copies the redirect names:
		// copy-up copies them (and a merged subdirectory's chain) from
		// there, unlink and rmdir leave whiteouts for them. A merged or
		// redirected directory still cannot move (EXDEV); one whose
		// redirect finds nothing is upper-only and moves.
		Name: "changes-in-redirected-dir",
		Lowers: []ut.Layer{
			{ut.File("old/x", "x", 0o644), ut.File("old/y", "y", 0o640), ut.File("old/sub/s", "s", 0o644), ut.Chmod("old/sub", 0o750),
				ut.Dir("old/empty", 0o700)},
			{ut.File("old/z", "z", 0o644), ut.File("old/sub/t", "t", 0o644)},
		},
		Upper: ut.Layer{ut.Dir("new", 0o755), ut.PrivateXattr("new", "redirect", "/old"), ut.Whiteout("old"),
			ut.Dir("lonely", 0o755), ut.PrivateXattr("lonely", "redirect", "/nothere")},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Unlink("new/x")
			r.WriteFlags("new/y", unix.O_WRONLY|unix.O_APPEND, 0, "+")
			r.Create("new/sub/deeper", 0o644)
			r.Unlink("new/sub/t")
			r.Rmdir("new/empty")
			r.Rename("new/z", "new/z2")
			r.Rename("new", "renamed")
			r.Rename("new/sub", "new/sub2")
			r.Rename("lonely", "lonely2")
			r.Explore("", "new", "new/y", "new/z2", "new/sub", "lonely2")
		},
	})
	return cases
}

func manyFiles(dir string, n int) ut.Layer {
	var l ut.Layer
	for i := 0; i < n; i++ {
		l = append(l, ut.File(fmt.Sprintf("%s/f%02d", dir, i), fmt.Sprint(i), 0o644))
	}
	return l
}
