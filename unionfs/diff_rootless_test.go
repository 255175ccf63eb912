package unionfs_test

import (
	"testing"

	ut "strata/internal/uniontest"
)

// TestDiffRootless runs the read and write differential cases without
// privilege, in the userxattr format (user.overlay.*, 0/0 whiteouts),
// comparing strata with kernel overlay mounted with -o userxattr in a user
// namespace: operation results, merged trees, upper dirs and cross-mounts,
// as TestDiffRead and TestDiffWrite do as root.
//
// The test process (root) makes /dev/fuse mode 0666, as distributions
// ship it, and a directory under /tmp owned by nobody (65534), then runs
// this test binary again as nobody (setpriv --reuid=65534 --regid=65534
// --clear-groups --inh-caps=-all), twice:
//
//   - user: nobody in the initial namespaces, with no capability. strata
//     mounts through the setuid fusermount3 and serves as nobody: the
//     path of a user's `strata mount` (no chown to others, no trusted.*,
//     no FUSE passthrough). A user can mount kernel overlay only in a
//     user namespace of its own, so a helper process enters one (uid 0
//     there is nobody) and mounts it there; the test reaches that mount
//     through /proc/HELPER/root and works on it as the same unprivileged
//     nobody as on strata's. This is the comparison of the README's
//     rootless promise, and the main one.
//   - userns: nobody, then unshare -Urm: root of a user namespace owned by
//     nobody, with only that one id mapped, as in a rootless container.
//     There strata mounts /dev/fuse directly (mount(2); fusermount3 is not
//     used by root, and FUSE allows user-namespace mounts), as does kernel
//     overlay.
//
// Fixtures are built by the child: a chown to other ids or a trusted.* or
// security.* xattr is left out of a case's fixture (logged, on both
// targets alike), and a case whose fixture holds a device node other than
// a 0/0 whiteout is skipped (see uniontest.Unprivileged). Operations that
// need privilege (chown to others, mknod of devices, trusted.* xattrs)
// stay in: both targets must refuse them alike. rootlessKnown lists, with
// the reason, the cases whose fixture needs privilege in a way the fixture
// data does not tell, and the differences from kernel overlay that exist
// only without privilege (logged, not failed; one that disappears fails,
// so that its entry goes).
//
// With STRATA_REQUIRE_MOUNT=1 a missing tool or target fails the test
// instead of skipping it. Rerun one mode or case with
// -run 'TestDiffRootless/user/file-chmod-lower-top'.
func TestDiffRootless(t *testing.T) {
	if mode := ut.RootlessChild(); mode != "" {
		t.Run(string(mode), func(t *testing.T) {
			cases := append(readCases(), append(matrixCases(), writeCases()...)...)
			ut.RunUnprivileged(t, mode.Config(), cases, rootlessKnown)
		})
		return
	}
	for _, m := range []ut.RootlessMode{ut.AsUser, ut.AsUserNSRoot} {
		t.Run(string(m), func(t *testing.T) { ut.RunRootless(t, m) })
	}
}

// rootlessKnown: what the rootless runs (both modes) know of cases
// beforehand, with why.
var rootlessKnown = func() map[string]ut.Known {
	m := map[string]ut.Known{
		"redirect-upper-written-by-kernel": {Skip: "its upper is written by a kernel overlay mount with redirect_dir=on, " +
			"which needs privilege (a userxattr mount refuses redirect_dir=on)"},
		// Reported, not fixed here: strata's redirect handling under
		// userxattr (new code) differs from the kernel's in listings.
		"redirect-malformed-in-impure-dir": {Diverge: "with userxattr, kernel overlay fails the readdir of the merged " +
			"impure directory holding redirected directories with EPERM; strata lists it (without those)"},
	}
	// With userxattr a lookup that reads a redirect fails with EPERM on
	// both targets. Kernel overlay (whose upper root ends up impure) also
	// leaves such a directory out of its parent's listing (a failed
	// lookup while computing d_ino makes the entry stale,
	// fs/overlayfs/readdir.c:ovl_cache_update); strata lists the name,
	// whose lstat then fails with EPERM.
	for _, name := range []string{"redirect-in-middle-lower-under-upper", "redirect-to-merged-dir", "redirect-to-missing", "redirect-malformed"} {
		m[name] = ut.Known{Diverge: "with userxattr kernel overlay leaves a directory whose lookup fails with EPERM " +
			"(a redirect it may not follow) out of its parent's listing; strata lists it"}
	}
	// Without CAP_DAC_READ_SEARCH in the initial namespace the kernel
	// cannot encode file handles (fs/overlayfs/util.c:ovl_can_decode_fh),
	// so copy-up stores an empty overlay.origin. A new hard link to a
	// copied-up lower file then has no origin the kernel can follow: it
	// reports the upper inode's st_ino under the new name and the lower
	// one's under the old name (fs/overlayfs/inode.c:ovl_getattr), two
	// st_ino for one file. strata keeps one st_ino for all names of a file
	// (as the kernel does with privilege).
	for _, name := range []string{
		"file-link-lower-top",
		"file-link-lower-bottom",
		"file-link-lower-deep",
		"file-link-lower-merged-parent",
		"file-link-to-upper-dir-lower-top",
		"file-link-to-upper-dir-lower-bottom",
		"file-link-to-upper-dir-lower-deep",
		"file-link-to-upper-dir-lower-merged-parent",
		"file-link-onto-whiteout-in-lower",
		"file-link-onto-whiteout-in-upper",
		"link-lower-file-nlink-two",
		"write-then-rename-then-link",
	} {
		m[name] = ut.Known{Diverge: "hard link to a copied-up lower file: kernel overlay without privilege stores an empty origin " +
			"and shows two st_ino for one file (ovl_can_decode_fh needs CAP_DAC_READ_SEARCH); strata shows one"}
	}
	return m
}()
