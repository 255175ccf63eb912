package cmd

import (
	"runtime"
	"testing"
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
