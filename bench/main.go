// Command bench measures strata against kernel overlayfs and its peers on
// one machine, end to end, and reports each engine's time as a ratio to
// kernel overlay's.
//
// Usage (as root, from the repository root):
//
//	go run ./bench [-quick|-smoke] [-engines kernel,strata,...] [-format text|csv|json] [-out FILE]
//
// It builds a container-image-like fixture once (three lower layers with a
// deep tree, whiteouts, an opaque dir, a git repo and large files), builds
// the strata binary, then runs every workload in a separate worker process
// ("bench worker", this same binary) against a fresh mount with a fresh
// upper dir, cold and warm, repetitions interleaved across engines. See
// README.md for the fixture, the workloads and how results are computed.
//
// bench imports nothing of strata: it runs the built binary, like a user.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}

// config is the parsed command line.
type config struct {
	workDir         string
	prof            profile
	reps            int
	engines         []string
	explicitEngines bool // -engines named them: each must work
	workloads       []*workload
	modes           []string
	strata          string
	format          string
	out             string
	owner           cred
	timeout         time.Duration
	verbose         bool          // log each run's phases
	allModes        bool          // also run each workload's moreModes
	waitIdle        time.Duration // before each run, wait up to this long for an idle machine
}

// run is main without the exit: "worker" runs one workload phase, anything
// else is the harness. Exit codes: 0 all ran, 1 a failure, 2 usage, 130
// interrupted.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "worker" {
		return workerMain(ctx, args[1:], stdout, stderr)
	}
	cfg, err := parseFlags(args, stdout, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "bench: %v\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := runHarness(ctx, cfg, stderr)
	if rep != nil {
		if werr := writeReport(rep, cfg.format, cfg.out, stdout); werr != nil {
			fmt.Fprintf(stderr, "bench: write report: %v\n", werr)
			return 1
		}
	}
	switch {
	case ctx.Err() != nil:
		fmt.Fprintln(stderr, "bench: interrupted")
		return 130
	case err != nil:
		fmt.Fprintf(stderr, "bench: %v\n", err)
		return 1
	case rep.failures() > 0:
		fmt.Fprintf(stderr, "bench: %d runs failed (see the notes column)\n", rep.failures())
		return 1
	}
	return 0
}

func parseFlags(args []string, stdout, stderr io.Writer) (config, error) {
	var cfg config
	fl := flag.NewFlagSet("bench", flag.ContinueOnError)
	fl.SetOutput(stderr)
	var (
		quick     = fl.Bool("quick", false, "smaller fixture and counts (5k files, 64 MiB files), 3 repetitions: a few minutes")
		smoke     = fl.Bool("smoke", false, "tiny fixture, 1 repetition: proves the harness works (the test suite runs this)")
		engines   = fl.String("engines", "all", "comma-separated engines: "+strings.Join(allEngines, ",")+`; "all" skips those that cannot run here`)
		wls       = fl.String("workloads", "all", "comma-separated workloads (see -list)")
		modes     = fl.String("modes", "cold,warm", "comma-separated modes: cold, warm")
		list      = fl.Bool("list", false, "list engines and workloads, then exit")
		uid       = fl.Int("uid", 65534, "user that runs the rootless engine and owns the fixture")
		gid       = fl.Int("gid", 65534, "group of -uid")
		timeout   = fl.Duration("timeout", 10*time.Minute, "limit for one worker run")
		repsFlag  = fl.Int("reps", 0, "repetitions (default 5; 3 with -quick; 1 with -smoke)")
		workDirFl = fl.String("workdir", "/var/tmp/strata-bench", "where the fixture is cached and mounts are made (must be world-searchable for the rootless engine)")
	)
	fl.BoolVar(&cfg.verbose, "v", false, "log how long each phase of each run took")
	fl.BoolVar(&cfg.allModes, "all-modes", false, "also run the modes left out by default (copyup, untar, rename, unlink warm; rm-rf cold)")
	fl.DurationVar(&cfg.waitIdle, "wait-idle", 0, "before each run, wait up to this long for other processes to leave the CPUs idle (0: do not wait)")
	fl.StringVar(&cfg.strata, "strata", "", "strata binary to measure (default: go build the repository's)")
	fl.StringVar(&cfg.format, "format", "text", "report format: text, csv or json")
	fl.StringVar(&cfg.out, "out", "", "write the report to this file instead of stdout")
	fl.Usage = func() {
		fmt.Fprintf(fl.Output(), "Usage: go run ./bench [flags]   (as root)\n\nMeasures strata against kernel overlay and peers; see bench/README.md.\n\nFlags:\n")
		fl.PrintDefaults()
	}
	if err := fl.Parse(args); err != nil {
		return cfg, err
	}
	if fl.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments: %s", strings.Join(fl.Args(), " "))
	}
	if *list {
		fmt.Fprintf(stdout, "engines: %s\n\nworkloads:\n", strings.Join(allEngines, ", "))
		for _, w := range workloads {
			ms := strings.Join(w.modes, ",")
			if w.name == "rm-rf" {
				ms = "warm, after create"
			}
			if len(w.moreModes) > 0 {
				ms += " (+" + strings.Join(w.moreModes, ",") + ")"
			}
			fmt.Fprintf(stdout, "  %-14s %-17s %s\n", w.name, ms, w.desc)
		}
		return cfg, flag.ErrHelp
	}
	switch {
	case *quick && *smoke:
		return cfg, errors.New("-quick and -smoke exclude each other")
	case *smoke:
		cfg.prof, cfg.reps = smokeProfile, 1
	case *quick:
		cfg.prof, cfg.reps = quickProfile, 3
	default:
		cfg.prof, cfg.reps = fullProfile, 5
	}
	if *repsFlag < 0 {
		return cfg, errors.New("-reps must be positive")
	}
	if *repsFlag > 0 {
		cfg.reps = *repsFlag
	}
	var err error
	if *engines == "all" {
		cfg.engines = allEngines
	} else if cfg.engines, err = pickList("engine", *engines, allEngines); err != nil {
		return cfg, err
	} else {
		cfg.explicitEngines = true
	}
	var names []string
	for _, w := range workloads {
		names = append(names, w.name)
	}
	picked := names
	if *wls != "all" {
		if picked, err = pickList("workload", *wls, names); err != nil {
			return cfg, err
		}
	}
	// rm-rf's default (warm) measurement is create's follow-up.
	if slices.Contains(picked, "rm-rf") && !slices.Contains(picked, "create") {
		picked = append(picked, "create")
	}
	for _, w := range workloads {
		if slices.Contains(picked, w.name) {
			cfg.workloads = append(cfg.workloads, w)
		}
	}
	if cfg.modes, err = pickList("mode", *modes, bothModes); err != nil {
		return cfg, err
	}
	if !slices.Contains([]string{"text", "csv", "json"}, cfg.format) {
		return cfg, fmt.Errorf("unknown -format %q (want text, csv or json)", cfg.format)
	}
	if *uid <= 0 || *gid <= 0 {
		return cfg, errors.New("-uid and -gid must name an unprivileged user")
	}
	cfg.owner = cred{uid: *uid, gid: *gid}
	cfg.timeout = *timeout
	if cfg.workDir, err = absPath(*workDirFl); err != nil {
		return cfg, err
	}
	return cfg, nil
}

// pickList splits a comma-separated list and checks each item against
// known, keeping known's order.
func pickList(what, list string, known []string) ([]string, error) {
	var want []string
	for _, s := range strings.Split(list, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !slices.Contains(known, s) {
			return nil, fmt.Errorf("unknown %s %q (want one of %s)", what, s, strings.Join(known, ", "))
		}
		want = append(want, s)
	}
	if len(want) == 0 {
		return nil, fmt.Errorf("no %s given", what)
	}
	var out []string
	for _, k := range known {
		if slices.Contains(want, k) {
			out = append(out, k)
		}
	}
	return out, nil
}

func absPath(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("%s: %w", p, err)
	}
	return abs, nil
}
