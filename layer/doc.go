// Package layer converts between OCI image layer tars and layer
// directories in the kernel overlayfs format.
//
// # Two formats of one change set
//
// An OCI layer (image-spec layer.md) is a tar archive. It marks a deleted
// name NAME with an empty entry ".wh.NAME", and a directory that hides
// everything below it with an entry ".wh..wh..opq" inside that directory.
// A layer directory in the kernel format (what an overlay upper dir holds,
// and what overlay accepts as a lower dir) marks the same things with a 0/0
// character device named NAME and with the attribute overlay.opaque="y" on
// the directory, in the trusted.* namespace or, for rootless mounts
// (-o userxattr), the user.* namespace. See [whiteout] for the markers.
//
// [Export] walks a layer directory and writes the OCI tar; [Import] reads
// one and builds the layer directory. strata never writes ".wh." names into
// a layer directory: the OCI form exists only inside tars.
//
// A whiteout applies to lower layers only (layer.md): when one layer holds
// both ".wh.d" and entries under d (in either order), the lower d is gone
// and this layer's d replaces it. In the kernel format that is an opaque
// directory, and Import writes it so. A whiteout of a non-directory the
// same layer adds changes nothing (the non-directory hides what is below).
//
// # Export
//
// Export is deterministic: directory entries are visited in byte order of
// their names on disk (a whiteout for "b" is written as ".wh.b" where "b"
// sorts), directories before their contents, owners are
// numeric only, modification times are kept to the second (as docker and
// containerd write them) and access/change times are left out, so the same
// tree always gives the same diffID. Overlay-private attributes
// (trusted.overlay.*, user.overlay.*) are never exported; a tree that uses
// overlay features the OCI format cannot express (redirect_dir, metacopy)
// is refused.
//
// # Import and its safety rules
//
// Import treats the archive as hostile:
//
//   - Names are made relative: leading slashes are dropped, as GNU tar and
//     containerd do, so "/etc/passwd" lands at TARGET/etc/passwd. A ".."
//     component anywhere in a name, or in a hard link's target, refuses the
//     entry; no entry can name a place outside the target.
//   - Every directory on the way to an entry is opened relative to its
//     parent with O_NOFOLLOW|O_DIRECTORY, so a symlink the archive made
//     earlier (a -> /etc, then a/passwd) is never followed: the later entry
//     is refused. Hard links are made with linkat without AT_SYMLINK_FOLLOW
//     from a source found the same way.
//   - Overlay-private attributes in PAX records are refused: only the OCI
//     markers produce whiteouts and opaque directories.
//   - Oversized headers (PAX or GNU long-name records over 1 MiB) and
//     truncated archives, including ones cut exactly between two entries
//     with no end-of-archive marker, are errors.
//
// Refused entries are listed in [ImportResult.Refused]; by default any
// refusal fails the import ([RefusedError]). Import is atomic: it unpacks
// into a temporary directory beside the target and renames it into place
// only when the whole archive was read, every check passed and the optional
// expected digests matched, so a failure or a crash leaves nothing at the
// target (a crash leaves a ".strata-import-*" directory beside it, removed
// by the next import to the same target).
//
// # Digests
//
// A layer's diffID is the sha256 of its uncompressed tar stream, written
// "sha256:<hex>"; its digest is the sha256 of the bytes as stored
// (compressed or not). Import computes both while reading and can verify
// them ([ImportOptions.DiffID], [ImportOptions.Digest]).
package layer
