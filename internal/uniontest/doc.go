// Package uniontest is strata's differential test harness: it runs one
// scenario on kernel overlayfs (the oracle) and on strata (the subject),
// from identical fixtures, and reports every difference the two leave
// behind.
//
// # Pieces
//
//   - Privilege probes ([RequireRoot], [RequireFUSE], [RequireKernelOverlay],
//     [RequireMknod]): one real probe each, cached; a missing capability
//     skips the test, or fails it when STRATA_REQUIRE_MOUNT=1.
//   - Fixtures: a [Layer] is a list of [Applier]s (continuity fstest style:
//     [File], [Dir], [Symlink], [Whiteout], [Opaque], ...), built into a
//     fresh directory with a given overlay xattr namespace by [BuildLayer].
//     Every object gets the fixed old times [FixtureMtime]/[FixtureAtime]
//     unless a [Times] applier says otherwise, so "preserved" and "changed
//     during the test" are told apart.
//   - Targets ([Kernel], [FUSE]): mount a [unionfs.Options] under
//     t.TempDir() and unmount in t.Cleanup (EBUSY retry, logged lazy
//     fallback); no test leaves a mount behind.
//   - [Snapshot]: a tree walked through directory fds without following
//     symlinks (so paths longer than PATH_MAX work): type, mode, owner,
//     size, content digest, link target, rdev, xattrs, nlink, hard-link
//     groups, mtime class. On a mount it also checks that every d_ino equals
//     st_ino, d_type is right, "." and ".." are listed and st_dev is one.
//   - [Recorder]: each operation of a case logged as (op, errno name or
//     "ok", output); both targets' logs must be identical.
//   - [Run]: builds the fixtures twice, runs [Case.Ops] on both targets and
//     compares (a) the op logs, (b) the merged trees while mounted, (c) the
//     upper dirs after unmount, (d) cross-mounts: each target mounts the
//     other's upper dir and must show the tree the other showed.
//
// # What is compared and what is not
//
// Inode numbers and st_dev are not compared (the kernel leaves them
// undefined across implementations); they are checked for internal
// consistency instead. atime is not compared (reads through the page cache
// may or may not touch the backing file). Times set during the test compare
// as the class "recent"; fixture and explicitly set times compare exactly.
// The kernel's bookkeeping xattrs in upper dirs are dropped in one place,
// [NormalizeUpper].
//
// # Environment
//
// Tests run as root. The process umask is set to 0 while a case runs:
// strata's in-process server shares the test's umask, and unionfs.Mount
// sets it to 0 for the daemon anyway, so cases pass modes explicitly.
// STRATA_DIFF_SUBJECT=kernel makes [Run] compare kernel overlay with
// itself, which must show no difference at all (a check of the harness).
//
// Rootless runs ([RunRootless], [RunUnprivileged]) re-execute the test
// binary as an unprivileged user and compare in the userxattr format,
// with kernel overlay mounted in a user namespace ([KernelUserNS]).
package uniontest
