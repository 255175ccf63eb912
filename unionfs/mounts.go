package unionfs

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Engine says what serves a mount.
type Engine string

const (
	// EngineFUSE is strata's own FUSE server.
	EngineFUSE Engine = "fuse"
	// EngineKernel is kernel overlayfs (a hand-off, or any overlay mount).
	EngineKernel Engine = "kernel"
)

// MountInfo is one live union mount.
type MountInfo struct {
	Mountpoint string
	Engine     Engine
	Source     string
	// Options holds the layers of a kernel overlay mount (the kernel shows
	// them in mountinfo); for a FUSE mount only what the mount table shows.
	Options Options
	Super   string // raw super options
	// Minor is the minor device number of the mount: for FUSE, the
	// connection's number under /sys/fs/fuse/connections.
	Minor uint64
}

// ReadMounts lists the live strata and kernel overlay mounts of this mount
// namespace.
func ReadMounts() ([]MountInfo, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseMountInfo(f)
}

// TopMount returns the mount on top at mountpoint mnt (absolute) among
// mounts, as ReadMounts lists them (in mount order, so the last is on top).
func TopMount(mounts []MountInfo, mnt string) (MountInfo, bool) {
	var top MountInfo
	found := false
	for _, m := range mounts {
		if m.Mountpoint == mnt {
			top, found = m, true
		}
	}
	return top, found
}

// ParseMountInfo parses /proc/self/mountinfo text (proc(5)) and returns the
// strata and overlay mounts in it.
func ParseMountInfo(r io.Reader) ([]MountInfo, error) {
	var out []MountInfo
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		sep := -1
		for i, x := range f {
			if x == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || len(f) < sep+4 {
			continue
		}
		fstype, source, super := f[sep+1], UnescapeMountinfo(f[sep+2]), f[sep+3]
		m := MountInfo{Mountpoint: UnescapeMountinfo(f[4]), Source: source, Super: UnescapeMountinfo(super)}
		if _, min, ok := strings.Cut(f[2], ":"); ok {
			m.Minor, _ = strconv.ParseUint(min, 10, 32)
		}
		switch fstype {
		case "overlay":
			m.Engine = EngineKernel
			m.Options = overlayLayers(super)
		case FSType:
			m.Engine = EngineFUSE
		default:
			continue
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	return out, nil
}

// overlayLayers reads the layers of a kernel overlay mount from its
// escaped super options: "lowerdir+=" per layer (new mount API) or
// "lowerdir=a:b" (mount(2), colons in paths escaped as "\:").
func overlayLayers(super string) Options {
	o := Options{SquashUID: -1, SquashGID: -1}
	for _, opt := range strings.Split(super, ",") {
		k, v, _ := strings.Cut(opt, "=")
		v = UnescapeMountinfo(v)
		switch k {
		case "lowerdir+":
			o.Lowers = append(o.Lowers, v)
		case "lowerdir":
			for _, l := range splitEscaped(v, ':') {
				if l != "" {
					o.Lowers = append(o.Lowers, unescape(l))
				}
			}
		case "upperdir":
			o.Upper = v
		case "workdir":
			o.Work = v
		case "userxattr":
			o.UserXattr = true
		}
	}
	return o
}

// UnescapeMountinfo undoes the octal escapes of mountinfo fields (proc(5)).
func UnescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func absPath(p string) (string, error) {
	a, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	if r, err := filepath.EvalSymlinks(a); err == nil {
		return r, nil
	}
	return a, nil
}

// AbortFUSE aborts the FUSE connection of a mount whose server is gone or
// stuck, so that every waiting request fails with ENOTCONN and the mount
// can be unmounted. It writes to fusectl's abort file, mounting a private
// fusectl instance when /sys/fs/fuse/connections is not mounted.
func AbortFUSE(m MountInfo) error {
	rel := filepath.Join(strconv.FormatUint(m.Minor, 10), "abort")
	if err := os.WriteFile(filepath.Join("/sys/fs/fuse/connections", rel), []byte("1"), 0o200); err == nil {
		return nil
	}
	dir, err := os.MkdirTemp("", "strata-fusectl-")
	if err != nil {
		return err
	}
	defer os.Remove(dir)
	if err := unix.Mount("fusectl", dir, "fusectl", 0, ""); err != nil {
		return fmt.Errorf("mount fusectl to abort the connection: %w", err)
	}
	defer unix.Unmount(dir, unix.MNT_DETACH)
	if err := os.WriteFile(filepath.Join(dir, rel), []byte("1"), 0o200); err != nil {
		return fmt.Errorf("abort FUSE connection %d: %w", m.Minor, err)
	}
	return nil
}

// ServerGone reports whether the strata server of a FUSE mount recorded by
// this user has died or hangs in the kernel (a zombie, or a thread stuck
// in uninterruptible sleep while its process is exiting).
func ServerGone(m MountInfo) bool {
	st, err := ReadState(m.Mountpoint)
	if err != nil {
		// No record: judge by the mount itself.
		var s unix.Stat_t
		return errors.Is(unix.Stat(m.Mountpoint, &s), unix.ENOTCONN)
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(st.Pid) + "/stat")
	if err != nil {
		return true
	}
	// pid (comm) state ...: the comm may hold spaces and parentheses.
	rest := string(b[strings.LastIndexByte(string(b), ')')+1:])
	f := strings.Fields(rest)
	if len(f) == 0 {
		return true
	}
	if f[0] == "Z" || f[0] == "X" {
		return true
	}
	cmd, _ := os.ReadFile("/proc/" + strconv.Itoa(st.Pid) + "/cmdline")
	return !strings.Contains(string(cmd), "strata")
}
