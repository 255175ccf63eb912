package uniontest

import (
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"strata/internal/sysx"
)

// Entry is one logged operation.
type Entry struct {
	Op     string // what was done, with paths relative to the mount
	Result string // "ok" or the errno name
	Output string // what the operation returned (bytes read, names listed, ...)
}

func (e Entry) String() string {
	if e.Output == "" {
		return fmt.Sprintf("%s -> %s", e.Op, e.Result)
	}
	return fmt.Sprintf("%s -> %s %s", e.Op, e.Result, e.Output)
}

// Recorder performs a case's operations on one mount and logs each. Paths
// given to its methods are relative to the mount root; logs never contain
// the mount path, so the logs of two targets compare directly.
type Recorder struct {
	mnt   string
	since time.Time
	log   []Entry
	inos  map[string]uint64
	files []*Handle
	// layers is the directory holding the case's layer dirs (l0, l1, ...,
	// upper), "" when unknown; see SameInoAsLayer.
	layers string
}

// NewRecorder returns a recorder for the mount at mnt; times at or after
// since show as "recent".
func NewRecorder(mnt string, since time.Time) *Recorder {
	return &Recorder{mnt: mnt, since: since, inos: map[string]uint64{}}
}

// Mnt returns the mount point.
func (r *Recorder) Mnt() string { return r.mnt }

// Path returns the absolute path of rel on the mount.
func (r *Recorder) Path(rel string) string {
	if rel == "" || rel == "." {
		return r.mnt
	}
	return r.mnt + "/" + rel
}

// Log returns the entries so far.
func (r *Recorder) Log() []Entry { return r.log }

// Record logs an operation's outcome.
func (r *Recorder) Record(op string, err error, out string) {
	scrub := func(s string) string { return strings.ReplaceAll(s, r.mnt, "$MNT") }
	r.log = append(r.log, Entry{Op: scrub(op), Result: scrub(errnoName(err)), Output: scrub(out)})
}

// Do runs f and logs its output and error under op. Use it for anything the
// named methods do not cover.
func (r *Recorder) Do(op string, f func() (string, error)) {
	out, err := f()
	r.Record(op, err, out)
}

// closeAll closes files the case left open, so the mount can go.
func (r *Recorder) closeAll() {
	for _, f := range r.files {
		if f.fd >= 0 {
			unix.Close(f.fd)
			f.fd = -1
		}
	}
}

// StatLine renders a stat result for the op log: type, mode, owner, size
// (not for dirs), nlink and mtime class.
func StatLine(st *unix.Stat_t, since time.Time) string {
	s := fmt.Sprintf("%s %#o %d:%d", typeName(st.Mode), st.Mode&0o7777, st.Uid, st.Gid)
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		s += fmt.Sprintf(" size=%d", st.Size)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFCHR || st.Mode&unix.S_IFMT == unix.S_IFBLK {
		s += fmt.Sprintf(" rdev=%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	return s + fmt.Sprintf(" nlink=%d mtime=%s", st.Nlink, timeClass(st.Mtim, since))
}

// Lstat logs lstat(p).
func (r *Recorder) Lstat(p string) {
	r.Do(fmt.Sprintf("lstat %s", q(p)), func() (string, error) {
		var st unix.Stat_t
		if err := unix.Lstat(r.Path(p), &st); err != nil {
			return "", err
		}
		return StatLine(&st, r.since), nil
	})
}

// Stat logs stat(p), following symlinks.
func (r *Recorder) Stat(p string) {
	r.Do(fmt.Sprintf("stat %s", q(p)), func() (string, error) {
		var st unix.Stat_t
		if err := unix.Stat(r.Path(p), &st); err != nil {
			return "", err
		}
		return StatLine(&st, r.since), nil
	})
}

// Times logs the atime and mtime classes of p (not following symlinks).
func (r *Recorder) Times(p string) {
	r.Do(fmt.Sprintf("times %s", q(p)), func() (string, error) {
		var st unix.Stat_t
		if err := unix.Lstat(r.Path(p), &st); err != nil {
			return "", err
		}
		return fmt.Sprintf("atime=%s mtime=%s", timeClass(st.Atim, r.since), timeClass(st.Mtim, r.since)), nil
	})
}

// Blocks logs whether p is sparse (st_blocks cover less than st_size).
func (r *Recorder) Blocks(p string) {
	r.Do(fmt.Sprintf("blocks %s", q(p)), func() (string, error) {
		var st unix.Stat_t
		if err := unix.Lstat(r.Path(p), &st); err != nil {
			return "", err
		}
		return allocClass(&st), nil
	})
}

// InoOf remembers p's st_ino under label (logging only success), for a
// later [Recorder.SameIno].
func (r *Recorder) InoOf(label, p string) {
	r.Do(fmt.Sprintf("remember ino of %s as %s", q(p), label), func() (string, error) {
		var st unix.Stat_t
		if err := unix.Lstat(r.Path(p), &st); err != nil {
			return "", err
		}
		r.inos[label] = st.Ino
		return "", nil
	})
}

// SameIno logs whether p's st_ino is still the one remembered under label.
func (r *Recorder) SameIno(label, p string) {
	r.Do(fmt.Sprintf("ino of %s == %s", q(p), label), func() (string, error) {
		var st unix.Stat_t
		if err := unix.Lstat(r.Path(p), &st); err != nil {
			return "", err
		}
		ino, ok := r.inos[label]
		if !ok {
			return "", errors.New("no remembered ino " + label)
		}
		return strconv.FormatBool(st.Ino == ino), nil
	})
}

// SameInoAsLayer logs whether p's st_ino on the mount equals that of the
// layer object at layerPath ("l0/old", "upper/d": relative to the
// directory holding the case's layers). On one filesystem (no xino) kernel
// overlay shows the real inode numbers of its layers' objects, and for a
// merged directory with an upper copy its topmost lower copy's: relations
// that strata shows too where it follows the kernel (a redirected
// directory keeps its origin's st_ino).
func (r *Recorder) SameInoAsLayer(p, layerPath string) {
	r.Do(fmt.Sprintf("ino of %s == ino of layer object %s", q(p), q(layerPath)), func() (string, error) {
		if r.layers == "" {
			return "", errors.New("layer dirs unknown to this recorder")
		}
		var st, lst unix.Stat_t
		if err := unix.Lstat(r.Path(p), &st); err != nil {
			return "", err
		}
		if err := unix.Lstat(filepath.Join(r.layers, layerPath), &lst); err != nil {
			return "", fmt.Errorf("layer object: %w", err)
		}
		return strconv.FormatBool(st.Ino == lst.Ino), nil
	})
}

// SameFile logs whether a and b are the same inode (st_dev and st_ino).
func (r *Recorder) SameFile(a, b string) {
	r.Do(fmt.Sprintf("same inode %s %s", q(a), q(b)), func() (string, error) {
		var sa, sb unix.Stat_t
		if err := unix.Lstat(r.Path(a), &sa); err != nil {
			return "", err
		}
		if err := unix.Lstat(r.Path(b), &sb); err != nil {
			return "", err
		}
		return strconv.FormatBool(sa.Dev == sb.Dev && sa.Ino == sb.Ino), nil
	})
}

// ReadFile logs the content of p.
func (r *Recorder) ReadFile(p string) {
	r.Do(fmt.Sprintf("read %s", q(p)), func() (string, error) {
		b, err := readAll(r.Path(p))
		if err != nil {
			return "", err
		}
		return DataString(b), nil
	})
}

func readAll(path string) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	var out []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return out, nil
		}
		out = append(out, buf[:n]...)
	}
}

// WriteFile logs open(p, O_WRONLY|O_CREAT|O_TRUNC, 0644), a write of data
// and close, as one operation ("open: ENOENT" names the failing step).
func (r *Recorder) WriteFile(p, data string) {
	r.WriteFlags(p, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC, 0o644, data)
}

// WriteFlags is WriteFile with explicit open flags and mode.
func (r *Recorder) WriteFlags(p string, flags int, mode uint32, data string) {
	r.Do(fmt.Sprintf("write %s %s %#o %s", q(p), FlagString(flags), mode, DataString([]byte(data))), func() (string, error) {
		fd, err := unix.Open(r.Path(p), flags|unix.O_CLOEXEC, mode)
		if err != nil {
			return "", fmt.Errorf("open: %w", err)
		}
		defer unix.Close(fd)
		if _, err := unix.Write(fd, []byte(data)); err != nil {
			return "", fmt.Errorf("write: %w", err)
		}
		if err := unix.Close(fd); err != nil {
			return "", fmt.Errorf("close: %w", err)
		}
		fd = -1
		return "", nil
	})
}

// Create logs open(p, O_CREAT|O_EXCL|O_WRONLY, mode) and close.
func (r *Recorder) Create(p string, mode uint32) {
	r.Do(fmt.Sprintf("create %s %#o", q(p), mode), func() (string, error) {
		fd, err := unix.Open(r.Path(p), unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, mode)
		if err != nil {
			return "", err
		}
		return "", unix.Close(fd)
	})
}

// Mkdir logs mkdir(p, mode).
func (r *Recorder) Mkdir(p string, mode uint32) {
	r.Record(fmt.Sprintf("mkdir %s %#o", q(p), mode), unix.Mkdir(r.Path(p), mode), "")
}

// Rmdir logs rmdir(p).
func (r *Recorder) Rmdir(p string) { r.Record("rmdir "+q(p), unix.Rmdir(r.Path(p)), "") }

// Unlink logs unlink(p).
func (r *Recorder) Unlink(p string) { r.Record("unlink "+q(p), unix.Unlink(r.Path(p)), "") }

// Rename logs rename(a, b).
func (r *Recorder) Rename(a, b string) {
	r.Record(fmt.Sprintf("rename %s %s", q(a), q(b)), unix.Rename(r.Path(a), r.Path(b)), "")
}

// Rename2 logs renameat2(a, b, flags).
func (r *Recorder) Rename2(a, b string, flags uint) {
	var names []string
	for _, f := range []struct {
		v uint
		n string
	}{{unix.RENAME_NOREPLACE, "NOREPLACE"}, {unix.RENAME_EXCHANGE, "EXCHANGE"}, {unix.RENAME_WHITEOUT, "WHITEOUT"}} {
		if flags&f.v != 0 {
			names = append(names, f.n)
		}
	}
	err := unix.Renameat2(unix.AT_FDCWD, r.Path(a), unix.AT_FDCWD, r.Path(b), flags)
	r.Record(fmt.Sprintf("renameat2 %s %s %s", q(a), q(b), strings.Join(names, "|")), err, "")
}

// Link logs link(old, new).
func (r *Recorder) Link(old, new string) {
	r.Record(fmt.Sprintf("link %s %s", q(old), q(new)), unix.Link(r.Path(old), r.Path(new)), "")
}

// Symlink logs symlink(target, p).
func (r *Recorder) Symlink(target, p string) {
	r.Record(fmt.Sprintf("symlink %s -> %s", q(p), q(target)), unix.Symlink(target, r.Path(p)), "")
}

// Readlink logs readlink(p).
func (r *Recorder) Readlink(p string) {
	r.Do("readlink "+q(p), func() (string, error) {
		t, err := readlinkAt(unix.AT_FDCWD, r.Path(p))
		if err != nil {
			return "", err
		}
		return strconv.Quote(t), nil
	})
}

// Mknod logs mknod(p, mode, dev).
func (r *Recorder) Mknod(p string, mode uint32, dev uint64) {
	err := unix.Mknod(r.Path(p), mode, int(dev))
	r.Record(fmt.Sprintf("mknod %s %s %#o %d:%d", q(p), typeName(mode), mode&0o7777, unix.Major(dev), unix.Minor(dev)), err, "")
}

// Chmod logs chmod(p, mode).
func (r *Recorder) Chmod(p string, mode uint32) {
	r.Record(fmt.Sprintf("chmod %s %#o", q(p), mode), unix.Chmod(r.Path(p), mode), "")
}

// Chown logs chown(p, uid, gid), following symlinks.
func (r *Recorder) Chown(p string, uid, gid int) {
	r.Record(fmt.Sprintf("chown %s %d:%d", q(p), uid, gid), unix.Chown(r.Path(p), uid, gid), "")
}

// Lchown logs lchown(p, uid, gid).
func (r *Recorder) Lchown(p string, uid, gid int) {
	r.Record(fmt.Sprintf("lchown %s %d:%d", q(p), uid, gid), unix.Lchown(r.Path(p), uid, gid), "")
}

// Truncate logs truncate(p, size).
func (r *Recorder) Truncate(p string, size int64) {
	r.Record(fmt.Sprintf("truncate %s %d", q(p), size), unix.Truncate(r.Path(p), size), "")
}

// UTimeNow and UTimeOmit are the utimensat special values.
var (
	UTimeNow  = unix.Timespec{Nsec: unix.UTIME_NOW}
	UTimeOmit = unix.Timespec{Nsec: unix.UTIME_OMIT}
)

// TS makes a timespec from a time.
func TS(t time.Time) unix.Timespec { return unix.NsecToTimespec(t.UnixNano()) }

func tsString(ts unix.Timespec) string {
	switch ts.Nsec {
	case unix.UTIME_NOW:
		return "NOW"
	case unix.UTIME_OMIT:
		return "OMIT"
	}
	return time.Unix(ts.Sec, ts.Nsec).UTC().Format(time.RFC3339Nano)
}

// Utimens logs utimensat(AT_FDCWD, p, {atime, mtime}, flags).
func (r *Recorder) Utimens(p string, atime, mtime unix.Timespec, flags int) {
	op := fmt.Sprintf("utimensat %s a=%s m=%s", q(p), tsString(atime), tsString(mtime))
	if flags&unix.AT_SYMLINK_NOFOLLOW != 0 {
		op += " NOFOLLOW"
	}
	r.Record(op, unix.UtimesNanoAt(unix.AT_FDCWD, r.Path(p), []unix.Timespec{atime, mtime}, flags), "")
}

// Setxattr logs lsetxattr(p, name, value, flags).
func (r *Recorder) Setxattr(p, name, value string, flags int) {
	r.Record(fmt.Sprintf("lsetxattr %s %s=%q flags=%d", q(p), name, value, flags), unix.Lsetxattr(r.Path(p), name, []byte(value), flags), "")
}

// Getxattr logs lgetxattr(p, name) and the value.
func (r *Recorder) Getxattr(p, name string) {
	r.Do(fmt.Sprintf("lgetxattr %s %s", q(p), name), func() (string, error) {
		buf := make([]byte, 64<<10)
		n, err := unix.Lgetxattr(r.Path(p), name, buf)
		if err != nil {
			return "", err
		}
		return DataString(buf[:n]), nil
	})
}

// Listxattr logs the sorted names llistxattr(p) returns.
func (r *Recorder) Listxattr(p string) {
	r.Do("llistxattr "+q(p), func() (string, error) {
		buf := make([]byte, 64<<10)
		n, err := unix.Llistxattr(r.Path(p), buf)
		if err != nil {
			return "", err
		}
		names := sysx.SplitNames(buf[:n])
		sort.Strings(names)
		return "[" + strings.Join(names, " ") + "]", nil
	})
}

// Removexattr logs lremovexattr(p, name).
func (r *Recorder) Removexattr(p, name string) {
	r.Record(fmt.Sprintf("lremovexattr %s %s", q(p), name), unix.Lremovexattr(r.Path(p), name), "")
}

// Access logs faccessat(AT_FDCWD, p, mode, 0).
func (r *Recorder) Access(p string, mode uint32) {
	var m []string
	for _, b := range []struct {
		v uint32
		n string
	}{{unix.R_OK, "R"}, {unix.W_OK, "W"}, {unix.X_OK, "X"}} {
		if mode&b.v != 0 {
			m = append(m, b.n)
		}
	}
	if len(m) == 0 {
		m = []string{"F"}
	}
	r.Record(fmt.Sprintf("access %s %s_OK", q(p), strings.Join(m, "|")), unix.Faccessat(unix.AT_FDCWD, r.Path(p), mode, 0), "")
}

// Statfs logs statfs(p): block size, name length limit and total blocks
// (all three come from the filesystem that holds the layers).
func (r *Recorder) Statfs(p string) {
	r.Do("statfs "+q(p), func() (string, error) {
		var s unix.Statfs_t
		if err := unix.Statfs(r.Path(p), &s); err != nil {
			return "", err
		}
		return fmt.Sprintf("bsize=%d namelen=%d blocks=%d", s.Bsize, s.Namelen, s.Blocks), nil
	})
}

// ReadDir logs the raw getdents64 listing of p, sorted: "name:type"
// entries, "." and ".." included, the type being d_type as the
// filesystem reported it.
func (r *Recorder) ReadDir(p string) {
	r.Do("readdir "+q(p), func() (string, error) {
		fd, err := unix.Open(r.Path(p), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return "", err
		}
		defer unix.Close(fd)
		ents, err := readDirents(fd)
		if err != nil {
			return "", err
		}
		return direntString(ents), nil
	})
}

func direntString(ents []dirent) string {
	var s []string
	for _, e := range ents {
		s = append(s, quotePath(e.Name)+":"+dtName(e.Type))
	}
	sort.Strings(s)
	if len(s) > 40 {
		return fmt.Sprintf("%d entries %s", len(s), DataString([]byte(strings.Join(s, "\n"))))
	}
	return "[" + strings.Join(s, " ") + "]"
}

// Extents logs the data extents of p as SEEK_DATA/SEEK_HOLE report them.
func (r *Recorder) Extents(p string) {
	r.Do("extents "+q(p), func() (string, error) {
		fd, err := unix.Open(r.Path(p), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return "", err
		}
		defer unix.Close(fd)
		return extents(fd)
	})
}

func extents(fd int) (string, error) {
	var parts []string
	for off := int64(0); ; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return strings.Join(parts, " "), err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return strings.Join(parts, " "), err
		}
		parts = append(parts, fmt.Sprintf("%d-%d", data, hole))
		off = hole
	}
	return "data[" + strings.Join(parts, " ") + "]", nil
}

// Handle is a file opened through a Recorder; its operations are logged
// under its label (f1, f2, ...). A failed open gives a Handle whose
// operations log EBADF.
type Handle struct {
	r     *Recorder
	fd    int
	label string
}

// Open logs open(p, flags, mode) and returns its handle.
func (r *Recorder) Open(p string, flags int, mode uint32) *Handle {
	f := &Handle{r: r, label: fmt.Sprintf("f%d", len(r.files)+1)}
	fd, err := unix.Open(r.Path(p), flags|unix.O_CLOEXEC, mode)
	if err != nil {
		fd = -1
	}
	f.fd = fd
	r.files = append(r.files, f)
	r.Record(fmt.Sprintf("%s = open %s %s %#o", f.label, q(p), FlagString(flags), mode), err, "")
	return f
}

// Fd returns the file descriptor (-1 if the open failed or it is closed).
func (f *Handle) Fd() int { return f.fd }

func (f *Handle) do(op string, fn func(fd int) (string, error)) {
	f.r.Do(f.label+": "+op, func() (string, error) {
		if f.fd < 0 {
			return "", unix.EBADF
		}
		return fn(f.fd)
	})
}

// Write logs write(data).
func (f *Handle) Write(data string) {
	f.do("write "+DataString([]byte(data)), func(fd int) (string, error) {
		n, err := unix.Write(fd, []byte(data))
		return fmt.Sprintf("n=%d", n), err
	})
}

// Pwrite logs pwrite(data, off).
func (f *Handle) Pwrite(data string, off int64) {
	f.do(fmt.Sprintf("pwrite %s @%d", DataString([]byte(data)), off), func(fd int) (string, error) {
		n, err := unix.Pwrite(fd, []byte(data), off)
		return fmt.Sprintf("n=%d", n), err
	})
}

// Read logs read(n) at the current offset and the bytes read.
func (f *Handle) Read(n int) {
	f.do(fmt.Sprintf("read %d", n), func(fd int) (string, error) {
		buf := make([]byte, n)
		m, err := unix.Read(fd, buf)
		if err != nil {
			return "", err
		}
		return DataString(buf[:m]), nil
	})
}

// Pread logs pread(n, off) and the bytes read.
func (f *Handle) Pread(n int, off int64) {
	f.do(fmt.Sprintf("pread %d @%d", n, off), func(fd int) (string, error) {
		buf := make([]byte, n)
		m, err := unix.Pread(fd, buf, off)
		if err != nil {
			return "", err
		}
		return DataString(buf[:m]), nil
	})
}

// Fstat logs fstat.
func (f *Handle) Fstat() {
	f.do("fstat", func(fd int) (string, error) {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return "", err
		}
		return StatLine(&st, f.r.since), nil
	})
}

// Fsync logs fsync.
func (f *Handle) Fsync() { f.do("fsync", func(fd int) (string, error) { return "", unix.Fsync(fd) }) }

// Fdatasync logs fdatasync.
func (f *Handle) Fdatasync() {
	f.do("fdatasync", func(fd int) (string, error) { return "", unix.Fdatasync(fd) })
}

// Ftruncate logs ftruncate(size).
func (f *Handle) Ftruncate(size int64) {
	f.do(fmt.Sprintf("ftruncate %d", size), func(fd int) (string, error) { return "", unix.Ftruncate(fd, size) })
}

// Fallocate logs fallocate(mode, off, length).
func (f *Handle) Fallocate(mode uint32, off, length int64) {
	f.do(fmt.Sprintf("fallocate mode=%#x %d+%d", mode, off, length), func(fd int) (string, error) {
		return "", unix.Fallocate(fd, mode, off, length)
	})
}

// Lseek logs lseek(off, whence) and the resulting offset.
func (f *Handle) Lseek(off int64, whence int) {
	names := map[int]string{unix.SEEK_SET: "SET", unix.SEEK_CUR: "CUR", unix.SEEK_END: "END", unix.SEEK_DATA: "DATA", unix.SEEK_HOLE: "HOLE"}
	f.do(fmt.Sprintf("lseek %d SEEK_%s", off, names[whence]), func(fd int) (string, error) {
		n, err := unix.Seek(fd, off, whence)
		if err != nil {
			return "", err
		}
		return strconv.FormatInt(n, 10), nil
	})
}

// Extents logs the file's data extents (SEEK_DATA/SEEK_HOLE).
func (f *Handle) Extents() { f.do("extents", extents) }

// Fchmod logs fchmod(mode).
func (f *Handle) Fchmod(mode uint32) {
	f.do(fmt.Sprintf("fchmod %#o", mode), func(fd int) (string, error) { return "", unix.Fchmod(fd, mode) })
}

// Fchown logs fchown(uid, gid).
func (f *Handle) Fchown(uid, gid int) {
	f.do(fmt.Sprintf("fchown %d:%d", uid, gid), func(fd int) (string, error) { return "", unix.Fchown(fd, uid, gid) })
}

// Fsetxattr logs fsetxattr(name, value).
func (f *Handle) Fsetxattr(name, value string) {
	f.do(fmt.Sprintf("fsetxattr %s=%q", name, value), func(fd int) (string, error) {
		return "", unix.Fsetxattr(fd, name, []byte(value), 0)
	})
}

// Flock logs flock(how).
func (f *Handle) Flock(how int) {
	var n []string
	for _, b := range []struct {
		v int
		s string
	}{{unix.LOCK_SH, "SH"}, {unix.LOCK_EX, "EX"}, {unix.LOCK_UN, "UN"}, {unix.LOCK_NB, "NB"}} {
		if how&b.v != 0 {
			n = append(n, "LOCK_"+b.s)
		}
	}
	f.do("flock "+strings.Join(n, "|"), func(fd int) (string, error) { return "", unix.Flock(fd, how) })
}

func lockType(t int16) string {
	switch t {
	case unix.F_RDLCK:
		return "F_RDLCK"
	case unix.F_WRLCK:
		return "F_WRLCK"
	case unix.F_UNLCK:
		return "F_UNLCK"
	}
	return strconv.Itoa(int(t))
}

// SetLk logs an open-file-description record lock (F_OFD_SETLK): OFD locks
// conflict between two opens of one process, so a case can show
// contention without a second process.
func (f *Handle) SetLk(typ int16, start, length int64) {
	f.do(fmt.Sprintf("F_OFD_SETLK %s %d+%d", lockType(typ), start, length), func(fd int) (string, error) {
		lk := unix.Flock_t{Type: typ, Whence: unix.SEEK_SET, Start: start, Len: length}
		return "", unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &lk)
	})
}

// GetLk logs F_OFD_GETLK for a lock of typ over the range and the
// conflicting lock it reports.
func (f *Handle) GetLk(typ int16, start, length int64) {
	f.do(fmt.Sprintf("F_OFD_GETLK %s %d+%d", lockType(typ), start, length), func(fd int) (string, error) {
		lk := unix.Flock_t{Type: typ, Whence: unix.SEEK_SET, Start: start, Len: length}
		if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &lk); err != nil {
			return "", err
		}
		if lk.Type == unix.F_UNLCK {
			return "F_UNLCK", nil
		}
		return fmt.Sprintf("%s %d+%d pid=%d", lockType(lk.Type), lk.Start, lk.Len, lk.Pid), nil
	})
}

// CopyFileRange logs copy_file_range(f@offIn -> dst@offOut, n).
func (f *Handle) CopyFileRange(offIn int64, dst *Handle, offOut int64, n int) {
	f.do(fmt.Sprintf("copy_file_range @%d -> %s @%d n=%d", offIn, dst.label, offOut, n), func(fd int) (string, error) {
		if dst.fd < 0 {
			return "", unix.EBADF
		}
		in, out := offIn, offOut
		m, err := unix.CopyFileRange(fd, &in, dst.fd, &out, n, 0)
		return fmt.Sprintf("n=%d", m), err
	})
}

// Close logs close.
func (f *Handle) Close() {
	f.do("close", func(fd int) (string, error) {
		f.fd = -1
		return "", unix.Close(fd)
	})
}

// FlagString renders open flags.
func FlagString(flags int) string {
	var s []string
	switch flags & unix.O_ACCMODE {
	case unix.O_RDONLY:
		s = append(s, "O_RDONLY")
	case unix.O_WRONLY:
		s = append(s, "O_WRONLY")
	case unix.O_RDWR:
		s = append(s, "O_RDWR")
	}
	for _, b := range []struct {
		v int
		n string
	}{
		{unix.O_CREAT, "O_CREAT"}, {unix.O_EXCL, "O_EXCL"}, {unix.O_TRUNC, "O_TRUNC"}, {unix.O_APPEND, "O_APPEND"},
		{unix.O_DIRECTORY, "O_DIRECTORY"}, {unix.O_NOFOLLOW, "O_NOFOLLOW"}, {unix.O_NONBLOCK, "O_NONBLOCK"},
		{unix.O_PATH, "O_PATH"}, {unix.O_TMPFILE, "O_TMPFILE"}, {unix.O_DIRECT, "O_DIRECT"}, {unix.O_SYNC, "O_SYNC"}, {unix.O_NOATIME, "O_NOATIME"},
	} {
		if flags&b.v == b.v {
			s = append(s, b.n)
		}
	}
	return strings.Join(s, "|")
}

// q renders a path argument in an op description.
func q(p string) string {
	if p == "" {
		return "."
	}
	return quotePath(filepath.ToSlash(p))
}

// Explore logs, for each path, lstat and whatever reading it gives: the
// raw listing of a directory, the content of a regular file, the target of
// a symlink, and its xattr names and values.
func (r *Recorder) Explore(paths ...string) {
	for _, p := range paths {
		r.Lstat(p)
		var st unix.Stat_t
		if err := unix.Lstat(r.Path(p), &st); err != nil {
			continue
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			r.ReadDir(p)
		case unix.S_IFREG:
			r.ReadFile(p)
		case unix.S_IFLNK:
			r.Readlink(p)
		}
		r.Listxattr(p)
		buf := make([]byte, 64<<10)
		if n, err := unix.Llistxattr(r.Path(p), buf); err == nil {
			names := sysx.SplitNames(buf[:n])
			sort.Strings(names)
			for _, x := range names {
				r.Getxattr(p, x)
			}
		}
	}
}

// InDir runs f with the process's working directory set to the directory
// fd dirfd (fchdir), and restores the previous one afterwards. The working
// directory is process-wide: f must not block on anything that needs
// another goroutine to change it.
func InDir(dirfd int, f func() (string, error)) (string, error) {
	old, err := unix.Open(".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(old)
	if err := unix.Fchdir(dirfd); err != nil {
		return "", err
	}
	defer func() {
		if err := unix.Fchdir(old); err != nil {
			panic("uniontest: cannot restore the working directory: " + err.Error())
		}
	}()
	return f()
}

// OpenDirs opens the directory rel of the mount by walking its components
// with openat from the mount root (so it works past PATH_MAX). The caller
// closes the fd.
func (r *Recorder) OpenDirs(rel string) (int, error) {
	root, err := unix.Open(r.mnt, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(root)
	return openDirs(root, splitRel(rel), false, nil)
}
