package cmd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"unicode"
	"unicode/utf8"

	"github.com/spf13/pflag"

	"strata/inspect"
	"strata/unionfs"
)

// The layer tools: explain, diff, fsck, merge. They work offline on the
// same -o options as mount; the logic lives in package inspect.

// stackFlags are the flags every layer tool takes.
type stackFlags struct {
	options []string
	json    bool
}

func (f *stackFlags) register(fs *pflag.FlagSet) {
	fs.StringArrayVarP(&f.options, "options", "o", nil, "the stack, as for mount (may repeat): lowerdir=TOP:...:BOTTOM[,upperdir=DIR[,workdir=DIR]][,userxattr]")
	fs.BoolVar(&f.json, "json", false, "print JSON")
}

// stack parses -o; workdir may be left out.
func (f *stackFlags) stack() (unionfs.Options, error) {
	if len(f.options) == 0 {
		return unionfs.Options{}, usagef("missing -o lowerdir=...")
	}
	o, err := inspect.ParseOptions(strings.Join(f.options, ","))
	if err != nil {
		return o, usagef("%v", err)
	}
	return o, nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// showPath renders a path on one line: quoted when it holds control
// characters, invalid UTF-8 or leading/trailing spaces, so that every
// output line parses.
func showPath(p string) string {
	if !utf8.ValidString(p) || strings.IndexFunc(p, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0 ||
		strings.TrimSpace(p) != p {
		return strconv.Quote(p)
	}
	return p
}

const stackHelp = `The stack is given with -o, in the syntax of mount: lowerdir=A:B:C (top first),
upperdir=, workdir= (optional here: nothing writes through it), userxattr
(read user.overlay.* markers instead of trusted.overlay.*). Nothing is
mounted. Layers are numbered top down: the upper dir is layer 0, the lowers
follow (without an upper dir the top lower is layer 0).`

func init() {
	register(&command{
		name: "explain", args: "[flags] -o OPTIONS PATH...", summary: "show how paths resolve through a layer stack, layer by layer",
		help: `For each PATH (from the merged root), shows what the merged tree has there and
which layer decides, then what every layer holds at that path (file,
directory, symlink, whiteout, xattr whiteout, opaque directory, nothing) and
why it shows or not: hidden by a whiteout, by an opaque directory, by a
non-directory above, or merged. The verdict comes from the mount's own
lookup code.

` + stackHelp,
		setup: func(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
			f := &stackFlags{}
			f.register(fs)
			return func(ctx context.Context, e *env, args []string) error { return runExplain(e, f, args) }
		},
	})
	register(&command{
		name: "diff", args: "[flags] -o OPTIONS", summary: "list what the upper dir changes, like docker diff",
		help: `Lists the changes the upper dir makes to the merged tree of the lowers, one per
line: A added, C changed, D deleted. "C PATH (metadata)" means only mode,
owner, times or xattrs changed. A type change is a D and an A; a deleted
directory is one D line, an added one an A line per entry; an opaque
directory deletes (D) each lower entry it hides. Directory times are not
compared.

` + stackHelp,
		setup: func(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
			f := &stackFlags{}
			f.register(fs)
			return func(ctx context.Context, e *env, args []string) error { return runDiff(e, f, args) }
		},
	})
	register(&command{
		name: "fsck", args: "[flags] -o OPTIONS", summary: "check a layer stack offline; --repair fixes what is safe",
		usageCode: fsckUsage,
		help: `Checks the upper dir against the lowers, every layer for markers that do not
belong there, and the work dir. Each problem has a stable code:

  ORPHAN_WHITEOUT      whiteout in the upper dir with nothing below to hide   (repair: remove)
  WHITEOUT_IN_OPAQUE   whiteout inside an opaque upper directory              (repair: remove)
  XWHITEOUT_IN_UPPER   xattr whiteout in the upper dir                        (repair: 0/0 whiteout)
  XWHITEOUT_UNMARKED   xattr whiteout in a lower dir not marked opaque=x
  FOREIGN_MARKER       .wh. files, fuse-overlayfs or unionfs markers          (repair: convert .wh.
                       whiteouts/opaque markers in the upper dir to the kernel format)
  WRONG_NS             overlay xattrs of the other namespace (trusted/user)
  BAD_MARKER           overlay.opaque/whiteout/redirect the kernel ignores    (repair: remove)
  BAD_REDIRECT         overlay.redirect whose lookups fail: malformed (EINVAL),
                       a ./.. component (EACCES), any with userxattr (EPERM)
  UNSUPPORTED_FEATURE  overlay.metacopy
  WORK_LEFTOVER        entries left in workdir/work                           (repair: remove)
  WORK_OTHER_FS        upper and work dirs on different filesystems
  LAYER_OVERLAP        layer directories inside one another
  VOLATILE_DIRTY       a volatile mount's marker: the kernel refuses to mount

Nothing changes without --repair. Lower layers are never changed. --repair
refuses to run while a mount uses the stack.

Exit status (fsck(8)): 0 no problems, 1 problems corrected, 4 problems left
uncorrected (1+4=5: some of each), 8 operational error, 16 usage error.

` + stackHelp,
		setup: func(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
			f := &stackFlags{}
			f.register(fs)
			repair := fs.Bool("repair", false, "fix what is safe and report what changed")
			return func(ctx context.Context, e *env, args []string) error { return runFsck(e, f, *repair, args) }
		},
	})
	register(&command{
		name: "merge", args: "[flags] -o OPTIONS (--output DIR | --into)", summary: "fold the upper dir into a new lower layer (dry run unless --apply)",
		help: `Folds the upper dir into the top lower layer, so that a long-lived upper dir
can be committed: the result is a layer in the kernel format such that the
stack "lowerdir=RESULT:REST" (without the upper dir) shows exactly the tree
the whole stack shows now. --output DIR writes the result to a new directory
(copying, with reflinks where the filesystem can); --into rebuilds the top
lower in place (hard-linking its unchanged objects, so no data is copied) —
every other stack using that layer changes too.

Without --apply it prints the plan: what comes from the upper dir and the
whiteouts and opaque directories the new layer needs. With --apply it builds
the layer in a temporary directory beside the target, compares its merged
tree with the stack's (--no-verify skips that), and moves it into place with
one rename (--into: an atomic exchange). --reset-upper then empties the upper
dir (atomically) so the stack continues from the new layer. It refuses to run
while a mount uses the stack.

` + stackHelp,
		setup: func(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
			f := &stackFlags{}
			f.register(fs)
			mo := &inspect.MergeOptions{}
			fs.StringVar(&mo.Output, "output", "", "directory for the new layer (must not exist, or be empty)")
			fs.BoolVar(&mo.Into, "into", false, "rebuild the top lower layer in place instead of writing a new one")
			fs.BoolVar(&mo.Apply, "apply", false, "perform the merge (default: print the plan)")
			fs.BoolVar(&mo.ResetUpper, "reset-upper", false, "after merging, empty the upper dir and the work dir's scratch area")
			fs.BoolVar(&mo.NoVerify, "no-verify", false, "skip comparing the merged tree before and after")
			return func(ctx context.Context, e *env, args []string) error { return runMerge(ctx, e, f, mo, args) }
		},
	})
}

func runExplain(e *env, f *stackFlags, args []string) error {
	if len(args) == 0 {
		return usagef("want at least one PATH")
	}
	o, err := f.stack()
	if err != nil {
		return err
	}
	s, err := inspect.Open(o)
	if err != nil {
		return err
	}
	defer s.Close()
	ex, err := s.Explain(args...)
	if err != nil {
		return err
	}
	if f.json {
		return writeJSON(e.stdout, ex)
	}
	for i, x := range ex {
		if i > 0 {
			fmt.Fprintln(e.stdout)
		}
		printExplanation(e.stdout, &x)
	}
	return nil
}

func printExplanation(w io.Writer, x *inspect.Explanation) {
	fmt.Fprintf(w, "%s: %s\n", showPath(x.Path), x.Verdict)
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	for _, l := range x.Layers {
		h := holds(&l)
		if l.At != "" {
			h = "at " + showPath(l.At) + ": " + h
		}
		fmt.Fprintf(tw, "  %d %s %s\t%s\t%s\t%s\n", l.Index, l.Role, showPath(l.Path), h, l.State, l.Reason)
	}
	tw.Flush()
	writeTrimmed(w, b.String())
	for _, l := range x.Layers {
		for _, n := range l.Notes {
			fmt.Fprintf(w, "  note (layer %d): %s\n", l.Index, n)
		}
	}
}

// plural renders n with the singular or plural noun (plural: noun+"s"
// unless given).
func plural(n int, noun string, pl ...string) string {
	if n == 1 {
		return "1 " + noun
	}
	if len(pl) > 0 {
		return fmt.Sprintf("%d %s", n, pl[0])
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// writeTrimmed writes text with the trailing blanks of each line removed
// (tabwriter pads every cell, the last one too when it is empty).
func writeTrimmed(w io.Writer, text string) {
	for _, line := range strings.SplitAfter(text, "\n") {
		if line == "" {
			continue
		}
		fmt.Fprintln(w, strings.TrimRight(line, " \n"))
	}
}

// holds describes a layer's object in a few words.
func holds(l *inspect.LayerView) string {
	switch l.Holds {
	case inspect.None:
		return "nothing"
	case inspect.Symlink:
		return fmt.Sprintf("symlink -> %s", showPath(l.Target))
	case inspect.Whiteout:
		return "whiteout (char 0/0)"
	case inspect.XattrWhiteout:
		return "xattr whiteout"
	}
	s := fmt.Sprintf("%s %s %d:%d", l.Holds, l.Mode, l.UID, l.GID)
	if l.Holds == inspect.File {
		s += fmt.Sprintf(" %dB", l.Size)
	}
	if l.Opacity != "" {
		s += " opaque=" + l.Opacity
	}
	return s
}

func runDiff(e *env, f *stackFlags, args []string) error {
	if len(args) > 0 {
		return usagef("takes no arguments")
	}
	o, err := f.stack()
	if err != nil {
		return err
	}
	if o.Upper == "" {
		return usagef("diff needs upperdir= in -o")
	}
	s, err := inspect.Open(o)
	if err != nil {
		return err
	}
	defer s.Close()
	changes, err := s.Diff()
	if err != nil {
		return err
	}
	if f.json {
		if changes == nil {
			changes = []inspect.Change{}
		}
		return writeJSON(e.stdout, changes)
	}
	for _, c := range changes {
		line := fmt.Sprintf("%s  %s", c.Kind, showPath(c.Path))
		if c.MetadataOnly {
			line += " (metadata)"
		}
		fmt.Fprintln(e.stdout, line)
	}
	return nil
}

// fsck(8) exit statuses of the layer checker.
const (
	fsckOperational = 8
	fsckUsage       = 16
)

func runFsck(e *env, f *stackFlags, repair bool, args []string) error {
	if len(args) > 0 {
		return &exitError{fsckUsage, errors.New("takes no arguments (the stack is given with -o)")}
	}
	o, err := f.stack()
	if err != nil {
		return &exitError{fsckUsage, err}
	}
	rep, err := inspect.Check(o, inspect.CheckOptions{Repair: repair})
	if err != nil {
		return &exitError{fsckOperational, err}
	}
	if f.json {
		out := struct {
			*inspect.FsckReport
			ExitCode int `json:"exit_code"`
		}{rep, rep.ExitCode()}
		if out.Problems == nil {
			out.Problems = []inspect.Problem{}
		}
		if out.Remaining == nil {
			out.Remaining = []inspect.Problem{}
		}
		if err := writeJSON(e.stdout, out); err != nil {
			return &exitError{fsckOperational, err}
		}
	} else {
		printFsck(e.stdout, rep, repair)
	}
	if code := rep.ExitCode(); code != 0 {
		return &exitError{code, nil}
	}
	return nil
}

func printFsck(w io.Writer, rep *inspect.FsckReport, repair bool) {
	for _, n := range rep.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	printProblems := func(ps []inspect.Problem, hint bool) {
		for _, p := range ps {
			where := p.Role
			if p.Layer >= 0 {
				where = fmt.Sprintf("layer %d (%s)", p.Layer, p.Role)
			}
			line := fmt.Sprintf("%-19s %-7s %s %s: %s", p.Code, p.Severity, where, showPath(p.Path), p.Message)
			if hint && p.Repair != "" {
				line += fmt.Sprintf(" [--repair: %s]", p.Repair)
			}
			fmt.Fprintln(w, line)
		}
	}
	if !repair {
		printProblems(rep.Problems, true)
	} else {
		for _, r := range rep.Repairs {
			if r.Error == "" {
				fmt.Fprintf(w, "fixed   %s %s: %s\n", r.Code, showPath(r.Path), r.Repair)
			} else {
				fmt.Fprintf(w, "FAILED  %s %s: %s: %s\n", r.Code, showPath(r.Path), r.Repair, r.Error)
			}
		}
		if len(rep.Remaining) > 0 {
			fmt.Fprintln(w, "remaining:")
			printProblems(rep.Remaining, false)
		}
	}
	errs, repairable := 0, 0
	for _, p := range rep.Remaining {
		if p.Severity == inspect.SeverityError {
			errs++
		}
		if p.Repair != "" {
			repairable++
		}
	}
	switch {
	case len(rep.Remaining) == 0 && rep.Corrected() == 0:
		fmt.Fprintln(w, "no problems")
	case len(rep.Remaining) == 0:
		fmt.Fprintf(w, "%s corrected, none left\n", plural(rep.Corrected(), "problem"))
	default:
		msg := fmt.Sprintf("%s left (%s, %s)", plural(len(rep.Remaining), "problem"), plural(errs, "error"), plural(len(rep.Remaining)-errs, "warning"))
		if repair {
			msg = fmt.Sprintf("%s corrected; ", plural(rep.Corrected(), "problem")) + msg
		} else if repairable > 0 {
			msg += fmt.Sprintf("; %d repairable with --repair", repairable)
		}
		fmt.Fprintln(w, msg)
	}
}

func runMerge(ctx context.Context, e *env, f *stackFlags, mo *inspect.MergeOptions, args []string) error {
	if len(args) > 0 {
		return usagef("takes no arguments (the stack is given with -o)")
	}
	o, err := f.stack()
	if err != nil {
		return err
	}
	switch {
	case o.Upper == "":
		return usagef("merge needs upperdir= in -o: there is nothing to fold")
	case mo.Into && mo.Output != "":
		return usagef("--into and --output exclude each other")
	case !mo.Into && mo.Output == "":
		return usagef("say where the result goes: --output DIR, or --into (the top lower)")
	}
	plan, err := inspect.Merge(ctx, o, *mo)
	if err != nil {
		return err
	}
	if f.json {
		if plan.Steps == nil {
			plan.Steps = []inspect.MergeStep{}
		}
		return writeJSON(e.stdout, plan)
	}
	printMerge(e.stdout, plan)
	return nil
}

func printMerge(w io.Writer, plan *inspect.MergePlan) {
	top := plan.TopLower
	if plan.Into {
		fmt.Fprintf(w, "merge: fold upper %s into the top lower %s, in place\n", showPath(plan.Upper), showPath(top))
	} else {
		fmt.Fprintf(w, "merge: fold upper %s and the top lower %s into a new layer %s\n", showPath(plan.Upper), showPath(top), showPath(plan.Target))
	}
	for _, wn := range plan.Warnings {
		fmt.Fprintf(w, "warning: %s\n", wn)
	}
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	for _, s := range plan.Steps {
		from := ""
		switch {
		case s.From == 0:
			from = "from the upper dir"
		case s.From > 0:
			from = fmt.Sprintf("from layer %d", s.From)
		}
		if s.LinkTo != "" {
			from += ", hard link to " + showPath(s.LinkTo)
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", s.Op, showPath(s.Path), strings.TrimSpace(s.Type+" "+from))
	}
	tw.Flush()
	writeTrimmed(w, b.String())
	fmt.Fprintf(w, "  (%s of %s carried over unchanged)\n", plural(plan.Carried, "object or marker", "objects and markers"), showPath(top))
	switch {
	case plan.Applied:
		v := "verified: the new stack shows the same tree"
		if !plan.Verified {
			v = "not verified (--no-verify)"
		}
		fmt.Fprintf(w, "merged into %s; %s\n", showPath(plan.Target), v)
		if plan.UpperReset {
			fmt.Fprintln(w, "the upper dir is now empty")
		}
		fmt.Fprintf(w, "the stack now: -o %s\n", plan.NewOptions)
	default:
		fmt.Fprintf(w, "after the merge the stack is: -o %s\n", plan.NewOptions)
		fmt.Fprintln(w, "dry run: nothing changed; add --apply to merge")
	}
}
