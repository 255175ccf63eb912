package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Engine names, in report order. kernel is the baseline of every ratio.
const (
	engKernel         = "kernel"
	engStrata         = "strata"
	engStrataRootless = "strata-rootless"
	engFuseOverlayfs  = "fuse-overlayfs"
	engPlain          = "plain"
)

var allEngines = []string{engKernel, engStrata, engStrataRootless, engFuseOverlayfs, engPlain}

// cred is an unprivileged identity: the rootless engines' user, and the
// owner of the fixture.
type cred struct{ uid, gid int }

// wrap prefixes argv with setpriv so it runs as c; a nil c runs argv as is.
func (c *cred) wrap(argv []string) []string {
	if c == nil {
		return argv
	}
	return append([]string{"setpriv", "--reuid=" + strconv.Itoa(c.uid), "--regid=" + strconv.Itoa(c.gid),
		"--clear-groups", "--"}, argv...)
}

// instance is one engine's state for one run: a fresh upper and work dir and
// a mount point (or, for plain, the plain tree), all under dir.
type instance struct {
	dir      string // removed after the run ("" for plain: its tree lives on)
	upper    string
	work     string
	mnt      string // where workloads run
	writable string // where a workload's prepare phase writes before mounting
	mounted  bool
	daemons  []int // FUSE server pids, waited for after unmounting
}

// engine mounts one implementation of the union. Each run gets a fresh
// instance from setup, then mount, the workload, unmount and cleanup.
type engine interface {
	name() string
	// user is the identity workers run as: nil for root, else the
	// rootless user (a rootless FUSE mount is only reachable by its owner).
	user() *cred
	// probe mounts a tiny stack for real and reports why the engine cannot
	// run here, or nil.
	probe(ctx context.Context, h *harness) error
	// setup lays out a fresh instance under dir for workload w.
	setup(ctx context.Context, h *harness, dir string, w *workload) (*instance, error)
	mount(ctx context.Context, h *harness, in *instance) error
	// unmount unmounts in (if mounted) and waits for its server to exit.
	unmount(ctx context.Context, h *harness, in *instance) error
	// cleanup removes what setup made, after the workload w ran (and
	// failed, if failed is set).
	cleanup(h *harness, in *instance, w *workload, failed bool) error
	// command is the mount command, with $FIX and $RUN for the fixture and
	// run dirs, for the report header.
	command() string
}

// newEngine returns the engine called name.
func newEngine(name string, h *harness) (engine, error) {
	switch name {
	case engKernel:
		return &kernelEngine{}, nil
	case engStrata:
		return &strataEngine{}, nil
	case engStrataRootless:
		return &strataEngine{rootless: &h.owner}, nil
	case engFuseOverlayfs:
		return &fuseOverlayEngine{}, nil
	case engPlain:
		return &plainEngine{}, nil
	}
	return nil, fmt.Errorf("unknown engine %q (want one of %s)", name, strings.Join(allEngines, ", "))
}

// overlayDirs creates upper, work and mnt under dir, owned by c (nil: root).
func overlayDirs(dir string, c *cred) (*instance, error) {
	in := &instance{dir: dir, upper: filepath.Join(dir, "upper"), work: filepath.Join(dir, "work"), mnt: filepath.Join(dir, "mnt")}
	in.writable = in.upper
	for _, d := range []string{dir, in.upper, in.work, in.mnt} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
		if c != nil {
			if err := os.Lchown(d, c.uid, c.gid); err != nil {
				return nil, err
			}
		}
	}
	return in, nil
}

// overlayOptions is the -o value shared by kernel overlay, strata and
// fuse-overlayfs.
func overlayOptions(f *fixture, in *instance) string {
	return "lowerdir=" + f.lowerdir() + ",upperdir=" + in.upper + ",workdir=" + in.work
}

const overlayCommandArgs = "-o lowerdir=$FIX/layers/top:$FIX/layers/middle:$FIX/layers/bottom,upperdir=$RUN/upper,workdir=$RUN/work $RUN/mnt"

// removeInstance removes an unmounted instance's dir.
func removeInstance(in *instance) error {
	if in.mounted || in.dir == "" {
		return nil // never remove under a live mount
	}
	return os.RemoveAll(in.dir)
}

// probeStack is a two-layer stack with one file, for engine probes.
func probeStack(h *harness, name string, c *cred) (lower string, in *instance, err error) {
	dir := filepath.Join(h.runDir, "probe-"+name)
	lower = filepath.Join(dir, "lower")
	if err := os.MkdirAll(lower, 0o755); err != nil {
		return "", nil, err
	}
	if err := os.WriteFile(filepath.Join(lower, "probe"), []byte("ok\n"), 0o644); err != nil {
		return "", nil, err
	}
	if c != nil {
		for _, p := range []string{dir, lower, filepath.Join(lower, "probe")} {
			if err := os.Lchown(p, c.uid, c.gid); err != nil {
				return "", nil, err
			}
		}
	}
	in, err = overlayDirs(filepath.Join(dir, "inst"), c)
	return lower, in, err
}

// probeWith mounts a probe stack with mountFn, reads the probe file as c,
// and unmounts.
func probeWith(ctx context.Context, h *harness, e engine, mountFn func(lower string, in *instance) error) error {
	lower, in, err := probeStack(h, e.name(), e.user())
	if err != nil {
		return err
	}
	defer os.RemoveAll(filepath.Dir(in.dir))
	if err := mountFn(lower, in); err != nil {
		return err
	}
	defer e.unmount(ctx, h, in)
	argv := e.user().wrap([]string{"cat", filepath.Join(in.mnt, "probe")})
	if out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput(); err != nil || string(out) != "ok\n" {
		return fmt.Errorf("read through the probe mount: %v: %s", err, bytes.TrimSpace(out))
	}
	return e.unmount(ctx, h, in)
}

// kernelEngine is kernel overlayfs: mount -t overlay, the baseline.
type kernelEngine struct{}

func (*kernelEngine) name() string { return engKernel }
func (*kernelEngine) user() *cred  { return nil }
func (*kernelEngine) command() string {
	return "mount -t overlay overlay " + overlayCommandArgs
}

func (e *kernelEngine) probe(ctx context.Context, h *harness) error {
	return probeWith(ctx, h, e, func(lower string, in *instance) error {
		return e.mountData(ctx, h, in, "lowerdir="+lower+",upperdir="+in.upper+",workdir="+in.work)
	})
}

func (*kernelEngine) setup(_ context.Context, _ *harness, dir string, _ *workload) (*instance, error) {
	return overlayDirs(dir, nil)
}

func (e *kernelEngine) mount(ctx context.Context, h *harness, in *instance) error {
	return e.mountData(ctx, h, in, overlayOptions(h.fix, in))
}

func (e *kernelEngine) mountData(ctx context.Context, h *harness, in *instance, data string) error {
	if err := h.runLogged(ctx, nil, "mount", "-t", "overlay", "overlay", "-o", data, in.mnt); err != nil {
		return err
	}
	in.mounted = true
	return nil
}

func (e *kernelEngine) unmount(_ context.Context, h *harness, in *instance) error {
	if !in.mounted {
		return nil
	}
	if err := unmountPath(in.mnt, h.log); err != nil {
		return err
	}
	in.mounted = false
	return nil
}

func (*kernelEngine) cleanup(_ *harness, in *instance, _ *workload, _ bool) error {
	return removeInstance(in)
}

// strataEngine is strata's FUSE server, mounted by root or, when rootless is
// set, by that user through fusermount3.
type strataEngine struct {
	rootless *cred
}

func (e *strataEngine) name() string {
	if e.rootless != nil {
		return engStrataRootless
	}
	return engStrata
}
func (e *strataEngine) user() *cred { return e.rootless }
func (e *strataEngine) command() string {
	return strings.Join(e.rootless.wrap([]string{"strata", "mount"}), " ") + " " + overlayCommandArgs
}

func (e *strataEngine) probe(ctx context.Context, h *harness) error {
	if h.strataBin == "" {
		return errors.New("no strata binary (build failed?)")
	}
	return probeWith(ctx, h, e, func(lower string, in *instance) error {
		return e.mountOpts(ctx, h, in, "lowerdir="+lower+",upperdir="+in.upper+",workdir="+in.work)
	})
}

func (e *strataEngine) setup(_ context.Context, _ *harness, dir string, _ *workload) (*instance, error) {
	return overlayDirs(dir, e.rootless)
}

func (e *strataEngine) mount(ctx context.Context, h *harness, in *instance) error {
	return e.mountOpts(ctx, h, in, overlayOptions(h.fix, in))
}

func (e *strataEngine) mountOpts(ctx context.Context, h *harness, in *instance, opts string) error {
	err := h.runLogged(ctx, e.rootless, h.strataBin, "mount", "-o", opts, in.mnt)
	// Even a failed mount command may have left a mount or a server.
	if mounted(in.mnt) {
		in.mounted = true
	}
	in.daemons = findDaemons(in.mnt)
	return err
}

func (e *strataEngine) unmount(ctx context.Context, h *harness, in *instance) error {
	return unmountFUSE(ctx, h, in, e.rootless, h.strataBin, "umount", in.mnt)
}

func (*strataEngine) cleanup(_ *harness, in *instance, _ *workload, _ bool) error {
	return removeInstance(in)
}

// status returns what "strata status" (run as the mounting user, who alone
// knows a FUSE mount's layers) says about in: its engine and xattr format,
// which strata picks by itself for a rootless mount. strata may write the
// state that status reads just after "strata mount" returns, so it asks
// again for up to a second.
func (e *strataEngine) status(ctx context.Context, h *harness, in *instance) string {
	argv := e.rootless.wrap([]string{h.strataBin, "status", "--json"})
	for try := 0; try < 10; try++ {
		if try > 0 {
			time.Sleep(100 * time.Millisecond)
		}
		out, err := outputCmd(ctx, "/", h.workerEnv, argv[0], argv[1:]...)
		if err != nil {
			return ""
		}
		var mounts []struct {
			Mountpoint, Engine, Format string
		}
		if json.Unmarshal(out, &mounts) != nil {
			return ""
		}
		for _, m := range mounts {
			if m.Mountpoint == in.mnt && m.Format != "" {
				return fmt.Sprintf("strata status: engine %s, xattr format %s", m.Engine, m.Format)
			}
		}
	}
	return ""
}

// fuseOverlayEngine is fuse-overlayfs, run by root with its defaults.
type fuseOverlayEngine struct{}

func (*fuseOverlayEngine) name() string    { return engFuseOverlayfs }
func (*fuseOverlayEngine) user() *cred     { return nil }
func (*fuseOverlayEngine) command() string { return "fuse-overlayfs " + overlayCommandArgs }

func (e *fuseOverlayEngine) probe(ctx context.Context, h *harness) error {
	if _, err := exec.LookPath("fuse-overlayfs"); err != nil {
		return errors.New("fuse-overlayfs is not installed")
	}
	return probeWith(ctx, h, e, func(lower string, in *instance) error {
		return e.mountOpts(ctx, h, in, "lowerdir="+lower+",upperdir="+in.upper+",workdir="+in.work)
	})
}

func (*fuseOverlayEngine) setup(_ context.Context, _ *harness, dir string, _ *workload) (*instance, error) {
	return overlayDirs(dir, nil)
}

func (e *fuseOverlayEngine) mount(ctx context.Context, h *harness, in *instance) error {
	return e.mountOpts(ctx, h, in, overlayOptions(h.fix, in))
}

func (e *fuseOverlayEngine) mountOpts(ctx context.Context, h *harness, in *instance, opts string) error {
	err := h.runLogged(ctx, nil, "fuse-overlayfs", "-o", opts, in.mnt)
	if mounted(in.mnt) {
		in.mounted = true
	}
	in.daemons = findDaemons(in.mnt)
	return err
}

func (e *fuseOverlayEngine) unmount(ctx context.Context, h *harness, in *instance) error {
	return unmountFUSE(ctx, h, in, nil, "fusermount3", "-u", in.mnt)
}

func (*fuseOverlayEngine) cleanup(_ *harness, in *instance, _ *workload, _ bool) error {
	return removeInstance(in)
}

// plainEngine is no union at all: a hard-link farm of the fixture's plain
// copy of the merged tree, the floor every engine is measured against.
// Building the farm takes a second or more, so it is kept across runs:
// after a workload that changed it, the workload's undo reverts the
// change, and only a failed run or a failed undo makes a new farm. Hard
// links share inodes with the plain copy, so the one workload that writes
// into an existing file (copy-up's append) gets its file truncated back.
type plainEngine struct {
	farm  string
	dirty bool
	// restore is the size to truncate the in-place file back to.
	restore map[string]int64
}

func (*plainEngine) name() string    { return engPlain }
func (*plainEngine) user() *cred     { return nil }
func (*plainEngine) command() string { return "cp -al $FIX/plain $RUN/plain (no mount)" }

func (e *plainEngine) probe(ctx context.Context, h *harness) error {
	if err := ensurePlain(ctx, h.fix, h.runDir, h.log); err != nil {
		return fmt.Errorf("plain copy of the merged tree (made through kernel overlay): %w", err)
	}
	return nil
}

func (e *plainEngine) setup(ctx context.Context, h *harness, _ string, w *workload) (*instance, error) {
	if e.farm == "" || e.dirty {
		if err := e.rebuild(ctx, h); err != nil {
			return nil, err
		}
	}
	in := &instance{mnt: e.farm, writable: e.farm, upper: e.farm}
	e.restore = map[string]int64{}
	for _, p := range w.inPlacePaths(&h.fix.m) {
		st, err := os.Stat(filepath.Join(e.farm, p))
		if err != nil {
			return nil, err
		}
		e.restore[p] = st.Size()
	}
	return in, nil
}

// rebuild makes a fresh farm. Linking changes every file's ctime, which git
// records, so the repo's index is refreshed (untimed) as a clone's would be.
func (e *plainEngine) rebuild(ctx context.Context, h *harness) error {
	farm := filepath.Join(h.runDir, "plain-farm")
	if err := os.RemoveAll(farm); err != nil {
		return err
	}
	if err := runCmd(ctx, "/", nil, "cp", "-al", h.fix.plainDir(), farm); err != nil {
		return err
	}
	if err := runCmd(ctx, filepath.Join(farm, h.fix.m.Repo), h.workerEnv, "git", "-c", "safe.directory=*",
		"update-index", "-q", "--refresh"); err != nil {
		return err
	}
	e.farm, e.dirty = farm, false
	return nil
}

func (*plainEngine) mount(context.Context, *harness, *instance) error   { return nil }
func (*plainEngine) unmount(context.Context, *harness, *instance) error { return nil }

func (e *plainEngine) cleanup(h *harness, _ *instance, w *workload, failed bool) error {
	var errs []error
	for p, size := range e.restore {
		if err := os.Truncate(filepath.Join(e.farm, p), size); err != nil {
			errs = append(errs, fmt.Errorf("restore %s in the plain copy: %w", p, err))
		}
	}
	e.restore = nil
	switch {
	case !w.mutates:
	case failed || w.undo == nil:
		e.dirty = true
	default:
		// Undo is far cheaper than a new farm (and deletes less: on
		// ext4, creating files right after mass deletions is slow).
		if err := w.undo(e.farm, h.fix.plainDir(), &h.fix.m); err != nil {
			fmt.Fprintf(h.log, "warning: undo %s in plain's tree: %v; rebuilding it\n", w.name, err)
			e.dirty = true
		}
	}
	return errors.Join(errs...)
}

// runLogged runs argv (as c when c is not nil) with output to the harness's
// command log, returning the output's tail in the error. Output goes to a
// file, not a pipe: a daemonizing child that keeps a pipe open would make
// Wait block until it exits.
func (h *harness) runLogged(ctx context.Context, c *cred, name string, args ...string) error {
	argv := c.wrap(append([]string{name}, args...))
	lf, err := os.CreateTemp(h.logDir, "cmd-*.log")
	if err != nil {
		return err
	}
	defer os.Remove(lf.Name())
	defer lf.Close()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = h.workerEnv
	cmd.Dir = "/"
	if err := cmd.Run(); err != nil {
		out, _ := os.ReadFile(lf.Name())
		return fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, tail(out, 600))
	}
	return nil
}

// tail returns the last n bytes of b, trimmed.
func tail(b []byte, n int) string {
	b = bytes.TrimSpace(b)
	if len(b) > n {
		b = append([]byte("..."), b[len(b)-n:]...)
	}
	return string(b)
}

// unmountFUSE unmounts a FUSE instance with the engine's own command (run as
// c), falling back to umount(2) as root, and waits for its server to exit.
func unmountFUSE(ctx context.Context, h *harness, in *instance, c *cred, name string, args ...string) error {
	if in.mounted {
		if err := h.runLogged(ctx, c, name, args...); err != nil {
			fmt.Fprintf(h.log, "warning: %v; unmounting as root\n", err)
			if err := unmountPath(in.mnt, h.log); err != nil {
				return err
			}
		}
		in.mounted = mounted(in.mnt)
		if in.mounted {
			return fmt.Errorf("%s is still mounted after unmounting", in.mnt)
		}
	}
	if err := waitDaemons(in.daemons, 10*time.Second); err != nil {
		return fmt.Errorf("FUSE server of %s: %w", in.mnt, err)
	}
	in.daemons = nil
	return nil
}

// unmountPath unmounts mnt as root, retrying while it is busy, then falls
// back to a lazy unmount (logged) so no mount outlives the harness.
func unmountPath(mnt string, logw io.Writer) error {
	var err error
	for i := 0; i < 20; i++ {
		err = unix.Unmount(mnt, 0)
		if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil // unmounted, or not a mount point (any more)
		}
		if !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if lerr := unix.Unmount(mnt, unix.MNT_DETACH); lerr != nil && !errors.Is(lerr, unix.EINVAL) {
		return fmt.Errorf("unmount %s: %w (lazy unmount: %v)", mnt, err, lerr)
	}
	fmt.Fprintf(logw, "warning: unmount %s: %v; detached it lazily\n", mnt, err)
	return nil
}

// mountEntry is one line of /proc/self/mountinfo.
type mountEntry struct {
	dev                                    string // major:minor
	point, fstype, source, opts, superOpts string
}

// readMounts parses /proc/self/mountinfo.
func readMounts() ([]mountEntry, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	return parseMountinfo(b), nil
}

// parseMountinfo parses mountinfo lines (proc(5)): fields 5 and 6 are the
// mount point and its options; after the "-" separator come the fs type,
// the source and the super block options.
func parseMountinfo(b []byte) []mountEntry {
	var out []mountEntry
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64*kib), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || len(f) < sep+4 {
			continue
		}
		out = append(out, mountEntry{dev: f[2], point: unescapeMount(f[4]), opts: f[5], fstype: f[sep+1],
			source: unescapeMount(f[sep+2]), superOpts: f[sep+3]})
	}
	return out
}

// unescapeMount undoes the kernel's octal escapes (\040 for space, ...).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// mounted reports whether mnt is a mount point.
func mounted(mnt string) bool {
	ms, err := readMounts()
	if err != nil {
		return false
	}
	for _, m := range ms {
		if m.point == mnt {
			return true
		}
	}
	return false
}

// mountsUnder returns the mount points at or below dir, deepest first.
func mountsUnder(dir string) []string {
	ms, _ := readMounts()
	var out []string
	for i := len(ms) - 1; i >= 0; i-- {
		if isUnder(ms[i].point, dir) {
			out = append(out, ms[i].point)
		}
	}
	return out
}

// mountOptionsOf returns "fstype opts super-opts" of the mount at mnt.
func mountOptionsOf(mnt string) string {
	ms, _ := readMounts()
	for i := len(ms) - 1; i >= 0; i-- {
		if ms[i].point == mnt {
			return ms[i].fstype + " " + ms[i].opts + " " + ms[i].superOpts
		}
	}
	return ""
}

// findDaemons returns the pids of processes (other than this one) with mnt
// as a command-line argument: a FUSE server serving mnt.
func findDaemons(mnt string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		for _, a := range bytes.Split(b, []byte{0}) {
			if string(a) == mnt {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// waitDaemons waits until each pid has exited, reaping it when it is our
// child: the harness is a child subreaper, so daemonized servers whose
// mount command exited become its children. A server still alive after
// timeout is killed (the harness started it) and reported.
func waitDaemons(pids []int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var errs []error
	for _, pid := range pids {
		for {
			if gone(pid) {
				break
			}
			if time.Now().After(deadline) {
				unix.Kill(pid, unix.SIGKILL)
				errs = append(errs, fmt.Errorf("pid %d did not exit %s after unmount; killed it", pid, timeout))
				time.Sleep(100 * time.Millisecond)
				gone(pid)
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return errors.Join(errs...)
}

// gone reports whether pid has exited, reaping it if it is our zombie child.
func gone(pid int) bool {
	var ws unix.WaitStatus
	wpid, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
	if wpid == pid {
		return true
	}
	if err == nil {
		return false // our child, still running
	}
	// Not our child: watch /proc. A zombie has exited.
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) {
		return b[i+2] == 'Z' || b[i+2] == 'X'
	}
	return false
}

// fuseDevice makes /dev/fuse usable by the rootless user for the run
// (mode 0666, as distributions ship it) and restores its mode afterwards.
type fuseDevice struct {
	mode    os.FileMode
	changed bool
}

const fuseDevPath = "/dev/fuse"

func (d *fuseDevice) open() error {
	st, err := os.Stat(fuseDevPath)
	if err != nil {
		return err
	}
	d.mode = st.Mode().Perm()
	if d.mode&0o006 == 0o006 {
		return nil
	}
	if err := os.Chmod(fuseDevPath, 0o666); err != nil {
		return fmt.Errorf("make %s usable for the rootless engine: %w", fuseDevPath, err)
	}
	d.changed = true
	return nil
}

func (d *fuseDevice) restore() error {
	if !d.changed {
		return nil
	}
	d.changed = false
	return os.Chmod(fuseDevPath, d.mode)
}
