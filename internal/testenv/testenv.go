// Package testenv holds the privilege probes that tests share: each
// capability is probed once, for real, and a test that lacks it skips with
// the reason — or fails, when STRATA_REQUIRE_MOUNT=1 (CI) says nothing may
// be skipped.
package testenv

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// Required reports whether CI demands every mount test to run.
func Required() bool { return os.Getenv("STRATA_REQUIRE_MOUNT") == "1" }

// Need skips (or, when Required, fails) t unless reason is empty.
func Need(t testing.TB, what, reason string) {
	t.Helper()
	if reason == "" {
		return
	}
	if Required() {
		t.Fatalf("needs %s: %s (STRATA_REQUIRE_MOUNT=1 forbids skipping)", what, reason)
	}
	t.Skipf("needs %s: %s", what, reason)
}

type probe struct {
	once   sync.Once
	reason string
}

func (p *probe) get(f func() string) string {
	p.once.Do(func() { p.reason = f() })
	return p.reason
}

var mknodProbe probe

// RequireMknod checks that this process can create a 0/0 character device
// (a whiteout): any user on Linux >= 5.8, else CAP_MKNOD.
func RequireMknod(t testing.TB) {
	t.Helper()
	Need(t, "whiteout creation (mknod 0/0)", mknodProbe.get(func() string {
		dir, err := os.MkdirTemp("", "strata-probe-")
		if err != nil {
			return err.Error()
		}
		defer os.RemoveAll(dir)
		if err := unix.Mknod(filepath.Join(dir, "wh"), unix.S_IFCHR, 0); err != nil {
			return "mknod c 0 0: " + err.Error()
		}
		return ""
	}))
}

var trustedProbe probe

// RequireTrustedXattr checks that trusted.* xattrs can be written
// (CAP_SYS_ADMIN) on the temp dir's filesystem.
func RequireTrustedXattr(t testing.TB) {
	t.Helper()
	Need(t, "trusted.* xattrs", trustedProbe.get(func() string {
		dir, err := os.MkdirTemp("", "strata-probe-")
		if err != nil {
			return err.Error()
		}
		defer os.RemoveAll(dir)
		if err := unix.Setxattr(dir, "trusted.strata-probe", []byte("1"), 0); err != nil {
			return "setxattr trusted.*: " + err.Error()
		}
		return ""
	}))
}

var fuseProbe probe

// RequireFUSE checks that this process can mount FUSE: /dev/fuse opens
// read-write, and either it is root or fusermount3 is installed.
func RequireFUSE(t testing.TB) {
	t.Helper()
	Need(t, "FUSE", fuseProbe.get(func() string {
		fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return "open /dev/fuse: " + err.Error()
		}
		unix.Close(fd)
		if os.Geteuid() != 0 {
			if _, err := lookPath("fusermount3"); err != nil {
				return "not root and no fusermount3"
			}
		}
		return ""
	}))
}

var overlayProbe probe

// RequireKernelOverlay checks that kernel overlayfs can be mounted here,
// by mounting a tiny one.
func RequireKernelOverlay(t testing.TB) {
	t.Helper()
	Need(t, "kernel overlay", overlayProbe.get(func() string {
		if os.Geteuid() != 0 {
			return "not root"
		}
		dir, data, err := ProbeStack()
		if err != nil {
			return err.Error()
		}
		defer os.RemoveAll(dir)
		if !initialUserNS() {
			// Root of a user namespace: trusted.* is out of reach, so
			// the overlay mounts tests make there use userxattr.
			data += ",userxattr"
		}
		if err := unix.Mount("overlay", dir+"/m", "overlay", 0, data); err != nil {
			return "mount -t overlay: " + err.Error()
		}
		if err := unix.Unmount(dir+"/m", 0); err != nil {
			return "umount overlay: " + err.Error()
		}
		return ""
	}))
}

// ProbeStack makes a temporary dir with empty l, u, w and m dirs for a
// probe mount, and returns it with the overlay mount data of l, u and w
// (the caller mounts on dir/m and removes dir).
func ProbeStack() (dir, data string, err error) {
	dir, err = os.MkdirTemp("", "strata-probe-")
	if err != nil {
		return "", "", err
	}
	for _, d := range []string{"l", "u", "w", "m"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			os.RemoveAll(dir)
			return "", "", err
		}
	}
	return dir, "lowerdir=" + dir + "/l,upperdir=" + dir + "/u,workdir=" + dir + "/w", nil
}

// RequireRoot checks that the test runs as root: euid 0. Root of a user
// namespace passes too: it may mount kernel overlay (with userxattr) and
// FUSE there, but not chown to unmapped ids, make device nodes or write
// trusted.* xattrs; tests that need trusted.* also ask for
// [RequireTrustedXattr].
func RequireRoot(t testing.TB) {
	t.Helper()
	reason := ""
	if os.Geteuid() != 0 {
		reason = "not root"
	}
	Need(t, "root", reason)
}

// initialUserNS reports whether this process runs in the initial user
// namespace (its uid map is the identity over the whole range).
func initialUserNS() bool {
	b, err := os.ReadFile("/proc/self/uid_map")
	if err != nil {
		return true
	}
	f := strings.Fields(string(b))
	return len(f) == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295"
}

func lookPath(name string) (string, error) {
	for _, dir := range filepath.SplitList(os.Getenv("PATH") + ":/usr/bin:/bin:/usr/sbin:/sbin") {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", os.ErrNotExist
}
