package stress

import (
	"bufio"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"strata/unionfs"
)

// LazyUnmount detaches whatever is mounted at mnt.
func LazyUnmount(mnt string) error { return unix.Unmount(mnt, unix.MNT_DETACH) }

// MountinfoHas reports whether mountinfo text lists mount point mnt.
func MountinfoHas(mountinfo, mnt string) bool {
	for _, line := range strings.Split(mountinfo, "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && unionfs.UnescapeMountinfo(f[4]) == mnt {
			return true
		}
	}
	return false
}

// IsMounted reports whether mnt is a mount point in this mount namespace.
func IsMounted(mnt string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	return err == nil && MountinfoHas(string(b), mnt)
}

// FdCount counts the open fds of process pid ("self" for this one).
func FdCount(pid string) int {
	ents, err := os.ReadDir("/proc/" + pid + "/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

// ProcStatus returns a field of /proc/PID/status in kB (VmRSS, VmHWM...),
// or -1.
func ProcStatus(pid, field string) int64 {
	f, err := os.Open("/proc/" + pid + "/status")
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && k == field {
			fs := strings.Fields(v)
			if len(fs) > 0 {
				n, err := strconv.ParseInt(fs[0], 10, 64)
				if err == nil {
					return n
				}
			}
		}
	}
	return -1
}
