package cmd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"strata/unionfs"
)

// mountFlags are the flags of "strata mount".
type mountFlags struct {
	options    []string
	foreground bool
	mode       string
	force      bool
	debugFUSE  bool
	dryRun     bool
	source     string
	readyFd    int
	logFile    string
	cpuProfile string
}

func (f *mountFlags) register(fs *pflag.FlagSet) {
	fs.StringArrayVarP(&f.options, "options", "o", nil, "mount options, comma-separated (may repeat): lowerdir=TOP:...:BOTTOM[,upperdir=DIR,workdir=DIR][,...]")
	fs.BoolVarP(&f.foreground, "foreground", "f", false, "stay in the foreground (do not daemonize); SIGINT/SIGTERM unmount")
	fs.StringVar(&f.mode, "mode", "fuse", "engine: fuse (strata's FUSE server), kernel (hand the mount to kernel overlay) or auto (kernel if it can, else fuse)")
	fs.BoolVar(&f.force, "force", false, "mount even if the upper or work dir is used by another live mount (the result is undefined)")
	fs.BoolVar(&f.debugFUSE, "debug-fuse", false, "log every FUSE request and reply (implies --foreground)")
	fs.BoolVar(&f.dryRun, "dry-run", false, "validate everything, print what would be mounted, mount nothing")
	fs.StringVar(&f.source, "source", "", "name shown as the mount's source in /proc/mounts (default \"strata\")")
	fs.StringVar(&f.logFile, "log-file", "", "daemon log file (default: discard once daemonized)")
	fs.IntVar(&f.readyFd, "ready-fd", -1, "internal: report readiness on this fd")
	_ = fs.MarkHidden("ready-fd")
	fs.StringVar(&f.cpuProfile, "cpuprofile", "", "write a CPU profile of the server to FILE (with --foreground)")
}

const mountHelp = `Mounts a union of directories with the semantics of Linux overlayfs.

Options (-o) use the kernel's syntax: lowerdir=A:B:C lists the read-only
layers, top first ("\:" escapes a colon, "\," a comma); upperdir= and
workdir= (same filesystem) make the mount writable; without them it is
read-only. Also: userxattr (user.overlay.* format, automatic without
privilege), ro, allow_other, default_permissions, squash_to_root,
squash_to_uid=N, squash_to_gid=N, uidmapping=C:H:N[:...],
gidmapping=C:H:N[:...], fsync=0 or volatile, timeout=SECONDS (kernel cache
timeouts, default 3600), fsname=NAME, and the generic mount flags (nosuid,
nodev, noexec, noatime, ...). Kernel overlay options strata does not
implement (redirect_dir=on, index=on, metacopy=on, nfs_export=on, ...) are
refused by name.

The command returns once the mount is live; the server runs in the
background until "strata umount MOUNTPOINT" (or umount/fusermount3 -u).
mount(8) can run it as a mount.fuse helper:
  mount -t fuse.strata strata MOUNTPOINT -o lowerdir=...`

func init() {
	register(&command{
		name: "mount", args: "[flags] -o OPTIONS MOUNTPOINT", summary: "mount a layer stack", help: mountHelp,
		setup: func(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
			f := &mountFlags{}
			f.register(fs)
			return func(ctx context.Context, e *env, args []string) error { return runMount(ctx, e, f, args) }
		},
	})
}

// parseMountArgs validates the command line of a mount.
func parseMountArgs(f *mountFlags, args []string) (unionfs.Options, string, error) {
	if len(args) != 1 {
		return unionfs.Options{}, "", usagef("want exactly one MOUNTPOINT, got %d arguments", len(args))
	}
	if len(f.options) == 0 {
		return unionfs.Options{}, "", usagef("missing -o lowerdir=...")
	}
	o, err := unionfs.ParseOptions(strings.Join(f.options, ","))
	if err != nil {
		return o, "", usagef("%v", err)
	}
	o.Force = f.force
	o.DebugFUSE = f.debugFUSE
	if f.source != "" && o.FsName == "" {
		o.FsName = f.source
	}
	switch f.mode {
	case "fuse", "kernel", "auto":
	default:
		return o, "", usagef("--mode must be fuse, kernel or auto, not %q", f.mode)
	}
	return o, args[0], nil
}

func runMount(ctx context.Context, e *env, f *mountFlags, args []string) error {
	o, mnt, err := parseMountArgs(f, args)
	if err != nil {
		return err
	}
	return mountWith(ctx, e, o, mnt, f)
}

// mountWith mounts o at mnt as "strata mount" does once its command line
// is parsed: validate, choose the engine, then serve in the foreground or
// from a daemon. Other commands (image mount) mount through it.
func mountWith(ctx context.Context, e *env, o unionfs.Options, mnt string, f *mountFlags) error {
	if err := o.Resolve(); err != nil {
		return err
	}
	if err := o.Validate(); err != nil {
		return err
	}
	if err := checkNotMounted(mnt); err != nil {
		return err
	}
	if f.mode != "fuse" {
		done, err := tryKernel(e, f, o, mnt)
		if done || err != nil {
			return err
		}
	}
	if f.dryRun {
		fmt.Fprintf(e.stdout, "would mount (fuse) %s: %s\n", mnt, o.String())
		return nil
	}
	if f.foreground || f.debugFUSE || f.readyFd >= 0 {
		return serveForeground(ctx, e, f, o, mnt)
	}
	return daemonize(e, f, o, mnt)
}

// tryKernel handles --mode=kernel and --mode=auto: it hands the mount to
// kernel overlay if it can. With auto, it says which engine it chose and
// why, and reports done=false to fall back to FUSE.
func tryKernel(e *env, f *mountFlags, o unionfs.Options, mnt string) (done bool, err error) {
	if ierr := o.KernelIncompatible(); ierr != nil {
		if f.mode == "kernel" {
			return true, fmt.Errorf("--mode=kernel: %v", ierr)
		}
		fmt.Fprintf(e.stderr, "strata: engine fuse: kernel overlay cannot honour %v\n", ierr)
		return false, nil
	}
	if f.dryRun {
		data, _ := o.KernelData()
		fmt.Fprintf(e.stdout, "would mount (kernel, if it accepts) %s: %s\n", mnt, data)
		return f.mode == "kernel", nil
	}
	kerr := unionfs.MountKernel(mnt, o)
	switch {
	case kerr == nil:
		if f.mode == "auto" {
			fmt.Fprintf(e.stderr, "strata: engine kernel: kernel overlay accepted the mount\n")
		}
		return true, nil
	case f.mode == "kernel":
		return true, kerr
	}
	fmt.Fprintf(e.stderr, "strata: engine fuse: %v\n", kerr)
	return false, nil
}

// checkNotMounted refuses a mount point that is already a mount point of
// a union (mounting over it would hide it).
func checkNotMounted(mnt string) error {
	abs, err := absPath(mnt)
	if err != nil {
		return &unionfs.LayerError{Role: "mountpoint", Path: mnt, Err: err}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(abs, &st); err != nil {
		return &unionfs.LayerError{Role: "mountpoint", Path: mnt, Err: err}
	}
	mounts, err := unionfs.ReadMounts()
	if err != nil {
		return nil
	}
	for _, m := range mounts {
		if m.Mountpoint == abs {
			return &unionfs.LayerError{Role: "mountpoint", Path: mnt, Err: fmt.Errorf("busy: already a %s mount", m.Engine)}
		}
	}
	return nil
}

// serveForeground mounts and serves until unmounted or signalled.
func serveForeground(ctx context.Context, e *env, f *mountFlags, o unionfs.Options, mnt string) error {
	if f.debugFUSE {
		e.logLevel.Set(-4) // debug
	}
	log := e.log
	if f.logFile != "" {
		lf, err := os.OpenFile(f.logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer lf.Close()
		log = newLogger(lf, e.logLevel)
	}
	o.Logger = log
	o.NoSelfAccess = true
	started := serverProcs()
	if f.cpuProfile != "" {
		pf, err := os.Create(f.cpuProfile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(pf); err != nil {
			return err
		}
		defer func() {
			pprof.StopCPUProfile()
			pf.Close()
		}()
	}
	srv, err := unionfs.Mount(mnt, o)
	if err != nil {
		ready(f.readyFd, err)
		return err
	}
	started()
	if err := srv.WriteState(); err != nil {
		log.Warn("cannot record mount state for strata status", "err", err)
	}
	defer srv.RemoveState()
	// Live, with its Ps set and its state recorded: once "strata mount"
	// returns, "strata status" finds the record.
	ready(f.readyFd, nil)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	done := make(chan struct{})
	go func() {
		srv.Wait()
		close(done)
	}()
	select {
	case <-done:
		log.Info("unmounted", "mountpoint", srv.Mountpoint())
		return nil
	case <-ctx.Done():
	case s := <-sigs:
		log.Info("signal: unmounting", "signal", s.String(), "mountpoint", srv.Mountpoint())
	}
	if err := srv.Unmount(); err != nil {
		// Busy: detach it, so that it disappears now and the server ends
		// when the last user lets go.
		log.Warn("unmount busy; detaching", "mountpoint", srv.Mountpoint(), "err", err)
		if derr := detach(srv.Mountpoint()); derr != nil {
			return fmt.Errorf("%v; lazy unmount: %v", err, derr)
		}
		<-done
	}
	return nil
}

// serverPs is how many Ps the server runs with once go-fuse has sized its
// pool of request readers; see serverProcs.
const serverPs = 4

// serverProcs sets the Go scheduler up for serving FUSE, unless the
// environment sets GOMAXPROCS, and returns what to call once the server
// exists.
//
// go-fuse serves a request on the goroutine that read it and keeps at most
// max(GOMAXPROCS, 2)+1 goroutines waiting in read(2) on /dev/fuse, a bound
// it takes from GOMAXPROCS when the server is made. A thread blocked in a
// system call keeps its P until sysmon takes it back, which sysmon does
// after 20 µs when no P is idle (runtime/proc.go: retake), and each P it
// takes keeps it polling every 20 µs for a millisecond or more (see
// serverTimerSlack for how the daemon makes those polls rarer). So the
// server is made with one P, which bounds the waiting readers to three, and
// then runs with serverPs: a P stays idle while all three wait, so sysmon
// leaves them alone, and a handler waiting on the disk holds only its own
// P, so the requests the kernel sends meanwhile (git status's parallel
// lstats, asynchronous READs and RELEASEs) are served at once instead of
// after a retake. Go's default here (2 Ps, 3 readers) had sysmon taking Ps
// from waiting readers all the time (2.8 context switches and 60-70 µs of
// server CPU per open+close, against 1.4-1.6 and 35 µs with one P); with
// one P throughout, a handler waiting on the disk held up the others until
// sysmon took its P. Measured against one P (bench/, 3 repetitions each,
// medians): git status cold 0.263 s instead of 0.358-0.386, reading the
// repo cold 1.64 s instead of 1.99-2.40, unlinking 5,000 lower files 3.56 s
// instead of 4.07-4.70, ls -lR warm 4.18 s instead of 4.69-4.87. It costs
// warm, cached open-and-close work: each of its requests (OPEN, the
// asynchronous RELEASE) wakes a waiting reader, where with one P they queue
// while the P is busy and the next read(2) returns at once (1.89 against
// 1.07 sleeps in read(2) per open+close), and reading the repo's 4,000
// cached files took 0.50 s instead of 0.34; GOMAXPROCS=1 in the environment
// keeps one P.
func serverProcs() (started func()) {
	if os.Getenv("GOMAXPROCS") != "" {
		return func() {}
	}
	runtime.GOMAXPROCS(1)
	return func() { runtime.GOMAXPROCS(serverPs) }
}

// serverTimerSlack is the timer slack the daemon runs with: how late the
// kernel may end its threads' timed sleeps, so that it can fold them into
// other wake-ups (prctl(2) PR_SET_TIMERSLACK; the default is 50 µs).
//
// The sleeps that matter are sysmon's. While any goroutine is in a system
// call sysmon never sleeps deeply, and a FUSE server always has readers
// waiting in read(2); sysmon then sleeps 20 µs at a time for a millisecond
// or more after each P it takes back, and it takes one whenever a reader's
// P has not been through the scheduler for 10 ms (runtime/proc.go: sysmon,
// retake), which a reader going from system call to system call never is.
// Each of those wake-ups is a context switch on a CPU the client or the
// server needs: a third of the server's switches during 1,500 cold renames
// and a quarter during cold 4 KiB reads, and the threads they preempt make
// more. With a 1 ms slack sysmon wakes at most about once a millisecond.
// What waits for sysmon waits up to that much longer: handing a P held by
// a thread blocked in a system call to runnable work, which with serverPs
// Ps happens only when all of them are busy. Measured against the default
// slack, alternating, medians of 4 rounds: 20,000 cached open+close 83 µs
// each instead of 106 (server context switches 2.3 instead of 2.5-2.6);
// cold 4 KiB reads 2.3 switches each instead of 3.0-3.5; four parallel
// cold readers of 20,000 files 4.62 s instead of 4.97.
const serverTimerSlack = time.Millisecond

// startWithTimerSlack starts cmd from a thread whose timer slack is slack
// for the moment: a child inherits its creator's slack, keeps it across
// execve, and passes it on to every thread it creates, so the whole daemon,
// sysmon included, runs with it. The calling thread gets its own back.
func startWithTimerSlack(cmd *exec.Cmd, slack time.Duration) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if old, err := unix.PrctlRetInt(unix.PR_GET_TIMERSLACK, 0, 0, 0, 0); err == nil {
		if unix.Prctl(unix.PR_SET_TIMERSLACK, uintptr(slack.Nanoseconds()), 0, 0, 0) == nil {
			defer unix.Prctl(unix.PR_SET_TIMERSLACK, uintptr(old), 0, 0, 0)
		}
	}
	return cmd.Start()
}

// ready reports the mount's outcome to a waiting parent (daemon mode).
func ready(fd int, err error) {
	if fd < 0 {
		return
	}
	w := os.NewFile(uintptr(fd), "ready")
	if err != nil {
		fmt.Fprintf(w, "%v\n", err)
	} else {
		fmt.Fprintf(w, "ok\n")
	}
	w.Close()
}

// daemonize runs the mount in a new session in the background and returns
// once it is live or has failed. The daemon is this binary again, given
// the already parsed and resolved options.
func daemonize(e *env, f *mountFlags, o unionfs.Options, mnt string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	args := []string{"mount", "--ready-fd=3", "--mode=fuse", "-o", o.String()}
	if f.force {
		args = append(args, "--force")
	}
	if f.logFile != "" {
		args = append(args, "--log-file", f.logFile, "--log-level", e.logLevel.Level().String())
	}
	args = append(args, "--", mnt)
	cmd := exec.Command(self, args...)
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer devnull.Close()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	if err := startWithTimerSlack(cmd, serverTimerSlack); err != nil {
		w.Close()
		r.Close()
		return err
	}
	w.Close()
	defer r.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	line, rerr := bufio.NewReader(r).ReadString('\n')
	line = strings.TrimSpace(line)
	if rerr == nil && line == "ok" {
		go func() { <-exited }()
		return nil
	}
	select {
	case err := <-exited:
		if line == "" {
			return fmt.Errorf("mount daemon exited before the mount was live: %v", err)
		}
	case <-time.After(5 * time.Second):
	}
	if line == "" {
		line = "mount daemon failed"
	}
	return errors.New(line)
}

// detach lazily unmounts mnt.
func detach(mnt string) error {
	if os.Geteuid() == 0 {
		return syscall.Unmount(mnt, syscall.MNT_DETACH)
	}
	out, err := exec.Command("fusermount3", "-u", "-z", mnt).CombinedOutput()
	if err != nil {
		return fmt.Errorf("fusermount3 -u -z: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}
