package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// harness runs every (repetition, workload, mode, engine) of one
// invocation and collects the samples.
type harness struct {
	cfg   config
	log   io.Writer // progress and warnings (stderr)
	owner cred      // the rootless user, owner of the fixture

	runDir    string // this invocation's scratch dir; every mount lives under it
	logDir    string
	workerBin string // a copy of this executable that the rootless user can run
	strataBin string
	workerEnv []string
	fix       *fixture

	engines []engine
	// mountOpts holds each engine's effective mount options, from
	// mountinfo at its first mount, with paths replaced by $FIX and $RUN.
	mountOpts map[string]string
	skipped   map[string]string // engine -> why it did not run
	fuseDev   fuseDevice
}

// runHarness builds or reuses the fixture, probes the engines and runs
// everything. It returns the report so far even when it fails midway.
// Every mount it makes is under runDir, and is gone when it returns.
func runHarness(ctx context.Context, cfg config, logw io.Writer) (rep *report, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("bench needs root: it mounts kernel overlay, drops caches and runs workers as the rootless user")
	}
	h := &harness{cfg: cfg, log: logw, owner: cfg.owner, mountOpts: map[string]string{}, skipped: map[string]string{}}
	if err := os.MkdirAll(cfg.workDir, 0o755); err != nil {
		return nil, err
	}
	unlock, err := lockWorkDir(cfg.workDir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	// We hold the lock, so a run dir left in workDir belongs to a killed
	// run: unmount what it left mounted and remove it. Only our own run-*
	// dirs: workDir itself may hold anything (say, -workdir /tmp).
	olds, _ := filepath.Glob(filepath.Join(cfg.workDir, "run-*"))
	for _, old := range olds {
		for _, p := range mountsUnder(old) {
			fmt.Fprintf(logw, "warning: unmounting %s, left by an earlier run\n", p)
			unmountPath(p, logw)
		}
		if len(mountsUnder(old)) == 0 {
			os.RemoveAll(old)
		}
	}

	h.runDir, err = os.MkdirTemp(cfg.workDir, "run-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := h.close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	if err := os.Chmod(h.runDir, 0o755); err != nil {
		return nil, err
	}
	// Daemonized FUSE servers are orphaned when their mount command exits;
	// as a subreaper we inherit and reap them (see waitDaemons).
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("become child subreaper: %w", err)
	}
	if err := h.setupRunDir(); err != nil {
		return nil, err
	}
	if slices.Contains(cfg.engines, engStrataRootless) {
		if err := checkReachable(h.runDir, h.owner); err != nil {
			return nil, err
		}
	}
	h.fix, err = ensureFixture(ctx, cfg.workDir, cfg.prof, h.owner, logw)
	if err != nil {
		return nil, err
	}
	if err := h.setupEngines(ctx); err != nil {
		return nil, err
	}
	rep = h.newReport()
	err = h.runAll(ctx, rep)
	for _, e := range h.engines {
		rep.Header.Engines = append(rep.Header.Engines, engineInfo{Name: e.name(), Command: e.command(), Effective: h.mountOpts[e.name()]})
	}
	rep.finish()
	return rep, err
}

// close unmounts whatever is still mounted under runDir (deepest first),
// restores /dev/fuse and removes runDir.
func (h *harness) close() error {
	var errs []error
	for _, p := range mountsUnder(h.runDir) {
		if p != filepath.Join(h.runDir, "fusectl") { // abortFUSE's, expected
			fmt.Fprintf(h.log, "warning: %s still mounted at exit; unmounting\n", p)
		}
		if err := unmountPath(p, h.log); err != nil {
			errs = append(errs, err)
		}
	}
	if err := h.fuseDev.restore(); err != nil {
		errs = append(errs, err)
	}
	unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	if len(mountsUnder(h.runDir)) == 0 {
		if err := os.RemoveAll(h.runDir); err != nil {
			errs = append(errs, err)
		}
	} else {
		errs = append(errs, fmt.Errorf("mounts remain under %s; not removing it", h.runDir))
	}
	return errors.Join(errs...)
}

// lockWorkDir takes an exclusive lock on workDir, so that cleaning up after
// a killed run never touches a live one.
func lockWorkDir(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s is in use by another bench run: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

// checkReachable verifies that c can traverse every ancestor of dir.
func checkReachable(dir string, c cred) error {
	for d := dir; ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return err
		}
		if st.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("the rootless user %d cannot reach %s: %s is mode %v (use a -workdir under a world-searchable path)",
				c.uid, dir, d, st.Mode().Perm())
		}
		if d == "/" {
			return nil
		}
	}
}

// setupRunDir makes the scratch layout, the worker binary and the workers'
// environment.
func (h *harness) setupRunDir() error {
	h.logDir = filepath.Join(h.runDir, "logs")
	home := filepath.Join(h.runDir, "home")
	bin := filepath.Join(h.runDir, "bin")
	for _, d := range []string{h.logDir, home, bin, filepath.Join(h.runDir, "inst")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	// Workers are this executable. go run's copy sits in a private temp
	// dir, so copy it where the rootless user can run it.
	self, err := os.Executable()
	if err != nil {
		return err
	}
	h.workerBin = filepath.Join(bin, "bench")
	if err := copyFile(self, h.workerBin, 0o755); err != nil {
		return fmt.Errorf("copy worker binary: %w", err)
	}
	h.workerEnv = gitEnv(home)
	h.workerEnv = append(h.workerEnv, "TZ=UTC")
	return nil
}

func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// setupEngines builds strata if needed, opens /dev/fuse for the rootless
// engine, and probes every requested engine. An engine that was asked for
// by name must work; from the default list, one that cannot run here is
// skipped with its reason in the report.
func (h *harness) setupEngines(ctx context.Context) error {
	want := h.cfg.engines
	if slices.Contains(want, engStrata) || slices.Contains(want, engStrataRootless) {
		bin, err := h.strataBinary(ctx)
		if err != nil {
			if h.cfg.explicitEngines {
				return err
			}
			fmt.Fprintf(h.log, "warning: %v\n", err)
		}
		h.strataBin = bin
	}
	if slices.Contains(want, engStrataRootless) {
		if err := h.fuseDev.open(); err != nil {
			if h.cfg.explicitEngines {
				return err
			}
			h.skipped[engStrataRootless] = err.Error()
			want = slices.DeleteFunc(slices.Clone(want), func(n string) bool { return n == engStrataRootless })
		}
	}
	for _, name := range want {
		e, err := newEngine(name, h)
		if err != nil {
			return err
		}
		if err := e.probe(ctx, h); err != nil {
			if h.cfg.explicitEngines {
				return fmt.Errorf("engine %s: %w", name, err)
			}
			fmt.Fprintf(h.log, "skipping %s: %v\n", name, err)
			h.skipped[name] = err.Error()
			continue
		}
		h.engines = append(h.engines, e)
	}
	if len(h.engines) == 0 {
		return errors.New("no engine can run here")
	}
	return ctx.Err()
}

// strataBinary returns -strata, or builds strata from the repository root
// into the run dir.
func (h *harness) strataBinary(ctx context.Context) (string, error) {
	if h.cfg.strata != "" {
		p, err := filepath.Abs(h.cfg.strata)
		if err != nil {
			return "", err
		}
		dst := filepath.Join(h.runDir, "bin", "strata")
		return dst, copyFile(p, dst, 0o755) // reachable by the rootless user
	}
	root, err := repoRoot()
	if err != nil {
		return "", fmt.Errorf("build strata: %w (or pass -strata PATH)", err)
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("build strata: %w (or pass -strata PATH)", err)
	}
	dst := filepath.Join(h.runDir, "bin", "strata")
	fmt.Fprintf(h.log, "building strata from %s\n", root)
	if err := runCmd(ctx, root, nil, goBin, "build", "-o", dst, "."); err != nil {
		return "", fmt.Errorf("build strata: %w", err)
	}
	return dst, nil
}

// repoRoot finds the strata module root above the working directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(bytes.TrimSpace(b), []byte("module strata")) {
			return dir, nil
		}
		if dir == "/" {
			return "", errors.New("no strata go.mod above the working directory")
		}
		dir = filepath.Dir(dir)
	}
}

// runAll runs the repetitions, interleaved: repetition 1 of every
// (workload, mode, engine), then repetition 2, and so on, so that drift in
// the machine's state spreads over all engines alike. The engine order
// rotates by one each repetition, so no engine always runs first after a
// change of workload (or always right after the slowest engine).
func (h *harness) runAll(ctx context.Context, rep *report) error {
	total := 0
	for _, w := range h.cfg.workloads {
		n := 0
		for _, mode := range h.runModesOf(w) {
			n++
			if h.followUpOf(w, mode) != nil {
				n++
			}
		}
		total += n * len(h.engines)
	}
	total *= h.cfg.reps
	done := 0
	start := time.Now()
	progress := func(r int, w, mode, engine string, res workerResult, err error) sample {
		s := sample{Seconds: res.Seconds, Ops: res.Ops, Bytes: res.Bytes, Busy: res.Busy}
		status := fmt.Sprintf("%.3fs", res.Seconds)
		if res.Busy > busyWarn {
			status += fmt.Sprintf(" (others kept the CPUs %.0f%% busy just before)", 100*res.Busy)
		}
		if err != nil {
			s.Err = err.Error()
			status = "FAILED: " + s.Err
		}
		fmt.Fprintf(h.log, "[%d/%d %s] rep %d %s %s %s: %s\n", done, total,
			time.Since(start).Round(time.Second), r, w, mode, engine, status)
		return s
	}
	for r := 1; r <= h.cfg.reps; r++ {
		for _, w := range h.cfg.workloads {
			for _, mode := range h.runModesOf(w) {
				fu := h.followUpOf(w, mode)
				for i := range h.engines {
					e := h.engines[(i+r-1)%len(h.engines)]
					if err := ctx.Err(); err != nil {
						return err
					}
					res, err := h.runOne(ctx, e, w, mode, r, fu != nil)
					done++
					rep.add(w, mode, e.name(), progress(r, w.name, mode, e.name(), res, err))
					if fu != nil {
						var fres workerResult
						var ferr error
						switch {
						case err != nil:
							ferr = fmt.Errorf("not run: %s failed", w.name)
						case res.FollowUp == nil:
							ferr = errors.New("the worker returned no follow-up result")
						default:
							fres = *res.FollowUp
							fres.Busy = res.Busy
							if fres.Err != "" {
								ferr = errors.New(fres.Err)
							}
						}
						done++
						fw, _ := findWorkload(fu.workload)
						rep.add(fw, fu.mode, e.name(), progress(r, fu.workload, fu.mode, e.name(), fres, ferr))
					}
				}
			}
		}
	}
	return nil
}

// followUpOf returns the follow-up of w's run in mode if its workload and
// mode were selected.
func (h *harness) followUpOf(w *workload, mode string) *followUp {
	fu := w.followUpOf(mode, h.modesOf(w))
	if fu == nil || !slices.Contains(h.cfg.modes, fu.mode) {
		return nil
	}
	for _, x := range h.cfg.workloads {
		if x.name == fu.workload {
			return fu
		}
	}
	return nil
}

// runModesOf returns the modes of w that get runs of their own: those of
// modesOf, less a warm mode measured as the cold run's follow-up.
func (h *harness) runModesOf(w *workload) []string {
	ms := h.modesOf(w)
	if w.warmAfterCold(ms) {
		return slices.DeleteFunc(slices.Clone(ms), func(m string) bool { return m == modeWarm })
	}
	return ms
}

// modesOf returns the requested modes that w runs in, cold first.
func (h *harness) modesOf(w *workload) []string {
	var ms []string
	for _, m := range bothModes {
		runs := slices.Contains(w.modes, m) || (h.cfg.allModes && slices.Contains(w.moreModes, m))
		if runs && slices.Contains(h.cfg.modes, m) {
			ms = append(ms, m)
		}
	}
	return ms
}

// runOne makes one measurement: a fresh instance, the workload's inputs,
// sync (and in cold mode, dropped caches), a fresh mount, the worker, then
// unmount and cleanup, which run even when the context is cancelled.
func (h *harness) runOne(ctx context.Context, e engine, w *workload, mode string, r int, follow bool) (res workerResult, err error) {
	ph := phases{last: time.Now()}
	dir := filepath.Join(h.runDir, "inst", fmt.Sprintf("%s-%s-%s-%d", e.name(), w.name, mode, r))
	in, err := e.setup(ctx, h, dir, w)
	ph.mark("setup")
	if err != nil {
		return res, fmt.Errorf("setup: %w", err)
	}
	bg := context.WithoutCancel(ctx)
	defer func() {
		if uerr := e.unmount(bg, h, in); uerr != nil {
			err = errors.Join(err, fmt.Errorf("unmount: %w", uerr))
		}
		reapOrphans()
		ph.mark("unmount")
		if cerr := e.cleanup(h, in, w, err != nil); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleanup: %w", cerr))
		}
		ph.mark("cleanup")
		if h.cfg.verbose {
			fmt.Fprintf(h.log, "  phases: %s\n", ph)
		}
	}()
	if w.prepare != nil {
		if _, err := h.worker(ctx, e.user(), w, "prepare", mode, in.writable, in.writable, false); err != nil {
			return res, fmt.Errorf("prepare: %w", err)
		}
		ph.mark("prepare")
	}
	unix.Sync()
	ph.mark("sync")
	if mode == modeCold {
		if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
			return res, fmt.Errorf("drop caches: %w", err)
		}
		ph.mark("drop-caches")
	}
	if err := e.mount(ctx, h, in); err != nil {
		return res, fmt.Errorf("mount: %w", err)
	}
	ph.mark("mount")
	if _, ok := h.mountOpts[e.name()]; !ok && in.dir != "" {
		o := strings.ReplaceAll(mountOptionsOf(in.mnt), in.dir, "$RUN")
		if se, ok := e.(*strataEngine); ok {
			if st := se.status(ctx, h, in); st != "" {
				o += " (" + st + ")"
			}
		}
		h.mountOpts[e.name()] = strings.ReplaceAll(o, h.fix.dir, "$FIX")
	}
	busy := h.otherLoad(ctx)
	ph.mark("load-sample")
	res, err = h.worker(ctx, e.user(), w, "run", mode, in.mnt, in.upper, follow)
	ph.mark("worker")
	res.Busy = busy
	if errors.Is(err, errWorkerTimeout) && in.mounted && isFUSE(e) {
		// A worker stuck on a dead server would block the unmount too.
		if res2 := h.abortFUSE(in.mnt); res2 != nil {
			fmt.Fprintf(h.log, "warning: %v\n", res2)
		}
	}
	return res, err
}

// reapOrphans reaps exited orphans that were reparented to the harness
// (it is a child subreaper), such as the children of a killed worker.
// Between runs no exec.Cmd of the harness is running, so every child it
// could reap is an orphan.
func reapOrphans() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}

// phases times the steps of one run, for -v.
type phases struct {
	last  time.Time
	steps []string
}

func (p *phases) mark(step string) {
	now := time.Now()
	p.steps = append(p.steps, step+"="+now.Sub(p.last).Round(time.Millisecond).String())
	p.last = now
}

func (p phases) String() string { return strings.Join(p.steps, " ") }

// errWorkerTimeout marks a worker killed by the per-run timeout.
var errWorkerTimeout = errors.New("worker timed out")

func isFUSE(e engine) bool {
	switch e.(type) {
	case *strataEngine, *fuseOverlayEngine:
		return true
	}
	return false
}

// worker runs one phase of w in a worker process as c, with the per-run
// timeout, and returns its result.
func (h *harness) worker(ctx context.Context, c *cred, w *workload, phase, mode, dir, syncDir string, follow bool) (workerResult, error) {
	var res workerResult
	ctx, cancel := context.WithTimeout(ctx, h.cfg.timeout)
	defer cancel()
	argv := c.wrap([]string{h.workerBin, "worker", "-workload", w.name, "-phase", phase, "-mode", mode,
		"-dir", dir, "-fixture", h.fix.dir, "-sync-dir", syncDir, "-follow-up=" + strconv.FormatBool(follow)})
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env, cmd.Dir = h.workerEnv, "/"
	// Its own process group, killed as a whole on timeout or interrupt:
	// a surviving child (ls, tar, git) would keep the mount busy.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return unix.Kill(-cmd.Process.Pid, unix.SIGKILL) }
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// If the worker hangs in a FUSE request, SIGKILL alone may not free
	// it; do not wait for its output pipes forever.
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		if ctx.Err() == context.DeadlineExceeded {
			err = fmt.Errorf("%w after %s", errWorkerTimeout, h.cfg.timeout)
		}
		if msg := tail(stderr.Bytes(), 600); msg != "" {
			err = fmt.Errorf("%w: %s", err, msg)
		}
		return res, err
	}
	if phase != "run" {
		return res, nil
	}
	if err := json.Unmarshal(bytes.TrimSpace(stdout.Bytes()), &res); err != nil {
		return res, fmt.Errorf("worker output %q: %w", tail(stdout.Bytes(), 200), err)
	}
	return res, nil
}

// abortFUSE aborts the FUSE connection of the mount at mnt through
// fusectl, which fails every pending and future request of a hung server.
// fusectl is mounted under the run dir if the system has not mounted it.
func (h *harness) abortFUSE(mnt string) error {
	ms, err := readMounts()
	if err != nil {
		return err
	}
	dev, ctl := "", ""
	for _, m := range ms {
		if m.point == mnt {
			dev = m.dev
		}
		if m.fstype == "fusectl" {
			ctl = m.point
		}
	}
	_, minor, ok := strings.Cut(dev, ":")
	if _, err := strconv.Atoi(minor); !ok || err != nil {
		return fmt.Errorf("abort FUSE connection of %s: no device number in mountinfo", mnt)
	}
	if ctl == "" {
		ctl = filepath.Join(h.runDir, "fusectl")
		if err := os.MkdirAll(ctl, 0o755); err != nil {
			return err
		}
		if err := unix.Mount("fusectl", ctl, "fusectl", 0, ""); err != nil {
			return fmt.Errorf("mount fusectl to abort %s: %w", mnt, err)
		}
	}
	if err := os.WriteFile(filepath.Join(ctl, minor, "abort"), []byte("1"), 0); err != nil {
		return fmt.Errorf("abort FUSE connection of %s: %w", mnt, err)
	}
	fmt.Fprintf(h.log, "warning: aborted the FUSE connection of %s (worker timed out)\n", mnt)
	return nil
}
