package inspect

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"strata/cow"
	"strata/unionfs"
	"strata/whiteout"
)

// MergeOptions configure [Merge].
type MergeOptions struct {
	// Output is the new layer's directory. It must not exist (or be an
	// empty directory) and its parent must exist. Exclusive with Into.
	Output string
	// Into rebuilds the top lower layer in place instead of writing a new
	// one. Every other stack using that layer sees the change.
	Into bool
	// Apply performs the merge; otherwise Merge only plans it.
	Apply bool
	// ResetUpper, after a successful merge, replaces the upper dir by an
	// empty one with the same owner, mode and xattrs, and clears the work
	// dir's scratch area, so that the stack continues from the new layer.
	ResetUpper bool
	// NoVerify skips the comparison of the merged tree before and after,
	// done before the new layer is moved into place.
	NoVerify bool
}

// MergeStep is one action of a merge plan.
type MergeStep struct {
	// Op is "dir" (create a directory), "copy" (copy an object), "link"
	// (hard-link to an object already placed, or, with Into, to the top
	// lower's own object), "whiteout" or "opaque".
	Op   string `json:"op"`
	Path string `json:"path"` // in the new layer
	// From is the layer the object comes from (-1 for markers).
	From int `json:"from"`
	// Type of the object, for dir/copy/link.
	Type string `json:"type,omitempty"`
	// LinkTo is, for a link inside the new layer, the path linked to.
	LinkTo string `json:"link_to,omitempty"`
	// Carried: the step reproduces the top lower layer as it is.
	Carried bool `json:"-"`
}

// MergePlan describes a merge: what the new layer will hold beyond the top
// lower layer, and the stack to use afterwards.
type MergePlan struct {
	// Target is the directory that will hold the new layer.
	Target string `json:"target"`
	// Into: the target is the top lower layer, rebuilt in place.
	Into bool `json:"into"`
	// Upper and TopLower are the directories folded together.
	Upper    string `json:"upper"`
	TopLower string `json:"top_lower"`
	// Steps lists what comes from the upper dir and the markers the new
	// layer needs, in order; what is carried over from the top lower
	// unchanged is only counted.
	Steps []MergeStep `json:"steps"`
	// Carried counts the objects and markers taken over from the top
	// lower layer unchanged.
	Carried int `json:"carried"`
	// NewLowers is lowerdir for the stack after the merge, top first.
	NewLowers []string `json:"new_lowers"`
	// NewOptions are the -o options for the stack after the merge: with
	// ResetUpper the (emptied) upper dir stays; otherwise, without it.
	NewOptions string `json:"new_options"`
	// Warnings are things to know before applying.
	Warnings []string `json:"warnings,omitempty"`
	// Applied: the new layer is in place.
	Applied bool `json:"applied"`
	// Verified: its merged tree was compared with the stack's and equal.
	Verified bool `json:"verified"`
	// UpperReset: the upper dir was emptied afterwards.
	UpperReset bool `json:"upper_reset"`
}

// Merge folds the upper dir into the top lower layer: the result, a layer
// in the kernel format (0/0 whiteouts, opaque directories, no private
// xattrs of the old layers), is built so that the stack of the result and
// the remaining lowers shows exactly the merged tree the whole stack shows
// now. It is built with the mount's resolution: each visible object the
// upper dir or the top lower decides is placed with its metadata; a
// whiteout goes wherever the lowers below would show a name the stack does
// not; a directory is made opaque where the stack stops merging it but the
// lowers below hold one.
//
// Without Apply nothing changes. With Apply the layer is built in a
// temporary directory beside the target, compared (unless NoVerify) with
// the stack's merged tree, and then renamed into place (Output) or
// exchanged atomically with the top lower (Into, renameat2
// RENAME_EXCHANGE); with Into the old layer's objects are hard-linked, not
// copied. Merge refuses to apply while a mount uses the stack.
func Merge(ctx context.Context, o unionfs.Options, mo MergeOptions) (*MergePlan, error) {
	o, err := resolveOptions(o)
	if err != nil {
		return nil, err
	}
	if o.Upper == "" {
		return nil, errors.New("nothing to merge: the stack has no upperdir")
	}
	target, err := mergeTarget(o, mo)
	if err != nil {
		return nil, err
	}
	plan := &MergePlan{Target: target, Into: mo.Into}
	plan.NewLowers = append([]string{target}, o.Lowers[1:]...)
	plan.Upper, plan.TopLower = o.Upper, o.Lowers[0]
	newOpts := unionfs.Options{Lowers: plan.NewLowers, UserXattr: o.UserXattr, SquashUID: -1, SquashGID: -1,
		EntryTimeout: unionfs.DefaultTimeout}
	if mo.ResetUpper {
		newOpts.Upper, newOpts.Work = o.Upper, o.Work
	}
	plan.NewOptions = newOpts.String()
	if mo.Into {
		plan.Warnings = append(plan.Warnings, fmt.Sprintf("rebuilds %s in place: every other stack that uses it sees the upper dir's changes too", o.Lowers[0]))
	}
	if mo.ResetUpper && o.Work == "" {
		return nil, errors.New("--reset-upper needs the workdir (its scratch area is cleared too)")
	}

	release := func() {}
	if mo.Apply {
		var extra []string
		if mo.Into {
			extra = append(extra, o.Lowers[0])
		}
		if release, err = claim(o, extra...); err != nil {
			return nil, fmt.Errorf("refusing to merge: %w", err)
		}
	}
	defer release()

	s, err := Open(o)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	m := &merger{s: s, ns: s.NS(), into: mo.Into, plan: plan, links: map[[2]uint64]string{}}
	if len(o.Lowers) > 1 {
		below := unionfs.Options{Lowers: slices.Clone(o.Lowers[1:]), UserXattr: o.UserXattr, SquashUID: -1, SquashGID: -1}
		if m.below, err = unionfs.OpenStack(below); err != nil {
			return nil, err
		}
		defer m.below.Close()
	}
	if !mo.Apply {
		if err := m.walk(ctx, "/", -1, m.below != nil); err != nil {
			return nil, err
		}
		return plan, nil
	}
	if err := m.build(ctx, target); err != nil {
		return plan, err
	}
	defer m.cleanup()
	if !mo.NoVerify {
		if err := m.verify(); err != nil {
			return plan, err
		}
		plan.Verified = true
	}
	if err := m.commit(o, target); err != nil {
		return plan, err
	}
	plan.Applied = true
	if mo.ResetUpper {
		if err := resetUpper(ctx, o); err != nil {
			return plan, fmt.Errorf("merged into %s, but resetting the upper dir failed (the stack still shows the same tree): %w", target, err)
		}
		plan.UpperReset = true
	}
	return plan, nil
}

// mergeTarget checks and returns the directory the new layer goes to.
func mergeTarget(o unionfs.Options, mo MergeOptions) (string, error) {
	if len(o.Lowers) == 0 {
		return "", errors.New("the stack has no lower layer to merge into")
	}
	if mo.Into {
		if mo.Output != "" {
			return "", errors.New("--into and --output exclude each other")
		}
		return o.Lowers[0], nil
	}
	if mo.Output == "" {
		return "", errors.New("say where the new layer goes (--output DIR) or merge into the top lower (--into)")
	}
	out, err := filepath.Abs(mo.Output)
	if err != nil {
		return "", err
	}
	if fi, err := os.Lstat(out); err == nil {
		if !fi.IsDir() {
			return "", fmt.Errorf("--output %s exists and is not a directory", out)
		}
		if ents, err := os.ReadDir(out); err != nil || len(ents) > 0 {
			return "", fmt.Errorf("--output %s exists and is not empty", out)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	if fi, err := os.Stat(filepath.Dir(out)); err != nil || !fi.IsDir() {
		return "", fmt.Errorf("--output %s: its parent directory does not exist", out)
	}
	ro := realPath(out)
	for _, l := range append([]string{o.Upper, o.Work}, o.Lowers...) {
		if l == "" {
			continue
		}
		rl := realPath(l)
		if ro == rl || within(ro, rl) || within(rl, ro) {
			return "", fmt.Errorf("--output %s overlaps the stack's directory %s", out, l)
		}
	}
	return out, nil
}

// within reports whether path p is strictly below dir.
func within(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, "../")
}

// merger builds (or plans) the new layer.
//
// Layer numbers are the stack's: 0 the upper dir, 1 the top lower, 2.. the
// lowers that stay below the new layer (the stack "below", whose layer i
// is layer i+2).
type merger struct {
	s     *Stack
	below *unionfs.Stack // the lowers that stay; nil when there are none
	ns    whiteout.NS
	into  bool
	plan  *MergePlan

	// Set when building.
	apply     bool
	copier    *cow.Copier
	container string // the temporary directory beside the target
	root      int    // fd of container/layer, the new layer's root
	links     map[[2]uint64]string
	dirs      []dirTimes
}

type dirTimes struct {
	path  string
	times [2]unix.Timespec
}

func (m *merger) step(st MergeStep) {
	if st.Carried {
		m.plan.Carried++
		return
	}
	m.plan.Steps = append(m.plan.Steps, st)
}

// mergesBelow reports whether a directory resolution of the stack merges
// any layer that stays below the new one.
func mergesBelow(dirs []unionfs.DirLayer) bool {
	return slices.ContainsFunc(dirs, func(d unionfs.DirLayer) bool { return d.Layer >= 2 })
}

// walk places the entries of directory p, which the new layer holds (open
// as fd when building), and the whiteouts it needs. below: the new
// layer's p merges with the lowers' p.
func (m *merger) walk(ctx context.Context, p string, fd int, below bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	ents, err := m.s.view.ReadDir(p)
	if err != nil {
		return fmt.Errorf("readdir %s: %w", p, err)
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
	shown := map[string]bool{}
	for _, e := range ents {
		shown[e.Name] = true
		q := child(p, e.Name)
		r, err := m.s.view.Resolve(q)
		if err != nil && lookupRefused(err) {
			return fmt.Errorf("%s: its lookup fails (%w); see strata fsck: not merged", q, err)
		}
		if err != nil {
			return err
		}
		if !r.Found {
			m.plan.Warnings = append(m.plan.Warnings, fmt.Sprintf("%s is listed but does not resolve (see strata fsck); not merged", q))
			continue
		}
		if r.Layer >= 2 {
			continue // shows through the lowers below, as it does now
		}
		if r.Stat.Mode&unix.S_IFMT != unix.S_IFDIR {
			if err := m.object(ctx, q, e.Name, fd, &r); err != nil {
				return err
			}
			continue
		}
		if err := m.dir(ctx, q, e.Name, fd, &r, below); err != nil {
			return err
		}
	}
	if !below || m.below == nil {
		return nil
	}
	// Names the lowers below would show here but the stack hides.
	lower, err := m.below.ReadDir(p)
	if err != nil {
		return fmt.Errorf("readdir %s in the lowers below: %w", p, err)
	}
	sort.Slice(lower, func(i, j int) bool { return lower[i].Name < lower[j].Name })
	for _, e := range lower {
		if shown[e.Name] {
			continue
		}
		q := child(p, e.Name)
		carried, err := m.topLowerHas(q, func(o Object) bool { return o.Kind == Whiteout }) // an xattr whiteout is converted: listed
		if err != nil {
			return err
		}
		m.step(MergeStep{Op: "whiteout", Path: q, From: -1, Carried: carried})
		if m.apply {
			if err := whiteout.Create(fd, e.Name); err != nil {
				return err
			}
		}
	}
	return nil
}

// topLowerHas reports whether the top lower layer's object at q (where
// the stack's lookup of q looks in that layer) satisfies f (used to tell
// carried markers from new ones).
func (m *merger) topLowerHas(q string, f func(Object) bool) (bool, error) {
	p := q
	if r, err := m.s.view.Resolve(q); err == nil && r.Looked != nil {
		p = r.Looked[1]
	}
	if p != q {
		return false, nil // moved by a redirect: not as the top lower has it
	}
	o, err := m.s.Probe(1, p)
	if err != nil {
		return false, err
	}
	return f(o), nil
}

// checkRedirects refuses a directory whose copies in the layers that stay
// below the new layer are found through a redirect of the upper dir or the
// top lower: the new layer would have to carry that redirect, and merge
// writes no private xattrs (strata never writes redirects).
func (m *merger) checkRedirects(q string, r *unionfs.Resolution) error {
	for i, d := range r.Dirs {
		if d.Layer >= 2 || d.Redirect == "" || !mergesBelow(r.Dirs[i+1:]) {
			continue
		}
		return fmt.Errorf("%s: its copy in %s carries %s=%q (a directory renamed by a kernel mount with redirect_dir=on), "+
			"which finds the directory's content in the layers that stay below the new layer; the new layer would need that redirect, "+
			"and strata writes none: not merged (mount the stack, copy the directory to a new name and remove the old one, then merge)",
			q, m.s.layers[d.Layer], m.ns.Redirect(), d.Redirect)
	}
	return nil
}

// dir places directory q (name in the directory open as fd).
func (m *merger) dir(ctx context.Context, q, name string, fd int, r *unionfs.Resolution, parentBelow bool) error {
	if err := m.checkRedirects(q, r); err != nil {
		return err
	}
	below := mergesBelow(r.Dirs)
	opaque := false
	if !below && parentBelow && m.below != nil {
		lr, err := m.below.Resolve(q)
		if err != nil {
			return err
		}
		opaque = lr.Found && lr.Stat.Mode&unix.S_IFMT == unix.S_IFDIR
	}
	m.step(MergeStep{Op: "dir", Path: q, From: r.Layer, Type: "directory", Carried: r.Layer == 1 && r.LayerPath == q})
	cfd := -1
	if m.apply {
		if err := m.s.withParent(r.Layer, r.LayerPath, func(src int, n string) error {
			return m.copier.Object(ctx, src, n, &r.Stat, fd, name)
		}); err != nil {
			return fmt.Errorf("%s: %w", q, err)
		}
		var err error
		if cfd, err = unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err != nil {
			return err
		}
		defer unix.Close(cfd)
		m.dirs = append(m.dirs, dirTimes{q, [2]unix.Timespec{r.Stat.Atim, r.Stat.Mtim}})
	}
	if opaque {
		carried, err := m.topLowerHas(q, func(o Object) bool { return o.Kind == Dir && o.Opacity == whiteout.Opaque })
		if err != nil {
			return err
		}
		m.step(MergeStep{Op: "opaque", Path: q, From: -1, Carried: carried})
		if m.apply {
			if err := whiteout.SetOpaque(fd, name, m.ns); err != nil {
				return err
			}
		}
	}
	return m.walk(ctx, q, cfd, below && !opaque)
}

// object places non-directory q (name in the directory open as fd).
func (m *merger) object(ctx context.Context, q, name string, fd int, r *unionfs.Resolution) error {
	typ := kindOf(&r.Stat).String()
	carried := r.Layer == 1 && r.LayerPath == q // placed where the top lower has it
	if m.into && r.Layer == 1 {
		// The top lower's own object: hard-link it into the new layer,
		// which replaces the old one.
		m.step(MergeStep{Op: "link", Path: q, From: 1, Type: typ, Carried: carried})
		if !m.apply {
			return nil
		}
		err := m.s.withParent(1, r.LayerPath, func(src int, n string) error { return unix.Linkat(src, n, fd, name, 0) })
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EMLINK) {
			return fmt.Errorf("link %s: %w", q, err)
		}
		// Cannot link (another filesystem, protected_hardlinks, link
		// limit): copy it instead.
	}
	key := [2]uint64{r.Stat.Dev, r.Stat.Ino}
	if first, ok := m.links[key]; ok && r.Stat.Nlink > 1 {
		m.step(MergeStep{Op: "link", Path: q, From: r.Layer, Type: typ, LinkTo: first, Carried: carried})
		if m.apply {
			if err := unix.Linkat(m.root, first[1:], fd, name, 0); err != nil {
				return fmt.Errorf("link %s to %s: %w", q, first, err)
			}
		}
		return nil
	}
	if r.Stat.Nlink > 1 {
		m.links[key] = q
	}
	m.step(MergeStep{Op: "copy", Path: q, From: r.Layer, Type: typ, Carried: carried})
	if !m.apply {
		return nil
	}
	return m.s.withParent(r.Layer, r.LayerPath, func(src int, n string) error {
		if err := m.copier.Object(ctx, src, n, &r.Stat, fd, name); err != nil {
			return fmt.Errorf("%s: %w", q, err)
		}
		return nil
	})
}

// build creates the new layer in a temporary directory beside target:
// container/layer, with container/work as the copier's scratch dir.
func (m *merger) build(ctx context.Context, target string) error {
	var err error
	if m.container, err = os.MkdirTemp(filepath.Dir(target), ".strata-merge-"); err != nil {
		return fmt.Errorf("create the build dir: %w", err)
	}
	workDir := filepath.Join(m.container, "work")
	if err := os.Mkdir(workDir, 0o700); err != nil {
		m.cleanup()
		return err
	}
	wfd, err := unix.Open(workDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		m.cleanup()
		return err
	}
	defer unix.Close(wfd)
	cfd, err := unix.Open(m.container, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		m.cleanup()
		return err
	}
	defer unix.Close(cfd)
	m.copier = cow.New(cow.Options{WorkFd: wfd, NS: m.ns, NoSync: true})
	m.apply = true
	m.root = -1
	fail := func(err error) error {
		m.cleanup()
		return err
	}
	root, err := m.s.view.Resolve("")
	if err != nil {
		return fail(err)
	}
	// The root's attributes are the upper root's, as a mount shows them.
	if err := m.copier.Object(ctx, m.s.fds[0], "", &root.Stat, cfd, "layer"); err != nil {
		return fail(fmt.Errorf("create the new layer's root: %w", err))
	}
	if m.root, err = unix.Openat(cfd, "layer", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err != nil {
		return fail(err)
	}
	if err := m.walk(ctx, "/", m.root, m.below != nil); err != nil {
		return fail(err)
	}
	// Directory times last: every entry placed in a directory changed them.
	for _, d := range m.dirs {
		if err := unix.UtimesNanoAt(m.root, d.path[1:], d.times[:], unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fail(fmt.Errorf("set times of %s: %w", d.path, err))
		}
	}
	if err := unix.UtimesNanoAt(cfd, "layer", []unix.Timespec{root.Stat.Atim, root.Stat.Mtim}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fail(fmt.Errorf("set times of the new layer's root: %w", err))
	}
	if err := unix.Syncfs(m.root); err != nil {
		return fail(fmt.Errorf("sync the new layer: %w", err))
	}
	return nil
}

// verify compares the merged tree of the new layer over the lowers below
// with the stack's merged tree.
func (m *merger) verify() error {
	before, err := m.s.Tree()
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	lowers := append([]string{filepath.Join(m.container, "layer")}, m.s.opts.Lowers[1:]...)
	t, err := Open(unionfs.Options{Lowers: lowers, UserXattr: m.s.opts.UserXattr, SquashUID: -1, SquashGID: -1})
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	defer t.Close()
	after, err := t.Tree()
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	if d := before.Compare(after); len(d) > 0 {
		if len(d) > 10 {
			d = append(d[:10], fmt.Sprintf("... and %d more", len(d)-10))
		}
		hint := ""
		if os.Geteuid() != 0 {
			hint = " (without privilege, owners and trusted.* xattrs cannot be kept)"
		}
		return fmt.Errorf("verify: the new layer shows a different tree%s; nothing was changed:\n  %s", hint, strings.Join(d, "\n  "))
	}
	return nil
}

// commit moves the built layer into place.
func (m *merger) commit(o unionfs.Options, target string) error {
	built := filepath.Join(m.container, "layer")
	if m.into {
		// Atomic: the old layer ends up in the build dir, removed below.
		if err := unix.Renameat2(unix.AT_FDCWD, built, unix.AT_FDCWD, target, unix.RENAME_EXCHANGE); err != nil {
			return fmt.Errorf("exchange %s with the new layer: %w", target, err)
		}
		return nil
	}
	if err := os.Rename(built, target); err != nil {
		return fmt.Errorf("move the new layer to %s: %w", target, err)
	}
	return nil
}

// cleanup closes the build fds and removes the build dir (with Into, after
// the commit, the old top lower).
func (m *merger) cleanup() {
	if m.root >= 0 {
		unix.Close(m.root)
		m.root = -1
	}
	if m.container == "" {
		return
	}
	pfd, err := unix.Open(filepath.Dir(m.container), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err == nil {
		cow.RemoveAllAt(pfd, filepath.Base(m.container))
		unix.Close(pfd)
	}
	m.container = ""
}

// resetUpper replaces the upper dir by an empty copy of its root (owner,
// mode, xattrs, times; no private xattrs) with one atomic exchange, then
// removes the old one and clears workdir/work (keeping the kernel's
// incompat markers).
func resetUpper(ctx context.Context, o unionfs.Options) error {
	parent, base := filepath.Dir(o.Upper), filepath.Base(o.Upper)
	pfd, err := unix.Open(parent, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	ufd, err := unix.Open(o.Upper, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(ufd)
	var st unix.Stat_t
	if err := unix.Fstat(ufd, &st); err != nil {
		return err
	}
	// The copier builds in its work fd and renames into place: both in
	// the upper dir's parent.
	c := cow.New(cow.Options{WorkFd: pfd, NS: o.NS(), NoSync: true})
	fresh := c.TempName()
	if err := c.Object(ctx, ufd, "", &st, pfd, fresh); err != nil {
		return fmt.Errorf("create an empty upper dir: %w", err)
	}
	if err := unix.Renameat2(pfd, fresh, pfd, base, unix.RENAME_EXCHANGE); err != nil {
		cow.RemoveAllAt(pfd, fresh)
		return fmt.Errorf("exchange the upper dir: %w", err)
	}
	if err := cow.RemoveAllAt(pfd, fresh); err != nil {
		return fmt.Errorf("remove the old upper dir (now %s): %w", filepath.Join(parent, fresh), err)
	}
	wfd, err := unix.Open(filepath.Join(o.Work, "work"), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer unix.Close(wfd)
	names, err := cow.ReadNames(wfd)
	if err != nil {
		return err
	}
	for _, n := range names {
		if n == "incompat" {
			continue
		}
		if err := cow.RemoveAllAt(wfd, n); err != nil {
			return err
		}
	}
	return nil
}
