package unionfs_test

import (
	"fmt"
	"os"
	"strings"
	"testing"

	"strata/internal/testenv"
	"strata/unionfs"
)

// TestReadaheadRaised checks that a root mount lets the kernel read ahead
// 1 MiB (one READ of the largest size) instead of the 128 KiB every FUSE
// mount starts with, and that a sequential read still returns the data.
func TestReadaheadRaised(t *testing.T) {
	testenv.RequireRoot(t)
	s := newRelStack(t, 1)
	data := make([]byte, 8<<20)
	for i := range data {
		data[i] = byte(i * 7 / 4096)
	}
	if err := os.WriteFile(s.lowers[0]+"/big", data, 0o644); err != nil {
		t.Fatal(err)
	}
	s.mount(t, "")
	mounts, err := unionfs.ReadMounts()
	if err != nil {
		t.Fatal(err)
	}
	m, found := unionfs.TopMount(mounts, s.mnt)
	if !found || m.Engine != unionfs.EngineFUSE {
		t.Fatalf("FUSE mount %s not in mountinfo", s.mnt)
	}
	b, err := os.ReadFile(fmt.Sprintf("/sys/class/bdi/0:%d/read_ahead_kb", m.Minor))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(b)); got != "1024" {
		t.Errorf("read_ahead_kb = %s, want 1024", got)
	}
	got, err := os.ReadFile(s.m("big"))
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(data) {
		t.Errorf("sequential read returned different data")
	}
}
