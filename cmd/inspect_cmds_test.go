package cmd

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"strata/inspect"
	"strata/internal/testenv"
)

// inspectStack builds the fixture of engines_test.go (a whiteout, an
// opaque dir, a changed file, a symlink) and returns its -o options.
func inspectStack(t *testing.T) (opts, l, u, w string) {
	t.Helper()
	testenv.RequireMknod(t)
	_, l, u, w, _ = stack(t)
	ns, x := "trusted", ""
	if os.Geteuid() != 0 {
		ns, x = "user", ",userxattr"
	}
	fixture(t, l, u, ns)
	return "lowerdir=" + l + ",upperdir=" + u + ",workdir=" + w + x, l, u, w
}

func TestInspectCommandsHelp(t *testing.T) {
	for name, flags := range map[string][]string{
		"explain": {"--options", "--json"},
		"diff":    {"--options", "--json"},
		"fsck":    {"--options", "--json", "--repair", "ORPHAN_WHITEOUT", "WORK_LEFTOVER", "16 usage error"},
		"merge":   {"--options", "--json", "--output", "--into", "--apply", "--reset-upper", "--no-verify"},
	} {
		code, out, _ := runMain(name, "--help")
		if code != 0 {
			t.Errorf("%s --help: exit %d", name, code)
		}
		for _, f := range flags {
			if !strings.Contains(out, f) {
				t.Errorf("%s --help does not mention %s", name, f)
			}
		}
	}
}

func TestExplainCommand(t *testing.T) {
	opts, l, u, _ := inspectStack(t)
	code, out, errb := runMain("explain", "-o", opts, "/gone", "d/a", "/op/hidden")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errb)
	}
	for _, want := range []string{
		"/gone: not visible: whiteout in layer 0 (upper " + u + ")",
		"  0 upper " + u + "  whiteout (char 0/0)",
		"  1 lower " + l + "  file 0644 0:0 20B",
		"hidden by a whiteout at /gone in layer 0 (upper " + u + ")",
		"/d/a: file from layer 0",
		"/op/hidden: not visible; hidden: parent /op is opaque in layer 0",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.TrimRight(line, " ") != line {
			t.Errorf("trailing blanks: %q", line)
		}
	}
	// JSON, and no workdir needed.
	noWork := strings.Split(opts, ",workdir=")[0]
	if strings.Contains(opts, "userxattr") {
		noWork += ",userxattr"
	}
	code, out, errb = runMain("explain", "--json", "-o", noWork, "/gone")
	if code != 0 {
		t.Fatalf("--json without workdir: exit %d: %s", code, errb)
	}
	var ex []inspect.Explanation
	if err := json.Unmarshal([]byte(out), &ex); err != nil {
		t.Fatalf("JSON: %v\n%s", err, out)
	}
	if len(ex) != 1 || ex[0].Found || ex[0].WhiteoutLayer != 0 || ex[0].Layers[1].State != "hidden" ||
		!strings.Contains(out, `"holds": "whiteout"`) {
		t.Errorf("JSON: %s", out)
	}
}

func TestInspectUsageErrors(t *testing.T) {
	opts, _, _, _ := inspectStack(t)
	for _, c := range []struct {
		args []string
		code int
	}{
		{[]string{"explain", "-o", opts}, 2},                     // no PATH
		{[]string{"explain", "/x"}, 2},                           // no -o
		{[]string{"explain", "-o", "upperdir=/u", "/x"}, 2},      // no lowerdir
		{[]string{"explain", "-o", "lowerdir=/a,bogus", "/"}, 2}, // unknown option
		{[]string{"diff", "-o", opts, "extra"}, 2},
		{[]string{"diff", "-o", strings.Split(opts, ",upperdir")[0]}, 2}, // no upper
		{[]string{"merge", "-o", opts}, 2},                               // neither --output nor --into
		{[]string{"merge", "-o", opts, "--into", "--output", "/x"}, 2},
		{[]string{"fsck"}, 16},
		{[]string{"fsck", "-o", opts, "extra"}, 16},
		{[]string{"fsck", "-o", "lowerdir=/a,bogus"}, 16},
	} {
		code, _, errb := runMain(c.args...)
		if code != c.code {
			t.Errorf("%v: exit %d, want %d (%s)", c.args, code, c.code, errb)
		}
	}
}

func TestDiffCommand(t *testing.T) {
	opts, _, _, _ := inspectStack(t)
	code, out, errb := runMain("diff", "-o", opts)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errb)
	}
	want := "C  /d/a\nD  /gone\nD  /op/hidden\nA  /op/visible\n"
	if out != want {
		t.Errorf("diff:\n%s\nwant:\n%s", out, want)
	}
	code, out, _ = runMain("diff", "--json", "-o", opts)
	var changes []inspect.Change
	if err := json.Unmarshal([]byte(out), &changes); code != 0 || err != nil || len(changes) != 4 ||
		changes[0].Kind != inspect.Changed || changes[0].Fields[0] != "content" {
		t.Errorf("--json: exit %d, %v: %s", code, err, out)
	}
	// metadata-only changes are marked
	if err := os.Chmod(filepath.Join(strings.Split(strings.Split(opts, "upperdir=")[1], ",")[0], "d", "a"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(strings.Split(strings.Split(opts, "lowerdir=")[1], ",")[0], "d", "a"), []byte("upper a"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, out, _ = runMain("diff", "-o", opts)
	if !strings.HasPrefix(out, "C  /d/a (metadata)\n") {
		t.Errorf("after making d/a the same data: %s", out)
	}
}

func TestFsckCommandExitCodes(t *testing.T) {
	opts, l, u, w := inspectStack(t)
	run := func(args ...string) (int, string) {
		t.Helper()
		code, out, errb := runMain(append([]string{"fsck", "-o", opts}, args...)...)
		return code, out + errb
	}
	if code, out := run(); code != 0 || !strings.Contains(out, "no problems") {
		t.Errorf("clean stack: exit %d: %s", code, out)
	}
	// Repairable problems: exit 4, then 1 with --repair, then 0.
	if err := os.MkdirAll(filepath.Join(u, "pure"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(filepath.Join(u, "pure", "w"), unix.S_IFCHR, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(w, "work"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w, "work", "#leftover"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	code, out := run()
	if code != 4 || !strings.Contains(out, "ORPHAN_WHITEOUT") || !strings.Contains(out, "WORK_LEFTOVER") || !strings.Contains(out, "[--repair: remove") {
		t.Errorf("dry run: exit %d: %s", code, out)
	}
	if _, err := os.Lstat(filepath.Join(u, "pure", "w")); err != nil {
		t.Errorf("the dry run removed the whiteout: %v", err)
	}
	if code, out := run("--repair"); code != 1 || !strings.Contains(out, "fixed   ORPHAN_WHITEOUT /pure/w: remove the whiteout") {
		t.Errorf("--repair: exit %d: %s", code, out)
	}
	if code, out := run(); code != 0 {
		t.Errorf("after repair: exit %d: %s", code, out)
	}
	// Some fixed, some left: 1+4.
	if err := os.WriteFile(filepath.Join(l, ".wh.x"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(filepath.Join(u, "pure", "w"), unix.S_IFCHR, 0); err != nil {
		t.Fatal(err)
	}
	code, out = run("--repair", "--json")
	var rep struct {
		inspect.FsckReport
		ExitCode int `json:"exit_code"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || code != 5 || rep.ExitCode != 5 || len(rep.Remaining) != 1 || rep.Remaining[0].Code != "FOREIGN_MARKER" {
		t.Errorf("--repair --json: exit %d, %v: %s", code, err, out)
	}
	// Operational error: a layer is missing.
	code, _, errb := runMain("fsck", "-o", "lowerdir="+filepath.Join(l, "missing"))
	if code != 8 || !strings.Contains(errb, "missing") {
		t.Errorf("missing layer: exit %d: %s", code, errb)
	}
}

func TestMergeCommand(t *testing.T) {
	opts, _, u, _ := inspectStack(t)
	out := filepath.Join(t.TempDir(), "merged")
	code, stdout, errb := runMain("merge", "-o", opts, "--output", out)
	if code != 0 || !strings.Contains(stdout, "dry run: nothing changed") || !strings.Contains(stdout, "copy  /d/a         file from the upper dir") {
		t.Errorf("dry run: exit %d: %s%s", code, stdout, errb)
	}
	if _, err := os.Lstat(out); err == nil {
		t.Errorf("the dry run created %s", out)
	}
	code, stdout, errb = runMain("merge", "--json", "-o", opts, "--output", out, "--apply")
	var plan inspect.MergePlan
	if err := json.Unmarshal([]byte(stdout), &plan); code != 0 || err != nil || !plan.Applied || !plan.Verified || plan.Target != out {
		t.Fatalf("--apply --json: exit %d, %v: %s%s", code, err, stdout, errb)
	}
	// The new stack, without the upper dir, is clean and shows no change
	// against itself; the old upper is untouched.
	newOpts := plan.NewOptions
	if code, o, e := runMain("fsck", "-o", newOpts); code != 0 {
		t.Errorf("fsck of the new stack: exit %d: %s%s", code, o, e)
	}
	if ents, _ := os.ReadDir(u); len(ents) == 0 {
		t.Errorf("merge without --reset-upper emptied the upper dir")
	}
	if code, _, errb := runMain("merge", "-o", opts, "--output", out); code != 1 || !strings.Contains(errb, "not empty") {
		t.Errorf("merge onto a non-empty output: exit %d: %s", code, errb)
	}
}
