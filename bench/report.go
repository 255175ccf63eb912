package main

import (
	"bufio"
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// sample is one timed run.
type sample struct {
	Seconds float64 `json:"seconds"`
	Ops     int64   `json:"ops"`
	Bytes   int64   `json:"bytes"`
	Err     string  `json:"error,omitempty"`
	// Busy is the fraction of CPU time other processes used in the 50 ms
	// before the run (see otherLoad).
	Busy float64 `json:"busy_before"`
}

// row is every sample of one (workload, mode, engine) and its summary.
type row struct {
	Workload string   `json:"workload"`
	Mode     string   `json:"mode"`
	Engine   string   `json:"engine"`
	Unit     string   `json:"unit"`
	Samples  []sample `json:"samples"`

	// Summary of the successful samples, set by finish.
	N      int     `json:"n"`
	Failed int     `json:"failed"`
	Median float64 `json:"median_seconds"`
	Min    float64 `json:"min_seconds"`
	Max    float64 `json:"max_seconds"`
	// Ratio is Median over kernel overlay's median for the same workload
	// and mode; 0 when there is no kernel result.
	Ratio float64 `json:"ratio_to_kernel,omitempty"`
	Ops   int64   `json:"ops"`   // of the first successful sample
	Bytes int64   `json:"bytes"` // of the first successful sample
	Note  string  `json:"note,omitempty"`
	// Mismatch says how the row's count differs from kernel overlay's
	// (entries walked, files read): the engine showed another tree.
	Mismatch string `json:"mismatch,omitempty"`
	// MaxBusy is the highest Busy of the successful samples.
	MaxBusy float64 `json:"max_busy_before"`
}

// engineInfo is how an engine was mounted.
type engineInfo struct {
	Name      string `json:"name"`
	Command   string `json:"command"`
	Effective string `json:"effective_options,omitempty"` // from mountinfo
}

// header records where and how the numbers were made: never compare
// numbers from different headers.
type header struct {
	Date        string            `json:"date"`
	Kernel      string            `json:"kernel"`
	CPU         string            `json:"cpu"`
	CPUs        int               `json:"cpus"`
	GoVersion   string            `json:"go"`
	Strata      string            `json:"strata,omitempty"`
	Commit      string            `json:"commit,omitempty"`
	FuseOverlay string            `json:"fuse_overlayfs,omitempty"`
	Profile     string            `json:"profile"`
	Reps        int               `json:"repetitions"`
	Modes       []string          `json:"modes"`
	RootlessID  string            `json:"rootless_user"`
	Fixture     string            `json:"fixture"`
	FixtureDesc string            `json:"fixture_desc"`
	Engines     []engineInfo      `json:"engines"`
	Skipped     map[string]string `json:"skipped,omitempty"`
	Workloads   map[string]string `json:"workloads"`
	Elapsed     string            `json:"elapsed,omitempty"`
	LoadStart   string            `json:"loadavg_start"`
	LoadEnd     string            `json:"loadavg_end,omitempty"`
	// Busy summarizes the samples' Busy: how much other processes ran.
	Busy string `json:"other_load,omitempty"`
}

// report is the whole result of one invocation.
type report struct {
	Header header `json:"header"`
	Rows   []*row `json:"results"`
	start  time.Time
}

// newReport fills the header from the machine and the harness's setup.
func (h *harness) newReport() *report {
	hd := header{
		Date:       time.Now().UTC().Format(time.RFC3339),
		Kernel:     kernelVersion(),
		CPUs:       runtime.NumCPU(),
		CPU:        cpuModel(),
		GoVersion:  runtime.Version(),
		Profile:    h.cfg.prof.Name,
		Reps:       h.cfg.reps,
		Modes:      h.cfg.modes,
		RootlessID: fmt.Sprintf("%d:%d", h.owner.uid, h.owner.gid),
		Fixture:    h.fix.dir,
		Skipped:    h.skipped,
		Workloads:  map[string]string{},
		LoadStart:  loadAvg(),
	}
	m := h.fix.m
	hd.FixtureDesc = fmt.Sprintf("bottom: %d files, %d symlinks, %d dirs (up to 10 deep); middle: %d overrides, %d whiteouts + %d dir whiteouts, opaque %s hiding %d files, git repo of %d files; top: %s + %s; tar of %d files",
		m.Counts.BottomFiles, m.Counts.Symlinks, m.Counts.BottomDirs, m.Counts.Overrides, m.Counts.Whiteouts,
		len(m.WhiteoutDirs), m.OpaqueDir, m.Counts.OpaqueHidden, m.Counts.RepoFiles,
		sizeString(m.Profile.BigBytes), sizeString(m.Profile.RandBytes), m.TarFiles)
	if h.strataBin != "" {
		if out, err := outputCmd(context.Background(), "/", nil, h.strataBin, "version"); err == nil {
			hd.Strata = strings.TrimSpace(string(out))
		}
		if root, err := repoRoot(); err == nil && h.cfg.strata == "" {
			if out, err := outputCmd(context.Background(), root, nil, "git", "describe", "--always", "--dirty"); err == nil {
				hd.Commit = strings.TrimSpace(string(out))
			}
		}
	}
	for _, e := range h.engines {
		if e.name() == engFuseOverlayfs {
			out, _ := exec0("fuse-overlayfs", "--version")
			for _, l := range strings.Split(out, "\n") {
				if strings.HasPrefix(l, "fuse-overlayfs:") {
					hd.FuseOverlay = strings.TrimSpace(strings.TrimPrefix(l, "fuse-overlayfs:"))
				}
			}
		}
	}
	for _, w := range h.cfg.workloads {
		hd.Workloads[w.name] = w.desc
	}
	return &report{Header: hd, start: time.Now()}
}

func exec0(name string, args ...string) (string, error) {
	out, err := outputCmd(context.Background(), "/", nil, name, args...)
	return string(out), err
}

// add records one sample.
func (r *report) add(w *workload, mode, engine string, s sample) {
	for _, x := range r.Rows {
		if x.Workload == w.name && x.Mode == mode && x.Engine == engine {
			x.Samples = append(x.Samples, s)
			return
		}
	}
	r.Rows = append(r.Rows, &row{Workload: w.name, Mode: mode, Engine: engine, Unit: w.unit, Samples: []sample{s}})
}

// finish computes the summaries and ratios and fills in the engines' mount
// options.
func (r *report) finish() {
	if !r.start.IsZero() {
		r.Header.Elapsed = time.Since(r.start).Round(time.Second).String()
		r.Header.LoadEnd = loadAvg()
	}
	var busy []float64
	flagged := 0
	for _, x := range r.Rows {
		for _, s := range x.Samples {
			busy = append(busy, s.Busy)
			if s.Busy > busyWarn {
				flagged++
			}
		}
	}
	if med, _, hi := stats(busy); len(busy) > 0 {
		r.Header.Busy = fmt.Sprintf("CPUs busy with other work just before a run: median %.0f%%, max %.0f%%; %d of %d runs above %.0f%%",
			100*med, 100*hi, flagged, len(busy), 100*busyWarn)
		if flagged > 0 {
			r.Header.Busy += " (their notes say so): those timings include someone else's load"
		}
	}
	// Rows in workload, mode, engine order, whatever order they ran in
	// (follow-ups run inside another workload's slot).
	sort.SliceStable(r.Rows, func(i, j int) bool {
		a, b := r.Rows[i], r.Rows[j]
		if wa, wb := workloadIndex(a.Workload), workloadIndex(b.Workload); wa != wb {
			return wa < wb
		}
		if a.Mode != b.Mode {
			return a.Mode == modeCold
		}
		return slices.Index(allEngines, a.Engine) < slices.Index(allEngines, b.Engine)
	})
	base := map[string]*row{}
	for _, x := range r.Rows {
		x.summarize()
		if x.Engine == engKernel && x.N > 0 {
			base[x.Workload+"/"+x.Mode] = x
		}
	}
	for _, x := range r.Rows {
		k := base[x.Workload+"/"+x.Mode]
		if k == nil || x.N == 0 {
			continue
		}
		if k.Median > 0 {
			x.Ratio = x.Median / k.Median
		}
		// Engines must agree on what they did: a different entry count
		// in a walk means a different tree.
		if x.Ops != k.Ops {
			x.Mismatch = fmt.Sprintf("%s: %d, kernel: %d", x.Unit, x.Ops, k.Ops)
			x.Note = joinNote(x.Mismatch, x.Note)
		}
	}
}

func workloadIndex(name string) int {
	return slices.IndexFunc(workloads, func(w *workload) bool { return w.name == name })
}

func joinNote(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

// summarize sets N, Failed, Median, Min, Max, Ops and Note from Samples.
func (x *row) summarize() {
	var secs []float64
	x.Note, x.Ops, x.Bytes = "", 0, 0
	for _, s := range x.Samples {
		if s.Err != "" {
			if x.Failed == 0 {
				x.Note = "error: " + s.Err
			}
			x.Failed++
			continue
		}
		if len(secs) == 0 {
			x.Ops, x.Bytes = s.Ops, s.Bytes
		} else if s.Ops != x.Ops {
			x.Note = joinNote(x.Note, fmt.Sprintf("%s vary between runs", x.Unit))
		}
		secs = append(secs, s.Seconds)
		x.MaxBusy = max(x.MaxBusy, s.Busy)
	}
	x.N = len(secs)
	if x.Failed > 0 {
		x.Note = fmt.Sprintf("%d of %d runs failed, first %s", x.Failed, len(x.Samples), x.Note)
	}
	if x.MaxBusy > busyWarn {
		x.Note = joinNote(x.Note, fmt.Sprintf("machine busy before a run (%.0f%% CPU)", 100*x.MaxBusy))
	}
	x.Median, x.Min, x.Max = stats(secs)
}

// stats returns the median, minimum and maximum of v (zeros if empty). The
// median of an even count is the mean of the middle two.
func stats(v []float64) (median, lo, hi float64) {
	if len(v) == 0 {
		return 0, 0, 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	n := len(s)
	median = s[n/2]
	if n%2 == 0 {
		median = (s[n/2-1] + s[n/2]) / 2
	}
	return median, s[0], s[n-1]
}

// failures counts the failed samples.
func (r *report) failures() int {
	n := 0
	for _, x := range r.Rows {
		n += x.Failed
	}
	return n
}

// rate renders the row's throughput at its median.
func (x *row) rate() string {
	if x.N == 0 || x.Median <= 0 {
		return ""
	}
	switch x.Unit {
	case "runs":
		return ""
	case "bytes":
		return fmt.Sprintf("%.0f MiB/s", float64(x.Bytes)/mib/x.Median)
	}
	return fmt.Sprintf("%.0f %s/s", float64(x.Ops)/x.Median, x.Unit)
}

func (x *row) ratioString() string {
	if x.Ratio == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", x.Ratio)
}

// write renders the report in format (text, csv or json).
func (r *report) write(w io.Writer, format string) error {
	switch format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	case "csv":
		return r.writeCSV(w)
	case "text":
		return r.writeText(w)
	}
	return fmt.Errorf("unknown format %q", format)
}

// headerLines is the header as "key: value" lines.
func (r *report) headerLines() []string {
	h := r.Header
	ls := []string{
		"date: " + h.Date,
		"kernel: " + h.Kernel,
		fmt.Sprintf("cpu: %s, %d CPUs", h.CPU, h.CPUs),
		"go: " + h.GoVersion,
	}
	if h.Strata != "" {
		v := h.Strata
		if h.Commit != "" && !strings.Contains(v, h.Commit) { // strata version names its commit when built with VCS stamps
			v += " " + h.Commit
		}
		ls = append(ls, "strata: "+v)
	}
	if h.FuseOverlay != "" {
		ls = append(ls, "fuse-overlayfs: "+h.FuseOverlay)
	}
	ls = append(ls,
		fmt.Sprintf("profile: %s, %d repetitions, modes %s (cold: caches dropped before mounting; warm: one untimed warm-up in the same mount, for read-only workloads the cold run)",
			h.Profile, h.Reps, strings.Join(h.Modes, ",")),
		"fixture ($FIX): "+h.Fixture,
		"fixture: "+h.FixtureDesc,
		"rootless user: "+h.RootlessID,
	)
	if h.Elapsed != "" {
		ls = append(ls, "elapsed: "+h.Elapsed)
	}
	ls = append(ls, "load average at start: "+h.LoadStart)
	if h.LoadEnd != "" {
		ls = append(ls, "load average at end: "+h.LoadEnd)
	}
	if h.Busy != "" {
		ls = append(ls, "other load: "+h.Busy)
	}
	for _, e := range h.Engines {
		ls = append(ls, fmt.Sprintf("engine %s: %s", e.Name, e.Command))
		if e.Effective != "" {
			ls = append(ls, fmt.Sprintf("engine %s mounted as: %s", e.Name, e.Effective))
		}
	}
	for _, k := range sortedKeys(h.Skipped) {
		ls = append(ls, fmt.Sprintf("skipped %s: %s", k, h.Skipped[k]))
	}
	return ls
}

func (r *report) writeText(w io.Writer) error {
	bw := bufio.NewWriter(w)
	fmt.Fprintln(bw, "strata bench: seconds per run (median, min, max) and the median's ratio to kernel overlay's")
	for _, l := range r.headerLines() {
		fmt.Fprintln(bw, "  "+l)
	}
	fmt.Fprintln(bw)
	t := [][]string{{"workload", "mode", "engine", "median", "min", "max", "ratio", "rate", "notes"}}
	prev := ""
	for _, x := range r.Rows {
		if k := x.Workload + "/" + x.Mode; k != prev && prev != "" {
			t = append(t, nil) // a blank line between groups
		}
		prev = x.Workload + "/" + x.Mode
		med, lo, hi := "-", "-", "-"
		if x.N > 0 {
			med, lo, hi = fmt.Sprintf("%.3f", x.Median), fmt.Sprintf("%.3f", x.Min), fmt.Sprintf("%.3f", x.Max)
		}
		t = append(t, []string{x.Workload, x.Mode, x.Engine, med, lo, hi, x.ratioString(), x.rate(), x.Note})
	}
	// Names left-aligned, numbers right-aligned; notes run to the end.
	right := []bool{false, false, false, true, true, true, true, true, false}
	width := make([]int, len(right))
	for _, l := range t {
		for i, c := range l {
			width[i] = max(width[i], len(c))
		}
	}
	for _, l := range t {
		var sb strings.Builder
		for i, c := range l {
			switch {
			case i == len(l)-1:
				sb.WriteString(c)
			case right[i]:
				sb.WriteString(strings.Repeat(" ", width[i]-len(c)) + c + "  ")
			default:
				sb.WriteString(c + strings.Repeat(" ", width[i]-len(c)) + "  ")
			}
		}
		fmt.Fprintln(bw, strings.TrimRight(sb.String(), " "))
	}
	return bw.Flush()
}

// writeCSV writes the header as "# key: value" comment lines, then one
// record per (workload, mode, engine).
func (r *report) writeCSV(w io.Writer) error {
	for _, l := range r.headerLines() {
		if _, err := fmt.Fprintln(w, "# "+l); err != nil {
			return err
		}
	}
	cw := csv.NewWriter(w)
	cw.Write([]string{"workload", "mode", "engine", "n", "failed", "median_s", "min_s", "max_s", "ratio_to_kernel",
		"ops", "unit", "bytes", "note"})
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', 6, 64) }
	for _, x := range r.Rows {
		ratio := ""
		if x.Ratio != 0 {
			ratio = strconv.FormatFloat(x.Ratio, 'f', 4, 64)
		}
		cw.Write([]string{x.Workload, x.Mode, x.Engine, strconv.Itoa(x.N), strconv.Itoa(x.Failed),
			f(x.Median), f(x.Min), f(x.Max), ratio, strconv.FormatInt(x.Ops, 10), x.Unit,
			strconv.FormatInt(x.Bytes, 10), x.Note})
	}
	cw.Flush()
	return cw.Error()
}

// kernelVersion is uname's release and version.
func kernelVersion() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Sysname[:]) + " " + unix.ByteSliceToString(u.Release[:]) + " " +
		unix.ByteSliceToString(u.Version[:]) + " " + unix.ByteSliceToString(u.Machine[:])
}

// cpuModel is /proc/cpuinfo's first "model name".
func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func sizeString(n int64) string {
	switch {
	case n >= gib && n%gib == 0:
		return fmt.Sprintf("%d GiB", n/gib)
	case n >= mib:
		return fmt.Sprintf("%d MiB", n/mib)
	}
	return fmt.Sprintf("%d KiB", n/kib)
}

// writeReport writes r to out (a file) or to stdout.
func writeReport(r *report, format, out string, stdout io.Writer) error {
	if out == "" {
		return r.write(stdout, format)
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	if err := r.write(f, format); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
