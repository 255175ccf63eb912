package unionfs

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"strata/whiteout"
)

// MaxLowers is the kernel's limit on lower layers (fs/overlayfs/params.h:
// OVL_MAX_STACK).
const MaxLowers = 500

// Options describe one union mount as data: the layer stack and every
// option, parsed from the kernel's -o syntax. The same value renders the
// kernel overlay mount data ([Options.KernelData]) and configures a FUSE
// mount, so the two engines always agree on what they mount.
type Options struct {
	// Lowers are the read-only layers, topmost first, as in
	// lowerdir=top:...:bottom.
	Lowers []string
	// Upper and Work are the writable layer and its scratch dir; both empty
	// for a read-only mount.
	Upper, Work string

	// UserXattr selects the kernel's userxattr format (user.overlay.*)
	// instead of trusted.overlay.*. It is set by -o userxattr, or chosen
	// automatically for unprivileged mounts (see [Options.Resolve]).
	UserXattr bool
	// ReadOnly is -o ro: no writes even with an upper layer.
	ReadOnly bool

	// MountFlags are generic mount flags (nosuid, nodev, noexec, noatime
	// ...), kept in the order given; both engines honour them.
	MountFlags []string

	// FUSE-only options.
	AllowOther         bool
	DefaultPermissions bool
	FsName             string
	// SquashUID/SquashGID, when >= 0, make every object appear owned by
	// that id (fuse-overlayfs squash_to_uid/squash_to_gid; squash_to_root
	// sets both to 0).
	SquashUID, SquashGID int
	// UIDMap/GIDMap translate ids between the layers (host) and the mount
	// (container), as fuse-overlayfs uidmapping/gidmapping.
	UIDMap, GIDMap IDMap
	// NoSync makes fsync a no-op and copy-up skip its fsync (kernel
	// "volatile" semantics without the incompat marker; fuse-overlayfs
	// fsync=0).
	NoSync bool

	// Timeouts for the kernel's entry, attribute and negative-entry
	// caches. strata is the only writer of the upper dir while mounted,
	// so long timeouts are safe.
	EntryTimeout, AttrTimeout, NegativeTimeout time.Duration

	// Force permits an upper or work dir already used by another live
	// mount.
	Force bool

	// NoSelfAccess says the mounting process never touches the mount
	// itself (the daemon): go-fuse's poll hack, which opens a file on the
	// new mount from the serving process, is skipped. Killed during that
	// open, a server would wait forever for its own answer.
	NoSelfAccess bool

	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
	// DebugFUSE dumps the FUSE protocol to the logger.
	DebugFUSE bool
}

// DefaultTimeout is the entry/attr/negative cache timeout of a mount when
// -o timeout= is not given.
const DefaultTimeout = time.Hour

// NS returns the xattr namespace of overlay-private attributes.
func (o *Options) NS() whiteout.NS {
	if o.UserXattr {
		return whiteout.User
	}
	return whiteout.Trusted
}

// Writable reports whether the mount takes changes.
func (o *Options) Writable() bool { return o.Upper != "" && !o.ReadOnly }

// IDMap is a list of id ranges, "container:host:size" each.
type IDMap []IDRange

// IDRange maps Size ids from Container to Host.
type IDRange struct{ Container, Host, Size uint32 }

// ToHost maps a container id to the host id; ok is false when unmapped.
func (m IDMap) ToHost(id uint32) (uint32, bool) {
	if len(m) == 0 {
		return id, true
	}
	for _, r := range m {
		if id >= r.Container && id-r.Container < r.Size {
			return r.Host + (id - r.Container), true
		}
	}
	return 0, false
}

// ToContainer maps a host id to the container id; ok is false when unmapped.
func (m IDMap) ToContainer(id uint32) (uint32, bool) {
	if len(m) == 0 {
		return id, true
	}
	for _, r := range m {
		if id >= r.Host && id-r.Host < r.Size {
			return r.Container + (id - r.Host), true
		}
	}
	return 0, false
}

func (m IDMap) String() string {
	parts := make([]string, len(m))
	for i, r := range m {
		parts[i] = fmt.Sprintf("%d:%d:%d", r.Container, r.Host, r.Size)
	}
	return strings.Join(parts, ":")
}

func parseIDMap(val string) (IDMap, error) {
	f := strings.Split(val, ":")
	if len(f)%3 != 0 || val == "" {
		return nil, fmt.Errorf("want container:host:size triples, got %q", val)
	}
	var m IDMap
	for i := 0; i < len(f); i += 3 {
		var n [3]uint32
		for j := range n {
			v, err := strconv.ParseUint(f[i+j], 10, 32)
			if err != nil {
				return nil, fmt.Errorf("bad number %q in %q", f[i+j], val)
			}
			n[j] = uint32(v)
		}
		if n[2] == 0 {
			return nil, fmt.Errorf("empty range in %q", val)
		}
		m = append(m, IDRange{Container: n[0], Host: n[1], Size: n[2]})
	}
	return m, nil
}

// OptionError is a malformed, unknown or unsupported mount option.
type OptionError struct {
	Option string
	Reason string
}

func (e *OptionError) Error() string { return fmt.Sprintf("option %q: %s", e.Option, e.Reason) }

// genericFlags are mount flags both engines understand.
var genericFlags = map[string]bool{
	"nosuid": true, "suid": true, "nodev": true, "dev": true, "noexec": true, "exec": true,
	"noatime": true, "atime": true, "relatime": true, "norelatime": true, "strictatime": true,
	"nodiratime": true, "diratime": true, "lazytime": true, "nolazytime": true,
	"sync": true, "async": true, "dirsync": true,
}

// ignoredHelperFlags are passed by mount(8) to helpers and carry nothing a
// filesystem acts on (mount.fuse semantics).
var ignoredHelperFlags = map[string]bool{
	"rw": true, "defaults": true, "auto": true, "noauto": true, "user": true, "nouser": true,
	"users": true, "owner": true, "_netdev": true, "nofail": true, "loud": true, "silent": true,
}

// kernelOnly are kernel overlay options strata does not implement, with
// the value strata's behaviour corresponds to (if any). An option set to
// that value is accepted; any other value is refused by name.
var kernelOnly = map[string]string{
	"redirect_dir":   "off",  // strata: EXDEV for lower/merged dir renames
	"index":          "off",  // strata: copy-up breaks lower hard links
	"metacopy":       "off",  // strata: full copy-up
	"nfs_export":     "off",  // strata: no NFS export
	"uuid":           "",     // accepted for any value: strata keeps no origin file handles
	"verity":         "off",  // strata: no fs-verity checks
	"xino":           "",     // accepted for any value: strata's st_ino is always unique
	"override_creds": "\x00", // refused
}

// ParseOptions parses mount data in the kernel's syntax: comma-separated
// options, "\," escaping a comma and "\:" a colon inside lowerdir (and "\\"
// a backslash). Paths are kept as given; see [Options.Resolve].
func ParseOptions(data string) (Options, error) {
	return parseOptions(data, true)
}

// ParseLayerOptions parses like ParseOptions but accepts an upperdir
// without workdir: offline tools (explain, diff, fsck, merge, export) read
// the layers and never need the work dir.
func ParseLayerOptions(data string) (Options, error) {
	return parseOptions(data, false)
}

func parseOptions(data string, needWork bool) (Options, error) {
	o := Options{SquashUID: -1, SquashGID: -1,
		EntryTimeout: DefaultTimeout, AttrTimeout: DefaultTimeout, NegativeTimeout: DefaultTimeout}
	var seenLower bool
	for _, opt := range splitEscaped(data, ',') {
		if opt == "" {
			continue
		}
		key, val, hasVal := strings.Cut(opt, "=")
		bad := func(reason string) (Options, error) { return Options{}, &OptionError{Option: opt, Reason: reason} }
		needVal := func() bool { return hasVal && val != "" }
		switch key {
		case "lowerdir":
			if !needVal() {
				return bad("needs at least one directory")
			}
			lowers, err := splitLowers(val)
			if err != nil {
				return bad(err.Error())
			}
			o.Lowers, seenLower = lowers, true
		case "upperdir":
			if !needVal() {
				return bad("needs a directory")
			}
			o.Upper = unescape(val)
		case "workdir":
			if !needVal() {
				return bad("needs a directory")
			}
			o.Work = unescape(val)
		case "userxattr":
			o.UserXattr = true
		case "ro":
			o.ReadOnly = true
		case "allow_other":
			o.AllowOther = true
		case "default_permissions":
			o.DefaultPermissions = true
		case "fsname":
			o.FsName = unescape(val)
		case "squash_to_root":
			o.SquashUID, o.SquashGID = 0, 0
		case "squash_to_uid", "squash_to_gid":
			n, err := strconv.ParseUint(val, 10, 32)
			if err != nil {
				return bad("needs a numeric id")
			}
			if key == "squash_to_uid" {
				o.SquashUID = int(n)
			} else {
				o.SquashGID = int(n)
			}
		case "uidmapping", "gidmapping":
			m, err := parseIDMap(val)
			if err != nil {
				return bad(err.Error())
			}
			if key == "uidmapping" {
				o.UIDMap = m
			} else {
				o.GIDMap = m
			}
		case "fsync":
			switch val {
			case "0":
				o.NoSync = true
			case "1":
				o.NoSync = false
			default:
				return bad("must be 0 or 1")
			}
		case "volatile":
			o.NoSync = true
		case "timeout":
			secs, err := strconv.ParseFloat(val, 64)
			if err != nil || secs < 0 {
				return bad("needs seconds >= 0")
			}
			d := time.Duration(secs * float64(time.Second))
			o.EntryTimeout, o.AttrTimeout, o.NegativeTimeout = d, d, d
		default:
			if genericFlags[key] && !hasVal {
				o.MountFlags = append(o.MountFlags, key)
				continue
			}
			if ignoredHelperFlags[key] && !hasVal {
				continue
			}
			if want, ok := kernelOnly[key]; ok {
				if want == "" || (hasVal && val == want) {
					continue
				}
				if want == "\x00" {
					return bad("kernel overlay option not supported by strata")
				}
				return bad(fmt.Sprintf("not supported by strata (only %s=%s)", key, want))
			}
			return bad("unknown option")
		}
	}
	if !seenLower {
		return Options{}, &OptionError{Option: "lowerdir", Reason: "missing: at least one lower layer is required"}
	}
	if (o.Upper == "") != (o.Work == "") && (needWork || o.Upper == "") {
		return Options{}, &OptionError{Option: "upperdir/workdir", Reason: "upperdir and workdir must be given together"}
	}
	if o.SquashUID >= 0 && len(o.UIDMap) > 0 || o.SquashGID >= 0 && len(o.GIDMap) > 0 {
		return Options{}, &OptionError{Option: "squash_to_*", Reason: "cannot be combined with uidmapping/gidmapping"}
	}
	return o, nil
}

// splitEscaped splits s at sep, honouring backslash escapes; escapes are
// kept so that the parts can be split again.
func splitEscaped(s string, sep byte) []string {
	var parts []string
	start := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\':
			i++
		case sep:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	return append(parts, s[start:])
}

// unescape removes one level of backslash escaping.
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func splitLowers(val string) ([]string, error) {
	var lowers []string
	for _, p := range splitEscaped(val, ':') {
		if p == "" {
			// "::" is the kernel's data-only layer separator.
			return nil, errors.New("empty layer (data-only layers \"::\" are not supported by strata)")
		}
		lowers = append(lowers, unescape(p))
	}
	if len(lowers) > MaxLowers {
		return nil, fmt.Errorf("%d lower layers, the limit is %d", len(lowers), MaxLowers)
	}
	return lowers, nil
}

// escapeLayer escapes a path for the kernel's mount data: backslash, comma
// and colon.
func escapeLayer(p string) string {
	r := strings.NewReplacer(`\`, `\\`, `,`, `\,`, `:`, `\:`)
	return r.Replace(p)
}

// KernelData renders the options that kernel overlay understands, in its
// syntax. It fails, naming the option, if o holds an option that only the
// FUSE engine can honour.
func (o *Options) KernelData() (string, error) {
	if err := o.KernelIncompatible(); err != nil {
		return "", err
	}
	parts := []string{o.layerData()}
	if o.NoSync && o.Upper != "" {
		parts = append(parts, "volatile")
	}
	return strings.Join(parts, ","), nil
}

// layerData renders the layers and the xattr format in the kernel's syntax.
func (o *Options) layerData() string {
	var parts []string
	lowers := make([]string, len(o.Lowers))
	for i, l := range o.Lowers {
		lowers[i] = escapeLayer(l)
	}
	parts = append(parts, "lowerdir="+strings.Join(lowers, ":"))
	if o.Upper != "" {
		parts = append(parts, "upperdir="+escapeLayer(o.Upper), "workdir="+escapeLayer(o.Work))
	}
	if o.UserXattr {
		parts = append(parts, "userxattr")
	}
	return strings.Join(parts, ",")
}

// KernelIncompatible returns an error naming the first option that kernel
// overlay cannot honour, or nil.
func (o *Options) KernelIncompatible() error {
	switch {
	case o.AllowOther:
		return &OptionError{Option: "allow_other", Reason: "FUSE-only option (kernel overlay is always visible to all users)"}
	case o.DefaultPermissions:
		return &OptionError{Option: "default_permissions", Reason: "FUSE-only option"}
	case o.SquashUID >= 0 || o.SquashGID >= 0:
		return &OptionError{Option: "squash_to_*", Reason: "FUSE-only option"}
	case len(o.UIDMap) > 0 || len(o.GIDMap) > 0:
		return &OptionError{Option: "uidmapping/gidmapping", Reason: "FUSE-only option"}
	case o.FsName != "":
		return &OptionError{Option: "fsname", Reason: "FUSE-only option"}
	case o.EntryTimeout != DefaultTimeout || o.AttrTimeout != DefaultTimeout || o.NegativeTimeout != DefaultTimeout:
		return &OptionError{Option: "timeout", Reason: "FUSE-only option (kernel overlay has no cache timeouts)"}
	}
	return nil
}

// String renders o in strata's own -o syntax, so that ParseOptions(o.String())
// gives o back.
func (o *Options) String() string {
	parts := []string{o.layerData()}
	if o.ReadOnly {
		parts = append(parts, "ro")
	}
	parts = append(parts, o.MountFlags...)
	if o.AllowOther {
		parts = append(parts, "allow_other")
	}
	if o.DefaultPermissions {
		parts = append(parts, "default_permissions")
	}
	if o.FsName != "" {
		parts = append(parts, "fsname="+strings.NewReplacer(`\`, `\\`, `,`, `\,`).Replace(o.FsName))
	}
	if o.SquashUID >= 0 {
		parts = append(parts, fmt.Sprintf("squash_to_uid=%d", o.SquashUID))
	}
	if o.SquashGID >= 0 {
		parts = append(parts, fmt.Sprintf("squash_to_gid=%d", o.SquashGID))
	}
	if len(o.UIDMap) > 0 {
		parts = append(parts, "uidmapping="+o.UIDMap.String())
	}
	if len(o.GIDMap) > 0 {
		parts = append(parts, "gidmapping="+o.GIDMap.String())
	}
	if o.NoSync {
		parts = append(parts, "fsync=0")
	}
	if o.EntryTimeout != DefaultTimeout {
		parts = append(parts, "timeout="+strconv.FormatFloat(o.EntryTimeout.Seconds(), 'f', -1, 64))
	}
	return strings.Join(parts, ",")
}

// Resolve makes every layer path absolute and clean, so that the mount
// does not depend on the working directory and paths can be compared.
func (o *Options) Resolve() error {
	abs := func(p string) (string, error) {
		a, err := filepath.Abs(p)
		if err != nil {
			return "", fmt.Errorf("%s: %w", p, err)
		}
		return a, nil
	}
	for i, l := range o.Lowers {
		a, err := abs(l)
		if err != nil {
			return err
		}
		o.Lowers[i] = a
	}
	var err error
	if o.Upper != "" {
		if o.Upper, err = abs(o.Upper); err != nil {
			return err
		}
	}
	if o.Work != "" {
		if o.Work, err = abs(o.Work); err != nil {
			return err
		}
	}
	return nil
}

// LayerError is a problem with one of the directories of a mount.
type LayerError struct {
	Role string // "lowerdir", "upperdir", "workdir", "mountpoint"
	Path string
	Err  error
}

func (e *LayerError) Error() string { return fmt.Sprintf("%s %s: %v", e.Role, e.Path, e.Err) }
func (e *LayerError) Unwrap() error { return e.Err }

// Validate checks the directories of a resolved mount the way the kernel
// does before it mounts (fs/overlayfs/super.c, params.c), and a little
// more: every layer must be an existing directory; upper and work must be
// on one filesystem (copy-up renames from work into upper), neither inside
// the other; no lower may be inside the upper or work dir, nor contain
// them. It reads only; nothing on disk changes.
func (o *Options) Validate() error {
	dirStat := func(role, p string) (*unix.Stat_t, error) {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			return nil, &LayerError{role, p, err}
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return nil, &LayerError{role, p, unix.ENOTDIR}
		}
		return &st, nil
	}
	for _, l := range o.Lowers {
		if _, err := dirStat("lowerdir", l); err != nil {
			return err
		}
	}
	if o.Upper == "" {
		return nil
	}
	ust, err := dirStat("upperdir", o.Upper)
	if err != nil {
		return err
	}
	if o.Work == "" {
		// Offline use (OpenStack): only the layers are read.
		return o.checkLowersApart(o.Upper, "")
	}
	wst, err := dirStat("workdir", o.Work)
	if err != nil {
		return err
	}
	if ust.Dev != wst.Dev {
		return &LayerError{"workdir", o.Work, errors.New("not on the same filesystem as upperdir " + o.Upper)}
	}
	if ust.Ino == wst.Ino {
		return &LayerError{"workdir", o.Work, errors.New("is the same directory as upperdir")}
	}
	up, wk := realPath(o.Upper), realPath(o.Work)
	if within(wk, up) {
		return &LayerError{"workdir", o.Work, errors.New("is inside upperdir " + o.Upper)}
	}
	if within(up, wk) {
		return &LayerError{"upperdir", o.Upper, errors.New("is inside workdir " + o.Work)}
	}
	return o.checkLowersApart(up, wk)
}

// checkLowersApart refuses a lower layer inside the (resolved) upper or
// work dir, or containing one of them; wk may be "".
func (o *Options) checkLowersApart(up, wk string) error {
	for _, l := range o.Lowers {
		lr := realPath(l)
		for _, w := range []struct{ role, p, orig string }{{"upperdir", up, o.Upper}, {"workdir", wk, o.Work}} {
			if w.p == "" {
				continue
			}
			if lr == w.p || within(lr, w.p) {
				return &LayerError{"lowerdir", l, fmt.Errorf("is inside %s %s", w.role, w.orig)}
			}
			if within(w.p, lr) {
				return &LayerError{w.role, w.orig, fmt.Errorf("is inside lowerdir %s", l)}
			}
		}
	}
	return nil
}

// realPath resolves symlinks in p where it can.
func realPath(p string) string {
	if r, err := filepath.EvalSymlinks(p); err == nil {
		return r
	}
	return p
}

// within reports whether path p is strictly below dir.
func within(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, "../")
}
