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
	// at locates the copy when a redirect moved it: "" is the entry of the
	// node's own name in the parent's copy in this layer; a name (no '/')
	// an entry of that name there (a relative redirect); "/a/b" a path from
	// the layer's root (an absolute redirect). See redirect.go.
	at string
	// redirect is the overlay.redirect this copy carries, as stored, when
	// the lookup read it ("" otherwise): it moved the lookup of the layers
	// below.
	redirect string
}

// entry is the result of resolving one name in a merged directory.
type entry struct {
	st    unix.Stat_t // lstat of the deciding (topmost) object
	layer int         // layer of the deciding object
	dirs  []dirLayer  // for a directory: the layers merged, top first
	// whiteoutLayer is the layer of the whiteout that ended the search
	// when nothing was found above it, else -1.
	whiteoutLayer int
	// originLayer and originIno are, for a directory whose upper copy
	// carries a redirect that found lower copies, the topmost lower copy:
	// the directory keeps its st_ino, as on the kernel (see
	// entryIdentity). originLayer is 0 otherwise.
	originLayer int
	originIno   uint64
}

func (e *entry) isDir() bool { return e.st.Mode&unix.S_IFMT == unix.S_IFDIR }

// errNotFound is returned (wrapping ENOENT) when a name resolves to nothing
// or to a whiteout; whiteoutLayer tells which.
var errNotFound = fmt.Errorf("not found: %w", unix.ENOENT)

// resolve looks name up in the layers dirs of directory node dir, top
// down, as fs/overlayfs/namei.c:ovl_lookup: the first layer that holds the
// name decides. A whiteout there ends the search (ENOENT); a
// non-directory is the answer; a directory is merged with the directories
// below until one is opaque, or a layer holds a non-directory or a
// whiteout there. A directory's overlay.redirect tells where the layers
// below it hold its copies (redirect.go): a relative one names another
// entry of the parent, an absolute one a path from the layer roots below.
func (s *Stack) resolve(dir *node, dirs []dirLayer, name string) (entry, error) {
	return s.resolveTraced(dir, dirs, name, nil)
}

// resolveTraced is resolve, recording in tr (when not nil) where it looks
// in each layer.
func (s *Stack) resolveTraced(dir *node, dirs []dirLayer, name string, tr *lookupTrace) (entry, error) {
	e := entry{layer: -1, whiteoutLayer: -1}
	d := lookupData{name: name}
	if tr != nil {
		defer tr.finish(&d)
	}
	follow := s.followRedirects()
	bottom := len(s.layers) - 1
	cands, fromRoots := dirs, false
	for i := 0; i < len(cands) && !d.stop; i++ {
		li := cands[i].layer
		// The layer below which nothing is looked up reads neither
		// opacity nor redirect (ovl_lookup_data.last): the stack's bottom
		// layer when redirects are followed, else the last of the
		// parent's layers.
		if follow {
			d.last = li == bottom
		} else {
			d.last = i == len(cands)-1
		}
		if tr != nil {
			tr.look(li, d.name)
		}
		h, err := s.lookupLayer(dir, li, name, &d)
		if errors.Is(err, errNoParentCopy) {
			if e.layer >= 0 {
				break
			}
			return e, err
		}
		if err != nil {
			return e, err
		}
		if d.redirect && !follow {
			// userxattr implies redirect_dir=nofollow: the kernel
			// refuses a lookup that would follow one
			// (namei.c:ovl_check_nextredirect).
			return e, fmt.Errorf("%s: redirect not followed with userxattr: %w", name, unix.EPERM)
		}
		switch {
		case h.found && e.layer < 0:
			e.st, e.layer = h.st, li
			if !e.isDir() {
				return e, nil
			}
			e.dirs = append(e.dirs, h.dirLayer(li))
		case h.found:
			e.dirs = append(e.dirs, h.dirLayer(li))
			if len(e.dirs) == 2 && s.upper != nil && e.layer == 0 && e.dirs[0].redirect != "" {
				e.originLayer, e.originIno = li, h.st.Ino
			}
		case h.whiteout && e.layer < 0:
			e.whiteoutLayer = li
			return e, errNotFound
		}
		if d.redirect && d.name[0] == '/' && !fromRoots {
			// From here on, the lookup walks the path from the roots of
			// the layers below this one.
			cands, fromRoots, i = s.layersBelow(li), true, -1
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
