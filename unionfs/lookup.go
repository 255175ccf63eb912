package unionfs

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"strata/whiteout"
)

// dirLayer is one layer's copy of a merged directory.
type dirLayer struct {
	layer   int
	opacity whiteout.Opacity // of this layer's copy
}

// entry is the result of resolving one name in a merged directory.
type entry struct {
	st    unix.Stat_t // lstat of the deciding (topmost) object
	layer int         // layer of the deciding object
	dirs  []dirLayer  // for a directory: the layers merged, top first
	// whiteoutLayer is the layer of the whiteout that ended the search
	// when nothing was found above it, else -1.
	whiteoutLayer int
}

func (e *entry) isDir() bool { return e.st.Mode&unix.S_IFMT == unix.S_IFDIR }

// errNotFound is returned (wrapping ENOENT) when a name resolves to nothing
// or to a whiteout; whiteoutLayer tells which.
var errNotFound = fmt.Errorf("not found: %w", unix.ENOENT)

// resolve looks name up in the layers dirs of directory node dir, top
// down (fs/overlayfs/namei.c:ovl_lookup): the first layer that holds the
// name decides. A whiteout there ends the search (ENOENT); a
// non-directory is the answer; a directory is merged with the same-named
// directories below until one is opaque, or a layer holds a non-directory
// or a whiteout of that name.
func (s *Stack) resolve(dir *node, dirs []dirLayer, name string) (entry, error) {
	e := entry{layer: -1, whiteoutLayer: -1}
	for _, dl := range dirs {
		ref, err := s.dirfd(dir, dl.layer)
		if err != nil {
			if e.layer >= 0 {
				break
			}
			return e, fmt.Errorf("open layer %d dir: %w", dl.layer, err)
		}
		var st unix.Stat_t
		err = unix.Fstatat(ref.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW)
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
			s.release(ref)
			continue
		}
		if err != nil {
			s.release(ref)
			return e, err
		}
		wh, err := whiteout.IsWhiteout(ref.fd, name, &st, s.ns)
		if err != nil {
			s.release(ref)
			return e, err
		}
		isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
		if e.layer < 0 {
			switch {
			case wh:
				s.release(ref)
				e.whiteoutLayer = dl.layer
				return e, errNotFound
			case !isDir:
				s.release(ref)
				e.st, e.layer = st, dl.layer
				return e, nil
			}
			e.st, e.layer = st, dl.layer
		} else if wh || !isDir {
			s.release(ref)
			break
		}
		op, err := whiteout.GetOpacity(ref.fd, name, s.ns)
		s.release(ref)
		if err != nil {
			return e, err
		}
		e.dirs = append(e.dirs, dirLayer{layer: dl.layer, opacity: op})
		if op == whiteout.Opaque {
			break
		}
	}
	if e.layer < 0 {
		return e, errNotFound
	}
	return e, nil
}

// lowerHas reports whether a layer of dirs below the upper one holds a
// visible object named name: whether removing the upper object (or a lower
// one) needs a whiteout to keep the name hidden
// (fs/overlayfs/namei.c:ovl_lower_positive).
func (s *Stack) lowerHas(dir *node, dirs []dirLayer, name string) (bool, error) {
	for _, dl := range dirs {
		if s.layers[dl.layer].upper {
			continue
		}
		ref, err := s.dirfd(dir, dl.layer)
		if err != nil {
			return false, err
		}
		var st unix.Stat_t
		err = unix.Fstatat(ref.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW)
		if err == nil {
			wh, werr := whiteout.IsWhiteout(ref.fd, name, &st, s.ns)
			s.release(ref)
			if werr != nil {
				return false, werr
			}
			return !wh, nil
		}
		s.release(ref)
		if !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENOTDIR) {
			return false, err
		}
	}
	return false, nil
}
