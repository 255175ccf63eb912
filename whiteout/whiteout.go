package whiteout

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"strata/internal/sysx"
)

// NS is the extended-attribute namespace that holds overlay's private
// attributes for one mount.
type NS int

const (
	// Trusted is the kernel's default format: "trusted.overlay.*". Writing it
	// needs CAP_SYS_ADMIN.
	Trusted NS = iota
	// User is the kernel's userxattr format: "user.overlay.*", used by
	// unprivileged mounts.
	User
)

// Both lists the namespaces, the privileged one first.
var Both = []NS{Trusted, User}

// String returns the name used in mount options and messages.
func (ns NS) String() string {
	if ns == User {
		return "user"
	}
	return "trusted"
}

// Prefix returns the attribute prefix of the namespace, with the final dot.
func (ns NS) Prefix() string {
	if ns == User {
		return "user.overlay."
	}
	return "trusted.overlay."
}

// Opaque returns the name of the opaque-directory attribute.
func (ns NS) Opaque() string { return ns.Prefix() + "opaque" }

// Whiteout returns the name of the attribute that marks an xattr whiteout.
func (ns NS) Whiteout() string { return ns.Prefix() + "whiteout" }

// IsPrivate reports whether name is an overlay-private attribute of ns. Such
// attributes are hidden from the merged view and never copied up.
func (ns NS) IsPrivate(name string) bool { return strings.HasPrefix(name, ns.Prefix()) }

// Escape maps an attribute name of the merged view to the name stored in
// a layer. Overlay-private names are escaped with one more "overlay." so
// that they are kept as user data: setting "trusted.overlay.x" through a
// mount stores "trusted.overlay.overlay.x" (fs/overlayfs/xattrs.c,
// Documentation/filesystems/overlayfs.rst "Nesting overlayfs mounts").
func (ns NS) Escape(name string) string {
	if ns.IsPrivate(name) {
		return ns.Prefix() + "overlay." + name[len(ns.Prefix()):]
	}
	return name
}

// Shown maps a stored attribute name to the name a merged view shows, or
// "" for an overlay-private attribute that stays hidden.
func (ns NS) Shown(stored string) string {
	if !ns.IsPrivate(stored) {
		return stored
	}
	if ns.IsEscaped(stored) {
		return ns.Prefix() + stored[len(ns.Prefix()+"overlay."):]
	}
	return ""
}

// IsEscaped reports whether a stored name is an escaped private attribute
// ("trusted.overlay.overlay.X"): user data, shown as "trusted.overlay.X"
// and copied up like any other attribute.
func (ns NS) IsEscaped(stored string) bool {
	p := ns.Prefix() + "overlay."
	return len(stored) > len(p) && stored[:len(p)] == p
}

// IsPrivateXattr reports whether name is an overlay-private attribute in
// either namespace. Offline tools use it when they do not know which
// namespace a layer was written for.
func IsPrivateXattr(name string) bool {
	return Trusted.IsPrivate(name) || User.IsPrivate(name)
}

// IsCharWhiteout reports whether st describes the kernel's classic whiteout,
// a character device with device number 0/0.
func IsCharWhiteout(st *unix.Stat_t) bool {
	return st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0
}

// MaybeXattrWhiteout reports whether st could be an xattr whiteout: a
// zero-size regular file. Only such files need the xattr check.
func MaybeXattrWhiteout(st *unix.Stat_t) bool {
	return st.Mode&unix.S_IFMT == unix.S_IFREG && st.Size == 0
}

// HasWhiteoutXattr reports whether name in dirfd carries the overlay.whiteout
// attribute of ns. The entry is not followed if it is a symlink.
func HasWhiteoutXattr(dirfd int, name string, ns NS) (bool, error) {
	ok, err := hasXattr(dirfd, name, ns.Whiteout())
	if err != nil {
		return false, fmt.Errorf("read %s of %q: %w", ns.Whiteout(), name, err)
	}
	return ok, nil
}

// IsWhiteout reports whether the entry name of dirfd, whose lstat result is
// st, is a whiteout in namespace ns: a 0/0 character device, or a zero-size
// regular file with the overlay.whiteout attribute. The kernel's lookup
// honours xattr whiteouts wherever it finds them (fs/overlayfs/util.c:
// ovl_path_is_whiteout); readdir filters them only in directories marked
// opaque "x", see [Opacity].
func IsWhiteout(dirfd int, name string, st *unix.Stat_t, ns NS) (bool, error) {
	if IsCharWhiteout(st) {
		return true, nil
	}
	if !MaybeXattrWhiteout(st) {
		return false, nil
	}
	return HasWhiteoutXattr(dirfd, name, ns)
}

// Create makes a classic whiteout, a 0/0 character device with mode 0, named
// name in dirfd. Linux 5.8 and later let any user create it.
func Create(dirfd int, name string) error {
	if err := unix.Mknodat(dirfd, name, unix.S_IFCHR, 0); err != nil {
		return fmt.Errorf("create whiteout %q: %w", name, err)
	}
	return nil
}

// CreateXattr makes an xattr whiteout (a zero-size regular file with the
// overlay.whiteout attribute) named name in dirfd. The kernel never writes
// this form; image tools do, and strata's tests use it to build lower layers.
// The caller marks the directory with [SetOpacity](…, XattrWhiteouts).
func CreateXattr(dirfd int, name string, ns NS) error {
	// Writable until the attribute is set: without CAP_DAC_OVERRIDE, a
	// user.* attribute needs write permission on the file (its owner's
	// too); the whiteout keeps mode 0 as before.
	fd, err := unix.Openat(dirfd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create xattr whiteout %q: %w", name, err)
	}
	defer unix.Close(fd)
	if err := unix.Fsetxattr(fd, ns.Whiteout(), nil, 0); err != nil {
		return fmt.Errorf("create xattr whiteout %q: set %s: %w", name, ns.Whiteout(), err)
	}
	if err := unix.Fchmod(fd, 0); err != nil {
		return fmt.Errorf("create xattr whiteout %q: %w", name, err)
	}
	return nil
}

// Opacity is the value of a directory's overlay.opaque attribute.
type Opacity int

const (
	// NotOpaque: no attribute (or a value the kernel ignores).
	NotOpaque Opacity = iota
	// Opaque ("y"): the directory hides the same-named directories below.
	Opaque
	// XattrWhiteouts ("x"): not opaque, but the directory holds xattr
	// whiteouts that readdir must filter.
	XattrWhiteouts
)

// String returns the attribute value, or "-" for NotOpaque.
func (o Opacity) String() string {
	switch o {
	case Opaque:
		return "y"
	case XattrWhiteouts:
		return "x"
	}
	return "-"
}

// ParseOpacity interprets the raw value of an overlay.opaque attribute the
// way the kernel does (fs/overlayfs/util.c:ovl_get_opaquedir_val): only
// exactly "y" and "x" mean something.
func ParseOpacity(val []byte) Opacity {
	if len(val) == 1 {
		switch val[0] {
		case 'y':
			return Opaque
		case 'x':
			return XattrWhiteouts
		}
	}
	return NotOpaque
}

// GetOpacity reads the overlay.opaque attribute of namespace ns from the
// entry name of dirfd (name "" or "." means dirfd itself). A missing
// attribute, or a filesystem without xattrs, is NotOpaque.
func GetOpacity(dirfd int, name string, ns NS) (Opacity, error) {
	var buf [8]byte
	n, err := sysx.Getxattr(dirfd, name, ns.Opaque(), buf[:])
	switch {
	case err == nil:
		return ParseOpacity(buf[:n]), nil
	case errors.Is(err, unix.ENODATA), errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ERANGE):
		// ERANGE: a value longer than 8 bytes is not "y" or "x".
		return NotOpaque, nil
	case errors.Is(err, unix.EACCES):
		// No read permission on the directory (an unprivileged mounter
		// on a mode-0 one): its names can still be listed, and without
		// the attribute it is not opaque. A value that cannot be read
		// stays an error.
		if ok, lerr := listed(dirfd, name, ns.Opaque()); lerr == nil && !ok {
			return NotOpaque, nil
		}
	}
	return NotOpaque, fmt.Errorf("read %s of %q: %w", ns.Opaque(), name, err)
}

// SetOpacity writes the overlay.opaque attribute of namespace ns on the
// directory name of dirfd ("" or "." for dirfd itself). NotOpaque removes
// it.
func SetOpacity(dirfd int, name string, ns NS, o Opacity) error {
	var err error
	if o == NotOpaque {
		err = sysx.Removexattr(dirfd, name, ns.Opaque())
		if errors.Is(err, unix.ENODATA) {
			err = nil
		}
	} else {
		err = sysx.Setxattr(dirfd, name, ns.Opaque(), []byte(o.String()), 0)
	}
	if err != nil {
		return fmt.Errorf("set %s=%s on %q: %w", ns.Opaque(), o, name, err)
	}
	return nil
}

// SetOpaque marks the directory name of dirfd opaque ("y").
func SetOpaque(dirfd int, name string, ns NS) error {
	return SetOpacity(dirfd, name, ns, Opaque)
}

// CheckName returns an error wrapping the errno the kernel gives for a
// directory entry name that cannot exist: EINVAL for "", ".", ".." or a name
// containing '/' or NUL, ENAMETOOLONG past NAME_MAX bytes.
func CheckName(name string) error {
	switch {
	case len(name) > unix.NAME_MAX:
		return fmt.Errorf("name of %d bytes: %w", len(name), unix.ENAMETOOLONG)
	case name == "" || name == "." || name == "..":
		return fmt.Errorf("name %q: %w", name, unix.EINVAL)
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("name %q: %w", name, unix.EINVAL)
	}
	return nil
}

func hasXattr(dirfd int, name, attr string) (bool, error) {
	_, err := sysx.Getxattr(dirfd, name, attr, nil)
	switch {
	case err == nil:
		return true, nil
	case sysx.IsNoAttr(err):
		return false, nil
	case errors.Is(err, unix.EACCES):
		// Reading a user.* attribute needs read permission on the
		// entry (an unprivileged mounter lacks it on a mode-0 file, even
		// its own); listing the names does not, and presence is all that
		// counts here (the kernel asks for the size only).
		return listed(dirfd, name, attr)
	}
	return false, err
}

// listed reports whether attr is among the attribute names of name in
// dirfd.
func listed(dirfd int, name, attr string) (bool, error) {
	names, err := sysx.ListxattrAll(dirfd, name)
	if err != nil {
		return false, err
	}
	for _, n := range names {
		if n == attr {
			return true, nil
		}
	}
	return false, nil
}
