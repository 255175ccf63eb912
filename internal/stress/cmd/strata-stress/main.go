// Command strata-stress runs the stress harness of package stress outside
// "go test": a fixture of three lowers, N workers doing random changes
// over a strata mount with every read checked against a model, then the
// whole tree checked after the load, after a remount and under kernel
// overlay on the upper dir strata left.
//
//	go run ./internal/stress/cmd/strata-stress -duration 10m -workers 8
//	go build -o strata . && go run ./internal/stress/cmd/strata-stress -strata ./strata -ops 200000
//
// It needs root (FUSE mount, trusted.* markers, kernel overlay). It exits
// 0 when the tree always matched the model, 1 on a mismatch, 2 when the
// run could not be done.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"time"

	"strata/internal/stress"
)

func main() {
	workers := flag.Int("workers", 4, "parallel workers")
	ops := flag.Int64("ops", 0, "total operations (0: run for -duration)")
	duration := flag.Duration("duration", time.Minute, "how long to run (0: until -ops)")
	seed := flag.Uint64("seed", 0, "seed (0: time-based)")
	bin := flag.String("strata", "", "mount with this strata binary (daemon); default: in this process")
	kernel := flag.Bool("kernel", true, "also check the fixture and the final upper under kernel overlay")
	dir := flag.String("dir", "", "work directory (default: a new temp dir, removed afterwards)")
	keep := flag.Bool("keep", false, "keep the work directory")
	verbose := flag.Bool("v", false, "log progress and strata warnings")
	flag.Parse()

	if *seed == 0 {
		*seed = uint64(time.Now().UnixNano())
	}
	d := *dir
	if d == "" {
		var err error
		if d, err = os.MkdirTemp("", "strata-stress-"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		if !*keep {
			defer os.RemoveAll(d)
		}
	}
	cfg := stress.Config{Dir: d, Workers: *workers, Ops: *ops, Duration: *duration, Seed: *seed,
		Kernel: *kernel}
	if *verbose {
		cfg.Logf = func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }
		cfg.Mount = stress.InProcess("", slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	}
	if *bin != "" {
		cfg.Mount = stress.Daemon(*bin, "")
	}
	fmt.Fprintf(os.Stderr, "strata-stress: seed %d, dir %s\n", *seed, d)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	rep, err := stress.Run(ctx, cfg)
	if rep != nil {
		fmt.Print(rep)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "strata-stress:", err)
		os.Exit(2)
	}
	if !rep.OK() {
		fmt.Fprintf(os.Stderr, "strata-stress: %d mismatches (seed %d)\n", len(rep.Mismatches), *seed)
		os.Exit(1)
	}
}
