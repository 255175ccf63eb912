// Package unionfs is the union: the layer stack, lookup across layers, the
// merged directory listing, every change an overlay makes (copy-up,
// whiteouts, opaque directories), the go-fuse node tree that serves it all,
// and the mount itself, by FUSE or handed to kernel overlayfs.
//
// # Terms
//
//   - layer: one directory tree of the stack. Lowers are read-only and
//     ordered topmost first (lowerdir=top:...:bottom); the upper layer, when
//     present, is above them all and takes every change.
//   - merged directory: a directory present in more than one layer; its
//     listing is the union of theirs.
//   - whiteout, opaque: see package whiteout.
//   - copy-up: before the first change to an object that lives in a lower
//     layer, the object (and any missing parent directory) is copied into the
//     upper layer; see package cow.
//   - identity: the st_ino a node shows. It is the real inode number of the
//     object's topmost layer copy, composed with a small filesystem index
//     when the layers span several filesystems, and it does not change when
//     the object is copied up while mounted.
//
// # Structure
//
// [Stack] holds the layers (a directory fd each), the work dir, a bounded
// cache of per-layer directory fds ([dirCache]) and the copier. Each object
// the kernel knows is a [node] (a go-fuse Inode). A node records where it
// lives: its parent node and name, and which layers hold it. Every access to
// a layer goes through a directory fd of the parent in that layer and a
// single-component *at call with AT_SYMLINK_NOFOLLOW/O_NOFOLLOW, so symlinks
// inside layers are never followed by strata itself and paths of any length
// work.
//
// # Invariants
//
//   - An upper object implies an upper parent: copy-up copies the parent
//     chain first, top down.
//   - A node that is in the upper layer never goes back to a lower one
//     (except by being unlinked); lookups refresh lower-only nodes only.
//   - Copy-up becomes visible only by a rename from the work dir.
//   - Whiteouts and overlay-private xattrs never appear in the merged view.
//   - readdir and lookup agree: a listed name resolves, and the d_ino of a
//     listed entry equals the st_ino lookup returns.
//
// # Locking
//
// The kernel serialises namespace changes within a directory (the parent's
// i_rwsem) and cross-directory renames (s_vfs_rename_mutex). strata adds:
//
//	node.mu        the node's layer state and its copy-up; taken parent
//	               before child, never the other way round: copy-up of a
//	               child first copies the parent (taking and releasing the
//	               parent's mu), then takes the child's.
//	dirCache.mu    the fd cache; a leaf lock, never held across a syscall
//	               that could block on the mount.
//	Stack.copiedMu the copied-up identity map; a leaf lock.
package unionfs
