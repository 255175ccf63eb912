package cmd

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"strata/internal/stress"
	"strata/internal/testenv"
)

// Fault tests: the daemon killed at random points, a full upper
// filesystem, an upper filesystem that fails with EIO. Each must end with
// errors reported to callers (never silent loss), nothing half-done
// visible, and a mount that can be cleaned up and mounted again.
//
// EIO comes from an ext4 upper shut down with FS_IOC_SHUTDOWN (what
// xfstests' godown does): this kernel has no device-mapper, so dm-error
// and dm-flakey cannot be used.

// faultIters is how many kill -9 rounds to run: STRATA_FAULT_ITERS, else
// 12 (4 with -short).
func faultIters(t *testing.T) int {
	if v := os.Getenv("STRATA_FAULT_ITERS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Fatalf("STRATA_FAULT_ITERS=%q: %v", v, err)
		}
		return n
	}
	if testing.Short() {
		return 4
	}
	return 12
}

// daemon is a strata server running in the foreground as a child.
type daemon struct {
	cmd  *exec.Cmd
	mnt  string
	done chan error
}

func startDaemon(t *testing.T, opts, mnt string) *daemon {
	t.Helper()
	cmd := exec.Command(strataBin, "mount", "-f", "-o", opts, mnt)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{cmd: cmd, mnt: mnt, done: make(chan error, 1)}
	go func() { d.done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		cleanupMount(mnt)
	})
	for i := 0; i < 400; i++ {
		if isMounted(t, mnt) {
			return d
		}
		select {
		case err := <-d.done:
			t.Fatalf("strata mount -f exited: %v: %s", err, stderr.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("%s never became a mount", mnt)
	return nil
}

// cleanupMount makes sure nothing is left mounted at mnt.
func cleanupMount(mnt string) {
	for i := 0; i < 5 && stress.IsMounted(mnt); i++ {
		stress.AbortFUSE(mnt)
		unix.Unmount(mnt, unix.MNT_DETACH)
	}
}

func (d *daemon) kill(t *testing.T) {
	t.Helper()
	d.cmd.Process.Signal(unix.SIGKILL)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		dump := threadDump(d.cmd.Process.Pid)
		// Free it: abort its FUSE connection (the mount may already be
		// detached; then find the connection by the daemon's mount id).
		stress.AbortFUSE(d.mnt)
		t.Fatalf("daemon %d did not exit within 10s of SIGKILL (see TestBugKill9DuringMountStartupUnkillable); its threads:\n%s", d.cmd.Process.Pid, dump)
	}
}

// exitedWithin reports whether the killed daemon exits within timeout.
func (d *daemon) exitedWithin(timeout time.Duration) bool {
	select {
	case <-d.done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// threadDump describes every thread of process pid: state, wait channel
// and kernel stack (what keeps a killed process from exiting).
func threadDump(pid int) string {
	var b strings.Builder
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		dir := fmt.Sprintf("/proc/%d/task/%s/", pid, task.Name())
		stat, _ := os.ReadFile(dir + "stat")
		wchan, _ := os.ReadFile(dir + "wchan")
		stack, _ := os.ReadFile(dir + "stack")
		state := ""
		if f := strings.Fields(string(stat)); len(f) > 2 {
			state = f[2]
		}
		fmt.Fprintf(&b, "thread %s state %s wchan %s\n%s", task.Name(), state, wchan, stack)
	}
	return b.String()
}

// umount runs "strata umount" and checks the mount point is plain again.
func umountChecked(t *testing.T, mnt string) {
	t.Helper()
	if out, err := exec.Command(strataBin, "umount", mnt).CombinedOutput(); err != nil {
		t.Fatalf("strata umount %s: %v: %s", mnt, err, out)
	}
	if isMounted(t, mnt) {
		t.Fatalf("%s still mounted after strata umount", mnt)
	}
	var st unix.Stat_t
	if err := unix.Stat(mnt, &st); err != nil {
		t.Fatalf("stat %s after strata umount: %v (a dead mount left behind)", mnt, err)
	}
}

// killFixture is a lower layer for the kill -9 rounds: many small files,
// a few large ones, directories to rename and remove.
type killFixture struct {
	lower  string
	small  []string // relative paths
	large  []string
	lowerB map[string][]byte // content of every lower file
	dirs   []string          // lower dirs with files, to empty and rmdir
}

func makeKillFixture(t *testing.T, dir string) *killFixture {
	t.Helper()
	f := &killFixture{lower: filepath.Join(dir, "lower"), lowerB: map[string][]byte{}}
	rng := rand.New(rand.NewPCG(1, 2))
	put := func(rel string, b []byte) {
		p := filepath.Join(f.lower, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		f.lowerB[rel] = b
	}
	for i := 0; i < 300; i++ {
		rel := fmt.Sprintf("small/d%d/f%d", i%10, i)
		b := make([]byte, 1+rng.IntN(16<<10))
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		put(rel, b)
		f.small = append(f.small, rel)
	}
	for i := 0; i < 3; i++ {
		rel := fmt.Sprintf("large/f%d", i)
		b := bytes.Repeat([]byte(fmt.Sprintf("large %d block ", i)), (24<<20)/16)
		put(rel, b)
		f.large = append(f.large, rel)
	}
	for i := 0; i < 6; i++ {
		d := fmt.Sprintf("rmdirs/r%d", i)
		for j := 0; j < 5; j++ {
			put(fmt.Sprintf("%s/f%d", d, j), []byte("to be removed"))
		}
		f.dirs = append(f.dirs, d)
	}
	return f
}

// acked records what the client saw succeed before the kill.
type acked struct {
	mu      sync.Mutex
	synced  map[string][]byte // path -> full content, written and fsynced
	written map[string][]byte // path -> full content, written (not fsynced)
	gone    map[string]bool   // unlinked or renamed away, acknowledged
	moved   map[string]string // rename dst -> src, acknowledged
	rmdirs  map[string]bool
	chmods  map[string]bool // large files whose chmod (a full copy-up) returned
}

// TestFaultKill9AtRandomPoints kills the daemon at random moments while
// clients copy up small and large files (appends with fsync, chmod of
// large files), rename, unlink, rmdir and create. After each kill:
// "strata umount" clears the dead mount; the upper dir shows no partial
// copy-up; a fresh mount clears the work dir, shows every acknowledged
// change, fsynced or not (the daemon's writes are in the upper's page
// cache once acknowledged), and a consistent tree.
func TestFaultKill9AtRandomPoints(t *testing.T) {
	testenv.RequireFUSE(t)
	base := t.TempDir()
	fix := makeKillFixture(t, base)
	iters := faultIters(t)
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d, %d rounds", seed, iters)
	rng := rand.New(rand.NewPCG(seed, 3))
	var outcomes []string
	for it := 0; it < iters; it++ {
		dir := filepath.Join(base, fmt.Sprintf("round%d", it))
		u, w, m := filepath.Join(dir, "u"), filepath.Join(dir, "w"), filepath.Join(dir, "m")
		for _, d := range []string{u, w, m} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		opts := "lowerdir=" + fix.lower + ",upperdir=" + u + ",workdir=" + w
		d := startDaemon(t, opts, m)
		a := &acked{synced: map[string][]byte{}, written: map[string][]byte{}, gone: map[string]bool{},
			moved: map[string]string{}, rmdirs: map[string]bool{}, chmods: map[string]bool{}}
		// At least 20ms after the mount shows up: a kill in the first
		// milliseconds can leave an unkillable daemon (a known strata
		// bug with its own test, TestBugKill9DuringMountStartupUnkillable).
		delay := time.Duration(20+rng.IntN(400)) * time.Millisecond
		var wg sync.WaitGroup
		for c := 0; c < 4; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				killClient(fix, m, a, c, rand.New(rand.NewPCG(seed, uint64(it*10+c))))
			}()
		}
		time.Sleep(delay)
		workLeft, _ := os.ReadDir(filepath.Join(w, "work"))
		d.kill(t)
		wg.Wait()
		// The dead mount answers ENOTCONN until unmounted.
		if err := unix.Access(filepath.Join(m, "probe-after-kill"), unix.F_OK); !errors.Is(err, unix.ENOTCONN) {
			t.Errorf("round %d: lookup in the dead mount: %v, want ENOTCONN", it, err)
		}
		umountChecked(t, m)
		checkNoPartialCopies(t, fix, u, a)
		leftovers, _ := os.ReadDir(filepath.Join(w, "work"))
		d2 := startDaemon(t, opts, m)
		if ents, _ := os.ReadDir(filepath.Join(w, "work")); len(ents) != 0 {
			t.Errorf("round %d: work dir after remount holds %d leftovers", it, len(ents))
		}
		checkAcked(t, fix, m, a)
		umountChecked(t, m)
		select {
		case err := <-d2.done:
			if err != nil {
				t.Errorf("round %d: daemon after umount: %v", it, err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("round %d: daemon did not exit after umount", it)
		}
		a.mu.Lock()
		outcomes = append(outcomes, fmt.Sprintf("round %d: kill after %v (work dir busy: %d entries, %d left at the kill): %d fsynced + %d written files, %d unlinks/renames, %d rmdirs, %d large chmods acknowledged",
			it, delay, len(workLeft), len(leftovers), len(a.synced), len(a.written), len(a.gone), len(a.rmdirs), len(a.chmods)))
		a.mu.Unlock()
		if t.Failed() {
			break
		}
	}
	t.Logf("\n%s", strings.Join(outcomes, "\n"))
}

// killClient changes the mount until the daemon dies, recording what
// succeeded.
func killClient(fix *killFixture, m string, a *acked, c int, rng *rand.Rand) {
	for n := 0; ; n++ {
		var err error
		switch r := rng.IntN(100); {
		case r < 45: // copy-up of a small file by an fsynced append
			rel := fix.small[rng.IntN(len(fix.small))]
			a.mu.Lock()
			skip := a.gone[rel]
			base, ok := a.synced[rel]
			if !ok {
				base = fix.lowerB[rel]
			}
			if w, ok := a.written[rel]; ok {
				base = w
			}
			a.mu.Unlock()
			if skip || rel[len(rel)-1]%4 != byte(c) {
				continue // one client per file keeps the record exact
			}
			rec := []byte(fmt.Sprintf("<ack %d.%d>", c, n))
			var f *os.File
			f, err = os.OpenFile(filepath.Join(m, rel), os.O_WRONLY|os.O_APPEND, 0)
			if err == nil {
				_, err = f.Write(rec)
				sync := rng.IntN(2) == 0
				if err == nil && sync {
					err = f.Sync()
				}
				if cerr := f.Close(); err == nil {
					err = cerr
				}
				if err == nil {
					a.mu.Lock()
					nb := append(append([]byte(nil), base...), rec...)
					if sync {
						a.synced[rel] = nb
						delete(a.written, rel)
					} else {
						a.written[rel] = nb
					}
					a.mu.Unlock()
				}
			}
		case r < 55: // full copy-up of a large file by chmod
			if c != 0 {
				continue
			}
			rel := fix.large[rng.IntN(len(fix.large))]
			if err = os.Chmod(filepath.Join(m, rel), 0o640); err == nil {
				a.mu.Lock()
				a.chmods[rel] = true
				a.mu.Unlock()
			}
		case r < 70: // rename a lower file (copy-up + whiteout)
			rel := fix.small[rng.IntN(len(fix.small))]
			if rel[len(rel)-1]%4 != byte(c) {
				continue
			}
			a.mu.Lock()
			skip := a.gone[rel] || a.synced[rel] != nil || a.written[rel] != nil
			a.mu.Unlock()
			if skip {
				continue
			}
			dst := rel + ".moved"
			if err = os.Rename(filepath.Join(m, rel), filepath.Join(m, dst)); err == nil {
				a.mu.Lock()
				a.gone[rel] = true
				a.moved[dst] = rel
				a.mu.Unlock()
			}
		case r < 80: // empty a lower dir and remove it
			if c != 1 {
				continue
			}
			d := fix.dirs[rng.IntN(len(fix.dirs))]
			a.mu.Lock()
			skip := a.rmdirs[d]
			a.mu.Unlock()
			if skip {
				continue
			}
			ents, err2 := os.ReadDir(filepath.Join(m, d))
			err = err2
			for _, e := range ents {
				if err == nil {
					err = os.Remove(filepath.Join(m, d, e.Name()))
				}
			}
			if err == nil {
				if err = os.Remove(filepath.Join(m, d)); err == nil {
					a.mu.Lock()
					a.rmdirs[d] = true
					a.mu.Unlock()
				}
			}
		default: // a new file in a new upper dir, fsynced
			p := fmt.Sprintf("new/c%d/n%d", c, n)
			b := []byte(fmt.Sprintf("new file %d.%d", c, n))
			if err = os.MkdirAll(filepath.Join(m, filepath.Dir(p)), 0o755); err == nil {
				var f *os.File
				if f, err = os.Create(filepath.Join(m, p)); err == nil {
					_, err = f.Write(b)
					if err == nil {
						err = f.Sync()
					}
					if cerr := f.Close(); err == nil {
						err = cerr
					}
					if err == nil {
						a.mu.Lock()
						a.synced[p] = b
						a.mu.Unlock()
					}
				}
			}
		}
		if errors.Is(err, unix.ENOTCONN) || errors.Is(err, unix.ECONNABORTED) {
			return
		}
		if err != nil && n > 100000 {
			return
		}
		var st unix.Stat_t
		if unix.Stat(m, &st) != nil {
			return
		}
	}
}

// checkNoPartialCopies looks at the upper dir left by a killed daemon:
// every regular file that a lower file was copied to must hold the whole
// lower content (plus appended records), every large file exactly it.
func checkNoPartialCopies(t *testing.T, fix *killFixture, upper string, a *acked) {
	t.Helper()
	for rel, lb := range fix.lowerB {
		b, err := os.ReadFile(filepath.Join(upper, rel))
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOTDIR) {
			continue
		}
		if err != nil {
			var st unix.Stat_t
			if unix.Lstat(filepath.Join(upper, rel), &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFCHR {
				continue // a whiteout
			}
			t.Errorf("upper %s: %v", rel, err)
			continue
		}
		if !bytes.HasPrefix(b, lb) {
			t.Errorf("upper %s: %d bytes that do not start with the lower file's %d: a partial copy-up is visible", rel, len(b), len(lb))
		}
	}
	for dst, src := range a.moved {
		b, err := os.ReadFile(filepath.Join(upper, dst))
		if err != nil || !bytes.HasPrefix(b, fix.lowerB[src]) {
			t.Errorf("upper %s (renamed from %s): %d bytes, %v; want the whole lower file", dst, src, len(b), err)
		}
	}
}

// checkAcked checks, through a fresh mount, that every acknowledged change
// survived the kill and the tree reads without errors.
func checkAcked(t *testing.T, fix *killFixture, m string, a *acked) {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	for p, want := range a.synced {
		if a.gone[p] {
			continue
		}
		got, err := os.ReadFile(filepath.Join(m, p))
		if err != nil || !bytes.HasPrefix(got, want) {
			t.Errorf("acknowledged fsynced write to %s lost: got %d bytes (%v), want %d starting with the acknowledged content", p, len(got), err, len(want))
		}
	}
	for p, want := range a.written {
		got, err := os.ReadFile(filepath.Join(m, p))
		if err != nil || !bytes.HasPrefix(got, want) {
			t.Errorf("acknowledged (not fsynced) write to %s lost after kill -9: got %d bytes (%v), want %d", p, len(got), err, len(want))
		}
	}
	for p := range a.gone {
		if _, err := os.Lstat(filepath.Join(m, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s was renamed away (acknowledged) but is visible again: %v", p, err)
		}
	}
	for dst, src := range a.moved {
		got, err := os.ReadFile(filepath.Join(m, dst))
		if err != nil || !bytes.Equal(got, fix.lowerB[src]) {
			t.Errorf("acknowledged rename %s -> %s lost: %d bytes, %v", src, dst, len(got), err)
		}
	}
	for d := range a.rmdirs {
		if _, err := os.Lstat(filepath.Join(m, d)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("acknowledged rmdir %s undone: %v", d, err)
		}
	}
	for rel := range a.chmods {
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(m, rel), &st); err != nil || st.Mode&0o777 != 0o640 {
			t.Errorf("acknowledged chmod of %s lost: mode %o, %v", rel, st.Mode&0o777, err)
		}
	}
	for rel, lb := range fix.lowerB {
		if a.gone[rel] || a.synced[rel] != nil || a.written[rel] != nil {
			continue
		}
		got, err := os.ReadFile(filepath.Join(m, rel))
		if errors.Is(err, os.ErrNotExist) && strings.HasPrefix(rel, "rmdirs/") {
			continue // removed by an rmdir round that the kill interrupted
		}
		if errors.Is(err, os.ErrNotExist) && strings.HasPrefix(rel, "small/") {
			// A rename in flight at the kill: the file moved in one step.
			if b, err2 := os.ReadFile(filepath.Join(m, rel+".moved")); err2 == nil && bytes.Equal(b, lb) {
				continue
			}
		}
		if err != nil || !bytes.HasPrefix(got, lb) {
			t.Errorf("%s after the kill: %d bytes, %v; want the lower content (a partial or lost copy-up)", rel, len(got), err)
		}
	}
	if err := filepathWalkAll(m); err != nil {
		t.Errorf("walk after the kill: %v", err)
	}
}

// filepathWalkAll stats and reads every object under root.
func filepathWalkAll(root string) error {
	return filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			_, err = os.ReadFile(p)
		}
		return err
	})
}

// smallUpper mounts a tmpfs of size bytes (and inodes inodes) at dir and
// returns it; it is unmounted when the test ends.
func smallUpper(t *testing.T, dir string, size, inodes int) string {
	t.Helper()
	testenv.RequireRoot(t)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,nr_inodes=%d,mode=755", size, inodes)); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			unix.Unmount(dir, unix.MNT_DETACH)
		}
	})
	return dir
}

// TestFaultENOSPCSurfacesAndRecovers fills a small upper filesystem
// through the mount: every failure must reach the caller as ENOSPC (never
// a silent short file), a copy-up that does not fit must fail without
// leaving a partial file, and once space is freed the same mount works
// again (not wedged). Everything acknowledged must read back.
func TestFaultENOSPCSurfacesAndRecovers(t *testing.T) {
	testenv.RequireFUSE(t)
	dir := t.TempDir()
	small := smallUpper(t, filepath.Join(dir, "small"), 4<<20, 400)
	l, u, w, m := filepath.Join(dir, "l"), filepath.Join(small, "u"), filepath.Join(small, "w"), filepath.Join(dir, "m")
	for _, d := range []string{l, u, w, m} {
		os.MkdirAll(d, 0o755)
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), (3<<20)/16)
	os.WriteFile(filepath.Join(l, "big"), big, 0o644)
	for i := 0; i < 50; i++ {
		os.WriteFile(filepath.Join(l, fmt.Sprintf("lf%d", i)), []byte("lower"), 0o644)
	}
	startDaemon(t, "lowerdir="+l+",upperdir="+u+",workdir="+w, m)

	// Fill the upper with 256 KiB files until the space runs out.
	chunk := bytes.Repeat([]byte("x"), 256<<10)
	good := map[string]int{}
	var fillErr error
	for i := 0; i < 100 && fillErr == nil; i++ {
		p := filepath.Join(m, fmt.Sprintf("fill%d", i))
		f, err := os.Create(p)
		if err != nil {
			fillErr = err
			break
		}
		n, err := f.Write(chunk)
		if err == nil {
			err = f.Sync()
		}
		cerr := f.Close()
		switch {
		case err == nil && cerr == nil && n == len(chunk):
			good[p] = n
		case err == nil && cerr == nil:
			t.Errorf("%s: short write %d of %d without an error", p, n, len(chunk))
		default:
			fillErr = errors.Join(err, cerr)
		}
	}
	if !errors.Is(fillErr, unix.ENOSPC) {
		t.Fatalf("filling the upper ended with %v, want ENOSPC", fillErr)
	}
	t.Logf("upper full after %d files of 256 KiB: %v", len(good), fillErr)

	// A copy-up that cannot fit fails with ENOSPC and leaves nothing.
	f, err := os.OpenFile(filepath.Join(m, "big"), os.O_WRONLY|os.O_APPEND, 0)
	if err == nil {
		f.Close()
		t.Errorf("open for write of a 3 MiB lower file on a full upper succeeded")
	} else if !errors.Is(err, unix.ENOSPC) {
		t.Errorf("copy-up on a full upper: %v, want ENOSPC", err)
	}
	if _, err := os.Lstat(filepath.Join(u, "big")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("failed copy-up left upper/big: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(w, "work")); len(ents) != 0 {
		t.Errorf("failed copy-up left %d entries in the work dir", len(ents))
	}
	if b, err := os.ReadFile(filepath.Join(m, "big")); err != nil || !bytes.Equal(b, big) {
		t.Errorf("big after a failed copy-up: %d bytes, %v; want the lower file", len(b), err)
	}

	// Exhaust inodes too: creates and whiteouts need one.
	var inodeErr error
	for i := 0; i < 1000 && inodeErr == nil; i++ {
		inodeErr = os.Mkdir(filepath.Join(m, fmt.Sprintf("dir%d", i)), 0o755)
	}
	if !errors.Is(inodeErr, unix.ENOSPC) {
		t.Errorf("mkdir until the inodes run out ended with %v, want ENOSPC", inodeErr)
	}
	err = os.Remove(filepath.Join(m, "lf0"))
	t.Logf("unlink of a lower file (needs a whiteout) with no inodes left: %v", err)
	if err != nil && !errors.Is(err, unix.ENOSPC) {
		t.Errorf("unlink of a lower file on a full upper: %v, want success or ENOSPC", err)
	}
	if err != nil {
		if _, serr := os.Stat(filepath.Join(m, "lf0")); serr != nil {
			t.Errorf("unlink failed (%v) but lf0 is gone: %v", err, serr)
		}
	}

	// Everything acknowledged reads back; the mount still answers.
	for p, n := range good {
		if st, err := os.Stat(p); err != nil || st.Size() != int64(n) {
			t.Errorf("%s: %v; want %d bytes", p, err, n)
		}
	}
	// Free space and inodes: the same mount works again.
	for p := range good {
		if err := os.Remove(p); err != nil {
			t.Fatalf("remove %s: %v", p, err)
		}
	}
	for i := 0; i < 1000; i++ {
		if err := os.Remove(filepath.Join(m, fmt.Sprintf("dir%d", i))); err != nil {
			break
		}
	}
	f, err = os.OpenFile(filepath.Join(m, "big"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatalf("copy-up after freeing space: %v (mount wedged?)", err)
	}
	if _, err := f.Write([]byte("tail")); err != nil {
		t.Errorf("append after freeing space: %v", err)
	}
	f.Close()
	if b, err := os.ReadFile(filepath.Join(m, "big")); err != nil || !bytes.Equal(b, append(append([]byte(nil), big...), "tail"...)) {
		t.Errorf("big after a successful copy-up: %d bytes, %v", len(b), err)
	}
	umountChecked(t, m)
	if ents, _ := os.ReadDir(filepath.Join(w, "work")); len(ents) != 0 {
		t.Errorf("work dir after unmount holds %d entries", len(ents))
	}
}

// fsIocShutdown is FS_IOC_SHUTDOWN (_IOR('X', 125, __u32)); flag 2 is
// FS_GOING_FLAGS_NOLOGFLUSH: from now on every operation fails with EIO.
const fsIocShutdown = 0x8004587D

// TestFaultEIOSurfacesNotWedged puts the upper on a loop-mounted ext4,
// shuts that filesystem down mid-mount (every later operation on it
// fails with EIO, as on a dying disk), and checks that callers get errors,
// never success for lost data, that lower-only reads still work, that
// nothing hangs, and that the mount unmounts.
func TestFaultEIOSurfacesNotWedged(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		testenv.Need(t, "mkfs.ext4 (e2fsprogs)", err.Error())
	}
	dir := t.TempDir()
	img, ext := filepath.Join(dir, "upper.img"), filepath.Join(dir, "ext")
	os.MkdirAll(ext, 0o755)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img, "32M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	// -o loop: the loop device goes away with the unmount (autoclear).
	if out, err := exec.Command("mount", "-o", "loop", img, ext).CombinedOutput(); err != nil {
		testenv.Need(t, "loop-mounted ext4", fmt.Sprintf("%v: %s", err, out))
	}
	t.Cleanup(func() {
		if err := unix.Unmount(ext, 0); err != nil {
			unix.Unmount(ext, unix.MNT_DETACH)
		}
	})
	l, u, w, m := filepath.Join(dir, "l"), filepath.Join(ext, "u"), filepath.Join(ext, "w"), filepath.Join(dir, "m")
	for _, d := range []string{l, u, w, m} {
		os.MkdirAll(d, 0o755)
	}
	for i := 0; i < 10; i++ {
		os.WriteFile(filepath.Join(l, fmt.Sprintf("lf%d", i)), []byte("lower data"), 0o644)
	}
	startDaemon(t, "lowerdir="+l+",upperdir="+u+",workdir="+w, m)
	if err := os.WriteFile(filepath.Join(m, "before"), []byte("written before"), 0o644); err != nil {
		t.Fatal(err)
	}
	keep, err := os.OpenFile(filepath.Join(m, "before"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer keep.Close()

	fd, err := unix.Open(ext, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	flag := uint32(2)
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fsIocShutdown, uintptr(unsafePointer(&flag)))
	unix.Close(fd)
	if errno != 0 {
		testenv.Need(t, "ext4 FS_IOC_SHUTDOWN", errno.Error())
	}

	type result struct {
		op  string
		err error
	}
	ops := []func() result{
		func() result {
			_, err := keep.Write([]byte("more"))
			if err == nil {
				err = keep.Sync()
			}
			return result{"write+fsync of an open upper file", err}
		},
		func() result {
			return result{"create", os.WriteFile(filepath.Join(m, "after"), []byte("x"), 0o644)}
		},
		func() result {
			f, err := os.OpenFile(filepath.Join(m, "lf1"), os.O_WRONLY|os.O_APPEND, 0)
			if err == nil {
				f.Close()
			}
			return result{"copy-up (open lower file for write)", err}
		},
		func() result { return result{"unlink of a lower file", os.Remove(filepath.Join(m, "lf2"))} },
		func() result { return result{"mkdir", os.Mkdir(filepath.Join(m, "newdir"), 0o755)} },
		func() result { return result{"chmod of a lower file", os.Chmod(filepath.Join(m, "lf3"), 0o600)} },
		func() result {
			return result{"rename of a lower file", os.Rename(filepath.Join(m, "lf4"), filepath.Join(m, "lf4b"))}
		},
	}
	for _, op := range ops {
		done := make(chan result, 1)
		go func() { done <- op() }()
		select {
		case r := <-done:
			t.Logf("%s on a shut-down upper: %v", r.op, r.err)
			if r.err == nil {
				t.Errorf("%s on a shut-down upper succeeded: the change cannot have been stored", r.op)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("an operation hung on a shut-down upper (mount wedged)")
		}
	}
	// Reads that need only the lower layers still answer.
	done := make(chan error, 1)
	go func() {
		b, err := os.ReadFile(filepath.Join(m, "lf5"))
		if err == nil && string(b) != "lower data" {
			err = fmt.Errorf("read %q", b)
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Logf("read of a lower-only file after the upper died: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatalf("read of a lower file hung after the upper died")
	}
	keep.Close()
	umountChecked(t, m)
}

func unsafePointer(p *uint32) unsafe.Pointer { return unsafe.Pointer(p) }

// TestBugKill9DuringMountStartupUnkillable demonstrates a strata bug
// found by TestFaultKill9AtRandomPoints (STRATA_FAULT_ITERS=100): a
// daemon killed with SIGKILL right after its mount appears can stay
// forever in D state, holding /dev/fuse, so the connection is never
// aborted. Its last thread is in open(2) on its own mount:
//
//	request_wait_answer <- __fuse_simple_request <- fuse_do_getattr <-
//	fuse_permission <- inode_permission <- may_open <- path_openat
//
// That is go-fuse's poll hack (fuse/poll_linux.go: WaitMount ->
// pollHack opens ".go-fuse-epoll-hack" in the mount from the serving
// process), run by unionfs.Mount after the mount is already visible. Once
// a server thread has read that request, the kernel waits for the answer
// uninterruptibly (fs/fuse/dev.c:request_wait_answer, "Either request is
// already in userspace, or it was forced. Wait it out"); the threads that
// would answer are dead and /dev/fuse is released only when this thread
// exits. Only an abort through fusectl frees it; strata umount does not
// (the mount is busy, and after a lazy unmount it is not even listed).
// Kernel overlay has no daemon. Fixed: the daemon never touches its own
// mount (unionfs.Options.NoSelfAccess skips go-fuse's poll hack), and
// strata umount aborts the connection of a server that is gone.
func TestKill9DuringMountStartup(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireRoot(t)
	for i := 0; i < 40; i++ {
		_, l, u, w, m := stack(t)
		cmd := exec.Command(strataBin, "mount", "-f", "-o", "lowerdir="+l+",upperdir="+u+",workdir="+w, m)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		d := &daemon{cmd: cmd, mnt: m, done: make(chan error, 1)}
		go func() { d.done <- cmd.Wait() }()
		t.Cleanup(func() {
			cmd.Process.Kill()
			cleanupMount(m)
		})
		for j := 0; j < 20000 && !stress.IsMounted(m); j++ {
			time.Sleep(100 * time.Microsecond)
		}
		cmd.Process.Signal(unix.SIGKILL)
		if !d.exitedWithin(5 * time.Second) {
			dump := threadDump(cmd.Process.Pid)
			stress.AbortFUSE(m)
			t.Fatalf("round %d: daemon did not exit within 5s of SIGKILL; threads:\n%s", i, dump)
		}
		cleanupMount(m)
	}
}
