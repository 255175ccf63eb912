package inspect

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"strata/cow"
	"strata/internal/sysx"
	"strata/unionfs"
	"strata/whiteout"
)

// Problem codes reported by [Check]. They are stable: scripts may match
// them.
const (
	// OrphanWhiteout: a whiteout in the upper dir that hides nothing (no
	// lower layer merged there holds the name). In a directory not merged
	// with any lower, kernel readdir lists it as a name that cannot be
	// looked up. Repair removes it.
	OrphanWhiteout = "ORPHAN_WHITEOUT"
	// WhiteoutInOpaque: a whiteout inside an opaque upper directory,
	// where it has nothing to hide; kernel readdir lists it as a broken
	// name. Repair removes it.
	WhiteoutInOpaque = "WHITEOUT_IN_OPAQUE"
	// XwhiteoutInUpper: an xattr whiteout in the upper dir. Lookup honours
	// it but kernel readdir lists it (the format is for lower layers).
	// Repair replaces it by a 0/0 whiteout.
	XwhiteoutInUpper = "XWHITEOUT_IN_UPPER"
	// XwhiteoutUnmarked: an xattr whiteout in a lower directory not marked
	// overlay.opaque=x: lookup hides the name, readdir lists it.
	XwhiteoutUnmarked = "XWHITEOUT_UNMARKED"
	// ForeignMarker: another tool's marker: OCI/AUFS ".wh." files,
	// fuse-overlayfs' user.fuseoverlayfs.* and override_stat xattrs,
	// unionfs-fuse and go-fuse unionfs deletion dirs. Overlay shows them as
	// ordinary entries or ignores them. Repair converts ".wh." whiteouts
	// and opaque markers (and fuse-overlayfs' opaque xattr) in the upper
	// dir to the kernel format.
	ForeignMarker = "FOREIGN_MARKER"
	// WrongNS: overlay-private xattrs of the other namespace
	// (trusted.overlay.* in a userxattr stack or user.overlay.* in a
	// trusted one): the stack is read as if they were not there.
	WrongNS = "WRONG_NS"
	// BadMarker: an overlay marker the kernel ignores: overlay.opaque with
	// a value other than "y" or "x", on a non-directory or ("y") on a layer
	// root; overlay.whiteout on anything but a zero-size regular file;
	// overlay.redirect on a non-directory or an opaque directory. Repair
	// removes it from the upper dir.
	BadMarker = "BAD_MARKER"
	// BadRedirect: an overlay.redirect that makes the lookups of its
	// directory fail: a malformed value (EINVAL), a "." or ".." component
	// (EACCES once reached), or any redirect in a userxattr stack, where
	// the kernel does not follow redirects (EPERM). Not repaired: where
	// the directory's lower copies are is unknown.
	BadRedirect = "BAD_REDIRECT"
	// UnsupportedFeature: overlay.metacopy, written by a kernel mount with
	// metacopy=on; strata (and the kernel without metacopy) shows a
	// different tree. (Redirects, written with redirect_dir=on, are
	// followed as the kernel does.)
	UnsupportedFeature = "UNSUPPORTED_FEATURE"
	// WorkLeftover: entries in workdir/work, left by a crash or an
	// interrupted copy-up (the next mount clears them). Repair removes
	// them. The kernel's shared 0/0 whiteout there is not reported.
	WorkLeftover = "WORK_LEFTOVER"
	// WorkOtherFS: upper and work dirs on different filesystems: neither
	// the kernel nor strata mounts the stack.
	WorkOtherFS = "WORK_OTHER_FS"
	// LayerOverlap: the directories overlap (work inside upper, a lower
	// inside upper, ...): the mount is refused.
	LayerOverlap = "LAYER_OVERLAP"
	// VolatileDirty: workdir/work/incompat/volatile exists: a volatile
	// mount ran, and the kernel refuses to mount until it is removed. Not
	// repaired: after a crash the upper dir may be inconsistent.
	VolatileDirty = "VOLATILE_DIRTY"
)

// Severities of a [Problem]. Both count as problems for the exit status.
const (
	// SeverityError: a mount shows something other than the writer meant,
	// shows broken entries, or is refused.
	SeverityError = "error"
	// SeverityWarning: not the kernel's format, but the merged tree is
	// what it should be.
	SeverityWarning = "warning"
)

// Problem is one finding of [Check].
type Problem struct {
	// Code is one of the stable codes (OrphanWhiteout, ...).
	Code string `json:"code"`
	// Severity is SeverityError or SeverityWarning.
	Severity string `json:"severity"`
	// Layer is the layer index, or -1 for the work dir or the whole stack.
	Layer int `json:"layer"`
	// Role is "upper", "lower", "work" or "stack".
	Role string `json:"role"`
	// Path inside the layer ("/d/x"), or inside the work dir.
	Path string `json:"path"`
	// Message explains the problem and its effect.
	Message string `json:"message"`
	// Repair says what --repair does about it; "" when it does nothing.
	Repair string `json:"repair,omitempty"`

	fix func() error
}

// String renders the problem on one line.
func (p Problem) String() string {
	where := p.Role
	if p.Layer >= 0 {
		where = fmt.Sprintf("layer %d (%s)", p.Layer, p.Role)
	}
	return fmt.Sprintf("%s %s %s: %s", p.Code, where, p.Path, p.Message)
}

// RepairResult is one repair attempt.
type RepairResult struct {
	Problem
	// Error is why the repair failed ("" on success).
	Error string `json:"error,omitempty"`
}

// FsckReport is the outcome of [Check].
type FsckReport struct {
	// Problems found (before any repair).
	Problems []Problem `json:"problems"`
	// Repairs attempted (with --repair).
	Repairs []RepairResult `json:"repairs,omitempty"`
	// Remaining problems: a second check after the repairs, or Problems
	// when nothing was repaired.
	Remaining []Problem `json:"remaining"`
	// Notes carry context that is not a problem (e.g. the stack is
	// mounted, so the check may see changes in flight).
	Notes []string `json:"notes,omitempty"`
}

// Corrected counts the repairs that succeeded.
func (r *FsckReport) Corrected() int {
	n := 0
	for _, x := range r.Repairs {
		if x.Error == "" {
			n++
		}
	}
	return n
}

// ExitCode returns the fsck(8) exit status: the sum of 1 (problems were
// corrected) and 4 (problems were left uncorrected); 0 when the stack is
// clean. 8 (operational error) and 16 (usage) are the caller's.
func (r *FsckReport) ExitCode() int {
	code := 0
	if r.Corrected() > 0 {
		code |= 1
	}
	if len(r.Remaining) > 0 {
		code |= 4
	}
	return code
}

// CheckOptions configure [Check].
type CheckOptions struct {
	// Repair fixes what is safe (see the codes); otherwise nothing on disk
	// changes.
	Repair bool
}

// Check examines a stack offline: the upper dir entry by entry against the
// lowers, every lower for markers it should not hold, and the work dir. It
// returns an error only when it cannot do its job (a layer is missing,
// unreadable, or --repair is refused because a mount uses the stack);
// problems of the stack are in the report.
func Check(o unionfs.Options, opts CheckOptions) (*FsckReport, error) {
	o, err := resolveOptions(o)
	if err != nil {
		return nil, err
	}
	rep := &FsckReport{}
	if opts.Repair {
		release, err := claim(o)
		if err != nil {
			return nil, fmt.Errorf("refusing to repair: %w", err)
		}
		defer release()
	} else if users := inUse(o); len(users) > 0 {
		rep.Notes = append(rep.Notes, "the stack is in use by "+strings.Join(users, ", ")+": changes in flight may show as problems")
	}
	c, err := check(o)
	if err != nil {
		return nil, err
	}
	rep.Problems, rep.Notes = c.probs, append(rep.Notes, c.notes...)
	rep.Remaining = c.probs
	if !opts.Repair {
		c.close()
		return rep, nil
	}
	for _, p := range c.probs {
		if p.fix == nil {
			continue
		}
		r := RepairResult{Problem: p}
		if err := p.fix(); err != nil {
			r.Error = err.Error()
		}
		rep.Repairs = append(rep.Repairs, r)
	}
	c.close()
	if len(rep.Repairs) > 0 {
		again, err := check(o)
		if err != nil {
			return rep, fmt.Errorf("check after repair: %w", err)
		}
		again.close()
		rep.Remaining = again.probs
	}
	return rep, nil
}

// checker holds one pass of Check.
type checker struct {
	s     *Stack
	o     unionfs.Options
	ns    whiteout.NS
	other whiteout.NS
	probs []Problem
	notes []string

	ownMarkers, otherMarkers int
}

// check runs every check once. The problems' fixes use the stack the
// checker opened: the caller closes it after them.
func check(o unionfs.Options) (*checker, error) {
	c := &checker{o: o, ns: o.NS(), other: whiteout.User}
	if c.ns == whiteout.User {
		c.other = whiteout.Trusted
	}
	workOK, err := c.structure()
	if err != nil {
		return nil, err
	}
	view, err := openView(o, !workOK)
	if err != nil {
		return nil, err
	}
	if c.s, err = newStack(o, view); err != nil {
		view.Close()
		return nil, err
	}
	if err := c.run(workOK); err != nil {
		c.close()
		return nil, err
	}
	return c, nil
}

func (c *checker) close() {
	if c.s != nil {
		c.s.Close()
		c.s = nil
	}
}

func (c *checker) run(workOK bool) error {
	for li := range c.s.layers {
		if err := c.walkLayer(li); err != nil {
			return err
		}
	}
	if c.o.Work != "" && workOK {
		if err := c.work(); err != nil {
			return err
		}
	}
	if c.otherMarkers > 0 && c.ownMarkers == 0 {
		if c.ns == whiteout.Trusted {
			c.notes = append(c.notes, "the layers carry user.overlay.* markers and no trusted.overlay.* ones: they were likely written in the userxattr format; check with -o ...,userxattr")
		} else {
			c.notes = append(c.notes, "the layers carry trusted.overlay.* markers and no user.overlay.* ones: they were likely written in the privileged format; check without userxattr")
		}
	}
	return nil
}

func (c *checker) add(p Problem) { c.probs = append(c.probs, p) }

// structure checks that every directory exists (an operational error
// otherwise) and the upper/work pair the way a mount would. It reports
// whether the work dir is usable.
func (c *checker) structure() (bool, error) {
	o := c.o
	dirs := append([]string{}, o.Lowers...)
	if o.Upper != "" {
		dirs = append(dirs, o.Upper)
	}
	if o.Work != "" {
		dirs = append(dirs, o.Work)
	}
	for _, d := range dirs {
		fi, err := os.Stat(d)
		if err != nil {
			return false, err
		}
		if !fi.IsDir() {
			return false, &os.PathError{Op: "stat", Path: d, Err: unix.ENOTDIR}
		}
	}
	if o.Work == "" {
		return false, nil
	}
	var ust, wst unix.Stat_t
	if err := unix.Stat(o.Upper, &ust); err != nil {
		return false, err
	}
	if err := unix.Stat(o.Work, &wst); err != nil {
		return false, err
	}
	if ust.Dev != wst.Dev {
		c.add(Problem{Code: WorkOtherFS, Severity: SeverityError, Layer: -1, Role: "stack", Path: o.Work,
			Message: fmt.Sprintf("the work dir is on another filesystem than the upper dir %s: copy-up renames from one to the other, so no mount is possible", o.Upper)})
		return false, nil
	}
	if err := o.Validate(); err != nil {
		c.add(Problem{Code: LayerOverlap, Severity: SeverityError, Layer: -1, Role: "stack", Path: "", Message: err.Error()})
		return false, nil
	}
	return true, nil
}

// dirEntry is one entry of a layer directory.
type dirEntry struct {
	name   string
	st     unix.Stat_t
	kind   Kind
	xattrs []string
}

// walkLayer checks every entry of layer li, directory by directory.
func (c *checker) walkLayer(li int) error {
	fd, err := unix.Openat(c.s.fds[li], ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%s: %w", c.s.layers[li], err)
	}
	defer unix.Close(fd)
	if err := c.rootMarkers(li, fd); err != nil {
		return err
	}
	return c.walkDir(li, fd, "/")
}

// rootMarkers checks the layer root's own xattrs.
func (c *checker) rootMarkers(li, fd int) error {
	names, err := sysx.ListxattrAll(fd, "")
	if err != nil {
		return fmt.Errorf("%s: listxattr: %w", c.s.layers[li], err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	e := dirEntry{st: st, kind: Dir, xattrs: names}
	return c.xattrChecks(li, fd, "/", "", &e, true)
}

func (c *checker) walkDir(li, fd int, p string) error {
	names, err := cow.ReadNames(fd)
	if err != nil {
		return fmt.Errorf("%s: readdir %s: %w", c.s.layers[li], p, err)
	}
	sort.Strings(names)
	ents := make([]dirEntry, 0, len(names))
	for _, n := range names {
		e := dirEntry{name: n}
		if err := unix.Fstatat(fd, n, &e.st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			return fmt.Errorf("%s: stat %s: %w", c.s.layers[li], child(p, n), err)
		}
		if e.kind, err = classify(fd, n, &e.st, c.ns); err != nil {
			return err
		}
		if e.xattrs, err = sysx.ListxattrAll(fd, n); err != nil {
			return fmt.Errorf("%s: listxattr %s: %w", c.s.layers[li], child(p, n), err)
		}
		ents = append(ents, e)
	}
	upper := li == 0 && c.s.upper
	var dir *upperDir
	if upper {
		if dir, err = c.upperDir(fd, p, ents); err != nil {
			return err
		}
	}
	opacity, err := whiteout.GetOpacity(fd, "", c.ns)
	if err != nil {
		return err
	}
	for i := range ents {
		e := &ents[i]
		q := child(p, e.name)
		if err := c.xattrChecks(li, fd, q, e.name, e, false); err != nil {
			return err
		}
		c.nameChecks(li, p, q, e, dir)
		if upper && e.kind.IsWhiteout() {
			if err := c.upperWhiteout(q, e, dir); err != nil {
				return err
			}
		}
		if !upper && e.kind == XattrWhiteout && opacity != whiteout.XattrWhiteouts {
			c.add(Problem{Code: XwhiteoutUnmarked, Severity: SeverityError, Layer: li, Role: "lower", Path: q,
				Message: fmt.Sprintf("an xattr whiteout in a directory not marked %s=x: lookup hides the name but readdir lists it", c.ns.Opaque())})
		}
		if e.kind == Dir {
			cfd, err := unix.Openat(fd, e.name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("%s: open %s: %w", c.s.layers[li], q, err)
			}
			err = c.walkDir(li, cfd, q)
			unix.Close(cfd)
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// upperDir is what the checks need to know of one upper directory.
type upperDir struct {
	path string
	// opaque: the directory is opaque.
	opaque bool
	// willBeOpaque: it is, or will be once repair converts its foreign
	// opaque marker (".wh..wh..opq", user.fuseoverlayfs.opaque).
	willBeOpaque bool
	// merged: lower directories are merged into it (it is not opaque and
	// a lower layer holds a directory there).
	merged bool
	names  map[string]bool
	// lowers are its lower copies, top first, where the lookup found them
	// (a redirect may have moved them).
	lowers []unionfs.DirLayer
	// refused: its lookup fails (a redirect the kernel rejects, reported
	// as BAD_REDIRECT): what its whiteouts hide is unknown.
	refused bool
}

func (c *checker) upperDir(fd int, p string, ents []dirEntry) (*upperDir, error) {
	d := &upperDir{path: p, names: map[string]bool{}}
	op, err := whiteout.GetOpacity(fd, "", c.ns)
	if err != nil {
		return nil, err
	}
	d.opaque = op == whiteout.Opaque
	d.willBeOpaque = d.opaque
	for _, e := range ents {
		d.names[e.name] = true
	}
	if d.names[ociOpaque] {
		d.willBeOpaque = true
	}
	if v, err := sysx.GetxattrAll(fd, "", foOpaque); err == nil && string(v) == "y" {
		d.willBeOpaque = true
	}
	r, err := c.s.view.Resolve(p)
	if err != nil && lookupRefused(err) {
		d.refused = true
		return d, nil
	}
	if err != nil {
		return nil, err
	}
	d.merged = len(r.Dirs) > 1
	if d.merged {
		d.lowers = r.Dirs[1:]
	}
	return d, nil
}

// hides reports whether a whiteout named name in upper directory d would
// hide something: d merges lower directories, and the first of them that
// holds name holds something else than a whiteout
// (fs/overlayfs/namei.c:ovl_lower_positive).
func (c *checker) hides(d *upperDir, name string) (bool, error) {
	if d.opaque || !d.merged {
		return false, nil
	}
	for _, l := range d.lowers {
		o, err := c.s.Probe(l.Layer, child(l.Path, name))
		if err != nil {
			return false, err
		}
		if o.Kind != None {
			return !o.Kind.IsWhiteout(), nil
		}
	}
	return false, nil
}

// upperWhiteout checks a whiteout of the upper dir.
func (c *checker) upperWhiteout(q string, e *dirEntry, d *upperDir) error {
	if d.refused {
		return nil
	}
	remove := func() error { return c.unlink(q) }
	if d.opaque {
		c.add(Problem{Code: WhiteoutInOpaque, Severity: SeverityError, Layer: 0, Role: "upper", Path: q,
			Message: fmt.Sprintf("a %s inside an opaque directory hides nothing; kernel readdir lists it as a name that cannot be looked up", e.kind),
			Repair:  "remove the whiteout", fix: remove})
		return nil
	}
	need, err := c.hides(d, e.name)
	if err != nil {
		return err
	}
	if !need {
		msg := fmt.Sprintf("the %s hides nothing: no lower layer merged here holds %s", e.kind, q)
		if !d.merged {
			msg = fmt.Sprintf("the %s hides nothing: %s is not merged with any lower directory; kernel readdir lists it as a name that cannot be looked up", e.kind, d.path)
		}
		c.add(Problem{Code: OrphanWhiteout, Severity: SeverityWarning, Layer: 0, Role: "upper", Path: q,
			Message: msg, Repair: "remove the whiteout", fix: remove})
		if !d.merged {
			c.probs[len(c.probs)-1].Severity = SeverityError
		}
		return nil
	}
	if e.kind == XattrWhiteout {
		c.add(Problem{Code: XwhiteoutInUpper, Severity: SeverityError, Layer: 0, Role: "upper", Path: q,
			Message: "an xattr whiteout in the upper dir: lookup honours it, but kernel readdir lists the name (xattr whiteouts are a lower-layer format)",
			Repair:  "replace it by a 0/0 whiteout",
			fix: func() error {
				return c.s.withParent(0, q, func(dirfd int, name string) error {
					if err := unix.Unlinkat(dirfd, name, 0); err != nil {
						return err
					}
					return whiteout.Create(dirfd, name)
				})
			}})
	}
	return nil
}

// Foreign markers.
const (
	ociOpaque       = ".wh..wh..opq"
	foPrefix        = "user.fuseoverlayfs."
	foOpaque        = "user.fuseoverlayfs.opaque"
	foOverrideStat  = "user.fuseoverlayfs.override_stat"
	ctrOverrideStat = "user.containers.override_stat"
)

// nameChecks flags entries whose name is another tool's marker.
func (c *checker) nameChecks(li int, p, q string, e *dirEntry, d *upperDir) {
	role := c.s.layers[li].Role
	upper := d != nil
	name := e.name
	if strings.Count(q, "/") == 1 && (name == ".unionfs" || name == ".unionfs-fuse" || name == "GOUNIONFS_DELETIONS") {
		c.add(Problem{Code: ForeignMarker, Severity: SeverityError, Layer: li, Role: role, Path: q,
			Message: "deletion records of unionfs-fuse or go-fuse unionfs: overlay ignores them, so what that tool deleted is visible here"})
		return
	}
	if !strings.HasPrefix(name, ".wh.") {
		return
	}
	switch {
	case name == ociOpaque:
		pr := Problem{Code: ForeignMarker, Severity: SeverityError, Layer: li, Role: role, Path: q,
			Message: "an OCI opaque-directory marker: overlay shows it as a file and does not make the directory opaque"}
		if upper {
			merged := d.merged && !d.opaque
			pr.Repair = "make the directory opaque (" + c.ns.Opaque() + "=y), remove its whiteouts and the marker"
			if !merged {
				pr.Repair = "remove the marker (the directory merges nothing)"
			}
			pr.fix = func() error {
				if merged {
					if err := c.makeOpaque(p); err != nil {
						return err
					}
				}
				return c.unlink(q)
			}
		} else {
			pr.Message += " (this layer was extracted without converting OCI markers)"
		}
		c.add(pr)
	case strings.HasPrefix(name, ".wh..wh."):
		c.add(Problem{Code: ForeignMarker, Severity: SeverityWarning, Layer: li, Role: role, Path: q,
			Message: "an AUFS metadata entry: overlay shows it as an ordinary entry"})
	default:
		target := name[len(".wh."):]
		pr := Problem{Code: ForeignMarker, Severity: SeverityError, Layer: li, Role: role, Path: q,
			Message: fmt.Sprintf("an OCI/AUFS whiteout: overlay shows it as a file and does not hide %s", child(p, target))}
		if upper {
			pr.Message += " (fuse-overlayfs writes these when it cannot create 0/0 devices)"
			need := false
			if !d.names[target] && !d.willBeOpaque {
				need, _ = c.hides(d, target)
			}
			pr.Repair = "remove the marker (nothing to hide)"
			if need {
				pr.Repair = "replace it by a 0/0 whiteout named " + target
			}
			pr.fix = func() error {
				return c.s.withParent(0, q, func(dirfd int, n string) error {
					if need {
						if err := whiteout.Create(dirfd, target); err != nil && !errors.Is(err, unix.EEXIST) {
							return err
						}
					}
					return unix.Unlinkat(dirfd, n, 0)
				})
			}
		} else {
			pr.Message += " (this layer was extracted without converting OCI markers)"
		}
		c.add(pr)
	}
}

// makeOpaque marks upper directory p opaque and removes the whiteouts in
// it, which an opaque directory does not need.
func (c *checker) makeOpaque(p string) error {
	return c.s.withParent(0, p, func(dirfd int, n string) error {
		if err := whiteout.SetOpaque(dirfd, n, c.ns); err != nil {
			return err
		}
		if n == "" {
			n = "."
		}
		fd, err := unix.Openat(dirfd, n, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		names, err := cow.ReadNames(fd)
		if err != nil {
			return err
		}
		for _, name := range names {
			var st unix.Stat_t
			if unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil {
				continue
			}
			if k, err := classify(fd, name, &st, c.ns); err == nil && k.IsWhiteout() {
				if err := unix.Unlinkat(fd, name, 0); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// knownPrivate are the kernel's overlay xattr names (fs/overlayfs/
// overlayfs.h: enum ovl_xattr), without the prefix.
var knownPrivate = map[string]bool{"opaque": true, "redirect": true, "origin": true, "impure": true, "nlink": true,
	"upper": true, "uuid": true, "metacopy": true, "protattr": true, "whiteout": true, "whiteouts": true}

// xattrChecks flags markers in the xattrs of entry q (name in dirfd; ""
// for the layer root).
func (c *checker) xattrChecks(li, dirfd int, q, name string, e *dirEntry, root bool) error {
	role := c.s.layers[li].Role
	upper := li == 0 && c.s.upper
	for _, x := range e.xattrs {
		switch {
		case c.other.IsPrivate(x) && !c.other.IsEscaped(x):
			suffix := x[len(c.other.Prefix()):]
			if !knownPrivate[suffix] {
				continue
			}
			c.otherMarkers++
			sev := SeverityWarning
			if suffix == "opaque" || suffix == "whiteout" {
				sev = SeverityError
			}
			c.add(Problem{Code: WrongNS, Severity: sev, Layer: li, Role: role, Path: q,
				Message: fmt.Sprintf("%s belongs to the %s format; this stack reads %s*, so it is ignored", x, c.other, c.ns.Prefix())})
		case c.ns.IsPrivate(x) && !c.ns.IsEscaped(x):
			if err := c.ownMarker(li, dirfd, q, name, e, x, root, upper); err != nil {
				return err
			}
		case x == foOpaque:
			p := Problem{Code: ForeignMarker, Severity: SeverityError, Layer: li, Role: role, Path: q,
				Message: "fuse-overlayfs' opaque marker: overlay ignores it"}
			if upper && !root && e.kind == Dir {
				merged := true
				if r, err := c.s.view.Resolve(q); err == nil {
					merged = len(r.Dirs) > 1
				}
				p.Repair = "replace it by " + c.ns.Opaque() + "=y (and remove the directory's whiteouts)"
				p.fix = func() error {
					if merged {
						if err := c.makeOpaque(q); err != nil {
							return err
						}
					}
					return c.s.withParent(0, q, func(dirfd int, n string) error { return sysx.Removexattr(dirfd, n, foOpaque) })
				}
			}
			c.add(p)
		case x == foOverrideStat || x == ctrOverrideStat:
			c.add(Problem{Code: ForeignMarker, Severity: SeverityError, Layer: li, Role: role, Path: q,
				Message: x + ": fuse-overlayfs shows the owner and mode stored there; overlay shows the file's own"})
		case strings.HasPrefix(x, foPrefix):
			c.add(Problem{Code: ForeignMarker, Severity: SeverityWarning, Layer: li, Role: role, Path: q,
				Message: x + ": fuse-overlayfs metadata, unused by overlay"})
		}
	}
	return nil
}

// ownMarker checks one overlay-private xattr x of the stack's namespace.
func (c *checker) ownMarker(li, dirfd int, q, name string, e *dirEntry, x string, root, upper bool) error {
	role := c.s.layers[li].Role
	suffix := x[len(c.ns.Prefix()):]
	bad := func(msg string) {
		p := Problem{Code: BadMarker, Severity: SeverityWarning, Layer: li, Role: role, Path: q, Message: msg}
		if upper {
			p.Repair = "remove " + x
			p.fix = func() error {
				return c.s.withParent(0, q, func(dirfd int, n string) error { return sysx.Removexattr(dirfd, n, x) })
			}
		}
		c.add(p)
	}
	switch suffix {
	case "opaque":
		c.ownMarkers++
		v, err := sysx.GetxattrAll(dirfd, name, x)
		if sysx.IsNoAttr(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: read %s of %s: %w", c.s.layers[li], x, q, err)
		}
		op := whiteout.ParseOpacity(v)
		switch {
		case op == whiteout.NotOpaque:
			bad(fmt.Sprintf("%s=%q: the kernel only knows \"y\" and \"x\" and ignores it", x, v))
		case e.kind != Dir:
			bad(fmt.Sprintf("%s on a %s: only directories can be opaque", x, e.kind))
		case root && op == whiteout.Opaque:
			bad(fmt.Sprintf("%s=y on a layer root is ignored", x))
		}
	case "whiteout":
		c.ownMarkers++
		if e.kind != XattrWhiteout {
			bad(fmt.Sprintf("%s on a %s: only a zero-size regular file is an xattr whiteout", x, e.kind))
		}
	case "redirect":
		c.ownMarkers++
		return c.redirectMarker(li, dirfd, q, name, e, x, root, bad)
	case "metacopy":
		c.add(Problem{Code: UnsupportedFeature, Severity: SeverityError, Layer: li, Role: role, Path: q,
			Message: x + ": a metadata-only copy-up (metacopy=on) whose data stays in a lower file; strata shows this layer's copy, without that data"})
	}
	return nil
}

// redirectMarker checks overlay.redirect x of entry q (name in dirfd) of
// layer li as a lookup reads it (fs/overlayfs/namei.c:ovl_lookup_single,
// ovl_check_redirect): only on a directory that is not opaque and not in
// the bottom layer; bad reports a marker the kernel ignores.
func (c *checker) redirectMarker(li, dirfd int, q, name string, e *dirEntry, x string, root bool, bad func(string)) error {
	role := c.s.layers[li].Role
	v, err := sysx.GetxattrAll(dirfd, name, x)
	if sysx.IsNoAttr(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: read %s of %s: %w", c.s.layers[li], x, q, err)
	}
	switch {
	case root || li == len(c.s.layers)-1:
		return nil // never read: a layer root is not looked up; nothing lies below the bottom layer
	case e.kind != Dir:
		if !slices.Contains(e.xattrs, c.ns.Prefix()+"metacopy") { // a metacopy file's data redirect: see metacopy
			bad(fmt.Sprintf("%s on a %s: only directories are redirected, the kernel ignores it", x, e.kind))
		}
		return nil
	}
	op, err := whiteout.GetOpacity(dirfd, name, c.ns)
	if err != nil {
		return err
	}
	if op == whiteout.Opaque {
		bad(fmt.Sprintf("%s on an opaque directory: it merges nothing below, so the kernel ignores the redirect", x))
		return nil
	}
	fail := func(msg string) {
		c.add(Problem{Code: BadRedirect, Severity: SeverityError, Layer: li, Role: role, Path: q, Message: msg})
	}
	r, err := whiteout.ParseRedirect(v)
	switch {
	case err != nil:
		fail(fmt.Sprintf("%s=%q is malformed (a redirect is /path/from/the/layer/roots or one name): lookups of this directory fail with EINVAL", x, v))
	case slices.Contains(append(r.Comps, r.Name), "..") || slices.Contains(append(r.Comps, r.Name), "."):
		fail(fmt.Sprintf("%s=%q names . or ..: lookups that reach that component fail with EACCES", x, v))
	case c.ns == whiteout.User:
		// With userxattr the kernel reads a redirect when a layer below
		// holds the parent directory (the lookup goes on there).
		parent := q[:strings.LastIndexByte(q, '/')+1]
		for j := li + 1; j < len(c.s.layers); j++ {
			if o, err := c.s.Probe(j, parent); err == nil && o.Kind == Dir {
				fail(fmt.Sprintf("%s=%q: with userxattr the kernel does not follow redirects (redirect_dir=nofollow), so lookups of this directory fail with EPERM", x, v))
				break
			}
		}
	}
	return nil
}

// unlink removes the non-directory at upper path q.
func (c *checker) unlink(q string) error {
	return c.s.withParent(0, q, func(dirfd int, name string) error { return unix.Unlinkat(dirfd, name, 0) })
}

// work checks workdir/work.
func (c *checker) work() error {
	fd, err := unix.Open(c.o.Work+"/work", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return &unionfs.LayerError{Role: "workdir", Path: c.o.Work + "/work", Err: err}
	}
	names, err := cow.ReadNames(fd)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("readdir %s/work: %w", c.o.Work, err)
	}
	sort.Strings(names)
	for _, n := range names {
		var st unix.Stat_t
		if err := unix.Fstatat(fd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			continue
		}
		if whiteout.IsCharWhiteout(&st) {
			continue // the kernel's shared whiteout, kept between mounts
		}
		if n == "incompat" {
			var vst unix.Stat_t
			if unix.Fstatat(fd, "incompat/volatile", &vst, unix.AT_SYMLINK_NOFOLLOW) == nil {
				c.add(Problem{Code: VolatileDirty, Severity: SeverityError, Layer: -1, Role: "work", Path: "work/incompat/volatile",
					Message: "a volatile mount used this stack: the kernel refuses to mount it until this is removed; after a crash the upper dir may have lost writes, so remove it only if the last volatile mount was unmounted cleanly"})
			}
			continue
		}
		name := n
		c.add(Problem{Code: WorkLeftover, Severity: SeverityWarning, Layer: -1, Role: "work", Path: "work/" + n,
			Message: fmt.Sprintf("a leftover %s in the work dir (an interrupted copy-up or a crash); the next mount clears it", kindOf(&st)),
			Repair:  "remove it",
			fix: func() error {
				wfd, err := unix.Open(c.o.Work+"/work", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
				if err != nil {
					return err
				}
				defer unix.Close(wfd)
				return cow.RemoveAllAt(wfd, name)
			}})
	}
	unix.Close(fd)
	if ifd, err := unix.Open(c.o.Work+"/index", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err == nil {
		if n, _ := cow.ReadNames(ifd); len(n) > 0 {
			c.notes = append(c.notes, fmt.Sprintf("workdir/index holds %d entries: a kernel mount with index=on used this stack; strata does not use the index", len(n)))
		}
		unix.Close(ifd)
	}
	return nil
}
