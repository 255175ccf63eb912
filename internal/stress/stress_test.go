package stress_test

import (
	"context"
	"flag"
	"log/slog"
	"os"
	"testing"
	"time"

	"strata/internal/stress"
	"strata/internal/testenv"
)

var (
	duration = flag.Duration("stress.duration", 0, "run TestStress for this long (default: a short op-count run)")
	workers  = flag.Int("stress.workers", 4, "TestStress: parallel workers")
	ops      = flag.Int64("stress.ops", 4000, "TestStress: total operations when -stress.duration is not set")
	seed     = flag.Uint64("stress.seed", 0, "TestStress: seed (0: time-based, logged)")
	hunt     = flag.Bool("stress.knownbugs", false, "TestStress: do not steer around known strata bugs (concurrent opens of shared/log)")
	bin      = flag.String("stress.strata", "", "TestStress: mount with this strata binary (daemon) instead of in-process")
)

// TestStress runs the workers over an in-process strata mount and checks
// the model at every read, after the load, after a remount and under
// kernel overlay. Short by default; see the package doc for long runs.
func TestStress(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireFUSE(t)
	testenv.RequireKernelOverlay(t)
	s := *seed
	if s == 0 {
		s = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (rerun with -stress.seed=%d)", s, s)
	cfg := stress.Config{Dir: t.TempDir(), Workers: *workers, Seed: s, Kernel: true, Logf: t.Logf,
		SerializeSharedOpens: !*hunt}
	if *duration > 0 {
		cfg.Duration = *duration
	} else {
		cfg.Ops = *ops
		cfg.Duration = 2 * time.Minute
	}
	// strata's own log (errors behind EIO replies) goes to the test log.
	cfg.Mount = stress.InProcess("", slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if *bin != "" {
		cfg.Mount = stress.Daemon(*bin, "")
	}
	cleanupMount(t, cfg.Dir+"/mnt")
	rep, err := stress.Run(context.Background(), cfg)
	if rep != nil {
		t.Logf("\n%s", rep)
	}
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Fatalf("%d mismatches (seed %d)", len(rep.Mismatches), s)
	}
}

// cleanupMount makes sure nothing stays mounted at mnt when the test ends,
// even after a failure.
func cleanupMount(t *testing.T, mnt string) {
	t.Cleanup(func() {
		for i := 0; i < 5 && isMountpoint(mnt); i++ {
			stress.AbortFUSE(mnt)
			stress.LazyUnmount(mnt)
		}
	})
}

func isMountpoint(p string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	return stress.MountinfoHas(string(b), p)
}

// testWriter sends a logger's lines to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Logf("strata: %s", b)
	return len(b), nil
}

// TestBugStressIntermittentStaleNode hunts an intermittent strata bug that
// TestStress finds about once per 200k operations (4 workers): a path the
// model says exists answers ENOENT to open or lookup although stat of it
// (served from the kernel's attribute cache) still works, and once a
// file's content differed from every write acknowledged for it (shorter,
// also in the upper dir under kernel overlay). It looks like a go-fuse
// node whose recorded location or layer is stale. It is not tied to a
// seed (the same seed passes on rerun), so this test repeats long runs
// until one fails. STRATA_KNOWN_BUGS=1 runs it.
func TestBugStressIntermittentStaleNode(t *testing.T) {
	if os.Getenv("STRATA_KNOWN_BUGS") != "1" {
		t.Skip("known strata bug, not fixed yet: intermittent ENOENT / lost data under the stress load (STRATA_KNOWN_BUGS=1 runs this hunt, which then fails)")
	}
	testenv.RequireRoot(t)
	testenv.RequireFUSE(t)
	for i := 0; i < 15; i++ {
		s := uint64(time.Now().UnixNano())
		cfg := stress.Config{Dir: t.TempDir(), Workers: 4, Seed: s, Ops: 25000, Duration: 5 * time.Minute,
			SerializeSharedOpens: true}
		cleanupMount(t, cfg.Dir+"/mnt")
		rep, err := stress.Run(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		if !rep.OK() {
			t.Fatalf("run %d (seed %d):\n%s", i, s, rep)
		}
	}
}
