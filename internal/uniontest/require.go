package uniontest

import (
	"testing"

	"strata/internal/testenv"
)

// The probes live in internal/testenv, shared with the unit tests of other
// packages; these names are the harness's entry points to them. Each probe
// runs once for real (sync.Once) and caches its result and reason. A missing
// capability skips the test with "needs ...: reason", or fails it when
// STRATA_REQUIRE_MOUNT=1.

// RequireRoot needs euid 0: fixtures chown, write trusted.* xattrs and make
// device nodes.
func RequireRoot(t testing.TB) { t.Helper(); testenv.RequireRoot(t) }

// RequireFUSE needs /dev/fuse open read-write, and root or fusermount3.
func RequireFUSE(t testing.TB) { t.Helper(); testenv.RequireFUSE(t) }

// RequireKernelOverlay needs a real kernel overlay mount (a tiny one is
// mounted and unmounted in a temp dir).
func RequireKernelOverlay(t testing.TB) { t.Helper(); testenv.RequireKernelOverlay(t) }

// RequireMknod needs mknod of a 0/0 character device (a whiteout) in a temp
// dir.
func RequireMknod(t testing.TB) { t.Helper(); testenv.RequireMknod(t) }

// RequireTrustedXattr needs trusted.* xattrs (CAP_SYS_ADMIN) on the temp
// dir's filesystem, for fixtures built in the trusted namespace.
func RequireTrustedXattr(t testing.TB) { t.Helper(); testenv.RequireTrustedXattr(t) }
