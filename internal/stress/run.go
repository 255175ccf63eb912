package stress

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"strata/unionfs"
)

// Mounter mounts strata over a fixture's layers, with the given work dir,
// at f.Mnt, and returns a function that unmounts it.
type Mounter func(f *Fixture, work string) (unmount func() error, err error)

// InProcess mounts with unionfs.Mount in this process; log, if not nil,
// receives strata's log.
func InProcess(extraOpts string, log *slog.Logger) Mounter {
	return func(f *Fixture, work string) (func() error, error) {
		o, err := unionfs.ParseOptions(mountData(f, work) + extraOpts)
		if err != nil {
			return nil, err
		}
		o.Logger = log
		srv, err := unionfs.Mount(f.Mnt, o)
		if err != nil {
			return nil, err
		}
		return srv.Unmount, nil
	}
}

// Daemon mounts by running the strata binary bin ("strata mount", which
// returns once the mount is live) and unmounts with "strata umount".
func Daemon(bin, extraOpts string) Mounter {
	return func(f *Fixture, work string) (func() error, error) {
		out, err := exec.Command(bin, "mount", "-o", mountData(f, work)+extraOpts, f.Mnt).CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("strata mount: %v: %s", err, out)
		}
		return func() error {
			if out, err := exec.Command(bin, "umount", f.Mnt).CombinedOutput(); err != nil {
				return fmt.Errorf("strata umount: %v: %s", err, out)
			}
			return nil
		}, nil
	}
}

func mountData(f *Fixture, work string) string {
	return "lowerdir=" + strings.Join(f.Lowers, ":") + ",upperdir=" + f.Upper + ",workdir=" + work
}

// MountKernel mounts kernel overlay on the fixture (read-only over the
// lowers alone when work is "") and returns its unmount.
func MountKernel(f *Fixture, work string) (func() error, error) {
	data := "lowerdir=" + strings.Join(f.Lowers, ":")
	if work != "" {
		data += ",upperdir=" + f.Upper + ",workdir=" + work
	}
	if strings.HasPrefix(f.OpaqueXattr, "user.") {
		data += ",userxattr"
	}
	if err := unix.Mount("overlay", f.Mnt, "overlay", 0, data); err != nil {
		return nil, fmt.Errorf("mount -t overlay %s: %w", data, err)
	}
	return func() error { return unmountRetry(f.Mnt) }, nil
}

// unmountRetry unmounts mnt, retrying while busy, then detaching.
func unmountRetry(mnt string) error {
	var err error
	for i := 0; i < 50; i++ {
		if err = unix.Unmount(mnt, 0); err == nil || !errors.Is(err, unix.EBUSY) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.Join(err, unix.Unmount(mnt, unix.MNT_DETACH))
}

// AbortFUSE aborts the FUSE connection of the mount at mnt (through
// /sys/fs/fuse/connections), so that every request in flight fails with
// ENOTCONN: the way out of a hung server.
func AbortFUSE(mnt string) error {
	var st unix.Stat_t
	if err := unix.Stat(mnt, &st); err != nil {
		return err
	}
	return AbortFUSEConn(uint64(unix.Minor(st.Dev)))
}

// AbortFUSEConn aborts FUSE connection id (the minor device number of its
// mount). fusectl need not be mounted at /sys/fs/fuse/connections (it is
// not on this machine): a private instance is mounted for the write.
func AbortFUSEConn(id uint64) error {
	return unionfs.AbortFUSE(unionfs.MountInfo{Minor: id})
}

// Config describes one stress run.
type Config struct {
	// Dir is an empty directory for the fixture.
	Dir     string
	Workers int
	// Ops is the total number of operations (0: no limit); Duration the
	// time to run (0: no limit). The run stops at the first reached; one
	// of them must be set.
	Ops      int64
	Duration time.Duration
	Seed     uint64
	// Mount mounts strata; nil means InProcess("").
	Mount Mounter
	// Kernel also checks the fixture model and the final upper dir under
	// kernel overlay (needs root).
	Kernel bool
	// OpaqueXattr: see Fixture; "" means trusted.overlay.opaque.
	OpaqueXattr string
	// HangTimeout: a worker op that takes longer is a hang; the run then
	// aborts the FUSE connection and fails. 0 means 2 minutes.
	HangTimeout time.Duration
	// Logf, if set, receives progress lines.
	Logf func(format string, args ...any)
}

// Report is the outcome of a run.
type Report struct {
	Workers  int
	Ops      int64
	Elapsed  time.Duration
	Counts   map[string]int64
	Expected map[string]int64 // expected errors seen ("rmdir ENOTEMPTY")
	// EINTR counts calls that strata answered with EINTR and the workers
	// retried (strata must not: unionfs.TestNoSpuriousEINTR guards that).
	EINTR int64
	// Checks lists each verification done and its outcome.
	Checks []string
	// Mismatches lists every difference from the model; empty on success.
	Mismatches []string
}

// OpsPerSec is the throughput of the load phase.
func (r *Report) OpsPerSec() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Ops) / r.Elapsed.Seconds()
}

// OK reports whether the run found no mismatch.
func (r *Report) OK() bool { return len(r.Mismatches) == 0 }

func (r *Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "stress: %d workers, %d ops in %v: %.0f ops/s\n", r.Workers, r.Ops, r.Elapsed.Round(time.Millisecond), r.OpsPerSec())
	names := make([]string, 0, len(r.Counts))
	for k := range r.Counts {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		fmt.Fprintf(&b, "  %-13s %8d\n", k, r.Counts[k])
	}
	names = names[:0]
	for k := range r.Expected {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		fmt.Fprintf(&b, "  expected error %-24s %6d\n", k, r.Expected[k])
	}
	if r.EINTR > 0 {
		fmt.Fprintf(&b, "  EINTR answers retried (a strata bug, see unionfs.TestNoSpuriousEINTR): %d\n", r.EINTR)
	}
	for _, c := range r.Checks {
		fmt.Fprintf(&b, "  check: %s\n", c)
	}
	for _, m := range r.Mismatches {
		fmt.Fprintf(&b, "  MISMATCH: %s\n", m)
	}
	return b.String()
}

// Run builds a fixture, mounts strata over it, runs the workers, and
// checks the tree against the model: at the end through the same mount,
// after a remount, and (with Kernel) under kernel overlay on the upper dir
// strata left. Every mount it makes is unmounted before it returns. An
// error means the run could not be done; differences from the model are
// in the report.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Workers <= 0 {
		cfg.Workers = 1
	}
	if cfg.Ops <= 0 && cfg.Duration <= 0 {
		return nil, errors.New("stress: set Ops or Duration")
	}
	if cfg.Mount == nil {
		cfg.Mount = InProcess("", nil)
	}
	if cfg.OpaqueXattr == "" {
		cfg.OpaqueXattr = "trusted.overlay.opaque"
	}
	if cfg.HangTimeout <= 0 {
		cfg.HangTimeout = 2 * time.Minute
	}
	logf := cfg.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	f, err := BuildFixture(cfg.Dir, cfg.Workers, cfg.Seed, cfg.OpaqueXattr)
	if err != nil {
		return nil, err
	}
	rep := &Report{Workers: cfg.Workers, Counts: map[string]int64{}, Expected: map[string]int64{}}
	check := func(what string, want map[string]Entry, skip func(string) bool, extra func() []string) {
		got, err := Snapshot(f.Mnt, skip)
		var diffs []string
		if err != nil {
			diffs = []string{"walk: " + err.Error()}
		} else {
			diffs = Diff(got, want, 50)
		}
		if extra != nil {
			diffs = append(diffs, extra()...)
		}
		if len(diffs) == 0 {
			rep.Checks = append(rep.Checks, what+": tree equals the model")
		} else {
			rep.Checks = append(rep.Checks, fmt.Sprintf("%s: %d differences", what, len(diffs)))
			for _, d := range diffs {
				rep.Mismatches = append(rep.Mismatches, what+": "+d)
			}
		}
		logf("%s", rep.Checks[len(rep.Checks)-1])
	}

	if cfg.Kernel {
		// The model's idea of the lowers, checked by the kernel itself.
		um, err := MountKernel(f, "")
		if err != nil {
			return nil, err
		}
		check("kernel overlay over the lowers", f.Model.Expect(), nil, nil)
		if err := um(); err != nil {
			return rep, err
		}
	}

	um, err := cfg.Mount(f, f.Work)
	if err != nil {
		return nil, err
	}
	mounted := true
	defer func() {
		if mounted {
			if err := um(); err != nil {
				AbortFUSE(f.Mnt)
				unix.Unmount(f.Mnt, unix.MNT_DETACH)
			}
		}
	}()
	check("strata before the load", f.Model.Expect(), nil, nil)

	trees, shared := f.Split()
	workers := make([]*worker, cfg.Workers)
	var ops atomic.Int64
	for i := range workers {
		workers[i] = &worker{id: i, mnt: f.Mnt, rng: rand.New(rand.NewPCG(cfg.Seed, uint64(i)+1)), t: trees[i],
			shared: shared, f: f, errs: map[string]int64{}, ops: &ops}
		if cfg.Ops > 0 {
			workers[i].budget = (cfg.Ops + int64(i)) / int64(cfg.Workers)
		}
		workers[i].inOp.Store("")
	}
	runCtx, cancel := context.WithCancel(ctx)
	if cfg.Duration > 0 {
		runCtx, cancel = context.WithTimeout(ctx, cfg.Duration)
	}
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := int64(0); w.budget == 0 || n < w.budget; n++ {
				if runCtx.Err() != nil {
					return
				}
				if err := w.step(); err != nil {
					mu.Lock()
					rep.Mismatches = append(rep.Mismatches, w.withHistory(err).Error())
					mu.Unlock()
					return // the model of this worker is no longer trustworthy
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	hung := watch(done, &ops, cfg.HangTimeout, logf)
	if hung {
		var inflight []string
		for _, w := range workers {
			inflight = append(inflight, fmt.Sprintf("worker %d: %q", w.id, w.inOp.Load()))
		}
		rep.Mismatches = append(rep.Mismatches, fmt.Sprintf("hang: no op finished for %v; in flight: %s", cfg.HangTimeout, strings.Join(inflight, "; ")))
		AbortFUSE(f.Mnt)
		<-done
		return rep, nil
	}
	rep.Elapsed = time.Since(start)
	rep.Ops = ops.Load()
	for _, w := range workers {
		for op := range numOps {
			rep.Counts[op.String()] += w.counts[op].Load()
		}
		for k, v := range w.errs {
			rep.Expected[k] += v
		}
		rep.EINTR += w.eintr
	}
	logf("load: %d ops in %v", rep.Ops, rep.Elapsed)

	// The final model: every worker's tree, the shared rest, the records
	// of shared/log in any order, each worker's attribute on shared/x.
	final := &Tree{M: map[string]*Obj{}}
	for p, o := range shared.M {
		final.M[p] = o
	}
	var records [][]byte
	for _, w := range workers {
		for p, o := range w.t.M {
			final.M[p] = o
		}
		if w.xattr != "" {
			final.M[XattrPath].Xattrs["user."+WorkerRoot(w.id)] = w.xattr
		}
		records = append(records, w.records...)
	}
	want := final.Expect()
	delete(want, LogPath)
	skipLog := func(p string) bool { return p == LogPath }
	checkLog := func() []string {
		b, err := os.ReadFile(filepath.Join(f.Mnt, LogPath))
		if err != nil {
			return []string{"read log: " + err.Error()}
		}
		recs, err := parseLog(b, f.LogHeader)
		if err != nil {
			return []string{"log: " + err.Error()}
		}
		var out []string
		for _, r := range records {
			if recs[string(r)] != 1 {
				out = append(out, fmt.Sprintf("log: acknowledged record %q present %d times, want once", r, recs[string(r)]))
			}
			delete(recs, string(r))
		}
		for r := range recs {
			out = append(out, fmt.Sprintf("log: record %q was never appended", r))
		}
		return out
	}
	check("strata after the load", want, skipLog, checkLog)

	mounted = false
	if err := um(); err != nil {
		AbortFUSE(f.Mnt)
		unix.Unmount(f.Mnt, unix.MNT_DETACH)
		return rep, fmt.Errorf("unmount after the load: %w", err)
	}
	if ents, err := os.ReadDir(filepath.Join(f.Work, "work")); err != nil || len(ents) != 0 {
		rep.Mismatches = append(rep.Mismatches, fmt.Sprintf("work dir after a clean unmount: %d leftovers (%v)", len(ents), err))
	}

	um, err = cfg.Mount(f, f.Work)
	if err != nil {
		return rep, fmt.Errorf("remount: %w", err)
	}
	mounted = true
	check("strata remounted", want, skipLog, checkLog)
	mounted = false
	if err := um(); err != nil {
		return rep, fmt.Errorf("unmount after remount: %w", err)
	}

	if cfg.Kernel {
		work2 := filepath.Join(cfg.Dir, "work-kernel")
		if err := os.Mkdir(work2, 0o755); err != nil {
			return rep, err
		}
		kum, err := MountKernel(f, work2)
		if err != nil {
			return rep, err
		}
		check("kernel overlay on strata's upper", want, skipLog, checkLog)
		if err := kum(); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// watch waits for done; it returns true if the op counter did not move
// for timeout meanwhile.
func watch(done <-chan struct{}, ops *atomic.Int64, timeout time.Duration, logf func(string, ...any)) bool {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	last, lastChange := ops.Load(), time.Now()
	lastLog := time.Now()
	for {
		select {
		case <-done:
			return false
		case <-tick.C:
			if n := ops.Load(); n != last {
				last, lastChange = n, time.Now()
			} else if time.Since(lastChange) > timeout {
				return true
			}
			if time.Since(lastLog) > 30*time.Second {
				logf("progress: %d ops", last)
				lastLog = time.Now()
			}
		}
	}
}
