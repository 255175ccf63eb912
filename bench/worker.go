package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"time"
)

// workerResult is what a worker prints (one JSON line) for the harness.
type workerResult struct {
	Seconds float64 `json:"seconds"`
	Ops     int64   `json:"ops"`
	Bytes   int64   `json:"bytes"`
	// Err is set only in FollowUp: a failed follow-up leaves the main
	// measurement valid, so the worker reports it and succeeds.
	Err string `json:"error,omitempty"`
	// FollowUp is the workload's follow-up step, when asked for.
	FollowUp *workerResult `json:"follow_up,omitempty"`
	// Busy is set by the harness, not the worker: see otherLoad.
	Busy float64 `json:"-"`
}

// workerMain is "bench worker": it runs one phase of one workload in its
// own process, so the load's CPU and memory never mix with the harness's
// or a FUSE server's, and under the rootless engine's user when needed.
// The run phase times only the workload itself, after any warm-up.
func workerMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fl := flag.NewFlagSet("bench worker", flag.ContinueOnError)
	fl.SetOutput(stderr)
	var (
		name    = fl.String("workload", "", "workload name")
		phase   = fl.String("phase", "run", "prepare (write inputs into the writable layer) or run")
		mode    = fl.String("mode", modeCold, "cold or warm (warm: warm up untimed first)")
		dir     = fl.String("dir", "", "mount point (run) or writable layer (prepare)")
		fixDir  = fl.String("fixture", "", "fixture directory")
		syncDir = fl.String("sync-dir", "", "upper dir behind the mount, for syncfs")
		follow  = fl.Bool("follow-up", false, "also time the workload's follow-up step")
	)
	if err := fl.Parse(args); err != nil {
		return 2
	}
	res, err := runWorker(ctx, *name, *phase, *mode, *dir, *fixDir, *syncDir, *follow)
	if err != nil {
		fmt.Fprintf(stderr, "bench worker %s/%s/%s: %v\n", *name, *phase, *mode, err)
		return 1
	}
	if err := json.NewEncoder(stdout).Encode(res); err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	return 0
}

func runWorker(ctx context.Context, name, phase, mode, dir, fixDir, syncDir string, follow bool) (workerResult, error) {
	var res workerResult
	w, err := findWorkload(name)
	if err != nil {
		return res, err
	}
	if dir == "" || fixDir == "" {
		return res, fmt.Errorf("need -dir and -fixture")
	}
	m, err := loadManifest(fixDir)
	if err != nil {
		return res, err
	}
	c := &wctx{ctx: ctx, dir: dir, fixDir: fixDir, m: &m, syncDir: syncDir}
	switch phase {
	case "prepare":
		if w.prepare != nil {
			return res, w.prepare(c)
		}
		return res, nil
	case "run":
	default:
		return res, fmt.Errorf("unknown phase %q", phase)
	}
	switch mode {
	case modeCold:
	case modeWarm:
		if w.warm != nil {
			err = w.warm(c)
		} else {
			_, err = w.run(c)
		}
		if err != nil {
			return res, fmt.Errorf("warm-up: %w", err)
		}
	default:
		return res, fmt.Errorf("unknown mode %q", mode)
	}
	start := time.Now()
	n, err := w.run(c)
	res.Seconds = time.Since(start).Seconds()
	res.Ops, res.Bytes = n.ops, n.bytes
	if err != nil || !follow {
		return res, err
	}
	start = time.Now()
	n, err = w.followUpStep().run(c)
	res.FollowUp = &workerResult{Seconds: time.Since(start).Seconds(), Ops: n.ops, Bytes: n.bytes}
	if err != nil {
		res.FollowUp.Err = err.Error()
	}
	return res, nil
}
