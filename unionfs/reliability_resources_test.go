package unionfs_test

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/internal/stress"
	"strata/internal/testenv"
)

// resourceFiles is the size of the tree the resource tests walk: 200k
// files by default (STRATA_RESOURCE_FILES overrides; -short uses 20k).
func resourceFiles(t *testing.T) int {
	if v := os.Getenv("STRATA_RESOURCE_FILES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Fatalf("STRATA_RESOURCE_FILES=%q: %v", v, err)
		}
		return n
	}
	if testing.Short() {
		return 20000
	}
	return 200000
}

// buildWideTree makes n empty files in dir, 20 per directory, in
// directories of 100 subdirectories each: many more directories than the
// directory-fd cache holds. It returns the number of directories.
func buildWideTree(t *testing.T, dir string, n int) int {
	t.Helper()
	const perDir, fanout = 20, 100
	dirs := 0
	for i := 0; i < n; i += perDir {
		d := filepath.Join(dir, fmt.Sprintf("t%03d", i/(perDir*fanout)), fmt.Sprintf("s%03d", (i/perDir)%fanout))
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		dirs++
		fd, err := unix.Open(d, unix.O_PATH|unix.O_DIRECTORY, 0)
		if err != nil {
			t.Fatal(err)
		}
		for j := 0; j < perDir && i+j < n; j++ {
			if err := unix.Mknodat(fd, "f"+strconv.Itoa(j), unix.S_IFREG|0o644, 0); err != nil {
				t.Fatal(err)
			}
		}
		unix.Close(fd)
	}
	return dirs + (n+perDir*fanout-1)/(perDir*fanout)
}

// fdPeak samples this process's open fd count until stop is called and
// returns the highest count seen.
func fdPeak() (stop func() int) {
	var peak atomic.Int64
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			if n := int64(stress.FdCount("self")); n > peak.Load() {
				peak.Store(n)
			}
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return func() int {
		close(done)
		<-finished
		if n := int64(stress.FdCount("self")); n > peak.Load() {
			peak.Store(n)
		}
		return int(peak.Load())
	}
}

// dirCacheBound is strata's directory-fd cache bound for this process
// (unionfs/stack.go dirCacheSize: a quarter of RLIMIT_NOFILE, 64..16384).
func dirCacheBound() int {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return 1024
	}
	return int(max(64, min(rl.Cur/4, 16384)))
}

func heapInuse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// TestResourcesWalkBounded walks (stats) every object of a 200k-file
// lower through the mount and checks that the server's fds stay within
// the directory-fd cache bound, that memory per cached inode is bounded,
// and that dropping the kernel's caches makes strata forget the inodes
// (memory and directory fds go back down).
func TestResourcesWalkBounded(t *testing.T) {
	testenv.RequireRoot(t) // drop_caches
	n := resourceFiles(t)
	s := newRelStack(t, 1)
	start := time.Now()
	dirs := buildWideTree(t, s.lowers[0], n)
	t.Logf("tree: %d files in %d directories, built in %v", n, dirs, time.Since(start).Round(time.Millisecond))

	fdBase := stress.FdCount("self")
	heapBase := heapInuse()
	s.mount(t, "")
	fdMounted := stress.FdCount("self")

	stop := fdPeak()
	start = time.Now()
	objects := 0
	err := filepath.WalkDir(s.mnt, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		objects++
		return nil
	})
	peak := stop()
	walk := time.Since(start)
	if err != nil {
		t.Fatalf("walk: %v", err)
	}
	if objects != n+dirs+1 {
		t.Errorf("walk saw %d objects, want %d", objects, n+dirs+1)
	}
	heapWalked := heapInuse()
	rssWalked := stress.ProcStatus("self", "VmRSS")
	fdWalked := stress.FdCount("self")
	bound := dirCacheBound()
	perInode := float64(heapWalked-heapBase) / float64(objects)
	t.Logf("walk of %d objects in %v (%.0f/s)", objects, walk.Round(time.Millisecond), float64(objects)/walk.Seconds())
	t.Logf("fds: %d before mount, %d mounted, peak %d during the walk, %d after; dir-fd cache bound %d",
		fdBase, fdMounted, peak, fdWalked, bound)
	t.Logf("heap in use: %d MiB before, %d MiB after the walk: %.0f bytes per cached inode; VmRSS %d MiB",
		heapBase>>20, heapWalked>>20, perInode, rssWalked>>10)
	// The walk holds no files open: everything beyond the mount's own fds
	// is the directory-fd cache (plus a few for requests in flight).
	if extra := peak - fdMounted; extra > bound+64 {
		t.Errorf("fds grew by %d during the walk, want at most the dir-fd cache bound %d + 64", extra, bound)
	}
	// Every directory walked keeps a cached fd unless its node was
	// forgotten: fewer means something dropped the kernel's caches during
	// the walk (another process's drop_caches, e.g. bench's cold runs),
	// and the per-inode figure then undercounts.
	if cached := fdWalked - fdMounted; cached < min(dirs, bound)-64 {
		t.Logf("only %d directory fds cached after the walk (want about %d): the kernel forgot inodes during the walk; per-inode memory not asserted", cached, min(dirs, bound))
	} else if perInode > 4096 {
		t.Errorf("%.0f bytes of heap per cached inode, want at most 4096", perInode)
	}

	// Make the kernel forget its dentries and inodes: it sends FORGET for
	// each, and strata must let go of the nodes and their directory fds.
	// FORGETs arrive asynchronously, and a directory's dentry can go only
	// after its children's: wait for both the heap and the fds to come
	// down, dropping caches again now and then.
	var heapDropped uint64
	var fdDropped int
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; ; i++ {
		if i%8 == 0 {
			if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("2"), 0o200); err != nil {
				t.Fatalf("drop_caches: %v", err)
			}
		}
		heapDropped, fdDropped = heapInuse(), stress.FdCount("self")
		if heapDropped < heapBase+(heapWalked-heapBase)/4 && fdDropped <= fdMounted+64 || time.Now().After(deadline) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("after drop_caches: heap in use %d MiB (%.0f%% of the walk's growth kept), fds %d",
		heapDropped>>20, 100*float64(int64(heapDropped)-int64(heapBase))/float64(heapWalked-heapBase), fdDropped)
	if heapDropped > heapBase+(heapWalked-heapBase)/3 {
		t.Errorf("after drop_caches the heap keeps %d of the walk's %d bytes: inodes not forgotten", heapDropped-heapBase, heapWalked-heapBase)
	}
	if fdDropped > fdMounted+64 {
		t.Errorf("after drop_caches %d fds are open, want about %d (directory fds of forgotten nodes not closed)", fdDropped, fdMounted)
	}
}

// TestResourcesOpenFilesOneFdEach holds thousands of files open through
// the mount (lower files read-only, upper files for writing) and checks
// that the server uses one fd per open file, plus its directory-fd cache.
func TestResourcesOpenFilesOneFdEach(t *testing.T) {
	const n = 3000
	s := newRelStack(t, 1)
	for i := 0; i < n; i++ {
		dir := s.lowers[0]
		if i%2 == 1 {
			dir = s.upper
		}
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%d", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s.mount(t, "")
	fdMounted := stress.FdCount("self")
	var fds []int
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	for i := 0; i < n; i++ {
		flags := unix.O_RDONLY
		if i%2 == 1 {
			flags = unix.O_RDWR
		}
		fd, err := unix.Open(s.m(fmt.Sprintf("f%d", i)), flags|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatalf("open f%d: %v", i, err)
		}
		fds = append(fds, fd)
	}
	held := stress.FdCount("self")
	// This process is both client (n fds) and server.
	server := held - fdMounted - n
	t.Logf("%d files open: %d fds in this process, %d of them the server's beyond its mount-time fds (%.2f per open file)",
		n, held, server, float64(server)/n)
	if server > n+64 {
		t.Errorf("server holds %d fds for %d open files, want at most one each (+64)", server, n)
	}
	for _, fd := range fds {
		unix.Close(fd)
	}
	fds = nil
	// RELEASE is asynchronous: give the server a moment.
	var after int
	for i := 0; i < 100; i++ {
		if after = stress.FdCount("self"); after <= fdMounted+64 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("after closing them: %d fds (%d at mount)", after, fdMounted)
	if after > fdMounted+64 {
		t.Errorf("%d fds still open after every file was closed, want about %d: file fds leak", after, fdMounted)
	}
}
