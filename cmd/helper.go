package cmd

import "strings"

// helperForm reports whether args look like the mount.fuse helper
// convention "SOURCE MOUNTPOINT [-o OPTIONS] ...": mount(8) runs
// "mount.fuse.strata" or "strata" that way for "mount -t fuse.strata".
func helperForm(args []string) bool {
	if len(args) < 2 || strings.HasPrefix(args[0], "-") || strings.HasPrefix(args[1], "-") {
		return false
	}
	return strings.Contains(args[0], "/") || strings.Contains(args[1], "/") || hasO(args[2:])
}

func hasO(args []string) bool {
	for _, a := range args {
		if a == "-o" || strings.HasPrefix(a, "-o") {
			return true
		}
	}
	return false
}

// helperArgs turns "SOURCE MOUNTPOINT -o OPTS [-n] [-v]" into the argument
// list of "strata mount": "-o OPTS MOUNTPOINT". SOURCE is only the name
// shown in /proc/mounts (it becomes fsname unless OPTS set one). mount(8)
// may pass -n (no mtab), -s (sloppy), -f (fake), -v (verbose): they are
// accepted and ignored, except that -f becomes a dry run.
func helperArgs(args []string) []string {
	src, mnt := args[0], args[1]
	out := []string{}
	rest := args[2:]
	for i := 0; i < len(rest); i++ {
		a := rest[i]
		switch {
		case a == "-o" && i+1 < len(rest):
			out = append(out, "-o", rest[i+1])
			i++
		case strings.HasPrefix(a, "-o"):
			out = append(out, "-o", a[2:])
		case a == "-n" || a == "-s" || a == "-v":
		case a == "-f":
			out = append(out, "--dry-run")
		default:
			out = append(out, a)
		}
	}
	out = append(out, "--source", src, mnt)
	return out
}
