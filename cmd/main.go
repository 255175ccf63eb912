package cmd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime/debug"
	"sort"
	"strings"

	"github.com/spf13/pflag"
)

// Version is strata's version, set at build time with
// -ldflags "-X strata/cmd.Version=...".
var Version = "0.1.0-dev"

// command is one subcommand.
type command struct {
	name    string
	args    string // synopsis after the name, e.g. "[flags] MOUNTPOINT"
	summary string // one line for the command list
	help    string // longer text for --help, may be empty
	// setup registers the command's flags on f and returns the function
	// that runs it with the remaining arguments.
	setup func(f *pflag.FlagSet) func(ctx context.Context, e *env, args []string) error
	// hidden commands are not listed (internal re-exec entry points).
	hidden bool
	// usageCode is the exit status of a usage error (default 2; fsck(8)
	// conventions want 16).
	usageCode int
}

var commands = map[string]*command{}

func register(c *command) {
	if commands[c.name] != nil {
		panic("duplicate command " + c.name)
	}
	commands[c.name] = c
}

// env is what a command may use to talk to the world.
type env struct {
	stdout, stderr io.Writer
	log            *slog.Logger
	logLevel       *slog.LevelVar
}

// usageError is a bad command line: exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return &usageError{fmt.Sprintf(format, a...)} }

// exitError carries a specific exit status (fsck-style tools).
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return ""
	}
	return e.err.Error()
}
func (e *exitError) Unwrap() error { return e.err }

// Main runs strata with args (without the program name) and returns the
// process exit status.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	lv := new(slog.LevelVar)
	lv.Set(slog.LevelWarn)
	e := &env{stdout: stdout, stderr: stderr, logLevel: lv,
		log: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lv}))}

	if len(args) == 0 {
		printCommands(stderr)
		return 2
	}
	name := args[0]
	switch name {
	case "-h", "--help", "help":
		if len(args) > 1 && commands[args[1]] != nil {
			return run(ctx, e, commands[args[1]], []string{"--help"})
		}
		printCommands(stdout)
		return 0
	case "-V", "--version":
		name = "version"
	}
	c := commands[name]
	if c == nil {
		// The mount.fuse helper convention: "strata SRC MNT -o OPTS".
		if helperForm(args) {
			return run(ctx, e, commands["mount"], helperArgs(args))
		}
		fmt.Fprintf(stderr, "strata: unknown command %q (see strata --help)\n", name)
		return 2
	}
	return run(ctx, e, c, args[1:])
}

func run(ctx context.Context, e *env, c *command, args []string) int {
	f := pflag.NewFlagSet("strata "+c.name, pflag.ContinueOnError)
	f.SetOutput(e.stderr)
	f.SortFlags = false
	logLevel := f.String("log-level", "warn", "log level: debug, info, warn or error")
	runFn := c.setup(f)
	f.Usage = func() { printUsage(e.stdout, c, f) }
	if err := f.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(e.stderr, "strata %s: %v\n", c.name, err)
		return c.usage()
	}
	if err := e.logLevel.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(e.stderr, "strata %s: bad --log-level %q\n", c.name, *logLevel)
		return 2
	}
	err := runFn(ctx, e, f.Args())
	return exitCode(e, c, err)
}

// usage returns the command's exit status for a usage error.
func (c *command) usage() int {
	if c.usageCode != 0 {
		return c.usageCode
	}
	return 2
}

func exitCode(e *env, c *command, err error) int {
	name := c.name
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.err != nil && ee.err.Error() != "" {
			fmt.Fprintf(e.stderr, "strata %s: %v\n", name, ee.err)
		}
		return ee.code
	}
	msg := strings.TrimSpace(err.Error())
	fmt.Fprintf(e.stderr, "strata %s: %s\n", name, msg)
	var ue *usageError
	switch {
	case errors.As(err, &ue):
		return c.usage()
	case errors.Is(err, context.Canceled):
		return 130
	}
	return 1
}

func printUsage(w io.Writer, c *command, f *pflag.FlagSet) {
	fmt.Fprintf(w, "Usage: strata %s %s\n\n%s\n", c.name, c.args, c.summary)
	if c.help != "" {
		fmt.Fprintf(w, "\n%s\n", strings.TrimRight(c.help, "\n"))
	}
	fmt.Fprintf(w, "\nFlags:\n%s", f.FlagUsages())
}

func printCommands(w io.Writer) {
	fmt.Fprintf(w, "strata: a union filesystem with the semantics and on-disk format of Linux overlayfs, over FUSE.\n\n")
	fmt.Fprintf(w, "Usage: strata COMMAND [flags] [args]\n       strata SOURCE MOUNTPOINT -o OPTIONS   (mount.fuse helper form)\n\nCommands:\n")
	var names []string
	for n, c := range commands {
		if !c.hidden {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(w, "\nRun 'strata COMMAND --help' for a command's flags.\n")
}

// versionString is Version and, when the binary was built from a git
// checkout, the commit (with "-dirty" if the tree had changes), so that a
// report or a bench header names the code it ran.
func versionString() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return Version
	}
	var rev, dirty string
	for _, st := range bi.Settings {
		switch st.Key {
		case "vcs.revision":
			rev = st.Value
		case "vcs.modified":
			if st.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if len(rev) < 7 {
		return Version
	}
	return Version + " " + rev[:7] + dirty
}

func init() {
	register(&command{
		name: "version", args: "", summary: "print strata's version",
		setup: func(f *pflag.FlagSet) func(context.Context, *env, []string) error {
			return func(ctx context.Context, e *env, args []string) error {
				if len(args) > 0 {
					return usagef("takes no arguments")
				}
				fmt.Fprintf(e.stdout, "strata %s\n", versionString())
				return nil
			}
		},
	})
}
