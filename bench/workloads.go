package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// Modes. Cold drops the page, dentry and inode caches before mounting; warm
// runs the workload's warm-up (by default the workload itself) untimed in
// the same mount first. A read-only workload measured in both modes takes
// its warm sample right after its cold run, in the same mount and worker:
// the cold run is exactly the warm-up warm mode asks for (see
// workload.followUpOf).
const (
	modeCold = "cold"
	modeWarm = "warm"
)

var (
	bothModes = []string{modeCold, modeWarm}
	coldOnly  = []string{modeCold}
	warmOnly  = []string{modeWarm}
)

// workload is one measured operation, run by a worker process against a
// mount that was fresh when the worker started.
type workload struct {
	name string
	desc string
	// modes lists the modes run by default: writing new data has no warm
	// state, so those workloads are cold only; the mutating workloads keep
	// one mode each so the full run fits in 30 minutes.
	modes []string
	// moreModes are further modes that -all-modes adds.
	moreModes []string
	// mutates is set when the workload changes the merged tree.
	mutates bool
	// inPlace returns the merged paths the workload writes into without
	// replacing them; plain (a hard-link farm) restores them afterwards.
	inPlace func(m *manifest) []string
	// prepare, if set, writes the workload's input into the writable layer
	// (the upper dir, or plain's tree) before the mount is made.
	prepare func(c *wctx) error
	// followUp, if set, is a second timed step in the same mount right
	// after run, recorded as another workload's sample.
	followUp *followUp
	// undo, if set, reverts the workload's changes to plain's hard-link
	// farm (given the plain copy it links to), so the farm need not be
	// rebuilt; a mutating workload without undo makes plain rebuild it.
	undo func(farm, plainCopy string, m *manifest) error
	// warm, if set, is the warm-up of warm mode; nil runs the workload.
	warm func(c *wctx) error
	run  func(c *wctx) (count, error)
	unit string // what count.ops counts
}

// followUp is a timed step that continues a workload's run in the same
// mount, measured as the sample of workload in mode.
type followUp struct {
	workload, mode string
	run            func(c *wctx) (count, error)
}

// followUpOf returns the step that follows w's run in mode when the modes
// in modes are measured (nil if none): see followUpStep.
func (w *workload) followUpOf(mode string, modes []string) *followUp {
	if w.followUp != nil || (mode == modeCold && w.warmAfterCold(modes)) {
		return w.followUpStep()
	}
	return nil
}

// followUpStep is the step a worker asked for a follow-up times after
// w's run: w's own followUp, else w again as its warm sample (the cold run
// having been the warm-up).
func (w *workload) followUpStep() *followUp {
	if w.followUp != nil {
		return w.followUp
	}
	return &followUp{workload: w.name, mode: modeWarm, run: w.run}
}

// warmAfterCold reports whether w's warm sample is taken as the follow-up
// of its cold run when the modes in modes are measured.
func (w *workload) warmAfterCold(modes []string) bool {
	return !w.mutates && w.warm == nil && w.prepare == nil &&
		slices.Contains(modes, modeCold) && slices.Contains(modes, modeWarm)
}

// inPlacePaths returns w.inPlace(m), or nothing.
func (w *workload) inPlacePaths(m *manifest) []string {
	if w.inPlace == nil {
		return nil
	}
	return w.inPlace(m)
}

// count is what a run did: operations (in the workload's unit) and bytes.
type count struct{ ops, bytes int64 }

// wctx is a worker's view of one run.
type wctx struct {
	ctx     context.Context
	dir     string // the mount (run, warm) or the writable layer (prepare)
	fixDir  string
	m       *manifest
	syncDir string // the upper dir behind the mount, for syncfs
}

func (c *wctx) path(rel string) string { return filepath.Join(c.dir, rel) }

// workloads is every workload, in run order: reads first, then writes.
var workloads = []*workload{
	{name: "statwalk", unit: "entries", modes: bothModes,
		desc: "readdir + lstat of every entry of the merged tree",
		run:  func(c *wctx) (count, error) { n, err := statWalk(c.dir); return count{ops: n}, err }},
	{name: "ls-lR", unit: "runs", modes: bothModes,
		desc: "exec ls -lR of the whole tree to /dev/null",
		run:  func(c *wctx) (count, error) { return count{ops: 1}, execTool(c, "/", "ls", "-lR", c.dir) }},
	{name: "seqread", unit: "bytes", modes: bothModes,
		desc: "read the big top-layer file in 1 MiB reads",
		run:  func(c *wctx) (count, error) { return readFile(c.path(c.m.BigFile), make([]byte, mib)) }},
	{name: "randread", unit: "reads", modes: bothModes,
		desc: "4 KiB preads at aligned offsets (fixed seed) in the random-read file",
		run:  randRead},
	{name: "git-status", unit: "runs", modes: bothModes,
		desc: "exec git status in the repo of the middle layer",
		run: func(c *wctx) (count, error) {
			return count{ops: 1}, execTool(c, c.path(c.m.Repo), "git", "-c", "safe.directory=*", "status")
		}},
	{name: "cat-repo", unit: "files", modes: bothModes,
		desc: "read every file of the repo (work tree and .git)",
		run:  func(c *wctx) (count, error) { return readTree(c.path(c.m.Repo)) }},
	{name: "seqwrite", unit: "bytes", modes: coldOnly, mutates: true,
		desc: "write a new file of the big file's size in 1 MiB writes, then fsync",
		run:  seqWrite, undo: removeNew("seqwrite.bin")},
	{name: "copyup", unit: "bytes", modes: coldOnly, moreModes: warmOnly, mutates: true, inPlace: bigOnly,
		desc: "append 1 byte to the big lower file (a full copy-up); warm reads the file first",
		warm: warmBig, run: func(c *wctx) (count, error) { return appendByte(c, false) }, undo: nothingToUndo},
	{name: "copyup-syncfs", unit: "bytes", modes: coldOnly, mutates: true, inPlace: bigOnly,
		desc: "copyup, then syncfs of the mount and of the upper dir's filesystem",
		run:  func(c *wctx) (count, error) { return appendByte(c, true) }, undo: nothingToUndo},
	{name: "create", unit: "files", modes: coldOnly, mutates: true,
		desc: "create 4 KiB files, 100 per new directory",
		run: func(c *wctx) (count, error) {
			n := c.m.Profile.CreateFiles
			return count{ops: int64(n), bytes: int64(n) * 4 * kib}, createFiles(c.path("create"), n)
		},
		followUp: &followUp{workload: "rm-rf", mode: modeWarm, run: func(c *wctx) (count, error) {
			return count{ops: int64(c.m.Profile.CreateFiles)}, execTool(c, "/", "rm", "-rf", c.path("create"))
		}},
		undo: removeNew("create")},
	// rm-rf warm is create's follow-up: rm -rf of the files create just
	// made, in the same mount. Its own run is the cold variant.
	{name: "rm-rf", unit: "files", moreModes: coldOnly, mutates: true,
		desc:    "exec rm -rf of create's files right after create, same mount (warm); cold: of such a tree written into the upper dir before mounting",
		prepare: func(c *wctx) error { return createFiles(c.path("rmrf"), c.m.Profile.CreateFiles) },
		run: func(c *wctx) (count, error) {
			return count{ops: int64(c.m.Profile.CreateFiles)}, execTool(c, "/", "rm", "-rf", c.path("rmrf"))
		},
		undo: removeNew("rmrf")},
	{name: "untar", unit: "files", modes: coldOnly, moreModes: warmOnly, mutates: true,
		desc: "exec tar -xf of the fixture's archive into a new dir; warm reads the archive first",
		warm: func(c *wctx) error {
			_, err := readFile(filepath.Join(c.fixDir, c.m.Tar), make([]byte, mib))
			return err
		},
		run: func(c *wctx) (count, error) {
			dst := c.path("untar")
			if err := os.Mkdir(dst, 0o755); err != nil {
				return count{}, err
			}
			return count{ops: int64(c.m.TarFiles)}, execTool(c, "/", "tar", "-xf", filepath.Join(c.fixDir, c.m.Tar), "-C", dst)
		},
		undo: removeNew("untar")},
	{name: "rename", unit: "files", modes: coldOnly, moreModes: warmOnly, mutates: true,
		desc: "rename lower files within their directory (copy-up + whiteout each); warm lstats them first",
		warm: func(c *wctx) error { return lstatTargets(c, c.m.Profile.RenameFiles) },
		run: func(c *wctx) (count, error) {
			return forTargets(c, c.m.Profile.RenameFiles, func(p string) error { return os.Rename(p, p+".renamed") })
		},
		undo: func(farm, _ string, m *manifest) error {
			for _, t := range m.Targets[:min(m.Profile.RenameFiles, len(m.Targets))] {
				p := filepath.Join(farm, t)
				if err := os.Rename(p+".renamed", p); err != nil {
					return err
				}
			}
			return nil
		}},
	{name: "unlink", unit: "files", modes: coldOnly, moreModes: warmOnly, mutates: true,
		desc: "unlink lower files (a whiteout each); warm lstats them first",
		warm: func(c *wctx) error { return lstatTargets(c, c.m.Profile.UnlinkFiles) },
		run: func(c *wctx) (count, error) {
			return forTargets(c, c.m.Profile.UnlinkFiles, func(p string) error { return unix.Unlink(p) })
		},
		undo: func(farm, plainCopy string, m *manifest) error {
			for _, t := range m.Targets[:min(m.Profile.UnlinkFiles, len(m.Targets))] {
				if err := os.Link(filepath.Join(plainCopy, t), filepath.Join(farm, t)); err != nil {
					return err
				}
			}
			return nil
		}},
}

// findWorkload returns the workload called name.
func findWorkload(name string) (*workload, error) {
	for _, w := range workloads {
		if w.name == name {
			return w, nil
		}
	}
	return nil, fmt.Errorf("unknown workload %q", name)
}

func bigOnly(m *manifest) []string { return []string{m.BigFile} }

// removeNew returns an undo that removes the tree a workload added.
func removeNew(rel string) func(farm, _ string, _ *manifest) error {
	return func(farm, _ string, _ *manifest) error { return os.RemoveAll(filepath.Join(farm, rel)) }
}

// nothingToUndo is the undo of a workload whose only change plain reverts
// anyway (an in-place write, truncated back).
func nothingToUndo(string, string, *manifest) error { return nil }

// statWalk reads every directory under root and lstats each entry (with
// fstatat on the directory's fd), returning the number of entries.
func statWalk(root string) (int64, error) {
	var n int64
	var walk func(dir string) error
	walk = func(dir string) error {
		f, err := os.Open(dir)
		if err != nil {
			return err
		}
		defer f.Close()
		ents, err := f.ReadDir(-1)
		if err != nil {
			return fmt.Errorf("readdir %s: %w", dir, err)
		}
		fd := int(f.Fd())
		var st unix.Stat_t
		for _, e := range ents {
			if err := unix.Fstatat(fd, e.Name(), &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return fmt.Errorf("lstat %s: %w", filepath.Join(dir, e.Name()), err)
			}
			n++
			if st.Mode&unix.S_IFMT == unix.S_IFDIR {
				if err := walk(filepath.Join(dir, e.Name())); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return n, walk(root)
}

// readFile reads name to the end with buf-sized reads.
func readFile(name string, buf []byte) (count, error) {
	f, err := os.Open(name)
	if err != nil {
		return count{}, err
	}
	defer f.Close()
	var c count
	for {
		n, err := f.Read(buf)
		c.bytes += int64(n)
		if errors.Is(err, io.EOF) {
			c.ops++
			return c, nil
		}
		if err != nil {
			return c, fmt.Errorf("read %s: %w", name, err)
		}
	}
}

// readTree reads every regular file under root.
func readTree(root string) (count, error) {
	var c count
	buf := make([]byte, 256*kib)
	var walk func(dir string) error
	walk = func(dir string) error {
		ents, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		for _, e := range ents {
			p := filepath.Join(dir, e.Name())
			switch {
			case e.IsDir():
				if err := walk(p); err != nil {
					return err
				}
			case e.Type().IsRegular():
				fc, err := readFile(p, buf)
				if err != nil {
					return err
				}
				c.ops++
				c.bytes += fc.bytes
			}
		}
		return nil
	}
	return c, walk(root)
}

// randRead does the profile's number of 4 KiB preads at 4 KiB-aligned
// offsets drawn from a fixed seed, so every engine reads the same blocks.
func randRead(c *wctx) (count, error) {
	f, err := os.Open(c.path(c.m.RandFile))
	if err != nil {
		return count{}, err
	}
	defer f.Close()
	blocks := c.m.Profile.RandBytes / (4 * kib)
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 4*kib)
	var n count
	for i := 0; i < c.m.Profile.RandReads; i++ {
		off := rng.Int64N(blocks) * 4 * kib
		r, err := f.ReadAt(buf, off)
		if err != nil {
			return n, fmt.Errorf("pread at %d: %w", off, err)
		}
		n.ops++
		n.bytes += int64(r)
	}
	return n, nil
}

// seqWrite writes a new file as large as the big file, then fsyncs it.
func seqWrite(c *wctx) (count, error) {
	buf := make([]byte, mib)
	var seed [32]byte
	rand.NewChaCha8(seed).Read(buf) // incompressible data, made before timing matters
	f, err := os.OpenFile(c.path("seqwrite.bin"), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return count{}, err
	}
	defer f.Close()
	var n count
	for n.bytes < c.m.Profile.BigBytes {
		w, err := f.Write(buf[:min(int64(len(buf)), c.m.Profile.BigBytes-n.bytes)])
		n.bytes += int64(w)
		if err != nil {
			return n, err
		}
	}
	if err := f.Sync(); err != nil {
		return n, fmt.Errorf("fsync: %w", err)
	}
	n.ops = 1
	return n, f.Close()
}

// warmBig reads the big file through the mount.
func warmBig(c *wctx) error {
	_, err := readFile(c.path(c.m.BigFile), make([]byte, mib))
	return err
}

// appendByte appends one byte to the big lower file, which copies it up.
// With sync it then calls syncfs on the mount and on the upper dir: FUSE
// does not pass syncfs to ordinary servers, so only the second one makes a
// FUSE engine's copy-up as durable as kernel overlay's.
func appendByte(c *wctx, sync bool) (count, error) {
	f, err := os.OpenFile(c.path(c.m.BigFile), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return count{}, err
	}
	if _, err := f.Write([]byte{'\n'}); err != nil {
		f.Close()
		return count{}, err
	}
	if err := f.Close(); err != nil {
		return count{}, err
	}
	if sync {
		for _, d := range []string{c.dir, c.syncDir} {
			if err := syncfs(d); err != nil {
				return count{}, err
			}
		}
	}
	return count{ops: 1, bytes: c.m.Profile.BigBytes}, nil
}

func syncfs(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

// createFiles creates n files of 4 KiB under root, 100 per directory.
func createFiles(root string, n int) error {
	buf := bytes.Repeat([]byte("strata bench 4k\n"), 4*kib/16)
	if err := os.Mkdir(root, 0o755); err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		dir := filepath.Join(root, fmt.Sprintf("d%03d", i/100))
		if i%100 == 0 {
			if err := os.Mkdir(dir, 0o755); err != nil {
				return err
			}
		}
		f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("f%05d", i)), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		if _, err := f.Write(buf); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	return nil
}

// targets returns the first n rename/unlink targets as paths in the mount.
func targets(c *wctx, n int) []string {
	ps := make([]string, min(n, len(c.m.Targets)))
	for i := range ps {
		ps[i] = c.path(c.m.Targets[i])
	}
	return ps
}

func lstatTargets(c *wctx, n int) error {
	var st unix.Stat_t
	for _, p := range targets(c, n) {
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("lstat %s: %w", p, err)
		}
	}
	return nil
}

func forTargets(c *wctx, n int, op func(p string) error) (count, error) {
	var k count
	for _, p := range targets(c, n) {
		if err := op(p); err != nil {
			return k, err
		}
		k.ops++
	}
	return k, nil
}

// execTool runs a real tool (ls, rm, tar, git) in dir with its output
// discarded; its stderr tail is returned in the error.
func execTool(c *wctx, dir, name string, args ...string) error {
	cmd := exec.CommandContext(c.ctx, name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr // stdout stays nil: /dev/null
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w: %s", name, err, tail(stderr.Bytes(), 400))
	}
	return nil
}
