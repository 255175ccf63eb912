package unionfs_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	ut "strata/internal/uniontest"
	"strata/whiteout"
)

// TestDiffRead runs the read-side differential cases: lookups, listings,
// attributes and content of merged trees, compared between kernel overlay
// and strata. Cases without an upper layer are read-only mounts, on which
// the harness also checks that every kind of write fails with EROFS.
func TestDiffRead(t *testing.T) { ut.RunAll(t, readCases()) }

// names with bytes that programs get wrong.
var oddNames = []string{
	"new\nline",
	"bad\xff\xfeutf8",
	strings.Repeat("n", 255),
	"-rf",
	"--help",
	"with space",
	"back\\slash",
	"co:lon,comma",
	"...",
	"\x01ctl",
	"ünï©ødé",
	".hidden",
}

// deepDirs returns a chain of n directory components of width bytes each,
// distinct per level.
func deepDirs(n, width int) string {
	parts := make([]string, n)
	for i := range parts {
		p := fmt.Sprintf("%03d", i)
		parts[i] = p + strings.Repeat("d", width-len(p))
	}
	return strings.Join(parts, "/")
}

// explorePaths logs lstat and content/listing/target/xattrs of each path.
func explorePaths(paths ...string) func(r *ut.Recorder, mnt string) {
	return func(r *ut.Recorder, mnt string) { r.Explore(paths...) }
}

func readCases() []ut.Case {
	deep := deepDirs(34, 8)   // depth 34
	long := deepDirs(24, 200) // > PATH_MAX (4096) in total
	var cases []ut.Case
	add := func(c ut.Case) { cases = append(cases, c) }

	add(ut.Case{
		Name: "shadow-file-two-lowers",
		Lowers: []ut.Layer{
			{ut.File("f", "top", 0o600), ut.Chown("f", 1, 2)},
			{ut.File("f", "bottom content", 0o644), ut.Xattr("f", "user.bottom", "1")},
		},
		Ops: explorePaths("", "f"),
	})
	add(ut.Case{
		Name: "shadow-three-lowers-and-upper",
		Lowers: []ut.Layer{
			{ut.File("f", "l0", 0o640), ut.File("g", "l0", 0o644), ut.Dir("d", 0o700)},
			{ut.File("f", "l1", 0o600), ut.File("g", "l1", 0o600), ut.File("h", "l1", 0o600), ut.File("d/x", "l1", 0o644)},
			{ut.File("f", "l2", 0o666), ut.File("h", "l2", 0o666), ut.File("i", "l2", 0o666), ut.File("d/x", "l2", 0o600)},
		},
		Upper: ut.Layer{ut.File("f", "upper", 0o604), ut.Xattr("f", "user.u", "up")},
		Ops:   explorePaths("", "f", "g", "h", "i", "d", "d/x"),
	})
	add(ut.Case{
		Name: "merged-dir-three-lowers",
		Lowers: []ut.Layer{
			{ut.File("m/a", "a0", 0o644), ut.File("m/sub/x", "x0", 0o644), ut.Chmod("m", 0o750)},
			{ut.File("m/b", "b1", 0o644), ut.File("m/a", "a1", 0o644), ut.File("m/sub/y", "y1", 0o644)},
			{ut.File("m/c", "c2", 0o644), ut.File("m/sub/z", "z2", 0o644), ut.File("m/sub/x", "x2", 0o644),
				ut.Chown("m", 5, 5), ut.Xattr("m", "user.bottom", "b")},
		},
		Ops: explorePaths("m", "m/a", "m/b", "m/c", "m/sub", "m/sub/x", "m/sub/y", "m/sub/z"),
	})
	add(ut.Case{
		Name: "whiteout-char-in-middle-lower",
		Lowers: []ut.Layer{
			{ut.File("d/top", "t", 0o644), ut.File("d/back", "over the whiteout", 0o644)},
			{ut.Whiteout("d/gone"), ut.Whiteout("d/back"), ut.Whiteout("d/nothing"), ut.File("d/mid", "m", 0o644)},
			{ut.File("d/gone", "hidden", 0o644), ut.File("d/back", "hidden", 0o644), ut.File("d/bottom", "b", 0o644)},
		},
		Ops: explorePaths("d", "d/top", "d/back", "d/gone", "d/nothing", "d/mid", "d/bottom"),
	})
	add(ut.Case{
		Name: "whiteout-xattr-in-middle-lower-marked-x",
		Lowers: []ut.Layer{
			{ut.File("d/top", "t", 0o644)},
			{ut.XattrWhiteout("d/gone"), ut.XattrWhiteout("d/nothing"), ut.File("d/mid", "m", 0o644)},
			{ut.File("d/gone", "hidden", 0o644), ut.File("d/bottom", "b", 0o644), ut.Dir("e", 0o755)},
		},
		Ops: explorePaths("d", "d/gone", "d/nothing", "d/mid", "d/bottom"),
	})
	add(ut.Case{
		// The kernel's lookup honours an xattr whiteout in any directory,
		// but readdir filters xattr whiteouts only in directories marked
		// "x" (fs/overlayfs/readdir.c): here the name is listed, yet
		// lookup says ENOENT.
		Name: "whiteout-xattr-in-unmarked-dir",
		Lowers: []ut.Layer{
			{ut.XattrWhiteoutOnly("d/gone"), ut.File("d/top", "t", 0o644)},
			{ut.File("d/gone", "hidden", 0o644), ut.File("d/bottom", "b", 0o644)},
		},
		Ops: explorePaths("d", "d/gone", "d/top"),
	})
	add(ut.Case{
		Name: "whiteout-xattr-in-upper",
		Lowers: []ut.Layer{
			{ut.File("d/gone", "hidden", 0o644), ut.File("d/kept", "k", 0o644)},
		},
		Upper: ut.Layer{ut.XattrWhiteout("d/gone")},
		Ops:   explorePaths("d", "d/gone", "d/kept"),
	})
	add(ut.Case{
		Name: "whiteout-hides-dir-and-subtree",
		Lowers: []ut.Layer{
			{ut.Whiteout("a/d"), ut.File("a/f", "f", 0o644)},
			{ut.File("a/d/x", "x", 0o644), ut.File("a/d/sub/y", "y", 0o644)},
		},
		Ops: explorePaths("a", "a/d", "a/d/x", "a/d/sub/y"),
	})
	add(ut.Case{
		Name: "whiteouts-in-upper-over-lowers",
		Lowers: []ut.Layer{
			{ut.File("a/f1", "1", 0o644), ut.File("a/f2", "2", 0o644), ut.Dir("a/d", 0o755)},
			{ut.File("a/f3", "3", 0o644), ut.File("a/d/x", "x", 0o644)},
		},
		Upper: ut.Layer{ut.Whiteout("a/f1"), ut.Whiteout("a/f3"), ut.Whiteout("a/d")},
		Ops:   explorePaths("a", "a/f1", "a/f2", "a/f3", "a/d", "a/d/x"),
	})
	add(ut.Case{
		Name: "opaque-dir-depth-1",
		Lowers: []ut.Layer{
			{ut.Opaque("o"), ut.File("o/new", "n", 0o644)},
			{ut.File("o/old", "o", 0o644), ut.Dir("o/olddir", 0o755), ut.File("keep", "k", 0o644)},
		},
		Ops: explorePaths("", "o", "o/new", "o/old", "o/olddir"),
	})
	add(ut.Case{
		Name: "opaque-dirs-at-several-depths",
		Lowers: []ut.Layer{
			{ut.Opaque("a/b/c"), ut.File("a/b/c/top", "t", 0o644), ut.Opaque("a/b/c/d/e/f")},
			{ut.File("a/b/mid", "m", 0o644), ut.File("a/b/c/d/e/f/g", "g", 0o644), ut.File("a/b/c/mid", "hidden", 0o644)},
			{ut.File("a/b/c/bottom", "hidden", 0o644), ut.File("a/b/bottom", "b", 0o644), ut.File("a/bottom", "b", 0o644)},
		},
		Ops: explorePaths("a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e/f", "a/b/c/d/e/f/g", "a/b/c/mid", "a/b/c/bottom"),
	})
	add(ut.Case{
		// An opaque mark in the lowest layer hides nothing; one on a layer
		// root is ignored by the kernel.
		Name: "opaque-in-bottom-layer-and-on-root",
		Lowers: []ut.Layer{
			{ut.Opaque(""), ut.File("top", "t", 0o644), ut.File("d/top", "t", 0o644)},
			{ut.File("bottom", "b", 0o644), ut.File("d/bottom", "b", 0o644), ut.Opaque("d")},
		},
		Ops: explorePaths("", "d", "bottom", "d/bottom"),
	})
	add(ut.Case{
		// Only "y" makes a directory opaque (and "x" only marks xattr
		// whiteouts): other values are ignored.
		Name: "opaque-values",
		Lowers: []ut.Layer{
			{ut.Dir("y", 0o755), ut.PrivateXattr("y", "opaque", "y"), ut.Dir("x", 0o755), ut.PrivateXattr("x", "opaque", "x"),
				ut.Dir("yes", 0o755), ut.PrivateXattr("yes", "opaque", "yes"), ut.Dir("n", 0o755), ut.PrivateXattr("n", "opaque", "n")},
			{ut.File("y/f", "f", 0o644), ut.File("x/f", "f", 0o644), ut.File("yes/f", "f", 0o644), ut.File("n/f", "f", 0o644)},
		},
		Ops: explorePaths("y", "x", "yes", "n"),
	})
	add(ut.Case{
		Name: "type-change-file-over-dir",
		Lowers: []ut.Layer{
			{ut.File("x", "file now", 0o644)},
			{ut.File("x/inner", "hidden", 0o644), ut.Dir("x/sub", 0o755)},
		},
		Ops: explorePaths("", "x", "x/inner"),
	})
	add(ut.Case{
		Name: "type-change-dir-over-file",
		Lowers: []ut.Layer{
			{ut.File("x/inner", "i", 0o644)},
			{ut.File("x", "hidden file", 0o644), ut.File("y/z", "z", 0o644)},
		},
		Ops: explorePaths("", "x", "x/inner"),
	})
	add(ut.Case{
		Name: "type-change-symlink-over-dir",
		Lowers: []ut.Layer{
			{ut.Symlink("x", "real"), ut.File("real/r", "r", 0o644)},
			{ut.File("x/inner", "hidden", 0o644)},
		},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("", "x", "x/inner", "real")
			r.Stat("x")
			r.ReadFile("x/r")
		},
	})
	add(ut.Case{
		// A non-directory in the middle stops the merge: the bottom
		// directory does not show through.
		Name: "dir-file-dir-stack",
		Lowers: []ut.Layer{
			{ut.File("d/top", "t", 0o644)},
			{ut.File("d", "middle file", 0o644)},
			{ut.File("d/bottom", "b", 0o644)},
		},
		Upper: ut.Layer{ut.File("d/up", "u", 0o644)},
		Ops:   explorePaths("d", "d/top", "d/bottom", "d/up"),
	})
	add(ut.Case{
		Name: "deep-tree-depth-34",
		Lowers: []ut.Layer{
			{ut.File(deep+"/top", "top", 0o644), ut.File(deepDirs(17, 8)+"/mid-top", "m", 0o644)},
			{ut.File(deep+"/bottom", "bottom", 0o644), ut.Whiteout(deepDirs(17, 8) + "/gone")},
			{ut.File(deepDirs(17, 8)+"/gone", "hidden", 0o644), ut.File(deep+"/top", "hidden", 0o644)},
		},
		Ops: explorePaths(deep, deep+"/top", deep+"/bottom", deepDirs(17, 8), deepDirs(17, 8)+"/gone"),
	})
	add(ut.Case{
		Name: "path-longer-than-PATH_MAX",
		Lowers: []ut.Layer{
			{ut.File(long+"/leaf", "deep leaf", 0o640)},
			{ut.File(long+"/lower", "deep lower", 0o644), ut.Dir(long+"/sub", 0o711)},
		},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Lstat(long + "/leaf") // ENAMETOOLONG: the path is too long for one call
			r.Do("openat walk, read leaf", func() (string, error) {
				fd, err := r.OpenDirs(long)
				if err != nil {
					return "", err
				}
				defer unix.Close(fd)
				var st unix.Stat_t
				if err := unix.Fstatat(fd, "leaf", &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
					return "", err
				}
				f, err := unix.Openat(fd, "lower", unix.O_RDONLY|unix.O_CLOEXEC, 0)
				if err != nil {
					return "", err
				}
				defer unix.Close(f)
				buf := make([]byte, 100)
				n, err := unix.Read(f, buf)
				return ut.StatLine(&st, time.Time{}) + " lower=" + ut.DataString(buf[:n]), err
			})
			r.Do("fchdir to the deepest dir, relative lstat/read/readdir", func() (string, error) {
				fd, err := r.OpenDirs(long)
				if err != nil {
					return "", err
				}
				defer unix.Close(fd)
				return ut.InDir(fd, func() (string, error) {
					var st unix.Stat_t
					if err := unix.Lstat("sub", &st); err != nil {
						return "", err
					}
					var pst unix.Stat_t
					if err := unix.Lstat("..", &pst); err != nil {
						return "", err
					}
					b := make([]byte, 100)
					f, err := unix.Open("leaf", unix.O_RDONLY|unix.O_CLOEXEC, 0)
					if err != nil {
						return "", err
					}
					n, _ := unix.Read(f, b)
					unix.Close(f)
					return fmt.Sprintf("sub=%s parent=%s leaf=%s", ut.StatLine(&st, time.Time{}), ut.StatLine(&pst, time.Time{}), b[:n]), nil
				})
			})
		},
	})
	add(largeDirCase())
	add(oddNamesCase())
	add(ut.Case{
		Name: "hard-links-in-lower",
		Lowers: []ut.Layer{
			{ut.Whiteout("d/c"), ut.File("top", "t", 0o644)},
			{ut.File("d/a", "linked", 0o644), ut.Link("d/b", "d/a"), ut.Link("d/c", "d/a"), ut.Link("e", "d/a")},
		},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("d/a", "d/b", "d/c", "e")
			r.SameFile("d/a", "d/b")
			r.SameFile("d/a", "e")
		},
	})
	add(ut.Case{
		Name: "fifos-devices-sockets",
		Lowers: []ut.Layer{
			{ut.Fifo("fifo"), ut.CharDev("null", 1, 3), ut.BlockDev("loop", 7, 0), ut.Socket("sock"), ut.CharDev("big", 4095, 1048575)},
			{ut.File("fifo", "hidden", 0o644), ut.Fifo("lowfifo"), ut.Chmod("lowfifo", 0o600), ut.Chown("lowfifo", 3, 4)},
		},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("", "fifo", "null", "loop", "sock", "big", "lowfifo")
			r.Do("open fifo O_RDONLY|O_NONBLOCK", func() (string, error) {
				fd, err := unix.Open(r.Path("fifo"), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
				if err == nil {
					unix.Close(fd)
				}
				return "", err
			})
			r.Do("open fifo O_WRONLY|O_NONBLOCK (no reader)", func() (string, error) {
				fd, err := unix.Open(r.Path("fifo"), unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
				if err == nil {
					unix.Close(fd)
				}
				return "", err
			})
		},
	})
	add(ut.Case{
		Name:   "open-device-node",
		Lowers: []ut.Layer{{ut.CharDev("null", 1, 3), ut.CharDev("zero", 1, 5)}},
		Ops: func(r *ut.Recorder, mnt string) {
			r.ReadFile("null")
			f := r.Open("zero", unix.O_RDONLY, 0)
			f.Read(4)
			f.Close()
		},
	})
	add(ut.Case{
		Name: "xattrs-visible-and-private",
		Lowers: []ut.Layer{
			{ut.File("f", "f", 0o644), ut.Xattr("f", "user.top", "t"), ut.Xattr("f", "trusted.other", "o"),
				ut.PrivateXattr("f", "foo", "private"), ut.Opaque("o"), ut.Xattr("o", "user.dir", "d"),
				ut.Symlink("l", "f"), ut.Xattr("l", "trusted.link", "l"), ut.File("big", "", 0o644),
				ut.Xattr("big", "user.big", strings.Repeat("v", 3000))},
			{ut.File("f", "hidden", 0o644), ut.Xattr("f", "user.bottom", "hidden"), ut.Dir("m", 0o755),
				ut.Xattr("m", "user.lower", "hidden-by-top-dir")},
		},
		Upper: ut.Layer{ut.Dir("m", 0o755), ut.Xattr("m", "user.upper", "u"), ut.PrivateXattr("m", "foo", "private")},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("f", "o", "l", "m", "big")
			r.Getxattr("f", "trusted.overlay.foo")
			r.Getxattr("o", "trusted.overlay.opaque")
			r.Getxattr("f", "user.bottom")
			r.Getxattr("f", "user.none")
			r.Do("lgetxattr f user.top size probe", func() (string, error) {
				n, err := unix.Lgetxattr(r.Path("f"), "user.top", nil)
				return fmt.Sprint(n), err
			})
			r.Do("lgetxattr big user.big into a short buffer", func() (string, error) {
				_, err := unix.Lgetxattr(r.Path("big"), "user.big", make([]byte, 10))
				return "", err
			})
			r.Do("llistxattr f into a short buffer", func() (string, error) {
				_, err := unix.Llistxattr(r.Path("f"), make([]byte, 3))
				return "", err
			})
		},
	})
	for _, c := range redirectCases() {
		add(c)
	}
	add(ut.Case{
		Name: "merged-dir-attributes-from-top",
		Lowers: []ut.Layer{
			{ut.Dir("d", 0o751), ut.Chown("d", 11, 12), ut.Xattr("d", "user.top", "t"), ut.File("d/a", "a", 0o644),
				ut.Times("d", ut.FixtureAtime, time.Date(2011, 1, 1, 0, 0, 0, 5, time.UTC))},
			{ut.Dir("d", 0o700), ut.Chown("d", 21, 22), ut.Xattr("d", "user.bottom", "b"), ut.File("d/b", "b", 0o644),
				ut.Dir("d/s1", 0o755), ut.Dir("d/s2", 0o755)},
		},
		Upper: ut.Layer{ut.Dir("u", 0o755), ut.Dir("u/s", 0o755), ut.Dir("u/t", 0o755)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("", "d", "u")
			r.Stat("d") // merged: nlink 1
			r.Stat("u") // upper only: real nlink
			r.Stat("d/s1")
		},
	})
	add(ut.Case{
		Name: "readlink-targets",
		Lowers: []ut.Layer{
			{ut.Symlink("abs", "/etc/passwd"), ut.Symlink("rel", "../x/y"), ut.Symlink("dangling", "nowhere"),
				ut.Symlink("long", strings.Repeat("t/", 2000)+"end"), ut.Symlink("nl", "a\nb"), ut.Symlink("self", "self"),
				ut.Symlink("tofile", "file"), ut.Symlink("todir", "dir"), ut.Symlink("bottom", "b")},
			{ut.File("file", "content", 0o644), ut.File("dir/in", "in", 0o644), ut.File("b", "b", 0o644),
				ut.File("bottom", "shadowed", 0o644)},
		},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("abs", "rel", "dangling", "long", "nl", "self", "tofile", "todir", "bottom")
			r.Stat("dangling")
			r.Stat("self")
			r.ReadFile("tofile")
			r.ReadFile("todir/in")
			r.ReadFile("bottom")
			r.Readlink("file")
			r.Readlink("dir")
		},
	})
	add(ut.Case{
		Name: "read-content",
		Lowers: []ut.Layer{
			{ut.File("big", strings.Repeat("0123456789abcdef", 1<<16)+"tail", 0o644), ut.File("empty", "", 0o644)},
			{ut.File("bin", "\x00\x01\x02\xff\xfe", 0o644), ut.SparseFile("sparse", 3<<20, map[int64]string{0: "head", 2 << 20: "middle"}, 0o644)},
		},
		Ops: func(r *ut.Recorder, mnt string) {
			r.ReadFile("big")
			r.ReadFile("empty")
			r.ReadFile("bin")
			r.ReadFile("sparse")
			r.Extents("sparse")
			r.Blocks("sparse")
			f := r.Open("big", unix.O_RDONLY, 0)
			f.Pread(10, 1<<20-5)
			f.Pread(100, 1<<20)
			f.Pread(10, 1<<21)
			f.Lseek(0, unix.SEEK_END)
			f.Read(10)
			f.Close()
			g := r.Open("sparse", unix.O_RDONLY, 0)
			g.Lseek(4, unix.SEEK_HOLE)
			g.Lseek(4096, unix.SEEK_DATA)
			g.Lseek(3<<20, unix.SEEK_DATA)
			g.Close()
		},
	})
	add(ut.Case{
		Name:   "statfs",
		Lowers: []ut.Layer{{ut.File("f", "f", 0o644), ut.Dir("d", 0o755)}, {ut.File("g", "g", 0o644)}},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Statfs("")
			r.Statfs("f")
			r.Statfs("d")
			r.Statfs("g")
		},
	})
	add(ut.Case{
		Name:   "statfs-with-upper",
		Lowers: []ut.Layer{{ut.File("f", "f", 0o644)}},
		Upper:  ut.Layer{ut.File("u", "u", 0o644)},
		Ops:    func(r *ut.Recorder, mnt string) { r.Statfs(""); r.Statfs("f"); r.Statfs("u") },
	})
	add(ut.Case{
		Name: "access-modes",
		Lowers: []ut.Layer{
			{ut.File("none", "", 0), ut.File("r", "", 0o444), ut.File("x", "", 0o111), ut.File("rw", "", 0o644),
				ut.Dir("d0", 0), ut.Dir("d7", 0o755), ut.Symlink("l", "x"), ut.Fifo("p")},
		},
		Ops: func(r *ut.Recorder, mnt string) {
			for _, p := range []string{"none", "r", "x", "rw", "d0", "d7", "l", "p", "missing"} {
				for _, m := range []uint32{unix.F_OK, unix.R_OK, unix.W_OK, unix.X_OK, unix.R_OK | unix.X_OK} {
					r.Access(p, m)
				}
			}
		},
	})
	add(ut.Case{
		Name: "access-modes-with-upper",
		Lowers: []ut.Layer{
			{ut.File("none", "", 0), ut.File("x", "", 0o111), ut.File("rw", "", 0o644), ut.Dir("d0", 0)},
		},
		Upper: ut.Layer{ut.File("u", "", 0o600)},
		Ops: func(r *ut.Recorder, mnt string) {
			for _, p := range []string{"none", "x", "rw", "d0", "u"} {
				for _, m := range []uint32{unix.F_OK, unix.W_OK, unix.X_OK} {
					r.Access(p, m)
				}
			}
		},
	})
	add(ut.Case{
		Name: "readdir-dot-dotdot-dtype",
		Lowers: []ut.Layer{
			{ut.File("m/f", "", 0o644), ut.Symlink("m/l", "f"), ut.Dir("top/sub", 0o755)},
			{ut.Fifo("m/p"), ut.CharDev("m/c", 1, 3), ut.BlockDev("m/b", 7, 1), ut.Dir("m/d", 0o755), ut.Socket("m/s"),
				ut.Dir("low/sub", 0o755)},
		},
		Upper: ut.Layer{ut.Dir("m/ud", 0o755), ut.File("m/uf", "", 0o644), ut.Dir("up/sub", 0o755)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.ReadDir("")
			r.ReadDir("m")
			r.ReadDir("top")
			r.ReadDir("low")
			r.ReadDir("up")
			r.ReadDir("m/d")
		},
	})
	add(ut.Case{
		Name: "ENAMETOOLONG-lookups",
		Lowers: []ut.Layer{
			{ut.File(strings.Repeat("a", 255), "max", 0o644), ut.Dir("d", 0o755)},
		},
		Upper: ut.Layer{ut.File("u", "", 0o644)},
		Ops: func(r *ut.Recorder, mnt string) {
			// Whole paths stay clear of PATH_MAX (4096 with its NUL) for
			// any mount path up to 290 bytes (3800) or pass it for any
			// (4100): near it, whether the call fails before reaching the
			// filesystem (ENAMETOOLONG) or in it (ENOENT for a rename of
			// a missing source) would depend on where each side is
			// mounted, and the kernel's rootless mount is reached through
			// /proc/PID/root.
			for _, n := range []int{255, 256, 300, 1024, 1100, 3800, 4100} {
				name := strings.Repeat("a", n)
				r.Lstat(name)
				r.Lstat("d/" + name)
				r.Lstat(name + "/x")
				r.ReadFile(name)
				r.Readlink(name)
				r.Access(name, unix.F_OK)
				r.Getxattr(name, "user.x")
				r.Listxattr(name)
				r.Create("d/"+name, 0o644)
				r.Mkdir(name, 0o755)
				r.Unlink("d/" + name)
				r.Symlink("t", name)
				r.Rename("u", "d/"+name)
			}
		},
	})
	add(ut.Case{
		Name: "symlinks-across-layers",
		Lowers: []ut.Layer{
			{ut.Symlink("a/link", "../b/target"), ut.Symlink("a/dirlink", "../b"), ut.Symlink("loop1", "loop2")},
			{ut.File("b/target", "bottom target", 0o644), ut.File("b/other", "o", 0o644), ut.Symlink("loop2", "loop1")},
		},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Stat("a/link")
			r.ReadFile("a/link")
			r.ReadDir("a/dirlink")
			r.ReadFile("a/dirlink/other")
			r.Stat("loop1")
		},
	})
	add(ut.Case{
		Name: "modes-owners-and-special-bits",
		Lowers: []ut.Layer{
			{ut.File("suid", "s", 0o4755), ut.File("sgid", "s", 0o2755), ut.Dir("sticky", 0o1777), ut.Dir("sgiddir", 0o2775),
				ut.File("all", "a", 0o7777), ut.File("owned", "o", 0o640), ut.Chown("owned", 1234, 5678),
				ut.Chown("suid", 99, 98), ut.Symlink("lnk", "x"), ut.Chown("lnk", 7, 8)},
		},
		Ops: explorePaths("suid", "sgid", "sticky", "sgiddir", "all", "owned", "lnk"),
	})
	add(ut.Case{
		// FUSE carries times as unsigned seconds: times before 1970 are a
		// classic casualty.
		Name: "exotic-times",
		Lowers: []ut.Layer{
			{ut.File("old", "o", 0o644), ut.Times("old", ut.FixtureAtime, time.Date(1960, 5, 6, 7, 8, 9, 10, time.UTC)),
				ut.File("future", "f", 0o644), ut.Times("future", ut.FixtureAtime, time.Date(2100, 1, 1, 0, 0, 0, 999999999, time.UTC)),
				ut.File("epoch", "e", 0o644), ut.Times("epoch", time.Unix(0, 0), time.Unix(0, 0)),
				ut.Dir("d", 0o755), ut.Times("d", ut.FixtureAtime, time.Date(1999, 12, 31, 23, 59, 59, 1, time.UTC))},
		},
		Ops: func(r *ut.Recorder, mnt string) {
			for _, p := range []string{"old", "future", "epoch", "d"} {
				r.Lstat(p)
				r.Times(p)
			}
		},
	})
	add(ut.Case{
		Name:   "many-lowers",
		Lowers: manyLowers(12),
		Ops:    explorePaths("", "d", "d/f0", "d/f5", "d/f11", "shared"),
	})
	add(ut.Case{
		Name: "read-with-upper-files-dirs-and-merge",
		Lowers: []ut.Layer{
			{ut.File("d/l0", "l0", 0o644), ut.File("d/both", "lower", 0o644), ut.Dir("d/sub", 0o755), ut.File("d/sub/l", "l", 0o644)},
		},
		Upper: ut.Layer{ut.File("d/u", "u", 0o644), ut.File("d/both", "upper", 0o600), ut.File("d/sub/u", "u", 0o644),
			ut.Dir("d/newdir", 0o700), ut.Opaque("d/sub2"), ut.File("d/sub2/x", "x", 0o644)},
		Ops: explorePaths("d", "d/l0", "d/both", "d/sub", "d/sub/l", "d/sub/u", "d/newdir", "d/sub2"),
	})
	return cases
}

// largeDirCase: 1200 entries in the bottom lower, every third one whited
// out above (alternating char and xattr whiteouts), 300 new names on top.
func largeDirCase() ut.Case {
	var bottom, top ut.Layer
	top = append(top, ut.Dir("big", 0o755))
	for i := 0; i < 1200; i++ {
		bottom = append(bottom, ut.File(fmt.Sprintf("big/entry-%04d", i), fmt.Sprint(i), 0o644))
	}
	var mid ut.Layer
	for i := 0; i < 1200; i += 3 {
		if i%2 == 0 {
			mid = append(mid, ut.Whiteout(fmt.Sprintf("big/entry-%04d", i)))
		} else {
			mid = append(mid, ut.XattrWhiteout(fmt.Sprintf("big/entry-%04d", i)))
		}
	}
	for i := 0; i < 300; i++ {
		top = append(top, ut.File(fmt.Sprintf("big/new-%04d", i), "new", 0o600))
	}
	return ut.Case{
		Name:   "large-dir-with-whiteouts",
		Lowers: []ut.Layer{top, mid, bottom},
		Ops: func(r *ut.Recorder, mnt string) {
			r.ReadDir("big")
			r.Do("count entries of big", func() (string, error) {
				fd, err := unix.Open(r.Path("big"), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
				if err != nil {
					return "", err
				}
				defer unix.Close(fd)
				n := 0
				buf := make([]byte, 4096) // many getdents calls: tests resumption
				for {
					m, err := unix.Getdents(fd, buf)
					if err != nil {
						return "", err
					}
					if m == 0 {
						break
					}
					_, _, names := unix.ParseDirent(buf[:m], -1, nil)
					n += len(names)
				}
				return fmt.Sprint(n), nil
			})
			for _, i := range []int{0, 1, 3, 6, 9, 1197, 1199} {
				r.Lstat(fmt.Sprintf("big/entry-%04d", i))
			}
			r.Lstat("big/new-0299")
		},
	}
}

// dirName names the directory that sits next to the file n (a 255-byte
// name cannot take a suffix, so it is cut).
func dirName(n string) string {
	if len(n) > 253 {
		n = n[:253]
	}
	return n + ".d"
}

func oddNamesCase() ut.Case {
	var top, bottom ut.Layer
	for i, n := range oddNames {
		bottom = append(bottom, ut.File("odd/"+n, fmt.Sprint("bottom ", i), 0o644), ut.File("gone/"+n, "hidden", 0o644),
			ut.Dir("odd/"+dirName(n), 0o700))
		top = append(top, ut.File("odd/"+dirName(n)+"/"+n, "in dir", 0o644), ut.Whiteout("gone/"+n), ut.Symlink("links/"+n, n))
	}
	return ut.Case{
		Name:   "odd-names",
		Lowers: []ut.Layer{top, bottom},
		Ops: func(r *ut.Recorder, mnt string) {
			r.ReadDir("odd")
			r.ReadDir("gone")
			r.ReadDir("links")
			for _, n := range oddNames {
				r.Lstat("odd/" + n)
				r.ReadFile("odd/" + n)
				r.ReadDir("odd/" + dirName(n))
				r.Lstat("gone/" + n)
				r.Readlink("links/" + n)
			}
		},
	}
}

// manyLowers makes n lowers, each with its own d/fI and its version of
// "shared" (the topmost wins).
func manyLowers(n int) []ut.Layer {
	ls := make([]ut.Layer, n)
	for i := range ls {
		ls[i] = ut.Layer{ut.File(fmt.Sprintf("d/f%d", i), fmt.Sprint(i), 0o644), ut.File("shared", fmt.Sprint("layer ", i), 0o644)}
	}
	return ls
}

// redirectCases: layers written by a kernel mount with redirect_dir=on.
// Renaming a lower or merged directory there moves its upper copy and
// records in overlay.redirect where the lower copies are; the kernel
// follows such redirects even with redirect_dir=off
// (redirect_always_follow, fs/overlayfs/namei.c:ovl_check_redirect), in
// the upper dir and in lower layers alike. The origin of each redirect is
// whited out, as the kernel's rename leaves it: a directory still visible
// under its own name and through a redirect is one inode twice, which
// the kernel refuses (ESTALE) for whichever name comes second.
func redirectCases() []ut.Case {
	return []ut.Case{{
		Name:   "redirect-xattr-in-upper",
		Lowers: []ut.Layer{{ut.File("old/x", "x", 0o644), ut.File("old/y", "y", 0o644)}},
		Upper: ut.Layer{ut.Dir("new", 0o755), ut.PrivateXattr("new", "redirect", "/old"), ut.File("new/u", "u", 0o644),
			ut.Whiteout("old")},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("", "new", "new/x", "old")
			r.Stat("new") // merged: nlink 1
			// A redirected directory keeps its origin's st_ino.
			r.SameInoAsLayer("new", "l0/old")
			r.SameInoAsLayer("new/x", "l0/old/x")
		},
	}, {
		// A relative redirect names another entry of the parent; below it
		// the redirected directory's own entries merge as usual.
		Name: "redirect-relative",
		Lowers: []ut.Layer{{ut.File("d/old/x", "x", 0o644), ut.File("d/old/sub/y", "y", 0o644), ut.File("d/keep", "k", 0o644),
			ut.Dir("d/new", 0o700), ut.File("d/new/hidden", "h", 0o644)}},
		Upper: ut.Layer{ut.Dir("d/new", 0o750), ut.PrivateXattr("d/new", "redirect", "old"), ut.File("d/new/sub/u", "u", 0o644),
			ut.Whiteout("d/old")},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("d", "d/new", "d/new/x", "d/new/sub", "d/new/sub/y", "d/new/hidden", "d/old")
			r.SameInoAsLayer("d/new", "l0/d/old")
		},
	}, {
		// A redirect in a lower layer applies to the layers below it; a
		// lower-only directory has no origin, so no inode is shared with
		// the still visible target.
		Name: "redirect-in-middle-lower",
		Lowers: []ut.Layer{
			{ut.Dir("new", 0o755), ut.PrivateXattr("new", "redirect", "/old"), ut.File("new/m", "m", 0o644),
				ut.Dir("p/rel", 0o755), ut.PrivateXattr("p/rel", "redirect", "target"), ut.File("p/rel/m", "m", 0o644)},
			{ut.File("old/x", "x", 0o644), ut.File("new/hidden", "h", 0o644), ut.File("p/target/t", "t", 0o644),
				ut.File("p/rel/hidden", "h", 0o644)},
			{ut.File("old/y", "y", 0o644), ut.File("p/target/t2", "t2", 0o644)},
		},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("", "new", "new/x", "new/y", "new/hidden", "old", "p", "p/rel", "p/target")
			r.SameInoAsLayer("new", "l0/new")
		},
	}, {
		// The same below an upper dir that merges the redirected lower
		// directory, and in a middle layer whose parent the layers below
		// do not hold (an absolute redirect reaches them from the roots).
		Name: "redirect-in-middle-lower-under-upper",
		Lowers: []ut.Layer{
			{ut.Dir("new", 0o755), ut.PrivateXattr("new", "redirect", "/old"), ut.File("new/m", "m", 0o644),
				ut.Dir("only/here", 0o755), ut.PrivateXattr("only/here", "redirect", "/old"), ut.File("only/here/h", "h", 0o644)},
			{ut.File("old/x", "x", 0o644)},
		},
		Upper: ut.Layer{ut.File("new/u", "u", 0o644), ut.Whiteout("new/m"), ut.File("only/here/u", "u", 0o644)},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("new", "new/x", "new/m", "only/here", "only/here/x")
		},
	}, {
		// The redirect's target is merged from two layers, the upper dir
		// and the layer below with it.
		Name: "redirect-to-merged-dir",
		Lowers: []ut.Layer{
			{ut.File("a/b/x", "x0", 0o644), ut.File("a/b/both", "top", 0o644), ut.File("a/keep", "k", 0o644)},
			{ut.File("a/b/y", "y1", 0o644), ut.File("a/b/both", "bottom", 0o644), ut.Whiteout("a/b/gone")},
			{ut.File("a/b/gone", "hidden", 0o644), ut.File("a/b/z", "z2", 0o644)},
		},
		Upper: ut.Layer{ut.Dir("new", 0o755), ut.PrivateXattr("new", "redirect", "/a/b"), ut.File("new/u", "u", 0o644),
			ut.Whiteout("new/x"), ut.Whiteout("a/b")},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("", "a", "new", "new/x", "new/y", "new/z", "new/both", "new/gone", "a/b")
			r.SameInoAsLayer("new", "l0/a/b")
		},
	}, {
		// A redirected directory inside a redirected directory (relative
		// and absolute), and a redirect whose target carries one itself
		// in the layer below.
		Name: "redirect-chain",
		Lowers: []ut.Layer{
			{ut.File("old/in0/x", "x", 0o644), ut.File("old/o", "o", 0o644), ut.File("other/y", "y", 0o644),
				ut.Dir("mid", 0o755), ut.PrivateXattr("mid", "redirect", "/bottom"), ut.File("mid/m", "m", 0o644)},
			{ut.File("bottom/b", "b", 0o644), ut.File("mid/hidden", "h", 0o644), ut.File("old/in0/x1", "x1", 0o644)},
		},
		Upper: ut.Layer{
			ut.Dir("new/inner", 0o755), ut.PrivateXattr("new", "redirect", "/old"), ut.PrivateXattr("new/inner", "redirect", "in0"),
			ut.Whiteout("old"), ut.Whiteout("new/in0"),
			ut.Dir("new/abs", 0o755), ut.PrivateXattr("new/abs", "redirect", "/other"), ut.Whiteout("other"),
			ut.Dir("n2", 0o755), ut.PrivateXattr("n2", "redirect", "/mid"), ut.File("n2/u", "u", 0o644), ut.Whiteout("mid"),
		},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("", "new", "new/inner", "new/inner/x", "new/inner/x1", "new/in0", "new/abs", "n2", "n2/b", "bottom")
			r.SameInoAsLayer("new/inner", "l0/old/in0")
			r.SameInoAsLayer("new/abs", "l0/other")
			r.SameInoAsLayer("n2", "l0/mid")
		},
	}, {
		// An absolute redirect is walked component by component in each
		// layer below: a redirect on the way rewrites the path for the
		// layers below that one; an opaque directory on the way stops them
		// (unless an absolute redirect further on restarts them); a
		// whiteout, non-directory or symlink on the way ends the lookup.
		Name: "redirect-absolute-walk",
		Lowers: []ut.Layer{
			{ut.Dir("a/b", 0o755), ut.PrivateXattr("a", "redirect", "/z"), ut.File("a/b/l0", "l0", 0o644),
				ut.Opaque("p"), ut.File("p/q/x", "x", 0o644),
				ut.Opaque("r"), ut.Dir("r/s", 0o755), ut.PrivateXattr("r/s", "redirect", "/t"), ut.File("r/s/x", "x", 0o644),
				ut.Whiteout("w"), ut.File("f", "file", 0o644), ut.Symlink("l", "a")},
			{ut.File("z/b/zb", "zb", 0o644), ut.File("a/b/hidden", "h", 0o644), ut.File("p/q/hidden", "h", 0o644),
				ut.File("t/tt", "t", 0o644), ut.File("r/s/hidden", "h", 0o644), ut.File("w/v/hidden", "h", 0o644),
				ut.File("f/g/hidden", "h", 0o644), ut.File("l/b/hidden", "h", 0o644)},
		},
		Upper: ut.Layer{
			ut.Dir("n1", 0o755), ut.PrivateXattr("n1", "redirect", "/a/b"),
			ut.Dir("n2", 0o755), ut.PrivateXattr("n2", "redirect", "/p/q"),
			ut.Dir("n3", 0o755), ut.PrivateXattr("n3", "redirect", "/r/s"),
			ut.Dir("n4", 0o755), ut.PrivateXattr("n4", "redirect", "/w/v"),
			ut.Dir("n5", 0o755), ut.PrivateXattr("n5", "redirect", "/f/g"),
			ut.Dir("n6", 0o755), ut.PrivateXattr("n6", "redirect", "/l/b"),
			ut.Whiteout("a"), ut.Whiteout("p"), ut.Whiteout("r"),
		},
		Ops: explorePaths("", "n1", "n2", "n3", "n4", "n5", "n6"),
	}, {
		// A redirect to nothing leaves an upper-only directory.
		Name:   "redirect-to-missing",
		Lowers: []ut.Layer{{ut.File("other/x", "x", 0o644), ut.File("d/f", "f", 0o644)}},
		Upper: ut.Layer{ut.Dir("new", 0o755), ut.PrivateXattr("new", "redirect", "/nothere"), ut.File("new/u", "u", 0o644),
			ut.Dir("d/rel", 0o755), ut.PrivateXattr("d/rel", "redirect", "nothere"),
			ut.Dir("d/long", 0o755), ut.PrivateXattr("d/long", "redirect", strings.Repeat("n", 256)),
			ut.Dir("d/deep", 0o755), ut.PrivateXattr("d/deep", "redirect", "/other/x/y"),
			ut.Dir("up/new", 0o755), ut.PrivateXattr("up/new", "redirect", "old")},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("new", "d", "d/rel", "d/long", "d/deep", "up", "up/new")
			r.Stat("new") // upper only: real nlink
			r.SameInoAsLayer("new", "upper/new")
		},
	}, {
		// Opaque directories and non-directories do not read a redirect.
		Name: "redirect-on-opaque-dir-and-file",
		Lowers: []ut.Layer{
			{ut.File("old/x", "x", 0o644), ut.File("new/hidden", "h", 0o644), ut.File("f/hidden", "h", 0o644),
				ut.File("g", "lower file", 0o644), ut.PrivateXattr("g", "redirect", "/old")},
		},
		Upper: ut.Layer{ut.Opaque("new"), ut.PrivateXattr("new", "redirect", "/old"), ut.File("new/u", "u", 0o644),
			ut.File("f", "upper file", 0o644), ut.PrivateXattr("f", "redirect", "/old"),
			ut.Opaque("bad"), ut.PrivateXattr("bad", "redirect", "a/b")},
		Ops: explorePaths("", "new", "f", "g", "bad"),
	}, {
		// Values the kernel rejects fail the lookup: malformed ones with
		// EINVAL (even where nothing lies below), "." and ".." components
		// with EACCES once the lookup reaches them. Readdir still lists
		// the names. In the bottom layer nothing reads a redirect.
		Name: "redirect-malformed",
		Lowers: []ut.Layer{
			{ut.File("old/x", "x", 0o644), ut.Dir("low", 0o755), ut.PrivateXattr("low", "redirect", "a/b"),
				ut.File("low/l", "l", 0o644), ut.File("r/f", "f", 0o644)},
			{ut.File("low/bottom", "b", 0o644), ut.Dir("bot", 0o755), ut.PrivateXattr("bot", "redirect", "//")},
		},
		Upper: ut.Layer{
			// m merges nothing: only the malformed values and absolute
			// redirects reach the lowers.
			ut.Dir("m/empty", 0o755), ut.PrivateXattr("m/empty", "redirect", ""),
			ut.Dir("m/slash", 0o755), ut.PrivateXattr("m/slash", "redirect", "/"),
			ut.Dir("m/relslash", 0o755), ut.PrivateXattr("m/relslash", "redirect", "a/b"),
			ut.Dir("m/dslash", 0o755), ut.PrivateXattr("m/dslash", "redirect", "/old//x"),
			ut.Dir("m/trail", 0o755), ut.PrivateXattr("m/trail", "redirect", "/old/"),
			ut.Dir("m/dotdot", 0o755), ut.PrivateXattr("m/dotdot", "redirect", ".."),
			ut.Dir("m/absdotdot", 0o755), ut.PrivateXattr("m/absdotdot", "redirect", "/old/../old"),
			ut.Dir("m/absdot", 0o755), ut.PrivateXattr("m/absdot", "redirect", "/./old"),
			ut.Dir("m/unreached", 0o755), ut.PrivateXattr("m/unreached", "redirect", "/nothere/../old"),
			// r merges a lower directory: relative redirects are looked up.
			ut.Dir("r/dotdot", 0o755), ut.PrivateXattr("r/dotdot", "redirect", ".."),
			ut.Dir("r/dot", 0o755), ut.PrivateXattr("r/dot", "redirect", "."),
			// The value ends at a NUL byte.
			ut.Dir("nul", 0o755), ut.PrivateXattr("nul", "redirect", "/old\x00junk"), ut.Whiteout("old"),
		},
		Ops: explorePaths("", "m", "m/empty", "m/slash", "m/relslash", "m/dslash", "m/trail", "m/dotdot", "m/absdotdot",
			"m/absdot", "m/unreached", "r", "r/dotdot", "r/dot", "nul", "low", "bot"),
	}, {
		// The kernel computes the d_ino of an impure directory's upper
		// entries by looking each up, and a lookup that fails costs the
		// entry (a merged directory leaves it out) or the readdir (a
		// directory that merges nothing fails it). The kernel marks a
		// directory impure when it copies up or renames into it, or
		// merges a lower copy into an upper one that records no origin.
		Name:   "redirect-malformed-in-impure-dir",
		Lowers: []ut.Layer{{ut.File("old/x", "x", 0o644), ut.File("imp/f", "f", 0o644), ut.File("clean/f", "f", 0o644)}},
		Upper: ut.Layer{
			ut.Dir("imp/ok", 0o755), ut.PrivateXattr("imp/ok", "redirect", "/old"), ut.Whiteout("old"),
			ut.Dir("imp/bad", 0o755), ut.PrivateXattr("imp/bad", "redirect", "a/b"), ut.PrivateXattr("imp", "impure", "y"),
			ut.Dir("pure/bad", 0o755), ut.PrivateXattr("pure/bad", "redirect", "/old/../old"), ut.Dir("pure/ok", 0o755),
			ut.PrivateXattr("pure", "impure", "y"),
			ut.Dir("clean/bad", 0o755), ut.PrivateXattr("clean/bad", "redirect", "a/b"),
			ut.PrivateXattr("", "impure", "y"),
		},
		Ops: explorePaths("", "imp", "imp/ok", "imp/bad", "pure", "pure/ok", "pure/bad", "clean", "clean/bad"),
	}, kernelRenamedUpperCase()}
}

// kernelRenamedUpperCase compares the targets on an upper dir written by a
// real kernel mount with redirect_dir=on: it renames lower and merged
// directories (within their parent: a relative redirect; elsewhere: an
// absolute one), a renamed directory inside a renamed one, and one renamed
// twice, then changes entries inside them.
func kernelRenamedUpperCase() ut.Case {
	return ut.Case{
		Name: "redirect-upper-written-by-kernel",
		Lowers: []ut.Layer{
			{ut.File("old/x", "x", 0o644), ut.File("old/sub/s", "s", 0o644), ut.File("a/b/c/f", "f", 0o644),
				ut.Dir("q", 0o755), ut.File("d/in/i", "i", 0o644)},
			{ut.File("old/y", "y", 0o644), ut.File("a/b/c/g", "g", 0o644), ut.File("d/in/j", "j", 0o644)},
		},
		Upper: ut.Layer{ut.Func("a kernel mount with redirect_dir=on renames directories", func(b *ut.Builder) error {
			return kernelRedirectRenames(b.Root, func(mnt string) error {
				p := func(rel string) string { return filepath.Join(mnt, rel) }
				steps := []func() error{
					func() error { return os.Rename(p("old"), p("new")) },
					func() error { return os.Rename(p("new/sub"), p("new/sub2")) },
					func() error { return os.MkdirAll(p("q/r"), 0o755) },
					func() error { return os.Rename(p("a/b"), p("q/r/bb")) },
					func() error { return os.Rename(p("q/r/bb/c"), p("q/r/bb/cc")) },
					func() error { return os.Mkdir(p("up"), 0o755) },
					func() error { return os.Rename(p("new"), p("up/new")) },
					func() error { return os.Remove(p("up/new/x")) },
					func() error { return os.WriteFile(p("up/new/added"), []byte("added"), 0o644) },
					func() error { return os.Rename(p("d/in"), p("d/out")) },
				}
				for i, f := range steps {
					if err := f(); err != nil {
						return fmt.Errorf("step %d: %w", i+1, err)
					}
				}
				return nil
			})
		})},
		Ops: func(r *ut.Recorder, mnt string) {
			r.Explore("", "up", "up/new", "up/new/y", "up/new/sub2", "up/new/sub2/s", "up/new/sub", "up/new/x",
				"q/r/bb", "q/r/bb/cc", "q/r/bb/cc/f", "q/r/bb/cc/g", "a", "d", "d/out", "old")
			r.SameInoAsLayer("up/new", "l0/old")
			r.SameInoAsLayer("up/new/sub2", "l0/old/sub")
			r.SameInoAsLayer("q/r/bb/cc", "l0/a/b/c")
			r.SameInoAsLayer("d/out", "l0/d/in")
		},
	}
}

// kernelRedirectRenames mounts kernel overlay with redirect_dir=on over
// upper and the lowers l0, l1, ... beside it, runs f on the mount and
// unmounts it.
func kernelRedirectRenames(upper string, f func(mnt string) error) error {
	root := filepath.Dir(upper)
	var lowers []string
	for i := 0; ; i++ {
		l := filepath.Join(root, fmt.Sprintf("l%d", i))
		if _, err := os.Stat(l); err != nil {
			break
		}
		lowers = append(lowers, l)
	}
	work, err := os.MkdirTemp(root, "kernel-work-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	mnt, err := os.MkdirTemp(root, "kernel-mnt-")
	if err != nil {
		return err
	}
	defer os.Remove(mnt)
	data := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s,redirect_dir=on", strings.Join(lowers, ":"), upper, work)
	if err := unix.Mount("overlay", mnt, "overlay", 0, data); err != nil {
		return fmt.Errorf("mount overlay -o %s: %w", data, err)
	}
	ferr := f(mnt)
	if err := unix.Unmount(mnt, 0); err != nil {
		return fmt.Errorf("unmount %s: %w", mnt, err)
	}
	return ferr
}

// TestDiffReadRedirectUserxattr: with userxattr the kernel does not follow
// redirects (userxattr implies redirect_dir=nofollow): a lookup that reads
// one fails with EPERM, a malformed one with EINVAL; where no redirect is
// read (opaque directories, the last of the parent's layers) nothing
// changes, and trusted.overlay.* attributes mean nothing.
func TestDiffReadRedirectUserxattr(t *testing.T) {
	cfg := ut.DefaultConfig()
	cfg.NS = whiteout.User
	cases := []ut.Case{{
		Name:   "redirect-userxattr-upper",
		Lowers: []ut.Layer{{ut.File("p/old/x", "x", 0o644), ut.File("old/x", "x", 0o644), ut.File("ign/x", "x", 0o644)}},
		Upper: ut.Layer{
			ut.Dir("p/new", 0o755), ut.PrivateXattr("p/new", "redirect", "/old"), ut.Whiteout("old"),
			ut.Dir("p/missing", 0o755), ut.PrivateXattr("p/missing", "redirect", "/nothere"),
			ut.Dir("p/rel", 0o755), ut.PrivateXattr("p/rel", "redirect", "old"),
			ut.Dir("p/dotdot", 0o755), ut.PrivateXattr("p/dotdot", "redirect", ".."),
			ut.Dir("p/bad", 0o755), ut.PrivateXattr("p/bad", "redirect", "a/b"),
			ut.Opaque("p/opq"), ut.PrivateXattr("p/opq", "redirect", "/old"),
			ut.Dir("pure/new", 0o755), ut.PrivateXattr("pure/new", "redirect", "old"),
			ut.Dir("p/trusted", 0o755), ut.Xattr("p/trusted", "trusted.overlay.redirect", "/ign"),
		},
		Ops: explorePaths("", "p", "p/new", "p/missing", "p/rel", "p/dotdot", "p/bad", "p/opq", "pure/new", "p/trusted"),
	}, {
		Name: "redirect-userxattr-lower",
		Lowers: []ut.Layer{
			{ut.Dir("mid", 0o755), ut.PrivateXattr("mid", "redirect", "/old"), ut.File("mid/m", "m", 0o644),
				ut.Dir("p/only", 0o755), ut.PrivateXattr("p/only", "redirect", "/old")},
			{ut.File("old/x", "x", 0o644), ut.Dir("bot", 0o755), ut.PrivateXattr("bot", "redirect", "/old")},
		},
		Ops: explorePaths("", "mid", "p", "p/only", "bot"),
	}}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) { cfg.Run(t, c) })
	}
}
