package cmd

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/internal/testenv"
	"strata/unionfs"
)

// TestServerProcs checks the daemon's scheduler set-up: one P while go-fuse
// sizes its reader pool, serverPs once the server exists, and nothing
// touched when the environment sets GOMAXPROCS.
func TestServerProcs(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))

	t.Setenv("GOMAXPROCS", "")
	runtime.GOMAXPROCS(8)
	started := serverProcs()
	if n := runtime.GOMAXPROCS(0); n != 1 {
		t.Errorf("while the server is made: GOMAXPROCS %d, want 1", n)
	}
	started()
	if n := runtime.GOMAXPROCS(0); n != serverPs {
		t.Errorf("once it exists: GOMAXPROCS %d, want %d", n, serverPs)
	}

	t.Setenv("GOMAXPROCS", "3")
	runtime.GOMAXPROCS(3)
	started = serverProcs()
	started()
	if n := runtime.GOMAXPROCS(0); n != 3 {
		t.Errorf("with GOMAXPROCS=3 in the environment: GOMAXPROCS %d, want 3", n)
	}
}

// TestStartWithTimerSlack: the child runs with the slack, from its first
// thread on, and the starting thread gets its own slack back.
func TestStartWithTimerSlack(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	before, err := unix.PrctlRetInt(unix.PR_GET_TIMERSLACK, 0, 0, 0, 0)
	if err != nil {
		t.Skipf("PR_GET_TIMERSLACK: %v", err)
	}
	var out bytes.Buffer
	cmd := exec.Command("cat", "/proc/self/timerslack_ns")
	cmd.Stdout = &out
	if err := startWithTimerSlack(cmd, 3*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out.String()); got != "3000000" {
		t.Errorf("child's timer slack %s ns, want 3000000", got)
	}
	if after, _ := unix.PrctlRetInt(unix.PR_GET_TIMERSLACK, 0, 0, 0, 0); after != before {
		t.Errorf("starting thread's timer slack %d ns afterwards, want %d back", after, before)
	}
}

// TestDaemonTimerSlack: every thread of a mount daemon runs with
// serverTimerSlack, sysmon included.
func TestDaemonTimerSlack(t *testing.T) {
	testenv.RequireFUSE(t)
	_, l, u, w, m := stack(t)
	if out, err := strata(t, "mount", "-o", "lowerdir="+l+",upperdir="+u+",workdir="+w, m); err != nil {
		t.Fatalf("strata mount: %v: %s", err, out)
	}
	t.Cleanup(func() { strata(t, "umount", "--lazy", m) })
	st, err := unionfs.ReadState(m)
	if err != nil {
		t.Fatalf("daemon state of %s: %v", m, err)
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", st.Pid))
	if err != nil {
		t.Fatal(err)
	}
	want := strconv.FormatInt(serverTimerSlack.Nanoseconds(), 10)
	for _, task := range tasks {
		b, err := os.ReadFile("/proc/" + task.Name() + "/timerslack_ns")
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(string(b)); got != want {
			t.Errorf("daemon thread %s: timer slack %s ns, want %s", task.Name(), got, want)
		}
	}
	if len(tasks) < 2 {
		t.Errorf("daemon has %d threads; want the runtime's sysmon among them", len(tasks))
	}
}
