package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// Other processes on the machine distort every timing, so the harness
// measures them: right before each timed run, when nothing of the harness
// is running (the mount is made, its server idle, the worker not started),
// it samples how busy the CPUs are. Whatever it sees is someone else's.

const (
	busySample = 50 * time.Millisecond
	// busyWarn is the busy fraction above which a run is flagged.
	busyWarn = 0.25
	// idleEnough is what -wait-idle waits for.
	idleEnough = 0.10
)

// cpuTicks reads the aggregate "cpu" line of /proc/stat and returns the
// busy and total tick counts (iowait counts as idle).
func cpuTicks() (busy, total uint64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("unexpected /proc/stat line %q", line)
	}
	// user nice system idle iowait irq softirq steal [guest guest_nice]:
	// guest time is already in user, so stop at steal.
	for i := 1; i <= 8 && i < len(f); i++ {
		v, err := strconv.ParseUint(f[i], 10, 64)
		if err != nil {
			return 0, 0, err
		}
		total += v
		if i != 4 && i != 5 {
			busy += v
		}
	}
	return busy, total, nil
}

// sampleBusy returns the fraction of all CPUs' time that was busy over d.
func sampleBusy(d time.Duration) float64 {
	b0, t0, err := cpuTicks()
	if err != nil {
		return 0
	}
	time.Sleep(d)
	b1, t1, err := cpuTicks()
	if err != nil || t1 <= t0 {
		return 0
	}
	return float64(b1-b0) / float64(t1-t0)
}

// otherLoad samples the CPUs before a run. With -wait-idle it keeps
// sampling until they are idle enough or the wait is over; it returns the
// last sample.
func (h *harness) otherLoad(ctx context.Context) float64 {
	busy := sampleBusy(busySample)
	if h.cfg.waitIdle <= 0 || busy <= idleEnough {
		return busy
	}
	deadline := time.Now().Add(h.cfg.waitIdle)
	for busy > idleEnough && time.Now().Before(deadline) && ctx.Err() == nil {
		busy = sampleBusy(4 * busySample)
	}
	return busy
}

// loadAvg returns /proc/loadavg's first three fields.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
