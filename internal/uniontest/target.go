package uniontest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"strata/unionfs"
)

// Target is a union filesystem implementation that can mount a
// [unionfs.Options].
type Target interface {
	// Name labels the target in diffs ("kernel", "strata").
	Name() string
	// Require skips (or fails) t when the target cannot mount here.
	Require(t testing.TB)
	// Mount mounts o under a fresh t.TempDir() and registers the unmount
	// with t.Cleanup. It returns once the mount is live; any failure fails t.
	Mount(t testing.TB, o unionfs.Options) *Mounted
}

// Mounted is a live mount made by a Target.
type Mounted struct {
	// Dir is the mount point.
	Dir string

	target string
	// unmount is the normal unmount; detach is the logged last resort.
	unmount func() error
	detach  func() error

	mu   sync.Mutex
	done bool
}

// Unmount unmounts m, once: it retries while the mount is busy and, as a
// last resort, detaches it lazily and says so in the test log. Later calls
// do nothing. It fails t if the mount could not be removed at all.
func (m *Mounted) Unmount(t testing.TB) {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.done {
		return
	}
	m.done = true
	err := m.unmount()
	if err == nil {
		return
	}
	t.Logf("%s: unmount %s: %v; detaching lazily", m.target, m.Dir, err)
	if derr := m.detach(); derr != nil {
		t.Errorf("%s: lazy unmount %s: %v (the mount is left behind)", m.target, m.Dir, derr)
	}
}

// newMounted makes a Mounted and schedules its unmount.
func newMounted(t testing.TB, target, dir string, unmount, detach func() error) *Mounted {
	m := &Mounted{Dir: dir, target: target, unmount: unmount, detach: detach}
	t.Cleanup(func() { m.Unmount(t) })
	return m
}

// retryBusy calls umount until it stops reporting EBUSY, for about 2 s:
// a file closed just before unmount can still be referenced for a moment.
func retryBusy(umount func() error) error {
	var err error
	for i := 0; i < 40; i++ {
		err = umount()
		if err == nil || !errors.Is(err, unix.EBUSY) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
	return err
}

// Kernel is kernel overlayfs, mounted with mount(2) and the data
// unionfs.Options.KernelData renders.
var Kernel Target = kernelTarget{name: "kernel"}

type kernelTarget struct{ name string }

// KernelNamed is Kernel under another label, to compare kernel overlay with
// itself.
func KernelNamed(name string) Target { return kernelTarget{name: name} }

func (k kernelTarget) Name() string { return k.name }

func (k kernelTarget) Require(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	RequireKernelOverlay(t)
}

func (k kernelTarget) Mount(t testing.TB, o unionfs.Options) *Mounted {
	t.Helper()
	data, flags := kernelMountArgs(t, k.name, o)
	mnt := t.TempDir()
	if err := unix.Mount("uniontest", mnt, "overlay", flags, data); err != nil {
		t.Fatalf("%s: mount -t overlay -o %s %s: %v", k.name, data, mnt, err)
	}
	return newMounted(t, k.name, mnt,
		func() error { return retryBusy(func() error { return unix.Unmount(mnt, 0) }) },
		func() error { return unix.Unmount(mnt, unix.MNT_DETACH) })
}

// kernelMountArgs renders o as mount(2) data and flags for kernel overlay
// target name, failing t when that is impossible.
func kernelMountArgs(t testing.TB, name string, o unionfs.Options) (string, uintptr) {
	t.Helper()
	o = cloneOptions(o)
	if err := o.Resolve(); err != nil {
		t.Fatalf("%s: resolve options: %v", name, err)
	}
	data, err := o.KernelData()
	if err != nil {
		t.Fatalf("%s: kernel data: %v", name, err)
	}
	if len(data) >= os.Getpagesize() {
		t.Fatalf("%s: mount data of %d bytes exceeds a page", name, len(data))
	}
	var flags uintptr
	if o.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	return data, flags
}

// FUSE is strata, mounted in-process with unionfs.Mount.
var FUSE Target = fuseTarget{name: "strata"}

type fuseTarget struct {
	name   string
	adjust func(*unionfs.Options)
}

// FUSEWith is strata with options adjusted before mounting (for variants:
// rootless formats, timeouts, ...), labelled name.
func FUSEWith(name string, adjust func(*unionfs.Options)) Target {
	return fuseTarget{name: name, adjust: adjust}
}

func (f fuseTarget) Name() string { return f.name }

func (f fuseTarget) Require(t testing.TB) {
	t.Helper()
	RequireFUSE(t)
}

func (f fuseTarget) Mount(t testing.TB, o unionfs.Options) *Mounted {
	t.Helper()
	o = cloneOptions(o)
	if f.adjust != nil {
		f.adjust(&o)
	}
	mnt := t.TempDir()
	srv, err := unionfs.Mount(mnt, o)
	if err != nil {
		t.Fatalf("%s: mount %s: %v", f.name, mnt, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(mnt, &st); err != nil {
		t.Errorf("%s: stat %s: %v", f.name, mnt, err)
	}
	conn := unix.Minor(st.Dev)
	return newMounted(t, f.name, mnt, srv.Unmount, func() error {
		// The server cannot stop while the kernel holds the connection:
		// detach the mount, abort the connection, then wait for the
		// server to notice.
		err := unix.Unmount(mnt, unix.MNT_DETACH)
		if err != nil && os.Geteuid() != 0 {
			// Mounted through fusermount3 by a user: unmounted the same way.
			if out, ferr := exec.Command("fusermount3", "-u", "-z", mnt).CombinedOutput(); ferr != nil {
				err = fmt.Errorf("fusermount3 -u -z: %v: %s", ferr, bytes.TrimSpace(out))
			} else {
				err = nil
			}
		}
		// Aborting needs root in the initial namespace; without it, the
		// server stops once the detached mount is no longer used.
		abort := "/sys/fs/fuse/connections/" + strconv.FormatUint(uint64(conn), 10) + "/abort"
		werr := os.WriteFile(abort, []byte("1"), 0)
		stopped := make(chan struct{})
		go func() { srv.Wait(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(10 * time.Second):
			err = errors.Join(err, werr, fmt.Errorf("server did not stop"))
		}
		return err
	})
}

// cloneOptions copies o deeply enough that Resolve and adjustments on the
// copy do not touch the caller's slices.
func cloneOptions(o unionfs.Options) unionfs.Options {
	o.Lowers = append([]string(nil), o.Lowers...)
	o.MountFlags = append([]string(nil), o.MountFlags...)
	return o
}
