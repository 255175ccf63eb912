package inspect

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"strata/unionfs"
)

// ErrInUse is returned (wrapped) when a change is refused because a live
// mount uses the layers: changing them under a mount is undefined
// behaviour for the kernel and for strata.
var ErrInUse = errors.New("in use by a live mount")

// realPath makes p absolute and resolves symlinks where it can, so that
// paths from the mount table compare with ours.
func realPath(p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		return p
	}
	if r, err := filepath.EvalSymlinks(a); err == nil {
		return r
	}
	return a
}

// mountsUsing lists the live kernel overlay mounts, and this user's strata
// mounts, of this mount namespace that use any of dirs as a layer or work
// dir: "MOUNTPOINT (engine)" each.
func mountsUsing(dirs []string) ([]string, error) {
	want := map[string]bool{}
	for _, d := range dirs {
		if d != "" {
			want[realPath(d)] = true
		}
	}
	mounts, err := unionfs.ReadMounts()
	if err != nil {
		return nil, fmt.Errorf("read the mount table: %w", err)
	}
	var out []string
	for _, m := range mounts {
		o := m.Options
		if m.Engine == unionfs.EngineFUSE {
			st, err := unionfs.ReadState(m.Mountpoint)
			if err != nil {
				continue // another user's mount: its work dir lock covers it
			}
			if o, err = unionfs.ParseOptions(st.Options); err != nil {
				continue
			}
		}
		used := append(slices.Clone(o.Lowers), o.Upper, o.Work)
		if slices.ContainsFunc(used, func(p string) bool { return p != "" && want[realPath(p)] }) {
			out = append(out, fmt.Sprintf("%s (%s)", m.Mountpoint, m.Engine))
		}
	}
	return out, nil
}

// inUse lists what uses the stack's upper and work dirs, without taking
// anything: strata's work dir lock (probed with a shared lock, released at
// once) and the mount table.
func inUse(o unionfs.Options) []string {
	var users []string
	if o.Work != "" {
		if fd, err := unix.Open(o.Work, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err == nil {
			if errors.Is(unix.Flock(fd, unix.LOCK_SH|unix.LOCK_NB), unix.EWOULDBLOCK) {
				users = append(users, "a strata mount (it holds the work dir's lock)")
			}
			unix.Close(fd)
		}
	}
	if m, err := mountsUsing([]string{o.Upper, o.Work}); err == nil {
		users = append(users, m...)
	}
	return users
}

// claim makes sure no live mount uses the stack's upper and work dirs (or
// any of extra) and keeps strata mounts out until release is called: it
// takes the lock a strata mount holds on the work dir for its whole life
// (unionfs/mount.go: claimUpper). Kernel overlay mounts take no lock; the
// mount table is checked for them.
func claim(o unionfs.Options, extra ...string) (release func(), err error) {
	release = func() {}
	if o.Work != "" {
		fd, err := unix.Open(o.Work, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return release, &unionfs.LayerError{Role: "workdir", Path: o.Work, Err: err}
		}
		if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
			unix.Close(fd)
			if errors.Is(err, unix.EWOULDBLOCK) {
				return release, fmt.Errorf("workdir %s: %w (a strata mount holds its lock)", o.Work, ErrInUse)
			}
			return release, fmt.Errorf("lock workdir %s: %w", o.Work, err)
		}
		release = func() { unix.Close(fd) }
	}
	users, err := mountsUsing(append([]string{o.Upper, o.Work}, extra...))
	if err != nil {
		release()
		return func() {}, err
	}
	if len(users) > 0 {
		release()
		return func() {}, fmt.Errorf("%w: %s", ErrInUse, strings.Join(users, ", "))
	}
	return release, nil
}
