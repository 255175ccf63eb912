package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestMain lets the test binary stand in for the bench binary: the harness
// re-executes itself as "worker", which here is this test binary.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "worker" {
		os.Exit(workerMain(context.Background(), os.Args[2:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// required reports whether CI demands that mount tests run, not skip.
func required() bool { return os.Getenv("STRATA_REQUIRE_MOUNT") == "1" }

// need skips t unless reason is empty, or fails it when STRATA_REQUIRE_MOUNT=1.
func need(t *testing.T, what, reason string) {
	t.Helper()
	if reason == "" {
		return
	}
	if required() {
		t.Fatalf("needs %s: %s (STRATA_REQUIRE_MOUNT=1 forbids skipping)", what, reason)
	}
	t.Skipf("needs %s: %s", what, reason)
}

// overlayReason probes kernel overlay with a real mount; "" means it works.
func overlayReason(t *testing.T) string {
	dir := t.TempDir()
	for _, d := range []string{"l", "u", "w", "m"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			return err.Error()
		}
	}
	data := "lowerdir=" + filepath.Join(dir, "l") + ",upperdir=" + filepath.Join(dir, "u") + ",workdir=" + filepath.Join(dir, "w")
	if err := unix.Mount("overlay", filepath.Join(dir, "m"), "overlay", 0, data); err != nil {
		return "mount -t overlay: " + err.Error()
	}
	if err := unix.Unmount(filepath.Join(dir, "m"), 0); err != nil {
		unix.Unmount(filepath.Join(dir, "m"), unix.MNT_DETACH)
	}
	return ""
}

// fuseReason checks what the FUSE engines need; "" means all is there.
func fuseReason() string {
	if _, err := os.Stat(fuseDevPath); err != nil {
		return err.Error()
	}
	for _, tool := range []string{"fusermount3", "setpriv", "git", "tar"} {
		if _, err := exec.LookPath(tool); err != nil {
			return tool + " not found"
		}
	}
	return ""
}

// TestSmoke runs the whole harness in -smoke mode (a tiny fixture, one
// repetition) against every engine that can run, and checks that it
// measured everything, that the engines saw the same trees, and that it
// left no mount behind. It asserts nothing about timings.
func TestSmoke(t *testing.T) {
	if os.Geteuid() != 0 {
		need(t, "root", "bench mounts kernel overlay, drops caches and switches users")
	}
	need(t, "kernel overlay", overlayReason(t))
	need(t, "FUSE", fuseReason())

	engines := "all"
	if required() {
		// Under CI every engine of ours must work; the peer is optional.
		engines = "kernel,strata,strata-rootless,plain"
		if _, err := exec.LookPath("fuse-overlayfs"); err == nil {
			engines += ",fuse-overlayfs"
		}
	}
	// The rootless user must reach the work dir, which t.TempDir is not.
	work, err := os.MkdirTemp("", "strata-bench-smoke-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(work, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if ms := mountsUnder(work); len(ms) > 0 {
			t.Errorf("mounts left behind: %v", ms)
			for _, m := range ms {
				unix.Unmount(m, unix.MNT_DETACH)
			}
			return // never remove under a mount
		}
		os.RemoveAll(work)
	})
	before, err := os.Stat(fuseDevPath)
	if err != nil {
		t.Fatal(err)
	}

	var stdout, stderr bytes.Buffer
	code := run(t.Context(), []string{"-smoke", "-workdir", work, "-engines", engines, "-format", "json"}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("bench -smoke exited %d:\n%s", code, stderr.String())
	}
	if testing.Verbose() {
		t.Logf("harness log:\n%s", stderr.String())
	}
	var rep report
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		t.Fatalf("parse the json report: %v\n%s", err, stdout.String())
	}

	if ms := mountsUnder(work); len(ms) > 0 {
		t.Errorf("mounts left behind: %v", ms)
	}
	if after, err := os.Stat(fuseDevPath); err != nil || after.Mode() != before.Mode() {
		t.Errorf("/dev/fuse mode: got %v, want %v restored (err %v)", after.Mode(), before.Mode(), err)
	}
	if len(rep.Header.Engines) == 0 {
		t.Fatal("no engine ran")
	}
	// The progress log counts up to the total it announced.
	var last string
	for _, l := range strings.Split(stderr.String(), "\n") {
		if strings.HasPrefix(l, "[") {
			last = l
		}
	}
	var done, total int
	if _, err := fmt.Sscanf(last, "[%d/%d", &done, &total); err != nil || done != total {
		t.Errorf("last progress line %q: want [N/N ...]", last)
	}
	for name, why := range rep.Header.Skipped {
		t.Logf("skipped engine %s: %s", name, why)
	}
	if rep.Header.Kernel == "" || rep.Header.CPU == "" || rep.Header.Date == "" {
		t.Errorf("header lacks kernel, cpu or date: %+v", rep.Header)
	}

	// Every engine measured every (workload, mode), without failure.
	got := map[string]*row{}
	for _, x := range rep.Rows {
		got[x.Workload+"/"+x.Mode+"/"+x.Engine] = x
	}
	for _, e := range rep.Header.Engines {
		if e.Command == "" {
			t.Errorf("engine %s: no mount command in the header", e.Name)
		}
		var want [][2]string // (workload, mode) of the default matrix
		for _, w := range workloads {
			for _, mode := range w.modes {
				want = append(want, [2]string{w.name, mode})
			}
			if fu := w.followUp; fu != nil {
				want = append(want, [2]string{fu.workload, fu.mode})
			}
		}
		for _, wm := range want {
			{
				name, mode := wm[0], wm[1]
				x := got[name+"/"+mode+"/"+e.Name]
				switch {
				case x == nil:
					t.Errorf("%s %s %s: no result", name, mode, e.Name)
				case x.Failed > 0 || x.N != 1:
					t.Errorf("%s %s %s: %d ok, %d failed: %s", name, mode, e.Name, x.N, x.Failed, x.Note)
				case x.Ops <= 0:
					t.Errorf("%s %s %s: did nothing (ops %d)", name, mode, e.Name, x.Ops)
				case x.Mismatch != "" && strings.HasPrefix(e.Name, "strata"):
					// A count that differs from kernel overlay's (entries
					// walked, files read) means strata shows another tree.
					t.Errorf("%s %s %s: %s", name, mode, e.Name, x.Mismatch)
				case x.Note != "":
					t.Logf("%s %s %s: %s", name, mode, e.Name, x.Note)
				}
			}
		}
	}

	// The other formats render the same report.
	for _, f := range []string{"text", "csv"} {
		var b bytes.Buffer
		if err := rep.write(&b, f); err != nil {
			t.Errorf("format %s: %v", f, err)
		}
		if !strings.Contains(b.String(), "statwalk") {
			t.Errorf("format %s: no statwalk row:\n%s", f, b.String())
		}
	}
}

func TestStats(t *testing.T) {
	for _, c := range []struct {
		in            []float64
		med, min, max float64
	}{
		{nil, 0, 0, 0},
		{[]float64{3}, 3, 3, 3},
		{[]float64{5, 1, 3}, 3, 1, 5},
		{[]float64{4, 1, 3, 2}, 2.5, 1, 4},
	} {
		med, lo, hi := stats(c.in)
		if med != c.med || lo != c.min || hi != c.max {
			t.Errorf("stats(%v): got %v %v %v, want %v %v %v", c.in, med, lo, hi, c.med, c.min, c.max)
		}
	}
}

// TestReportRatios checks the summary arithmetic and the notes on
// synthetic samples.
func TestReportRatios(t *testing.T) {
	w := &workload{name: "statwalk", unit: "entries"}
	r := &report{}
	for _, s := range []float64{1, 3, 2} {
		r.add(w, modeCold, engKernel, sample{Seconds: s, Ops: 10})
	}
	for _, s := range []float64{4, 6, 5} {
		r.add(w, modeCold, engStrata, sample{Seconds: s, Ops: 10})
	}
	r.add(w, modeCold, engFuseOverlayfs, sample{Seconds: 1, Ops: 9})
	r.add(w, modeCold, engFuseOverlayfs, sample{Err: "boom"})
	r.finish()
	byEngine := map[string]*row{}
	for _, x := range r.Rows {
		byEngine[x.Engine] = x
	}
	if k := byEngine[engKernel]; k.Median != 2 || k.Ratio != 1 {
		t.Errorf("kernel: got median %v ratio %v, want 2 and 1", k.Median, k.Ratio)
	}
	if s := byEngine[engStrata]; s.Median != 5 || s.Ratio != 2.5 || s.Note != "" {
		t.Errorf("strata: got median %v ratio %v note %q, want 5, 2.5, no note", s.Median, s.Ratio, s.Note)
	}
	f := byEngine[engFuseOverlayfs]
	if f.N != 1 || f.Failed != 1 || !strings.Contains(f.Note, "boom") || f.Mismatch != "entries: 9, kernel: 10" {
		t.Errorf("fuse-overlayfs: got n %d failed %d note %q", f.N, f.Failed, f.Note)
	}
	var b bytes.Buffer
	if err := r.write(&b, "text"); err != nil || !strings.Contains(b.String(), "2.50x") {
		t.Errorf("text report (err %v) lacks the 2.50x ratio:\n%s", err, b.String())
	}
}

func TestParseMountinfo(t *testing.T) {
	in := "36 35 98:0 / /mnt/a\\040b rw,relatime shared:1 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w\n" +
		"37 35 0:50 / /tmp/m rw,nosuid,nodev - fuse.strata strata rw,user_id=0\n"
	got := parseMountinfo([]byte(in))
	if len(got) != 2 {
		t.Fatalf("got %d entries, want 2", len(got))
	}
	if got[0].point != "/mnt/a b" || got[0].fstype != "overlay" || got[0].superOpts != "rw,lowerdir=/l,upperdir=/u,workdir=/w" {
		t.Errorf("entry 0: got %+v", got[0])
	}
	if got[1].point != "/tmp/m" || got[1].fstype != "fuse.strata" || got[1].opts != "rw,nosuid,nodev" {
		t.Errorf("entry 1: got %+v", got[1])
	}
}

func TestParseFlags(t *testing.T) {
	var out, errb bytes.Buffer
	cfg, err := parseFlags([]string{"-quick", "-engines", "plain,kernel", "-workloads", "unlink,statwalk", "-modes", "warm"}, &out, &errb)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.prof.Name != "quick" || cfg.reps != 3 || !cfg.explicitEngines {
		t.Errorf("got profile %s reps %d explicit %v, want quick 3 true", cfg.prof.Name, cfg.reps, cfg.explicitEngines)
	}
	if strings.Join(cfg.engines, ",") != "kernel,plain" || len(cfg.workloads) != 2 || cfg.workloads[0].name != "statwalk" {
		t.Errorf("got engines %v and workloads in the wrong order", cfg.engines)
	}
	for _, bad := range [][]string{{"-engines", "zfs"}, {"-quick", "-smoke"}, {"-format", "xml"}, {"-workloads", ""}, {"extra"}} {
		if _, err := parseFlags(bad, &out, &errb); err == nil {
			t.Errorf("parseFlags(%q): no error", bad)
		}
	}
}
