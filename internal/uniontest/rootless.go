package uniontest

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/internal/testenv"
	"strata/unionfs"
	"strata/whiteout"
)

// Rootless differential runs.
//
// A test that compares the targets without privilege runs twice: the test
// process (root) prepares what a normal distribution gives users, then
// re-executes the test binary as an unprivileged user ([RunRootless]); the
// re-executed child sees [RootlessChild] set and runs the cases
// ([RunUnprivileged]) with the targets of its [RootlessMode].

// RootlessUID is the user (and group) rootless children run as: nobody.
const RootlessUID = 65534

// RootlessMode says how a rootless child runs.
type RootlessMode string

const (
	// AsUser: uid 65534 with no capability, in the initial namespaces
	// (setpriv --reuid --regid --clear-groups --inh-caps=-all). strata
	// mounts through fusermount3 and serves as that user, exactly as a
	// user's `strata mount`. Kernel overlay, which a user can mount only
	// in a user namespace of its own, is mounted by [KernelUserNS] and
	// used by the same unprivileged process through /proc/PID/root.
	AsUser RootlessMode = "user"
	// AsUserNSRoot: the same user, then unshare -Urm: root of a user
	// namespace the user owns (uid 0 there is 65534 outside, nothing else
	// is mapped), as in a rootless container. Both targets mount there
	// directly (mount(2): FUSE and overlay allow user-namespace mounts).
	AsUserNSRoot RootlessMode = "userns"
)

const (
	childEnv   = "STRATA_ROOTLESS_CHILD"   // the child's RootlessMode
	resultsEnv = "STRATA_ROOTLESS_RESULTS" // file the child reports each case to
)

// RootlessChild returns the mode this process was re-executed in by
// [RunRootless], or "" in a normal test process.
func RootlessChild() RootlessMode { return RootlessMode(os.Getenv(childEnv)) }

// Config returns the differential configuration of a child of mode m:
// kernel overlay as the oracle, strata as the subject, userxattr format.
// STRATA_DIFF_SUBJECT=kernel compares kernel overlay with itself, as
// [DefaultConfig] does.
func (m RootlessMode) Config() Config {
	c := Config{Oracle: Kernel, Subject: FUSE, NS: whiteout.User}
	if m == AsUser {
		c.Oracle = KernelUserNS
	}
	if os.Getenv("STRATA_DIFF_SUBJECT") == "kernel" {
		c.Subject = KernelNamed("kernel#2")
		if m == AsUser {
			c.Subject = userNSKernel{name: "kernel#2"}
		}
	}
	return c
}

// RunRootless runs the test t belongs to again, as [RootlessUID] in mode m,
// and fails t if that child fails. As root it first makes /dev/fuse usable
// by users (mode 0666, as distributions ship it; restored at cleanup) and
// a directory the user owns under /tmp for the child's temp dirs and a
// copy of the test binary (the go build dir is private to root). The
// child runs the top-level test again with the subtest path of t, so t's
// name must end with "/" + m; -test.run patterns below that level are
// passed on. After the child exits, any mount left under that directory
// fails t and is detached.
func RunRootless(t *testing.T, m RootlessMode) {
	t.Helper()
	top, sub, _ := strings.Cut(t.Name(), "/")
	if sub != string(m) {
		t.Fatalf("RunRootless(%s) from test %s: the subtest must be named %q", m, t.Name(), m)
	}
	testenv.RequireRoot(t)
	if !unionfs.InitialUserNS() {
		testenv.Need(t, "root in the initial user namespace", "this process runs in a user namespace: uid "+strconv.Itoa(RootlessUID)+" may not be mapped")
	}
	tools := []string{"setpriv"}
	if m == AsUserNSRoot {
		tools = append(tools, "unshare")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Need(t, tool, err.Error())
		}
	}
	usableFUSE(t)

	dir, err := os.MkdirTemp("/tmp", "strata-rootless-diff-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		detachUnder(t, dir)
		os.RemoveAll(dir)
	})
	tmp, results := filepath.Join(dir, "tmp"), filepath.Join(dir, "results")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, filepath.Base(self))
	if err := os.Mkdir(tmp, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(results, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := copyFile(self, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{tmp, results} {
		if err := os.Chown(p, RootlessUID, RootlessUID); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}

	args := []string{"--reuid=" + strconv.Itoa(RootlessUID), "--regid=" + strconv.Itoa(RootlessUID), "--clear-groups", "--inh-caps=-all"}
	if m == AsUserNSRoot {
		args = append(args, "unshare", "-Urm")
	}
	pattern := "^" + regexp.QuoteMeta(top) + "$/^" + regexp.QuoteMeta(string(m)) + "$"
	if parts := splitPattern(flagValue("test.run")); len(parts) > 2 {
		pattern += "/" + strings.Join(parts[2:], "/")
	}
	args = append(args, bin, "-test.run="+pattern, "-test.count=1")
	if testing.Verbose() {
		args = append(args, "-test.v")
	}
	if testing.Short() {
		args = append(args, "-test.short")
	}
	timeout := time.Duration(0)
	if d, ok := t.Deadline(); ok {
		timeout = max(time.Until(d)-30*time.Second, time.Minute)
	}
	args = append(args, "-test.timeout="+timeout.String())
	cmd := exec.Command("setpriv", args...)
	cmd.Dir = tmp
	cmd.Env = []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=" + tmp, "TMPDIR=" + tmp,
		childEnv + "=" + string(m), resultsEnv + "=" + results,
	}
	for _, k := range []string{"STRATA_REQUIRE_MOUNT", "STRATA_KNOWN_BUGS", "STRATA_DIFF_SUBJECT", "GORACE", "GOTRACEBACK"} {
		if v, ok := os.LookupEnv(k); ok {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if testing.Verbose() {
		// Live progress: the child's verbose log is long.
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stdout
	}
	t.Logf("child: %s", strings.Join(cmd.Args, " "))
	start := time.Now()
	runErr := cmd.Run()
	detachUnder(t, dir)

	sum := readResults(t, results)
	t.Logf("child (%s, %s): %s", m, time.Since(start).Round(time.Second), sum)
	switch {
	case runErr != nil:
		if out.Len() > 0 {
			t.Logf("child output:\n%s", out.String())
		}
		t.Errorf("rootless child (%s) failed: %v", m, runErr)
	case sum.skipAll != "":
		testenv.Need(t, "rootless targets", sum.skipAll)
	case sum.ran == 0 && sum.skipped == 0:
		t.Errorf("rootless child (%s) ran no case (pattern %q)", m, pattern)
	}
}

// usableFUSE makes /dev/fuse readable and writable by everyone, as
// distributions ship it, until t's cleanup (unless it already is).
func usableFUSE(t *testing.T) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat("/dev/fuse", &st); err != nil {
		testenv.Need(t, "/dev/fuse", err.Error())
	}
	if st.Mode&0o666 == 0o666 {
		return
	}
	old := st.Mode & 0o7777
	if err := unix.Chmod("/dev/fuse", old|0o666); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Chmod("/dev/fuse", old); err != nil {
			t.Errorf("restore /dev/fuse mode %#o: %v", old, err)
		}
	})
}

// detachUnder fails t for every mount left under dir and detaches it
// (deepest first).
func detachUnder(t *testing.T, dir string) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Errorf("mountinfo: %v", err)
		return
	}
	var left []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		if mp := unionfs.UnescapeMountinfo(f[4]); strings.HasPrefix(mp, dir+"/") {
			left = append(left, mp)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(left)))
	for _, mp := range left {
		t.Errorf("the rootless child left %s mounted; detaching it", mp)
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
			t.Errorf("umount -l %s: %v", mp, err)
		}
	}
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func flagValue(name string) string {
	if f := flag.Lookup(name); f != nil {
		return f.Value.String()
	}
	return ""
}

// splitPattern splits a -test.run pattern at the slashes that separate
// subtest levels (not those inside brackets or parentheses), as the
// testing package does.
func splitPattern(p string) []string {
	if p == "" {
		return nil
	}
	var parts []string
	depth, start := 0, 0
	for i := 0; i < len(p); i++ {
		switch p[i] {
		case '[', '(':
			depth++
		case ']', ')':
			depth--
		case '\\':
			i++
		case '/':
			if depth == 0 {
				parts = append(parts, p[start:i])
				start = i + 1
			}
		}
	}
	return append(parts, p[start:])
}

// Results reported by the child, one line each: "pass NAME", "fail NAME",
// "skip NAME\tREASON", "adapted NAME\tWHAT", "skipall -\tREASON".

type summary struct {
	ran, passed, failed, skipped, adapted int
	skipAll                               string
	skips                                 []string
	fails                                 []string
}

func (s summary) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d cases ran (%d passed, %d failed), %d skipped; %d ran on fixtures without what needs privilege",
		s.ran, s.passed, s.failed, s.skipped, s.adapted)
	for _, f := range s.fails {
		fmt.Fprintf(&b, "\n  FAIL %s", f)
	}
	for _, r := range s.skips {
		fmt.Fprintf(&b, "\n  skip %s", r)
	}
	if s.skipAll != "" {
		fmt.Fprintf(&b, "\n  skipped everything: %s", s.skipAll)
	}
	return b.String()
}

func readResults(t *testing.T, path string) summary {
	t.Helper()
	var s summary
	b, err := os.ReadFile(path)
	if err != nil {
		t.Errorf("child results: %v", err)
		return s
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		kind, rest, _ := strings.Cut(line, " ")
		name, reason, _ := strings.Cut(rest, "\t")
		switch kind {
		case "pass":
			s.ran++
			s.passed++
		case "fail":
			s.ran++
			s.failed++
			s.fails = append(s.fails, name)
		case "skip":
			s.skipped++
			s.skips = append(s.skips, name+": "+reason)
		case "adapted":
			s.adapted++
		case "skipall":
			s.skipAll = reason
		}
	}
	return s
}

var resultsMu sync.Mutex

// report appends one result line to the file the parent reads.
func report(kind, name, reason string) {
	path := os.Getenv(resultsEnv)
	if path == "" {
		return
	}
	resultsMu.Lock()
	defer resultsMu.Unlock()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return
	}
	defer f.Close()
	reason = strings.NewReplacer("\n", " ", "\t", " ").Replace(reason)
	fmt.Fprintf(f, "%s %s\t%s\n", kind, name, reason)
}

// skipCatcher reports why a probe skipped or failed the whole run.
type skipCatcher struct{ testing.TB }

func (s skipCatcher) Skipf(format string, args ...any) {
	report("skipall", "-", fmt.Sprintf(format, args...))
	s.TB.Helper()
	s.TB.Skipf(format, args...)
}

func (s skipCatcher) Fatalf(format string, args ...any) {
	report("skipall", "-", "failed: "+fmt.Sprintf(format, args...))
	s.TB.Helper()
	s.TB.Fatalf(format, args...)
}

// Known is what a rootless run knows of a case beforehand.
type Known struct {
	// Skip says why the case cannot run without privilege (for what
	// [Unprivileged] cannot tell from the fixture, such as a Func
	// applier that mounts).
	Skip string
	// Diverge says why strata differs from kernel overlay only without
	// privilege; it replaces the case's Diverge (a difference is logged,
	// no difference fails).
	Diverge string
}

// RunUnprivileged runs cases with cfg as subtests of t, in a rootless
// child: each case is first adapted with [Unprivileged] to what this
// process may build (and skipped when it cannot run at all); known holds
// the rest, by case name. Every outcome is reported to the parent.
func RunUnprivileged(t *testing.T, cfg Config, cases []Case, known map[string]Known) {
	t.Helper()
	catch := skipCatcher{t}
	RequireMknod(catch)
	cfg.Oracle.Require(catch)
	cfg.Subject.Require(catch)
	for name := range known {
		if !hasCase(cases, name) {
			t.Errorf("rootless knowledge of %q, which is no case", name)
		}
	}
	uid, gid := os.Geteuid(), os.Getegid()
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			var skipReason string
			t.Cleanup(func() {
				switch {
				case t.Failed():
					report("fail", c.Name, "")
				case t.Skipped():
					report("skip", c.Name, skipReason)
				default:
					report("pass", c.Name, "")
				}
			})
			k := known[c.Name]
			ac, dropped, why := Unprivileged(c, uid, gid)
			if why == "" {
				why = k.Skip
			}
			if why != "" {
				skipReason = why
				t.Skip(why)
			}
			if len(dropped) > 0 {
				report("adapted", c.Name, strings.Join(dropped, "; "))
				t.Logf("fixture without privilege: left out %s", strings.Join(dropped, "; "))
			}
			if k.Diverge != "" {
				ac.Diverge = k.Diverge
			}
			cfg.Run(t, ac)
		})
	}
}

func hasCase(cases []Case, name string) bool {
	for _, c := range cases {
		if c.Name == name {
			return true
		}
	}
	return false
}

// Unprivileged adapts c to fixtures that a user whose objects get uid:gid
// can build. It leaves out chowns to other ids (CAP_CHOWN) and trusted.*
// and security.* xattrs (CAP_SYS_ADMIN): the rest of the case still
// compares both targets on identical fixtures. A device node other than
// a 0/0 whiteout (CAP_MKNOD) is what such a case is about, so the case
// cannot run: why says so. dropped lists what was left out, and why.
func Unprivileged(c Case, uid, gid int) (adapted Case, dropped []string, why string) {
	adapt := func(l Layer) Layer {
		if l == nil {
			return nil
		}
		out := Layer{}
		for _, a := range l {
			p, ok := a.(privileged)
			switch {
			case !ok:
			case p.need == needDevice:
				if why == "" {
					why = "fixture needs privilege: " + p.String() + " (device nodes other than 0/0 whiteouts need CAP_MKNOD)"
				}
			case p.need == needOwner && (p.uid != uid || p.gid != gid):
				dropped = append(dropped, p.String()+" (CAP_CHOWN)")
				continue
			case p.need == needXattr:
				dropped = append(dropped, p.String()+" (CAP_SYS_ADMIN)")
				continue
			}
			out = append(out, a)
		}
		return out
	}
	adapted = c
	adapted.Lowers = make([]Layer, len(c.Lowers))
	for i, l := range c.Lowers {
		adapted.Lowers[i] = adapt(l)
	}
	adapted.Upper = adapt(c.Upper)
	return adapted, dropped, why
}

// KernelUserNS is kernel overlay mounted without privilege: a helper
// process (this test binary, re-executed) enters a new user and mount
// namespace in which it is root (uid 0 there is this process's uid) and
// mounts there on request; this process uses the mounts through
// /proc/HELPER/root, with its own credentials. One helper serves every
// mount of the process; it exits, and its namespace and any mount left in
// it go, when this process dies.
var KernelUserNS Target = userNSKernel{name: "kernel"}

type userNSKernel struct{ name string }

func (k userNSKernel) Name() string { return k.name }

var userNSProbe struct {
	once   sync.Once
	reason string
}

func (k userNSKernel) Require(t testing.TB) {
	t.Helper()
	userNSProbe.once.Do(func() {
		userNSProbe.reason = func() string {
			h, err := theUserNSHelper()
			if err != nil {
				return err.Error()
			}
			dir, data, err := testenv.ProbeStack()
			if err != nil {
				return err.Error()
			}
			defer os.RemoveAll(dir)
			if err := h.do("mount", dir+"/m", "0", data+",userxattr"); err != nil {
				return err.Error()
			}
			if err := h.do("umount", dir+"/m"); err != nil {
				return err.Error()
			}
			return ""
		}()
	})
	testenv.Need(t, "kernel overlay in a user namespace", userNSProbe.reason)
}

func (k userNSKernel) Mount(t testing.TB, o unionfs.Options) *Mounted {
	t.Helper()
	data, flags := kernelMountArgs(t, k.name, o)
	h, err := theUserNSHelper()
	if err != nil {
		t.Fatalf("%s: %v", k.name, err)
	}
	mnt := t.TempDir()
	if err := h.do("mount", mnt, strconv.FormatUint(uint64(flags), 10), data); err != nil {
		t.Fatalf("%s: %v", k.name, err)
	}
	return newMounted(t, k.name, h.root+mnt,
		func() error { return h.do("umount", mnt) },
		func() error { return h.do("detach", mnt) })
}

// The helper's protocol: a request is one line of tab-separated quoted
// fields, "mount MNT FLAGS DATA", "umount MNT" (retried while busy) or
// "detach MNT" (MNT_DETACH); the answer is "ok" or "error: ...". It says
// "ready" once its namespace is set up, and exits at EOF on stdin.
const helperEnv = "STRATA_UNIONTEST_USERNS_HELPER"

func init() {
	if os.Getenv(helperEnv) != "" {
		os.Exit(userNSHelper())
	}
}

func userNSHelper() int {
	// Mounts made later in the parent namespace (strata's) must not
	// propagate in here and outlive their unmount there.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		fmt.Printf("error: make / private: %v\n", err)
		return 1
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(nil, 1<<20)
	for in.Scan() {
		var req []string
		for _, f := range strings.Split(in.Text(), "\t") {
			u, err := strconv.Unquote(f)
			if err != nil {
				u = f
			}
			req = append(req, u)
		}
		var err error
		switch {
		case len(req) == 4 && req[0] == "mount":
			flags, _ := strconv.ParseUint(req[2], 10, 64)
			if err = unix.Mount("uniontest", req[1], "overlay", uintptr(flags), req[3]); err != nil {
				err = fmt.Errorf("mount -t overlay -o %s %s: %w", req[3], req[1], err)
			}
		case len(req) == 2 && req[0] == "umount":
			if err = retryBusy(func() error { return unix.Unmount(req[1], 0) }); err != nil {
				err = fmt.Errorf("umount %s: %w", req[1], err)
			}
		case len(req) == 2 && req[0] == "detach":
			if err = unix.Unmount(req[1], unix.MNT_DETACH); err != nil {
				err = fmt.Errorf("umount -l %s: %w", req[1], err)
			}
		default:
			err = fmt.Errorf("bad request %q", in.Text())
		}
		if err != nil {
			fmt.Printf("error: %v\n", err)
		} else {
			fmt.Println("ok")
		}
	}
	return 0
}

type userNSHelperProc struct {
	mu     sync.Mutex
	root   string // /proc/PID/root
	stdin  io.WriteCloser
	lines  chan string
	stderr *lockedBuffer
	broken error // set once an answer did not come: later ones would be out of step
}

var userNSHelperOnce struct {
	sync.Once
	h   *userNSHelperProc
	err error
}

// theUserNSHelper starts the helper at first use.
func theUserNSHelper() (*userNSHelperProc, error) {
	userNSHelperOnce.Do(func() {
		userNSHelperOnce.h, userNSHelperOnce.err = startUserNSHelper()
	})
	return userNSHelperOnce.h, userNSHelperOnce.err
}

func startUserNSHelper() (*userNSHelperProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  unix.CLONE_NEWUSER | unix.CLONE_NEWNS,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Geteuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getegid(), Size: 1}},
	}
	h := &userNSHelperProc{lines: make(chan string, 4), stderr: &lockedBuffer{}}
	cmd.Stderr = h.stderr
	if h.stdin, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the user-namespace mount helper: %w", err)
	}
	h.root = fmt.Sprintf("/proc/%d/root", cmd.Process.Pid)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
		close(h.lines)
		cmd.Wait()
	}()
	if err := h.answer(); err != nil {
		cmd.Process.Kill()
		return nil, err
	}
	return h, nil
}

// do sends one request and waits for its answer.
func (h *userNSHelperProc) do(req ...string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.broken != nil {
		return h.broken
	}
	for i := range req {
		req[i] = strconv.Quote(req[i])
	}
	if _, err := io.WriteString(h.stdin, strings.Join(req, "\t")+"\n"); err != nil {
		return fmt.Errorf("user-namespace mount helper: %w", err)
	}
	err := h.answer()
	if errors.Is(err, errNoAnswer) {
		h.broken = err
	}
	return err
}

var errNoAnswer = errors.New("user-namespace mount helper did not answer in 30 s")

// answer waits for the helper's next line: nil for "ok" or "ready".
func (h *userNSHelperProc) answer() error {
	select {
	case line, ok := <-h.lines:
		switch {
		case !ok:
			return fmt.Errorf("user-namespace mount helper exited: %s", strings.TrimSpace(h.stderr.String()))
		case line != "ok" && line != "ready":
			return errors.New(strings.TrimPrefix(line, "error: "))
		}
		return nil
	case <-time.After(30 * time.Second):
		return errNoAnswer
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
