package unionfs

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// mountAttrs maps generic mount flags to the new mount API's attributes
// (fsmount) and to mount(2) flags.
var mountAttrs = map[string]struct {
	attr  uint64
	flags uintptr
}{
	"nosuid":      {unix.MOUNT_ATTR_NOSUID, unix.MS_NOSUID},
	"nodev":       {unix.MOUNT_ATTR_NODEV, unix.MS_NODEV},
	"noexec":      {unix.MOUNT_ATTR_NOEXEC, unix.MS_NOEXEC},
	"noatime":     {unix.MOUNT_ATTR_NOATIME, unix.MS_NOATIME},
	"relatime":    {unix.MOUNT_ATTR_RELATIME, unix.MS_RELATIME},
	"strictatime": {unix.MOUNT_ATTR_STRICTATIME, unix.MS_STRICTATIME},
	"nodiratime":  {unix.MOUNT_ATTR_NODIRATIME, unix.MS_NODIRATIME},
	"sync":        {0, unix.MS_SYNCHRONOUS},
	"dirsync":     {0, unix.MS_DIRSYNC},
	"lazytime":    {0, unix.MS_LAZYTIME},
}

// mountFlagBits returns the mount(2) flags for o's generic flags and
// read-only state, starting from relatime (the kernel's default; go-fuse
// wants a non-zero value to replace its own nosuid,nodev default, which
// kernel overlay does not have).
func (o *Options) mountFlagBits(readOnly bool) uintptr {
	flags := uintptr(unix.MS_RELATIME)
	for _, f := range o.MountFlags {
		if a, ok := mountAttrs[f]; ok {
			if f == "noatime" || f == "strictatime" {
				flags &^= unix.MS_RELATIME
			}
			flags |= a.flags
		}
	}
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	return flags
}

// KernelError is a kernel overlay mount that failed; Log holds what the
// kernel said about it (the fs_context log), if anything.
type KernelError struct {
	Step string
	Err  error
	Log  string
}

func (e *KernelError) Error() string {
	msg := fmt.Sprintf("kernel overlay: %s: %v", e.Step, e.Err)
	if e.Log != "" {
		msg += " (" + e.Log + ")"
	}
	return msg
}

func (e *KernelError) Unwrap() error { return e.Err }

// MountKernel hands the union described by o to kernel overlayfs: the
// same layers and options, from the same parsed Options that drive the
// FUSE engine. Options the kernel cannot honour are refused by name. It
// uses the new mount API (one "lowerdir+" per layer, so any path works and
// the mount data has no length limit) and falls back to mount(2) on
// kernels before 6.8.
func MountKernel(mountpoint string, o Options) error {
	if err := o.KernelIncompatible(); err != nil {
		return err
	}
	o.AutoXattr()
	if err := o.Resolve(); err != nil {
		return err
	}
	if err := o.Validate(); err != nil {
		return err
	}
	mnt, err := checkMountpoint(mountpoint)
	if err != nil {
		return err
	}
	var attrs uint64
	for _, f := range o.MountFlags {
		attrs |= mountAttrs[f].attr
	}
	if o.ReadOnly {
		attrs |= unix.MOUNT_ATTR_RDONLY
	}
	flags := o.mountFlagBits(o.ReadOnly)
	err = mountKernelNew(mnt, &o, attrs)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, errOldKernel) {
		data, derr := o.KernelData()
		if derr != nil {
			return derr
		}
		if merr := unix.Mount(source(&o), mnt, "overlay", flags, data); merr != nil {
			return &KernelError{Step: "mount", Err: merr}
		}
		return nil
	}
	return err
}

var errOldKernel = errors.New("kernel without lowerdir+")

func source(o *Options) string {
	if o.FsName != "" {
		return o.FsName
	}
	return "strata"
}

func mountKernelNew(mnt string, o *Options, attrs uint64) error {
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return err
	}
	defer unix.Close(fsfd)
	fail := func(step string, err error) error {
		return &KernelError{Step: step, Err: err, Log: readFsLog(fsfd)}
	}
	if err := unix.FsconfigSetString(fsfd, "source", source(o)); err != nil {
		return fail("source", err)
	}
	for i, l := range o.Lowers {
		if err := unix.FsconfigSetString(fsfd, "lowerdir+", l); err != nil {
			if i == 0 && errors.Is(err, unix.EINVAL) && !strings.Contains(readFsLog(fsfd), "lowerdir") {
				return errOldKernel
			}
			return fail("lowerdir+ "+l, err)
		}
	}
	if o.Upper != "" {
		if err := unix.FsconfigSetString(fsfd, "upperdir", o.Upper); err != nil {
			return fail("upperdir", err)
		}
		if err := unix.FsconfigSetString(fsfd, "workdir", o.Work); err != nil {
			return fail("workdir", err)
		}
	}
	if o.UserXattr {
		if err := unix.FsconfigSetFlag(fsfd, "userxattr"); err != nil {
			return fail("userxattr", err)
		}
	}
	if o.NoSync && o.Upper != "" {
		if err := unix.FsconfigSetFlag(fsfd, "volatile"); err != nil {
			return fail("volatile", err)
		}
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return fail("create", err)
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, int(attrs))
	if err != nil {
		return fail("fsmount", err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, mnt, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fail("move_mount", err)
	}
	return nil
}

// readFsLog drains the kernel's messages about a filesystem context.
func readFsLog(fsfd int) string {
	var msgs []string
	buf := make([]byte, 1024)
	for i := 0; i < 16; i++ {
		n, err := unix.Read(fsfd, buf)
		if err != nil || n <= 0 {
			break
		}
		msgs = append(msgs, strings.TrimSpace(string(buf[:n])))
	}
	return strings.Join(msgs, "; ")
}

// AutoXattr selects the userxattr format when this process cannot write
// trusted.* attributes: not root, or root of a user namespace (trusted.*
// needs CAP_SYS_ADMIN in the initial one). It reports whether it changed o.
func (o *Options) AutoXattr() bool {
	if o.UserXattr || privilegedXattrs() {
		return false
	}
	o.UserXattr = true
	return true
}

// privilegedXattrs reports whether this process may use trusted.* xattrs.
func privilegedXattrs() bool {
	if os.Geteuid() != 0 {
		return false
	}
	return InitialUserNS()
}

// InitialUserNS reports whether this process runs in the initial user
// namespace (its uid map is the identity over the whole range).
func InitialUserNS() bool {
	b, err := os.ReadFile("/proc/self/uid_map")
	if err != nil {
		return true
	}
	f := strings.Fields(string(b))
	return len(f) == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295"
}
