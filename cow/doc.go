// Package cow copies objects up from a lower layer into the upper layer, the
// way kernel overlayfs does (fs/overlayfs/copy_up.c): data, then owner,
// mode, extended attributes and times, built under a temporary name in the
// work directory and renamed into place, so that a crash at any point never
// leaves a partial object visible in the upper layer.
//
// cow works on directory file descriptors and single names. It knows nothing
// of FUSE or of how the layers stack: the caller (unionfs) decides what must
// be copied, copies missing parent directories first, and serialises
// concurrent copy-ups of one object.
//
// Order of the metadata steps (continuity fs/copy_linux.go, kernel
// ovl_copy_up_metadata): chown first, because chown clears setuid/setgid and
// security.capability; then chmod, which puts setuid/setgid back; then
// xattrs (capabilities last survive); times last, because every step before
// changes ctime/mtime.
package cow
