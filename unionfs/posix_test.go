package unionfs_test

import (
	"fmt"
	"sort"
	"testing"

	"github.com/hanwen/go-fuse/v2/posixtest"

	ut "strata/internal/uniontest"
	"strata/whiteout"
)

// posixLeftOut names the posixtest tests that are not run, and why.
var posixLeftOut = map[string]string{
	// It takes a POSIX (F_SETLK) write lock through one fd and expects a
	// read lock through a second fd of the same process to fail with
	// EAGAIN, but POSIX record locks belong to the process: the second
	// F_SETLK succeeds on every filesystem. go-fuse's own TestAll skips it
	// ("TODO - fix this test"). The differential "locks" cases cover
	// flock and OFD locks instead.
	"FcntlFlockLocksFile": "POSIX locks are per process: the test fails on any filesystem (go-fuse skips it too)",
}

// posixLowers gives, for each posixtest test, the layers of the
// "lower" variant: the files the test creates already exist in a lower
// layer (empty or with other content, and the modes the test expects), so
// the same operations start from lower files and copy them up. Names the
// test creates with mkdir or symlink (which fail on an existing name) are
// in the lower too, hidden by a whiteout in the upper, so those calls
// create over a whiteout.
func posixLowers() map[string][2]ut.Layer {
	file := func(name string, mode uint32) ut.Applier { return ut.File(name, "old lower content", mode) }
	hiddenDir := func(name string) [2]ut.Layer {
		return [2]ut.Layer{{ut.File(name+"/lowerfile", "hidden", 0o644)}, {ut.Whiteout(name)}}
	}
	m := map[string][2]ut.Layer{
		"AppendWrite":                {{ut.File("file", "", 0o644)}},
		"DirectIO":                   {{file("file.txt", 0o644)}},
		"Fallocate":                  {{file("file", 0o666)}},
		"FallocateKeepSize":          {{file("file", 0o644)}},
		"FcntlFlockSetLk":            {{file("file0", 0o644), file("file1", 0o644)}},
		"FdLeak":                     {{file("file", 0o755)}},
		"FileBasic":                  {{file("file", 0o755)}},
		"FileLarge":                  {{file("file", 0o644)}},
		"Link":                       {{file("target", 0o644)}},
		"LinkUnlinkRename":           {{file("tmpfile", 0o644)}},
		"LseekEnxioCheck":            {{file("file.bin", 0o644)}},
		"LseekHoleSeeksToEOF":        {{file("file.bin", 0o644)}},
		"MkdirRmdir":                 hiddenDir("dir"),
		"NlinkZero":                  {{file("src", 0o644), file("dst", 0o644)}},
		"OpenAt":                     hiddenDir("dir1"),
		"OpenSymlinkRace":            {{ut.File("OpenSymlinkRace", "", 0o600)}},
		"ParallelFileOpen":           {{file("file", 0o644)}},
		"ReadDirConsistency":         {{file("a", 0o644), ut.Dir("b", 0o755), ut.Symlink("c", "a"), ut.Fifo("d")}},
		"RenameOverwriteDestExist":   {{file("file", 0o644), ut.File("dir/renamed", "hidden", 0o644)}, {ut.Whiteout("dir")}},
		"RenameOverwriteDestNoExist": {{file("file", 0o644), ut.File("dir/lowerfile", "hidden", 0o644)}, {ut.Whiteout("dir")}},
		"SetattrSymlink":             {{ut.Symlink("link", "old")}, {ut.Whiteout("link")}},
		"SymlinkReadlink":            {{ut.Symlink("link", "old")}, {ut.Whiteout("link")}},
		"TruncateFile":               {{file("file", 0o755)}},
		"TruncateNoFile":             {{file("file", 0o644)}},
		"XAttr":                      {{ut.File("file", "", 0o666)}},
		"XAttrLarge":                 {{ut.File("file", "", 0o666)}},
		// Tmpfile wants the directory empty: a lower entry hidden by a
		// whiteout.
		"Tmpfile": {{file("x", 0o644)}, {ut.Whiteout("x")}},
	}
	// DirSeek and ReadDirBasic check the listing exactly: the lower names
	// are all whited out in the upper, so each create replaces a whiteout.
	var ttt [2]ut.Layer
	ttt[1] = ut.Layer{ut.Whiteout("ttt")}
	for i := 1; i <= 168; i++ {
		ttt[0] = append(ttt[0], file(fmt.Sprintf("ttt/%d", i), 0o600))
	}
	m["DirSeek"] = ttt
	var rdb [2]ut.Layer
	for i := 0; i < 110; i++ {
		nm := fmt.Sprintf("file%036x", i)
		rdb[0] = append(rdb[0], file(nm, 0o644))
		rdb[1] = append(rdb[1], ut.Whiteout(nm))
	}
	m["ReadDirBasic"] = rdb
	// RenameOpenDir makes dir1 and dir2.
	m["RenameOpenDir"] = [2]ut.Layer{
		{ut.File("dir1/a", "hidden", 0o644), ut.File("dir2/b", "hidden", 0o644)},
		{ut.Whiteout("dir1"), ut.Whiteout("dir2")},
	}
	var fd ut.Layer
	for i := 0; i <= 9; i++ {
		fd = append(fd, file(fmt.Sprint(i), 0o644))
	}
	m["FstatDeleted"] = [2]ut.Layer{fd}
	return m
}

// TestPosix runs go-fuse's posixtest suite on a fresh mount per test, in
// two layouts: "upper" (an empty lower and an empty upper: every file the
// test makes is upper-only) and "lower" (the test's files start in a lower
// layer, see posixLowers). Each test runs on kernel overlay first, as the
// reference for the fixture, then on strata. Some posixtest tests skip
// themselves when a feature is missing (O_TMPFILE, fstat of a directory
// replaced by rename, large xattrs): a skip on strata where kernel overlay
// passed is a failure.
func TestPosix(t *testing.T) {
	lowers := posixLowers()
	var names []string
	for name := range posixtest.All {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, variant := range []string{"upper", "lower"} {
		t.Run(variant, func(t *testing.T) {
			for _, name := range names {
				t.Run(name, func(t *testing.T) {
					if why, ok := posixLeftOut[name]; ok {
						t.Skip(why)
					}
					layers := [2]ut.Layer{{}, {}}
					if variant == "lower" {
						l, ok := lowers[name]
						if !ok {
							t.Fatalf("posixtest %s has no lower-variant fixture: add it to posixLowers", name)
						}
						layers = l
						if layers[1] == nil {
							layers[1] = ut.Layer{}
						}
					}
					skipped := map[string]bool{}
					for _, tg := range []ut.Target{ut.Kernel, ut.FUSE} {
						t.Run(tg.Name(), func(t *testing.T) {
							defer func() { skipped[tg.Name()] = t.Skipped() }()
							m := ut.MountLayers(t, tg, whiteout.Trusted, []ut.Layer{layers[0]}, layers[1])
							posixtest.All[name](t, m.Dir)
						})
					}
					if skipped[ut.FUSE.Name()] && !skipped[ut.Kernel.Name()] {
						t.Errorf("the test skipped itself on %s but passed on %s (see its log)", ut.FUSE.Name(), ut.Kernel.Name())
					}
				})
			}
		})
	}
}
