package unionfs_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestNoSpuriousEINTR guards a fixed strata bug (found by
// internal/stress: "rmdir: got EINTR, want ENOTEMPTY"): when the calling
// thread gets a signal while strata serves its request, the kernel sends
// FUSE INTERRUPT, go-fuse cancels the request's context, and strata
// answers EINTR (unionfs/errno.go: context.Canceled -> EINTR; readdir's
// ctx.Err() check, used by rmdir's emptiness test, is one place that
// sees it). The kernel passes that EINTR to the caller as is — it does
// not restart the call even for SA_RESTART handlers — so programs get
// EINTR from rmdir, rename, unlink..., which kernel overlay never returns
// for them. Go programs are hit hardest: the runtime's SIGURG preemption
// signals land on threads all the time, and os.Remove does not retry.
//
// The test sends SIGURG (which Go ignores, with SA_RESTART) to the
// thread doing rmdir of a large non-empty merged directory, over and
// over; every answer must be ENOTEMPTY.
func TestNoSpuriousEINTR(t *testing.T) {
	s := newRelStack(t, 2)
	for li, l := range s.lowers {
		d := filepath.Join(l, "big")
		os.MkdirAll(d, 0o755)
		for i := 0; i < 5000; i++ {
			os.WriteFile(filepath.Join(d, fmt.Sprintf("l%d-%d", li, i)), nil, 0o644)
		}
	}
	s.mount(t, "")
	var eintr, other atomic.Int64
	var tid atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if id := tid.Load(); id != 0 {
				unix.Tgkill(unix.Getpid(), int(id), unix.SIGURG)
			}
			time.Sleep(50 * time.Microsecond)
		}
	}()
	deadline := time.Now().Add(3 * time.Second)
	n := 0
	func() {
		// One OS thread does the rmdirs, so the signals reach it.
		runtimeLockOSThread()
		defer runtimeUnlockOSThread()
		tid.Store(int64(unix.Gettid()))
		for ; time.Now().Before(deadline) && eintr.Load() == 0; n++ {
			err := unix.Rmdir(s.m("big"))
			switch {
			case errors.Is(err, unix.EINTR):
				eintr.Add(1)
			case !errors.Is(err, unix.ENOTEMPTY):
				other.Add(1)
				t.Errorf("rmdir: %v", err)
			}
		}
		tid.Store(0)
	}()
	close(stop)
	wg.Wait()
	if e := eintr.Load(); e > 0 {
		t.Errorf("rmdir of a non-empty dir returned EINTR %d times in %d calls while the thread got SIGURG; want ENOTEMPTY every time (kernel overlay never returns EINTR here)", e, n)
	}
	t.Logf("%d rmdir calls", n)
}

func runtimeLockOSThread()   { runtime.LockOSThread() }
func runtimeUnlockOSThread() { runtime.UnlockOSThread() }
