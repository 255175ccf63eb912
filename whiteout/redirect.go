package whiteout

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"strata/internal/sysx"
)

// Redirect returns the name of the redirect attribute: a directory renamed
// by a kernel mount with redirect_dir=on names where its lower copies are
// (Documentation/filesystems/overlayfs.rst, "Redirect dir").
func (ns NS) Redirect() string { return ns.Prefix() + "redirect" }

// Redirect is a parsed overlay.redirect value.
type Redirect struct {
	// Raw is the value as stored, up to its first NUL byte.
	Raw string
	// Abs: an absolute redirect ("/a/b"), a path from the layer roots;
	// otherwise a relative one, a single name in the parent directory.
	Abs bool
	// Comps are the components of an absolute redirect; Name the name of
	// a relative one.
	Comps []string
	Name  string
}

// ParseRedirect interprets an overlay.redirect value as the kernel does
// (fs/overlayfs/util.c:ovl_get_redirect_xattr): the value ends at its
// first NUL byte; an absolute value is "/" followed by non-empty
// components separated by single slashes; a relative value is one name
// without a slash. Anything else, the empty value included, is invalid: an
// error wrapping EINVAL, which is what a lookup that reads it fails with.
// "." and ".." components pass: the lookup that reaches one fails with
// EACCES (fs/namei.c:lookup_one_common).
func ParseRedirect(val []byte) (Redirect, error) {
	if i := bytes.IndexByte(val, 0); i >= 0 {
		val = val[:i]
	}
	r := Redirect{Raw: string(val)}
	invalid := func() (Redirect, error) {
		return r, fmt.Errorf("invalid redirect %q: %w", r.Raw, unix.EINVAL)
	}
	switch {
	case r.Raw == "":
		return invalid()
	case r.Raw[0] == '/':
		r.Abs = true
		r.Comps = strings.Split(r.Raw[1:], "/")
		for _, c := range r.Comps {
			if c == "" {
				return invalid()
			}
		}
	case strings.Contains(r.Raw, "/"):
		return invalid()
	default:
		r.Name = r.Raw
	}
	return r, nil
}

// Path renders an absolute redirect's components, or returns a relative
// redirect's name.
func (r Redirect) Path() string {
	if r.Abs {
		return "/" + strings.Join(r.Comps, "/")
	}
	return r.Name
}

// ReadRedirect reads the raw overlay.redirect attribute of namespace ns
// from the entry name of dirfd ("" for dirfd itself); ok is false when
// there is none (or the filesystem has no xattrs).
func ReadRedirect(dirfd int, name string, ns NS) (val []byte, ok bool, err error) {
	// Most directories have none: one call with a buffer on the stack.
	var buf [256]byte
	n, err := sysx.Getxattr(dirfd, name, ns.Redirect(), buf[:])
	switch {
	case err == nil:
		return append([]byte(nil), buf[:n]...), true, nil
	case errors.Is(err, unix.ERANGE):
		val, err = sysx.GetxattrAll(dirfd, name, ns.Redirect())
	case errors.Is(err, unix.EACCES):
		// No read permission on the directory (an unprivileged mounter
		// on a mode-0 one): without the attribute in its name list,
		// which needs none, there is no redirect. A present but
		// unreadable one stays an error.
		if ok, lerr := listed(dirfd, name, ns.Redirect()); lerr == nil && !ok {
			return nil, false, nil
		}
	}
	if sysx.IsNoAttr(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read %s of %q: %w", ns.Redirect(), name, err)
	}
	return val, true, nil
}
