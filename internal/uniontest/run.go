package uniontest

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/unionfs"
	"strata/whiteout"
)

// Case is one differential scenario.
type Case struct {
	// Name names the subtest (no spaces).
	Name string
	// Lowers are the lower layers, topmost first. None means one empty
	// lower (the kernel needs at least one).
	Lowers []Layer
	// Upper is the upper layer. nil means no upper dir: a read-only mount,
	// on which every write must fail with EROFS. Layer{} is an empty upper.
	Upper Layer
	// Ops performs the case's operations through r (paths relative to the
	// mount at mnt). It must not leave its working directory inside the
	// mount; files opened through r are closed after it returns.
	Ops func(r *Recorder, mnt string)
	// Diverge, when set, says why strata deliberately differs from the
	// kernel here (with a kernel reference): differences are logged, not
	// failed. A Diverge that shows no difference fails, so stale markers
	// do not hide regressions.
	Diverge string
}

// Config says what a case runs on.
type Config struct {
	// Oracle is the reference (kernel overlay); Subject is under test.
	Oracle, Subject Target
	// NS is the xattr namespace the fixtures are built with; User selects
	// the kernel's userxattr format on both targets.
	NS whiteout.NS
}

// DefaultConfig compares kernel overlay (oracle) with strata (subject) in
// the trusted namespace. With STRATA_DIFF_SUBJECT=kernel the subject is
// kernel overlay too: the harness checking itself, which must show no
// difference.
func DefaultConfig() Config {
	c := Config{Oracle: Kernel, Subject: FUSE, NS: whiteout.Trusted}
	if os.Getenv("STRATA_DIFF_SUBJECT") == "kernel" {
		c.Subject = KernelNamed("kernel#2")
	}
	return c
}

// Run runs c with [DefaultConfig] and fails t on any difference.
func Run(t *testing.T, c Case) {
	t.Helper()
	DefaultConfig().Run(t, c)
}

// RunAll runs each case as a subtest named after it.
func RunAll(t *testing.T, cases []Case) {
	seen := map[string]bool{}
	for _, c := range cases {
		if seen[c.Name] || strings.ContainsAny(c.Name, " \t\n") {
			t.Fatalf("case name %q is duplicated or has spaces", c.Name)
		}
		seen[c.Name] = true
		t.Run(c.Name, func(t *testing.T) { Run(t, c) })
	}
}

// Run runs c on both targets and fails t on any difference (or logs them,
// for a case marked Diverge).
func (cfg Config) Run(t *testing.T, c Case) {
	t.Helper()
	res := cfg.Execute(t, c)
	if testing.Verbose() {
		t.Logf("operations on %s:\n%s", cfg.Oracle.Name(), res.OracleLog())
	}
	switch {
	case c.Diverge == "" && !res.Equal():
		t.Errorf("%s differs from %s:\n%s", cfg.Subject.Name(), cfg.Oracle.Name(), res)
	case c.Diverge != "" && !res.Equal():
		t.Logf("known divergence (%s):\n%s", c.Diverge, res)
	case c.Diverge != "" && res.Equal():
		t.Errorf("case is marked Diverge (%s) but shows no difference: remove the marker", c.Diverge)
	}
}

// Diff is one difference: at Path (or op), Field has value A on one side
// and B on the other ("" when absent).
type Diff struct{ Path, Field, A, B string }

// Section is one comparison of a Result.
type Section struct {
	Title string
	A, B  string // labels of the two sides
	Diffs []Diff
}

// Result holds every comparison of a case.
type Result struct {
	Sections []Section
	oracle   []Entry
}

// OracleLog renders the oracle's op log, one entry a line.
func (r *Result) OracleLog() string {
	var b strings.Builder
	for i, e := range r.oracle {
		fmt.Fprintf(&b, "    %d %s\n", i+1, e)
	}
	return b.String()
}

// Equal reports whether no comparison found a difference.
func (r *Result) Equal() bool {
	for _, s := range r.Sections {
		if len(s.Diffs) > 0 {
			return false
		}
	}
	return true
}

// maxDiffLines bounds the lines printed per section.
const maxDiffLines = 60

func (r *Result) String() string {
	var b strings.Builder
	for _, s := range r.Sections {
		if len(s.Diffs) == 0 {
			continue
		}
		fmt.Fprintf(&b, "--- %s (%s vs %s): %d difference(s)\n", s.Title, s.A, s.B, len(s.Diffs))
		for i, d := range s.Diffs {
			if i == maxDiffLines {
				fmt.Fprintf(&b, "    ... %d more\n", len(s.Diffs)-i)
				break
			}
			fmt.Fprintf(&b, "    %s: %s: %s=%s %s=%s\n", d.Path, d.Field, s.A, orDash(d.A), s.B, orDash(d.B))
		}
	}
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// side is one target's run of a case.
type side struct {
	target Target
	label  string
	root   string // holds l0.., upper, work
	opts   unionfs.Options
	log    []Entry
	merged *Snapshot
	upper  *Snapshot
	roBad  []Diff // writes on a read-only mount that did not give EROFS
}

// Execute runs c on both targets and returns every difference without
// failing t for them (t fails only when the harness itself cannot work).
func (cfg Config) Execute(t testing.TB, c Case) *Result {
	t.Helper()
	RequireMknod(t)
	if cfg.NS == whiteout.Trusted {
		// trusted.overlay.* fixtures and chown: root in the initial
		// namespace. (A userxattr config needs only what its targets do.)
		RequireRoot(t)
		RequireTrustedXattr(t)
	}
	cfg.Oracle.Require(t)
	cfg.Subject.Require(t)
	// strata's server shares this process's umask; unionfs.Mount sets it
	// to 0 for the daemon. Use 0 for both targets so modes given to the
	// operations are what the filesystems see.
	syscall.Umask(0)
	since := time.Now()

	la, lb := cfg.Oracle.Name(), cfg.Subject.Name()
	if la == lb {
		lb += "#2"
	}
	a := cfg.prepare(t, c, cfg.Oracle, la)
	b := cfg.prepare(t, c, cfg.Subject, lb)
	t.Cleanup(func() {
		if t.Failed() {
			dumpLayers(t, a)
			dumpLayers(t, b)
		}
	})
	for _, s := range []*side{a, b} {
		cfg.runSide(t, c, s, since)
	}

	res := &Result{oracle: a.log}
	res.add(Section{Title: "(a) operations", A: la, B: lb, Diffs: compareLogs(a.log, b.log)})
	res.add(Section{Title: "(b) merged tree while mounted", A: la, B: lb, Diffs: CompareSnapshots(a.merged, b.merged, true)})
	for _, s := range []*side{a, b} {
		res.add(Section{Title: "read-only mount: writes must fail with EROFS", A: s.label, B: "want", Diffs: s.roBad})
	}
	if c.Upper == nil {
		return res
	}
	res.add(Section{Title: "(c) upper dir after unmount", A: la, B: lb, Diffs: CompareSnapshots(a.upper, b.upper, false)})
	// (d) Each target mounts the other's upper dir (same lowers, a fresh
	// work dir) and must show the tree the other showed.
	for _, x := range []struct {
		mounter Target
		label   string
		of      *side
		subject bool // the mounter is the target under test
	}{{cfg.Oracle, la, b, false}, {cfg.Subject, lb, a, true}} {
		o := cloneOptions(x.of.opts)
		o.Work = filepath.Join(x.of.root, "cross-work")
		if err := os.Mkdir(o.Work, 0o755); err != nil {
			t.Fatalf("cross mount: %v", err)
		}
		m := x.mounter.Mount(t, o)
		snap, err := TakeSnapshot(m.Dir, SnapshotOptions{Since: since, Mount: true})
		if err != nil {
			t.Fatalf("%s: snapshot of %s's upper: %v", x.label, x.of.label, err)
		}
		m.Unmount(t)
		res.add(Section{
			Title: fmt.Sprintf("(d) %s's upper mounted by %s", x.of.label, x.label),
			A:     x.of.label, B: x.label + " on " + x.of.label + "'s upper",
			Diffs: CompareSnapshots(x.of.merged, snap, x.subject),
		})
	}
	return res
}

func (r *Result) add(s Section) { r.Sections = append(r.Sections, s) }

// MountLayers builds lowers (topmost first) and upper (nil: none) in a
// fresh directory with namespace ns, mounts them with tg and returns the
// mount, unmounted at cleanup. It is the harness's fixture-and-mount step,
// for tests that check a mount by other means than a comparison (such as
// go-fuse's posixtest).
func MountLayers(t testing.TB, tg Target, ns whiteout.NS, lowers []Layer, upper Layer) *Mounted {
	t.Helper()
	tg.Require(t)
	cfg := Config{NS: ns}
	s := cfg.prepare(t, Case{Lowers: lowers, Upper: upper}, tg, tg.Name())
	return tg.Mount(t, s.opts)
}

// prepare builds the case's layers in a fresh directory for one target.
func (cfg Config) prepare(t testing.TB, c Case, tg Target, label string) *side {
	t.Helper()
	s := &side{target: tg, label: label, root: t.TempDir()}
	if os.Geteuid() != 0 {
		// Runs before t.TempDir's removal: without CAP_DAC_OVERRIDE,
		// directories whose mode keeps their owner out (fixtures, the
		// kernel's work/work) must be opened up to be removed.
		t.Cleanup(func() { openUp(s.root) })
	}
	lowers := c.Lowers
	if len(lowers) == 0 {
		lowers = []Layer{{}}
	}
	if c.Upper == nil && len(lowers) == 1 {
		// The kernel mounts a read-only overlay only from two lowers or
		// more; an empty bottom layer changes nothing in the merged view.
		lowers = append(append([]Layer(nil), lowers...), Layer{})
	}
	var dirs []string
	for i, l := range lowers {
		d := filepath.Join(s.root, fmt.Sprintf("l%d", i))
		BuildLayer(t, d, cfg.NS, l)
		dirs = append(dirs, d)
	}
	data := "lowerdir=" + strings.Join(dirs, ":")
	if c.Upper != nil {
		up, work := filepath.Join(s.root, "upper"), filepath.Join(s.root, "work")
		BuildLayer(t, up, cfg.NS, c.Upper)
		if err := os.Mkdir(work, 0o755); err != nil {
			t.Fatal(err)
		}
		data += ",upperdir=" + up + ",workdir=" + work
	}
	if cfg.NS == whiteout.User {
		data += ",userxattr"
	}
	o, err := unionfs.ParseOptions(data)
	if err != nil {
		t.Fatalf("options %q: %v", data, err)
	}
	s.opts = o
	return s
}

// runSide mounts s, runs the ops, snapshots the merged tree, checks that
// writes fail on a read-only mount, unmounts and snapshots the upper dir.
func (cfg Config) runSide(t testing.TB, c Case, s *side, since time.Time) {
	t.Helper()
	m := s.target.Mount(t, s.opts)
	r := NewRecorder(m.Dir, since)
	r.layers = s.root
	func() {
		defer r.closeAll()
		if c.Ops != nil {
			c.Ops(r, m.Dir)
		}
	}()
	snap, err := TakeSnapshot(m.Dir, SnapshotOptions{Since: since, Mount: true})
	if err != nil {
		t.Fatalf("%s: snapshot of the mount: %v", s.label, err)
	}
	s.merged = snap
	if c.Upper == nil {
		s.roBad = writeAttempts(r, snap)
	}
	s.log = r.Log()
	m.Unmount(t)
	if c.Upper != nil {
		ns := cfg.NS
		snap, err := TakeSnapshot(s.opts.Upper, SnapshotOptions{Since: since, Upper: &ns})
		if err != nil {
			t.Fatalf("%s: snapshot of the upper dir: %v", s.label, err)
		}
		s.upper = snap
	}
}

// openUp gives every directory under root (owned by this user) u+rwx.
func openUp(root string) {
	filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			if info, err := d.Info(); err == nil && info.Mode().Perm()&0o700 != 0o700 {
				os.Chmod(p, info.Mode().Perm()|0o700)
			}
		}
		return nil
	})
}

// writeAttempts tries every kind of write on the paths of a read-only
// mount (all of them, or an even sample of large trees), logging each
// through r so that both targets' attempts are compared too, and returns
// those that did not fail with EROFS.
func writeAttempts(r *Recorder, s *Snapshot) []Diff {
	start := len(r.log)
	step := 1 + len(s.Paths)/40
	for i, p := range s.Paths {
		if i%step != 0 {
			continue
		}
		n := s.Nodes[p]
		if strings.HasPrefix(n.Type, "error") {
			continue // listed but not there (an xattr whiteout in a dir not marked "x")
		}
		rel := p
		if p == "." {
			rel = ""
		}
		if len(r.Path(rel))+32 >= unix.PathMax {
			continue // out of reach of path-based calls (ENAMETOOLONG)
		}
		child := func(name string) string { return joinRel(rel, name) }
		switch n.Type {
		case "dir":
			if !searchable(n) {
				break // EACCES before the filesystem is asked
			}
			r.Create(child("ro-file"), 0o644)
			r.Mkdir(child("ro-dir"), 0o755)
			r.Mknod(child("ro-fifo"), unix.S_IFIFO|0o644, 0)
			r.Symlink("target", child("ro-link"))
		case "file":
			r.WriteFlags(rel, unix.O_WRONLY, 0, "x")
			r.Truncate(rel, 0)
			r.Link(rel, shortSibling(rel, "ro-link"))
		}
		if rel != "" {
			if n.Type == "dir" {
				r.Rmdir(rel)
			} else {
				r.Unlink(rel)
			}
			r.Rename(rel, shortSibling(rel, "ro-renamed"))
		}
		if n.Type != "symlink" {
			r.Chmod(rel, 0o700)
		}
		if n.Type == "file" || n.Type == "dir" {
			// Writing to a fifo or device does not write the filesystem:
			// access(W_OK) succeeds on them even read-only.
			r.Access(rel, unix.W_OK)
		}
		r.Lchown(rel, 1, 1)
		r.Utimens(rel, UTimeNow, UTimeNow, unix.AT_SYMLINK_NOFOLLOW)
		r.Setxattr(rel, "user.ro", "v", 0)
		r.Removexattr(rel, "user.ro")
	}
	var bad []Diff
	for _, e := range r.log[start:] {
		if e.Result != "EROFS" {
			bad = append(bad, Diff{Path: e.Op, Field: "result", A: e.Result, B: "EROFS"})
		}
	}
	return bad
}

// searchable reports whether this process may look names up in the
// directory n: root may anywhere; other users per the mode bits that
// apply to them.
func searchable(n *Node) bool {
	switch {
	case os.Geteuid() == 0:
		return true
	case n.UID == uint32(os.Geteuid()):
		return n.Mode&0o100 != 0
	case n.GID == uint32(os.Getegid()):
		return n.Mode&0o010 != 0
	}
	return n.Mode&0o001 != 0
}

// compareLogs compares two op logs entry by entry.
func compareLogs(a, b []Entry) []Diff {
	var d []Diff
	for i := 0; i < max(len(a), len(b)); i++ {
		var ea, eb Entry
		sa, sb := "(no more operations)", "(no more operations)"
		if i < len(a) {
			ea, sa = a[i], a[i].String()
		}
		if i < len(b) {
			eb, sb = b[i], b[i].String()
		}
		switch {
		case ea.Op != eb.Op:
			d = append(d, Diff{Path: fmt.Sprintf("op %d", i+1), Field: "op", A: sa, B: sb})
		case ea != eb:
			d = append(d, Diff{Path: fmt.Sprintf("op %d %s", i+1, ea.Op), Field: "result",
				A: strings.TrimSpace(ea.Result + " " + ea.Output), B: strings.TrimSpace(eb.Result + " " + eb.Output)})
		}
	}
	return d
}

// CompareSnapshots lists every path whose fields differ and paths present
// on one side only; with checkB, also b's identity violations that a does
// not share (see [Violation]).
func CompareSnapshots(a, b *Snapshot, checkB bool) []Diff {
	var d []Diff
	paths := map[string]bool{}
	for _, p := range a.Paths {
		paths[p] = true
	}
	for _, p := range b.Paths {
		paths[p] = true
	}
	var all []string
	for p := range paths {
		all = append(all, p)
	}
	sort.Strings(all)
	for _, p := range all {
		na, nb := a.Nodes[p], b.Nodes[p]
		switch {
		case na == nil:
			d = append(d, Diff{Path: quotePath(p), Field: "exists", A: "missing", B: nb.Type})
			continue
		case nb == nil:
			d = append(d, Diff{Path: quotePath(p), Field: "exists", A: na.Type, B: "missing"})
			continue
		}
		fa, fb := na.fields(), nb.fields()
		for i := range fa {
			if fa[i][1] != fb[i][1] {
				d = append(d, Diff{Path: quotePath(p), Field: fa[i][0], A: fa[i][1], B: fb[i][1]})
			}
		}
	}
	if checkB {
		// Identity rules are checked on the side under test only, and a
		// break the reference shows too (same path, same rule) is excused:
		// kernel overlay itself lists the real upper inode as d_ino of a
		// merged dir whose upper copy has no origin xattr (made outside
		// the kernel, as fixtures are), while stat reports the lower's.
		excused := map[[2]string]bool{}
		for _, v := range a.Violations {
			excused[[2]string{v.Path, v.Kind}] = true
		}
		for _, v := range b.Violations {
			if !excused[[2]string{v.Path, v.Kind}] {
				d = append(d, Diff{Path: quotePath(v.Path), Field: "identity", A: "-", B: v.What})
			}
		}
	}
	return d
}

// maxDumpLines bounds the lines dumped per layer.
const maxDumpLines = 200

// dumpLayers logs every layer dir of s (lowers, upper, work), one line per
// path with its attributes and xattrs.
func dumpLayers(t testing.TB, s *side) {
	t.Helper()
	dirs := append([]string(nil), s.opts.Lowers...)
	if s.opts.Upper != "" {
		dirs = append(dirs, s.opts.Upper, s.opts.Work)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "layers of %s (%s):\n", s.label, s.opts.String())
	for _, d := range dirs {
		snap, err := TakeSnapshot(d, SnapshotOptions{})
		if err != nil {
			fmt.Fprintf(&b, "%s: %v\n", d, err)
			continue
		}
		fmt.Fprintf(&b, "%s:\n", d)
		for i, p := range snap.Paths {
			if i == maxDumpLines {
				fmt.Fprintf(&b, "  ... %d more\n", len(snap.Paths)-i)
				break
			}
			fmt.Fprintf(&b, "  %s: %s\n", quotePath(p), snap.Nodes[p])
		}
	}
	t.Log(b.String())
}

// shortSibling names a new entry next to rel whose name stays within
// NAME_MAX.
func shortSibling(rel, suffix string) string {
	dir, name := filepath.Split(rel)
	if len(name)+len(suffix)+1 > 255 {
		name = name[:255-len(suffix)-1]
	}
	return dir + name + "." + suffix
}
