// Package whiteout owns the on-disk markers of Linux overlayfs: whiteouts,
// opaque directories and the names of overlay-private extended attributes.
//
// It is the single source of truth for those formats in strata. Everything
// here works on plain directories through directory file descriptors and
// *at system calls; it knows nothing of FUSE or of the layer stack, so that
// offline tools (explain, diff, fsck, export) use exactly the rules the
// mount uses.
//
// # Terms (Documentation/filesystems/overlayfs.rst)
//
//   - A whiteout hides a name of the layers below. The kernel creates it as a
//     character device with device number 0/0. Since Linux 6.7 a lower layer
//     may also hold an "xattr whiteout": a zero-size regular file carrying the
//     overlay.whiteout xattr; its directory is then marked overlay.opaque="x"
//     so that readdir knows to look for them.
//   - An opaque directory (overlay.opaque="y") hides the same-named
//     directories of all layers below it.
//   - Private xattrs: everything under the overlay prefix of the namespace in
//     use. The privileged format uses "trusted.overlay."; rootless mounts use
//     "user.overlay." (the kernel's userxattr mount option). Private xattrs are
//     never shown in a merged view and never copied up.
//   - OCI image layers spell the same markers as files named ".wh.NAME" and
//     ".wh..wh..opq". That is an import/export format only; strata never
//     writes it into a layer directory.
package whiteout
