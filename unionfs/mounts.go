package unionfs

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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
		fstype, source, super := f[sep+1], unescapeMountinfo(f[sep+2]), f[sep+3]
		m := MountInfo{Mountpoint: unescapeMountinfo(f[4]), Source: source, Super: unescapeMountinfo(super)}
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
		v = unescapeMountinfo(v)
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

// unescapeMountinfo undoes the octal escapes of mountinfo fields.
func unescapeMountinfo(s string) string {
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
