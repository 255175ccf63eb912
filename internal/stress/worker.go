package stress

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Op is one kind of operation a worker does.
type Op int

// The operations, in the order reports list them.
const (
	OpCreate Op = iota
	OpWrite
	OpAppend
	OpTruncate
	OpRename
	OpRenameDir
	OpLink
	OpUnlink
	OpMkdir
	OpRmdir
	OpSetxattr
	OpRemovexattr
	OpChmod
	OpSymlink
	OpRead
	OpStat
	OpReaddir
	OpLogAppend
	OpLogRead
	OpSharedXattr
	OpSharedRead
	numOps
)

var opNames = [numOps]string{"create", "write", "append", "truncate", "rename", "rename-dir", "link", "unlink",
	"mkdir", "rmdir", "setxattr", "removexattr", "chmod", "symlink", "read", "stat", "readdir",
	"log-append", "log-read", "shared-xattr", "shared-read"}

func (o Op) String() string { return opNames[o] }

// opWeights is how often each op is picked, out of their sum.
var opWeights = [numOps]int{
	OpCreate: 10, OpWrite: 8, OpAppend: 5, OpTruncate: 4, OpRename: 6, OpRenameDir: 2, OpLink: 3,
	OpUnlink: 6, OpMkdir: 5, OpRmdir: 4, OpSetxattr: 4, OpRemovexattr: 2, OpChmod: 2, OpSymlink: 2,
	OpRead: 12, OpStat: 6, OpReaddir: 5, OpLogAppend: 4, OpLogRead: 1, OpSharedXattr: 2, OpSharedRead: 3,
}

// poolNames are the names workers create: short ones that collide with
// the lower layers' names, and awkward ones (a space, a newline, bytes
// that are not UTF-8, exactly NAME_MAX bytes).
var poolNames = []string{"a", "b", "c", "d", "e", "f", "g", "sp ace", "nl\nx", "\xff\xfe", strings.Repeat("L", 255)}

// worker does random operations on the paths it owns and checks each
// result against its model.
type worker struct {
	id      int
	mnt     string
	rng     *rand.Rand
	t       *Tree // owned paths only
	shared  *Tree // read only
	f       *Fixture
	seq     int
	records [][]byte // records acknowledged appended to shared/log
	xattr   string   // last value of user.w<id> on shared/x, "" if none
	counts  [numOps]atomic.Int64
	errs    map[string]int64 // expected errors seen, "op ERRNO"
	ops     *atomic.Int64    // shared op counter
	budget  int64            // stop after this many ops (0: no limit)
	inOp    atomic.Value     // string describing the op in flight
	hist    []string         // the last ops done, for mismatch reports
	eintr   int64            // EINTR answers retried
}

// retry runs f again while it fails with EINTR, as the kernel would
// restart a call interrupted by an SA_RESTART signal. strata used to answer
// EINTR when the caller's thread got a signal during a request (fixed;
// unionfs.TestNoSpuriousEINTR guards it), and Go's runtime signals threads
// all the time. Any retries are counted and reported.
func (w *worker) retry(f func() error) error {
	for i := 0; ; i++ {
		err := f()
		if !errors.Is(err, unix.EINTR) || i == 10 {
			return err
		}
		w.eintr++
	}
}

// open is unix.Open with retry.
func (w *worker) open(p string, flags int, mode uint32) (int, error) {
	var fd int
	err := w.retry(func() error {
		var err error
		fd, err = unix.Open(p, flags, mode)
		return err
	})
	return fd, err
}

// note records op description d as in flight and in the history.
func (w *worker) note(d string) {
	w.inOp.Store(d)
	w.hist = append(w.hist, d)
	if len(w.hist) > 12 {
		w.hist = w.hist[1:]
	}
}

func (w *worker) full(p string) string { return filepath.Join(w.mnt, p) }

func errnoOf(err error) unix.Errno {
	if err == nil {
		return 0
	}
	var e unix.Errno
	if errors.As(err, &e) {
		return e
	}
	return unix.EIO
}

// mismatchError is a result that differs from the model.
type mismatchError struct{ msg string }

func (e *mismatchError) Error() string { return e.msg }

func mismatch(f string, a ...any) error { return &mismatchError{fmt.Sprintf(f, a...)} }

// withHistory adds the worker's recent ops to a mismatch.
func (w *worker) withHistory(err error) error {
	return mismatch("%v\n    last ops of worker %d: %q", err, w.id, w.hist)
}

// expect compares the error of an operation with the errno the model
// predicts (0: success).
func (w *worker) expect(op Op, p string, err error, want unix.Errno) error {
	got := errnoOf(err)
	if got != want {
		return mismatch("worker %d: %s %q: got %v (%v), want %v", w.id, op, p, errName(got), err, errName(want))
	}
	if want != 0 {
		w.errs[op.String()+" "+errName(want)]++
	}
	return nil
}

func errName(e unix.Errno) string {
	if e == 0 {
		return "ok"
	}
	if n := unix.ErrnoName(e); n != "" {
		return n
	}
	return e.Error()
}

func (w *worker) pick(ps []string) (string, bool) {
	if len(ps) == 0 {
		return "", false
	}
	return ps[w.rng.IntN(len(ps))], true
}

// ownDirs are the directories of the worker's subtree.
func (w *worker) ownDirs() []string { return w.t.Paths(Dir) }

// ownFiles are the regular files the worker owns, in its subtree and its
// names in shared/d.
func (w *worker) ownFiles() []string { return w.t.Paths(File) }

func (w *worker) inSubtree(p string) bool {
	r := WorkerRoot(w.id)
	return p == r || isUnder(p, r)
}

func (w *worker) subtreePaths(kinds ...Kind) []string {
	var out []string
	for _, p := range w.t.Paths(kinds...) {
		if w.inSubtree(p) {
			out = append(out, p)
		}
	}
	return out
}

// newPath returns a name for something new: mostly in the worker's own
// dirs, sometimes "w<id>-NAME" in the shared dir (files only).
func (w *worker) newPath(allowShared bool) string {
	name := poolNames[w.rng.IntN(len(poolNames))]
	if w.rng.IntN(4) == 0 {
		w.seq++
		name = fmt.Sprintf("n%d", w.seq)
	}
	if allowShared && w.rng.IntN(5) == 0 {
		return SharedDir + "/" + WorkerRoot(w.id) + "-" + name
	}
	d, _ := w.pick(w.subtreePaths(Dir))
	return path.Join(d, name)
}

func tooLong(p string) bool { return len(path.Base(p)) > unix.NAME_MAX }

func (w *worker) data() []byte {
	n := w.rng.IntN(16 << 10)
	if w.rng.IntN(50) == 0 {
		n = 1<<20 + w.rng.IntN(1<<20)
	}
	return randData(w.rng, n)
}

func (w *worker) pickOp() Op {
	total := 0
	for _, x := range opWeights {
		total += x
	}
	r := w.rng.IntN(total)
	for op, x := range opWeights {
		if r < x {
			return Op(op)
		}
		r -= x
	}
	return OpRead
}

// step does one random operation. It returns a mismatch, or nil.
func (w *worker) step() error {
	op := w.pickOp()
	w.counts[op].Add(1)
	w.ops.Add(1)
	switch op {
	case OpCreate:
		p := w.newPath(true)
		w.note("create " + p)
		want := unix.Errno(0)
		switch {
		case tooLong(p):
			want = unix.ENAMETOOLONG
		case w.t.Get(p) != nil:
			want = unix.EEXIST
		}
		data := w.data()
		fd, err := w.open(w.full(p), unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
		if e := w.expect(op, p, err, want); e != nil || want != 0 {
			if err == nil {
				unix.Close(fd)
			}
			return e
		}
		_, werr := unix.Write(fd, data)
		cerr := unix.Close(fd)
		if werr != nil || cerr != nil {
			return mismatch("worker %d: create %q: write %v close %v", w.id, p, werr, cerr)
		}
		w.t.Put(p, &Obj{Kind: File, Mode: 0o644, Data: data})
	case OpWrite, OpAppend:
		p, ok := w.pick(w.ownFiles())
		if !ok {
			return nil
		}
		w.note(op.String() + " " + p)
		o := w.t.Get(p)
		data := w.data()
		flags := unix.O_WRONLY | unix.O_CLOEXEC
		off := int64(w.rng.IntN(len(o.Data) + 4096))
		if op == OpAppend {
			flags |= unix.O_APPEND
			off = int64(len(o.Data))
		}
		fd, err := w.open(w.full(p), flags, 0)
		if e := w.expect(op, p, err, 0); e != nil {
			return e
		}
		var n int
		if op == OpAppend {
			n, err = unix.Write(fd, data)
		} else {
			n, err = unix.Pwrite(fd, data, off)
		}
		if err == nil && w.rng.IntN(8) == 0 {
			err = unix.Fsync(fd)
		}
		cerr := unix.Close(fd)
		if err != nil || cerr != nil || n != len(data) {
			return mismatch("worker %d: %s %q: wrote %d of %d: %v, close %v", w.id, op, p, n, len(data), err, cerr)
		}
		if len(data) == 0 {
			return nil // a write of no bytes changes nothing, not even past the end
		}
		if end := off + int64(len(data)); end > int64(len(o.Data)) {
			o.Data = append(o.Data, make([]byte, end-int64(len(o.Data)))...)
		}
		copy(o.Data[off:], data)
	case OpTruncate:
		p, ok := w.pick(w.ownFiles())
		if !ok {
			return nil
		}
		w.note("truncate " + p)
		o := w.t.Get(p)
		size := w.rng.IntN(2*len(o.Data) + 100)
		if e := w.expect(op, p, w.retry(func() error { return unix.Truncate(w.full(p), int64(size)) }), 0); e != nil {
			return e
		}
		if size <= len(o.Data) {
			o.Data = o.Data[:size:size]
		} else {
			o.Data = append(o.Data, make([]byte, size-len(o.Data))...)
		}
	case OpRename:
		src, ok := w.pick(w.subtreePaths(File, Symlink))
		if !ok {
			return nil
		}
		dst := w.newPath(false)
		w.note("rename " + src + " -> " + dst)
		so, do := w.t.Get(src), w.t.Get(dst)
		want := unix.Errno(0)
		switch {
		case isUnder(src, dst):
			want = unix.ENOTEMPTY // the target is an ancestor (fs/namei.c:do_renameat2)
		case do != nil && do.Kind == Dir:
			want = unix.EISDIR
		}
		if e := w.expect(op, src+" -> "+dst, w.retry(func() error { return unix.Rename(w.full(src), w.full(dst)) }), want); e != nil || want != 0 {
			return e
		}
		if src == dst || so == do {
			return nil // rename(2) between names of one object does nothing
		}
		delete(w.t.M, dst)
		w.t.Move(src, dst)
	case OpRenameDir:
		src, ok := w.pick(w.subtreePaths(Dir))
		if !ok || src == WorkerRoot(w.id) {
			return nil
		}
		dst := w.newPath(false)
		if w.t.Get(dst) != nil || dst == src || isUnder(dst, src) {
			return nil
		}
		w.note("rename-dir " + src + " -> " + dst)
		want := unix.Errno(0)
		if !w.t.Get(src).PureUpper {
			// Kernel overlay without redirect_dir (fs/overlayfs/dir.c:ovl_rename).
			want = unix.EXDEV
		}
		if e := w.expect(op, src+" -> "+dst, w.retry(func() error { return unix.Rename(w.full(src), w.full(dst)) }), want); e != nil || want != 0 {
			return e
		}
		w.t.Move(src, dst)
	case OpLink:
		src, ok := w.pick(w.ownFiles())
		if !ok {
			return nil
		}
		dst := w.newPath(false)
		w.note("link " + src + " -> " + dst)
		want := unix.Errno(0)
		if w.t.Get(dst) != nil {
			want = unix.EEXIST
		}
		if e := w.expect(op, src+" -> "+dst, os.Link(w.full(src), w.full(dst)), want); e != nil || want != 0 {
			return e
		}
		w.t.M[dst] = w.t.Get(src)
	case OpUnlink:
		p, ok := w.pick(w.t.Paths(File, Symlink))
		if !ok {
			return nil
		}
		w.note("unlink " + p)
		if e := w.expect(op, p, w.retry(func() error { return unix.Unlink(w.full(p)) }), 0); e != nil {
			return e
		}
		delete(w.t.M, p)
	case OpMkdir:
		p := w.newPath(false)
		w.note("mkdir " + p)
		want := unix.Errno(0)
		if w.t.Get(p) != nil {
			want = unix.EEXIST
		}
		if e := w.expect(op, p, w.retry(func() error { return unix.Mkdir(w.full(p), 0o755) }), want); e != nil || want != 0 {
			return e
		}
		w.t.Put(p, &Obj{Kind: Dir, Mode: 0o755, PureUpper: true})
	case OpRmdir:
		p, ok := w.pick(w.subtreePaths(Dir))
		if !ok || p == WorkerRoot(w.id) {
			return nil
		}
		w.note("rmdir " + p)
		want := unix.Errno(0)
		if len(w.t.Children(p)) > 0 {
			want = unix.ENOTEMPTY
		}
		if e := w.expect(op, p, w.retry(func() error { return unix.Rmdir(w.full(p)) }), want); e != nil || want != 0 {
			return e
		}
		w.t.RemoveAll(p)
	case OpSetxattr, OpRemovexattr:
		p, ok := w.pick(w.t.Paths(File, Dir))
		if !ok {
			return nil
		}
		keys := []string{"user.k0", "user.k1", "user.k2", "user.color"}
		k := keys[w.rng.IntN(len(keys))]
		w.note(op.String() + " " + p + " " + k)
		o := w.t.Get(p)
		if op == OpSetxattr {
			v := string(randData(w.rng, w.rng.IntN(64)))
			if e := w.expect(op, p, w.retry(func() error { return unix.Lsetxattr(w.full(p), k, []byte(v), 0) }), 0); e != nil {
				return e
			}
			o.Xattrs[k] = v
			return nil
		}
		want := unix.Errno(0)
		if _, ok := o.Xattrs[k]; !ok {
			want = unix.ENODATA
		}
		if e := w.expect(op, p, w.retry(func() error { return unix.Lremovexattr(w.full(p), k) }), want); e != nil || want != 0 {
			return e
		}
		delete(o.Xattrs, k)
	case OpChmod:
		p, ok := w.pick(w.ownFiles())
		if !ok {
			return nil
		}
		modes := []uint32{0o600, 0o644, 0o755, 0o640, 0o400}
		m := modes[w.rng.IntN(len(modes))]
		w.note("chmod " + p)
		if e := w.expect(op, p, w.retry(func() error { return unix.Chmod(w.full(p), m) }), 0); e != nil {
			return e
		}
		w.t.Get(p).Mode = m
	case OpSymlink:
		p := w.newPath(false)
		tgt := symlinkTargets[w.rng.IntN(len(symlinkTargets))]
		w.note("symlink " + p)
		want := unix.Errno(0)
		if w.t.Get(p) != nil {
			want = unix.EEXIST
		}
		if e := w.expect(op, p, w.retry(func() error { return unix.Symlink(tgt, w.full(p)) }), want); e != nil || want != 0 {
			return e
		}
		w.t.Put(p, &Obj{Kind: Symlink, Target: tgt})
	case OpRead:
		p, ok := w.pick(w.t.Paths(File, Symlink))
		if !ok {
			return nil
		}
		w.note("read " + p)
		return w.checkContent(w.t, p)
	case OpStat:
		p, ok := w.pick(w.t.Paths())
		if !ok {
			return nil
		}
		w.note("stat " + p)
		return w.checkStat(p)
	case OpReaddir:
		p, ok := w.pick(w.subtreePaths(Dir))
		if !ok {
			return nil
		}
		w.note("readdir " + p)
		return w.checkReaddir(w.t, p, false)
	case OpLogAppend:
		w.seq++
		rec := []byte(fmt.Sprintf("%-*s\n", RecordSize-1, fmt.Sprintf("w%d %d", w.id, w.seq)))
		w.note("log-append")
		fd, err := w.open(w.full(LogPath), unix.O_WRONLY|unix.O_APPEND|unix.O_CLOEXEC, 0)
		if e := w.expect(op, LogPath, err, 0); e != nil {
			return e
		}
		n, err := unix.Write(fd, rec)
		if err == nil && w.rng.IntN(4) == 0 {
			err = unix.Fsync(fd)
		}
		cerr := unix.Close(fd)
		if err != nil || cerr != nil || n != len(rec) {
			return mismatch("worker %d: log append: wrote %d: %v, close %v", w.id, n, err, cerr)
		}
		w.records = append(w.records, rec)
	case OpLogRead:
		// Before this worker's first append the log may still be the
		// lower file, which another worker's append copies up while this
		// read holds it open (unionfs.TestPassthroughOpenForWriteWhileLowerOpen).
		w.note("log-read")
		b, err := os.ReadFile(w.full(LogPath))
		if err != nil {
			return mismatch("worker %d: read log: %v", w.id, err)
		}
		recs, err := parseLog(b, w.f.LogHeader)
		if err != nil {
			return mismatch("worker %d: log: %v", w.id, err)
		}
		for _, r := range w.records {
			if recs[string(r)] != 1 {
				return mismatch("worker %d: log holds acknowledged record %q %d times, want once", w.id, r, recs[string(r)])
			}
		}
	case OpSharedXattr:
		w.seq++
		v := fmt.Sprintf("v%d", w.seq)
		k := "user." + WorkerRoot(w.id)
		w.note("shared-xattr")
		if e := w.expect(op, XattrPath, w.retry(func() error { return unix.Lsetxattr(w.full(XattrPath), k, []byte(v), 0) }), 0); e != nil {
			return e
		}
		w.xattr = v
		buf := make([]byte, 64)
		n, err := unix.Lgetxattr(w.full(XattrPath), k, buf)
		if err != nil || string(buf[:n]) != v {
			return mismatch("worker %d: getxattr %s after set: %q, %v; want %q", w.id, k, buf[:max(n, 0)], err, v)
		}
	case OpSharedRead:
		p, ok := w.pick(w.shared.Paths())
		if !ok || p == LogPath {
			return nil
		}
		w.note("shared-read " + p)
		switch w.shared.Get(p).Kind {
		case Dir:
			return w.checkReaddir(w.shared, p, true)
		default:
			return w.checkContent(w.shared, p)
		}
	}
	return nil
}

// checkContent reads file or symlink p and compares it with t.
func (w *worker) checkContent(t *Tree, p string) error {
	o := t.Get(p)
	if o.Kind == Symlink {
		tgt, err := os.Readlink(w.full(p))
		if err != nil || tgt != o.Target {
			return mismatch("worker %d: readlink %q: %q, %v; want %q", w.id, p, tgt, err, o.Target)
		}
		return nil
	}
	b, err := os.ReadFile(w.full(p))
	if err != nil {
		return mismatch("worker %d: read %q: %v", w.id, p, err)
	}
	if !bytes.Equal(b, o.Data) {
		return mismatch("worker %d: read %q: %d bytes differ from the model's %d (first difference at %d)",
			w.id, p, len(b), len(o.Data), firstDiff(b, o.Data))
	}
	return nil
}

func firstDiff(a, b []byte) int {
	for i := 0; i < len(a) && i < len(b); i++ {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// checkStat compares lstat of p with the model.
func (w *worker) checkStat(p string) error {
	o := w.t.Get(p)
	var st unix.Stat_t
	if err := unix.Lstat(w.full(p), &st); err != nil {
		return mismatch("worker %d: stat %q: %v", w.id, p, err)
	}
	kind := map[uint32]Kind{unix.S_IFREG: File, unix.S_IFDIR: Dir, unix.S_IFLNK: Symlink}[st.Mode&unix.S_IFMT]
	if kind != o.Kind {
		return mismatch("worker %d: stat %q: type %o, want %v", w.id, p, st.Mode&unix.S_IFMT, o.Kind)
	}
	switch o.Kind {
	case File:
		if st.Size != int64(len(o.Data)) || st.Mode&0o7777 != o.Mode || int(st.Nlink) != w.t.Nlink(o) {
			return mismatch("worker %d: stat %q: size %d mode %o nlink %d; want %d %o %d", w.id, p,
				st.Size, st.Mode&0o7777, st.Nlink, len(o.Data), o.Mode, w.t.Nlink(o))
		}
	case Dir:
		if st.Mode&0o7777 != o.Mode {
			return mismatch("worker %d: stat %q: mode %o, want %o", w.id, p, st.Mode&0o7777, o.Mode)
		}
	}
	return nil
}

// checkReaddir lists dir p and compares the names with t. With shared,
// names owned by a worker are left out (other workers change them).
func (w *worker) checkReaddir(t *Tree, p string, shared bool) error {
	ents, err := os.ReadDir(w.full(p))
	if err != nil {
		return mismatch("worker %d: readdir %q: %v", w.id, p, err)
	}
	var got []string
	for _, e := range ents {
		if shared && w.f.Owner(path.Join(p, e.Name())) >= 0 {
			continue
		}
		got = append(got, e.Name())
	}
	sort.Strings(got)
	want := t.Children(p)
	if strings.Join(got, "\x00") != strings.Join(want, "\x00") {
		return mismatch("worker %d: readdir %q: %q, want %q", w.id, p, got, want)
	}
	return nil
}

// parseLog checks the framing of shared/log and counts its records.
func parseLog(b, header []byte) (map[string]int, error) {
	if len(b)%RecordSize != 0 {
		return nil, fmt.Errorf("size %d is not a multiple of %d (a torn or lost append)", len(b), RecordSize)
	}
	if !bytes.HasPrefix(b, header) {
		return nil, fmt.Errorf("lower header lost: starts with %q", b[:min(len(b), RecordSize)])
	}
	out := map[string]int{}
	for i := RecordSize; i < len(b); i += RecordSize {
		r := b[i : i+RecordSize]
		if r[0] != 'w' || r[RecordSize-1] != '\n' {
			return nil, fmt.Errorf("bad record at %d: %q", i, r)
		}
		out[string(r)]++
	}
	return out, nil
}
