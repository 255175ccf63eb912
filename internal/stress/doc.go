// Package stress is strata's load, fault and hostile-input harness: a
// fixture of three lower layers (files, dirs, symlinks, char 0/0
// whiteouts, opaque dirs) with a model of the merged tree it must show,
// and concurrent workers that create, write, append, truncate, rename,
// link, unlink, mkdir, rmdir, chmod, set and remove user.* xattrs and read
// over the mount, checking every result against the model.
//
// # Model ownership
//
// Worker i owns the subtree w<i> and the names shared/d/w<i>-*, so the
// model of each part has one writer and concurrent runs stay
// deterministic. Everything else is read-only and shared, except two
// commutative changes: fixed-size records appended to shared/log (checked
// as a multiset: every acknowledged append exactly once, nothing else) and
// one attribute user.w<i> per worker on shared/x. Concurrent first writes
// to those shared lower files exercise concurrent copy-up of one object.
//
// # Checks
//
// [Run] checks the tree before the load, every read during the load, the
// whole tree after the load, again after an unmount and a fresh mount,
// and then (Config.Kernel) under kernel overlay mounted on the upper dir
// strata left, with a fresh work dir. It also checks the fixture model
// itself against kernel overlay over the lowers, so a wrong model shows up
// as such rather than as a strata bug.
//
// # Running
//
// A short run is part of "go test ./internal/stress". Long runs:
//
//	go test ./internal/stress -run TestStress -stress.duration=10m -stress.workers=8
//	go run ./internal/stress/cmd/strata-stress -duration 10m -workers 8 [-strata ./strata]
package stress
