package cmd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"github.com/spf13/pflag"

	"strata/unionfs"
)

func init() {
	register(&command{
		name: "umount", args: "[flags] MOUNTPOINT", summary: "unmount a strata or kernel overlay mount",
		help: "Unmounts a strata mount (FUSE, also when its server died) or a kernel overlay mount.\nWithout root, FUSE mounts are unmounted through fusermount3.",
		setup: func(f *pflag.FlagSet) func(context.Context, *env, []string) error {
			lazy := f.BoolP("lazy", "l", false, "detach now, finish when no longer busy")
			abort := f.Bool("abort", false, "abort the FUSE connection first (for a server that hangs); pending requests fail")
			return func(ctx context.Context, e *env, args []string) error {
				if len(args) != 1 {
					return usagef("want exactly one MOUNTPOINT")
				}
				return unmount(args[0], *lazy, *abort)
			}
		},
	})
}

// unmount unmounts mnt, which must be a strata or overlay mount.
func unmount(mnt string, lazy, abort bool) error {
	abs, err := absPath(mnt)
	if err != nil {
		return err
	}
	mounts, err := unionfs.ReadMounts()
	if err != nil {
		return err
	}
	found, ok := unionfs.TopMount(mounts, abs)
	if !ok {
		return fmt.Errorf("%s: not a strata or overlay mount", mnt)
	}
	if found.Engine == unionfs.EngineFUSE && (abort || unionfs.ServerGone(found)) {
		// A dead server's mount answers ENOTCONN; one whose server is
		// stuck would keep its callers waiting forever. Aborting the
		// connection fails every pending request, so that nothing stays
		// blocked and the unmount can finish.
		if err := unionfs.AbortFUSE(found); err != nil && abort {
			return fmt.Errorf("%s: %w", mnt, err)
		}
	}
	if os.Geteuid() == 0 {
		flags := 0
		if lazy {
			flags = syscall.MNT_DETACH
		}
		if err := syscall.Unmount(abs, flags); err != nil {
			if errors.Is(err, syscall.EBUSY) {
				return fmt.Errorf("%s: busy (retry with --lazy to detach it)", mnt)
			}
			return fmt.Errorf("%s: %w", mnt, err)
		}
		return nil
	}
	if found.Engine != unionfs.EngineFUSE {
		return fmt.Errorf("%s: unmounting a kernel overlay mount needs root (or its user namespace)", mnt)
	}
	args := []string{"-u"}
	if lazy {
		args = append(args, "-z")
	}
	out, err := exec.Command("fusermount3", append(args, abs)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: fusermount3: %s", mnt, strings.TrimSpace(string(out)))
	}
	return nil
}
