// Package image unpacks container images into a layer store keyed by
// chainID, from which union mounts are built.
//
// # Sources
//
// [OpenSource] reads an OCI image layout (a directory with oci-layout,
// index.json and blobs/sha256/..., or a tar of one) or a "docker save"
// tarball (manifest.json, the config as <hex>.json, layers as
// <id>/layer.tar, or OCI-style blobs/sha256/... in newer docker). Layers
// may be plain, gzip or zstd tars. Every blob whose digest is known is
// verified (index, manifest, config, compressed layer), and every layer's
// diffID is checked against the config's rootfs.diff_ids while it is
// unpacked; any mismatch fails the unpack and leaves the store unchanged.
//
// # Store layout
//
//	DIR/store.json              format version and xattr namespace (trusted or user)
//	DIR/store.lock              flock: shared while unpacking, exclusive for rm/prune/cleanup
//	DIR/layers/<hex>/diff/      the layer in the kernel overlay format (layer.Import)
//	DIR/layers/<hex>/diffid     "sha256:..." of the layer tar
//	DIR/layers/<hex>/parent     chainID of the layer below (absent for a base layer)
//	DIR/layers/<hex>/size       bytes of file data in diff/
//	DIR/locks/<hex>.lock        flock: held while a layer is being unpacked
//	DIR/images/<name>.json      an image: name, ids, layer chain, lowerdirs, config
//	DIR/tmp/                    work in progress; removed when no unpack is running
//
// <hex> is the hex part of the layer's chainID: chainID(L0) = diffID(L0),
// chainID(Ln) = sha256(chainID(Ln-1) + " " + diffID(Ln)), both written
// "sha256:<hex>" (image-spec config.md). An image name is stored
// path-escaped (url.PathEscape), so "docker.io/library/alpine:3" becomes
// "docker.io%2Flibrary%2Falpine:3.json"; an image without a name is stored
// under its config digest (its image ID).
//
// # Invariants
//
//   - A directory layers/<hex> is complete: layers are unpacked and their
//     metadata written under tmp/, synced, and renamed into place. A crash
//     (kill -9) leaves only entries under tmp/, which the next unpack, rm
//     or prune removes once it holds store.lock exclusively.
//   - An unpack writes nothing under layers/ until every layer it needs has
//     been read and verified; then it renames them in and writes the image
//     record last. A failed unpack leaves the store as it was.
//   - Each layer is stored once. An unpack holds locks/<hex>.lock of every
//     layer of its chain, taken bottom-up, until it has committed: a
//     concurrent unpack of an image that shares layers waits, then finds
//     them in place. Bottom-up order is the same for every chain that
//     shares a prefix, so two unpacks cannot deadlock.
//   - rm and prune take store.lock exclusively, so they never remove a
//     layer that a running unpack is about to reuse. A layer is removed
//     only when no image record refers to it, and by renaming it under
//     tmp/ first, so a crash never leaves a half-deleted layer.
//
// Lock order: store.lock, then locks/<hex>.lock bottom-up.
package image
