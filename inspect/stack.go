package inspect

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"strata/unionfs"
	"strata/whiteout"

	"strata/internal/sysx"
)

// ParseOptions parses mount options in the kernel's syntax, like
// [unionfs.ParseOptions], except that workdir may be left out when
// upperdir is given: offline tools never write through the work dir.
func ParseOptions(data string) (unionfs.Options, error) {
	return unionfs.ParseLayerOptions(data)
}

// Layer describes one layer of a stack.
type Layer struct {
	Index int    `json:"layer"` // 0 is the upper dir when there is one
	Role  string `json:"role"`  // "upper" or "lower"
	Path  string `json:"path"`  // absolute
}

// String renders the layer for messages: "layer 1 (lower /l1)".
func (l Layer) String() string { return fmt.Sprintf("layer %d (%s %s)", l.Index, l.Role, l.Path) }

// Stack is a layer stack opened read-only for inspection: the mount's
// resolution code over all layers, plus a directory fd per layer for
// looking at each one on its own.
type Stack struct {
	opts   unionfs.Options // resolved (absolute paths)
	view   *unionfs.Stack  // every layer: what a mount shows
	layers []Layer
	fds    []int // O_PATH fd of each layer root; immutable
	upper  bool  // layer 0 is the upper dir

	lowers *unionfs.Stack // the lowers-only stack, opened on first use
}

// Open opens the stack that o describes, for reading only: nothing on disk
// changes and the work dir is not touched. The caller closes it.
func Open(o unionfs.Options) (*Stack, error) {
	o, err := resolveOptions(o)
	if err != nil {
		return nil, err
	}
	view, err := openView(o, o.Work == "")
	if err != nil {
		return nil, err
	}
	return newStack(o, view)
}

// openView opens the mount's resolution over every layer of o. With
// noWork the work dir is neither checked nor needed.
func openView(o unionfs.Options, noWork bool) (*unionfs.Stack, error) {
	o = cloneOptions(o)
	if noWork {
		o.Work = ""
	}
	return unionfs.OpenStack(o)
}

func newStack(o unionfs.Options, view *unionfs.Stack) (*Stack, error) {
	s := &Stack{opts: o, view: view, upper: o.Upper != ""}
	paths := o.Lowers
	if s.upper {
		paths = append([]string{o.Upper}, o.Lowers...)
	}
	for i, p := range paths {
		fd, err := unix.Open(p, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			s.Close()
			return nil, &os.PathError{Op: "open layer", Path: p, Err: err}
		}
		role := "lower"
		if s.upper && i == 0 {
			role = "upper"
		}
		s.layers = append(s.layers, Layer{Index: i, Role: role, Path: p})
		s.fds = append(s.fds, fd)
	}
	return s, nil
}

// resolveOptions returns a copy of o with absolute layer paths.
func resolveOptions(o unionfs.Options) (unionfs.Options, error) {
	o = cloneOptions(o)
	err := o.Resolve()
	return o, err
}

func cloneOptions(o unionfs.Options) unionfs.Options {
	o.Lowers = slices.Clone(o.Lowers)
	return o
}

// Close releases the stack's fds.
func (s *Stack) Close() error {
	for _, fd := range s.fds {
		unix.Close(fd)
	}
	s.fds = nil
	if s.view != nil {
		s.view.Close()
	}
	if s.lowers != nil {
		s.lowers.Close()
	}
	return nil
}

// Layers lists the stack's layers, the upper one (if any) first.
func (s *Stack) Layers() []Layer { return slices.Clone(s.layers) }

// Options returns the stack's options, with absolute paths.
func (s *Stack) Options() unionfs.Options { return cloneOptions(s.opts) }

// NS returns the private xattr namespace the stack is read with.
func (s *Stack) NS() whiteout.NS { return s.opts.NS() }

// HasUpper reports whether layer 0 is an upper dir.
func (s *Stack) HasUpper() bool { return s.upper }

// lowersOnly returns the stack without its upper dir (nil when there is no
// upper dir). Its layer i is layer i+1 of s.
func (s *Stack) lowersOnly() (*unionfs.Stack, error) {
	if !s.upper {
		return nil, nil
	}
	if s.lowers == nil {
		st, err := unionfs.OpenStack(unionfs.Options{Lowers: slices.Clone(s.opts.Lowers), UserXattr: s.opts.UserXattr, SquashUID: -1, SquashGID: -1})
		if err != nil {
			return nil, fmt.Errorf("open the lowers-only stack: %w", err)
		}
		s.lowers = st
	}
	return s.lowers, nil
}

// Kind is the kind of object one layer holds at a path, markers included.
type Kind int

const (
	// None: nothing at this path in this layer.
	None Kind = iota
	// Dir is a directory.
	Dir
	// File is a regular file.
	File
	// Symlink is a symbolic link.
	Symlink
	// Fifo is a named pipe.
	Fifo
	// Socket is a unix socket.
	Socket
	// CharDevice is a character device other than a whiteout.
	CharDevice
	// BlockDevice is a block device.
	BlockDevice
	// Whiteout is the kernel's whiteout, a 0/0 character device.
	Whiteout
	// XattrWhiteout is a zero-size regular file with the overlay.whiteout
	// xattr (Linux 6.7 format, for lower layers).
	XattrWhiteout
)

var kindNames = [...]string{"nothing", "directory", "file", "symlink", "fifo", "socket", "char device", "block device", "whiteout", "xattr whiteout"}

// String names the kind for people: "directory", "whiteout", ...
func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// MarshalText names the kind for JSON: "directory", "xattr_whiteout", ...
func (k Kind) MarshalText() ([]byte, error) {
	return []byte(strings.ReplaceAll(k.String(), " ", "_")), nil
}

// UnmarshalText parses a name MarshalText gives.
func (k *Kind) UnmarshalText(b []byte) error {
	name := strings.ReplaceAll(string(b), "_", " ")
	for i, n := range kindNames {
		if n == name {
			*k = Kind(i)
			return nil
		}
	}
	return fmt.Errorf("unknown kind %q", b)
}

// IsWhiteout reports whether k is either whiteout form.
func (k Kind) IsWhiteout() bool { return k == Whiteout || k == XattrWhiteout }

// kindOf classifies an lstat result, without the whiteout checks.
func kindOf(st *unix.Stat_t) Kind {
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return Dir
	case unix.S_IFREG:
		return File
	case unix.S_IFLNK:
		return Symlink
	case unix.S_IFIFO:
		return Fifo
	case unix.S_IFSOCK:
		return Socket
	case unix.S_IFCHR:
		if whiteout.IsCharWhiteout(st) {
			return Whiteout
		}
		return CharDevice
	case unix.S_IFBLK:
		return BlockDevice
	}
	return None
}

// classify returns the kind of the entry name of dirfd whose lstat is st,
// with the xattr whiteout check of namespace ns.
func classify(dirfd int, name string, st *unix.Stat_t, ns whiteout.NS) (Kind, error) {
	k := kindOf(st)
	if k == File && whiteout.MaybeXattrWhiteout(st) {
		wh, err := whiteout.HasWhiteoutXattr(dirfd, name, ns)
		if err != nil {
			return k, err
		}
		if wh {
			return XattrWhiteout, nil
		}
	}
	return k, nil
}

// typeName names the type of a visible object from its mode.
func typeName(mode uint32) string {
	st := unix.Stat_t{Mode: mode, Rdev: 1}
	return kindOf(&st).String()
}

// Object is what one layer holds at one path, seen on its own.
type Object struct {
	// Kind of the object, None when there is none.
	Kind Kind
	// Stat is the lstat of the object (zero for None).
	Stat unix.Stat_t
	// Target is a symlink's target.
	Target string
	// Opacity is a directory's overlay.opaque value in the stack's
	// namespace.
	Opacity whiteout.Opacity
	// BlockedAt is set when the layer holds nothing at the path because a
	// parent in this layer is not a directory: that parent's path.
	BlockedAt string
	// BlockedBy is what the layer holds at BlockedAt.
	BlockedBy Kind
}

// splitPath returns the components of a path relative to the merged root
// ("", "/" and "." are the root). "..", NUL and over-long names are
// refused, as a lookup refuses them.
func splitPath(p string) ([]string, error) {
	var out []string
	for _, c := range strings.Split(p, "/") {
		if c == "" || c == "." {
			continue
		}
		if err := whiteout.CheckName(c); err != nil {
			return nil, fmt.Errorf("path %q: %w", p, err)
		}
		out = append(out, c)
	}
	return out, nil
}

// joinPath renders components as a path from the merged root: "/a/b".
func joinPath(comps []string) string { return "/" + strings.Join(comps, "/") }

// child returns the path of name in directory p ("/" for the root).
func child(p, name string) string {
	if p == "/" || p == "" {
		return "/" + name
	}
	return p + "/" + name
}

// openParent opens, as O_PATH, the directory holding the last component of
// comps in layer li, walking one component at a time without following
// symlinks. A missing or non-directory component gives (-1, index of that
// component, nil); the caller closes a returned fd unless it is the layer
// root fd (reported by root).
func (s *Stack) openParent(li int, comps []string) (fd int, failedAt int, err error) {
	fd = s.fds[li]
	for i, c := range comps[:max(len(comps)-1, 0)] {
		nfd, err := unix.Openat(fd, c, unix.O_PATH|unix.O_NOFOLLOW|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if fd != s.fds[li] {
			unix.Close(fd)
		}
		if err != nil {
			if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
				return -1, i, nil
			}
			return -1, i, fmt.Errorf("%s: open %s: %w", s.layers[li], joinPath(comps[:i+1]), err)
		}
		fd = nfd
	}
	return fd, -1, nil
}

// closeFd closes fd unless it is one of the layer root fds.
func (s *Stack) closeFd(li, fd int) {
	if fd >= 0 && fd != s.fds[li] {
		unix.Close(fd)
	}
}

// Probe reports what layer li holds at path on its own, without the
// union: the object there (whiteouts recognised), or why there is none.
func (s *Stack) Probe(li int, path string) (Object, error) {
	if li < 0 || li >= len(s.layers) {
		return Object{}, fmt.Errorf("no layer %d", li)
	}
	comps, err := splitPath(path)
	if err != nil {
		return Object{}, err
	}
	ns := s.NS()
	if len(comps) == 0 {
		o := Object{Kind: Dir}
		if err := unix.Fstat(s.fds[li], &o.Stat); err != nil {
			return o, fmt.Errorf("%s: %w", s.layers[li], err)
		}
		o.Opacity, err = whiteout.GetOpacity(s.fds[li], "", ns)
		return o, err
	}
	dir, failedAt, err := s.openParent(li, comps)
	if err != nil {
		return Object{}, err
	}
	if dir < 0 {
		// Say what stands in the way, if anything does.
		o := Object{}
		blocker, err := s.Probe(li, joinPath(comps[:failedAt+1]))
		if err != nil {
			return o, err
		}
		if blocker.Kind != None {
			o.BlockedAt, o.BlockedBy = joinPath(comps[:failedAt+1]), blocker.Kind
		} else if blocker.BlockedAt != "" {
			o.BlockedAt, o.BlockedBy = blocker.BlockedAt, blocker.BlockedBy
		}
		return o, nil
	}
	defer s.closeFd(li, dir)
	return s.probeAt(li, dir, comps[len(comps)-1])
}

// probeAt describes the entry name of dirfd in layer li.
func (s *Stack) probeAt(li, dirfd int, name string) (Object, error) {
	var o Object
	err := unix.Fstatat(dirfd, name, &o.Stat, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return Object{}, nil
	}
	if err != nil {
		return o, fmt.Errorf("%s: stat %q: %w", s.layers[li], name, err)
	}
	if o.Kind, err = classify(dirfd, name, &o.Stat, s.NS()); err != nil {
		return o, fmt.Errorf("%s: %w", s.layers[li], err)
	}
	switch o.Kind {
	case Symlink:
		if o.Target, err = sysx.Readlinkat(dirfd, name); err != nil {
			return o, fmt.Errorf("%s: readlink %q: %w", s.layers[li], name, err)
		}
	case Dir:
		if o.Opacity, err = whiteout.GetOpacity(dirfd, name, s.NS()); err != nil {
			return o, fmt.Errorf("%s: %w", s.layers[li], err)
		}
	}
	return o, nil
}

// openFile opens the regular file at path in layer li for reading,
// without following symlinks in any component.
func (s *Stack) openFile(li int, path string) (*os.File, error) {
	comps, err := splitPath(path)
	if err != nil {
		return nil, err
	}
	if len(comps) == 0 {
		return nil, unix.EISDIR
	}
	dir, _, err := s.openParent(li, comps)
	if err != nil {
		return nil, err
	}
	if dir < 0 {
		return nil, fmt.Errorf("%s: %s: %w", s.layers[li], path, unix.ENOENT)
	}
	defer s.closeFd(li, dir)
	return openRead(dir, comps[len(comps)-1])
}

// openRead opens the regular file name of dirfd for reading, without
// following a symlink and, where allowed, without updating its atime.
func openRead(dirfd int, name string) (*os.File, error) {
	const flags = unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	fd, err := unix.Openat(dirfd, name, flags|unix.O_NOATIME, 0)
	if errors.Is(err, unix.EPERM) {
		// O_NOATIME needs ownership or CAP_FOWNER.
		fd, err = unix.Openat(dirfd, name, flags, 0)
	}
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: name, Err: err}
	}
	return os.NewFile(uintptr(fd), name), nil
}

// withParent calls fn with an O_PATH fd of the directory that holds path
// in layer li and the last component; a missing parent gives ENOENT.
func (s *Stack) withParent(li int, path string, fn func(dirfd int, name string) error) error {
	comps, err := splitPath(path)
	if err != nil {
		return err
	}
	if len(comps) == 0 {
		return fn(s.fds[li], "")
	}
	dir, _, err := s.openParent(li, comps)
	if err != nil {
		return err
	}
	if dir < 0 {
		return fmt.Errorf("%s: %s: %w", s.layers[li], path, unix.ENOENT)
	}
	defer s.closeFd(li, dir)
	return fn(dir, comps[len(comps)-1])
}
