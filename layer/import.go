package layer

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"strata/internal/sysx"
	"strata/whiteout"
)

// ImportOptions configure [Import].
type ImportOptions struct {
	// NS is the namespace of the opaque-directory attribute written for
	// ".wh..wh..opq": whiteout.Trusted for layers that privileged (root)
	// mounts use, whiteout.User for rootless (-o userxattr) mounts.
	NS whiteout.NS
	// Rootless imports without privilege: owners in the archive are not
	// applied (everything belongs to the caller), and attributes the
	// caller may not set (trusted.*, security.*) are skipped and listed in
	// [ImportResult.Skipped] instead of failing the import.
	Rootless bool
	// SkipDevices skips character and block devices that cannot be
	// created (EPERM without CAP_MKNOD), listing them in
	// [ImportResult.Skipped]; without it they fail the import. Whiteouts
	// (0/0) never need privilege on Linux >= 5.8.
	SkipDevices bool
	// SkipRefused leaves out unsafe entries, listing them in
	// [ImportResult.Refused], and imports the rest; without it any refused
	// entry fails the import with a [*RefusedError].
	SkipRefused bool
	// DiffID, if set, is the expected sha256 of the uncompressed tar
	// ("sha256:<hex>"); a mismatch fails the import with a [*DigestError]
	// and leaves nothing at the target.
	DiffID string
	// Digest, if set, is the expected sha256 of the bytes read from the
	// reader (the compressed blob).
	Digest string
	// NoSync skips the syncfs before the final rename. Without it the
	// unpacked tree is on disk before it appears at the target, so a crash
	// never leaves a layer with missing data under its final name.
	NoSync bool
	// Logger receives debug messages; nil discards them.
	Logger *slog.Logger
}

// ImportResult describes an import, also a failed one as far as it got.
type ImportResult struct {
	// DiffID is the sha256 of the uncompressed tar stream.
	DiffID string
	// Digest is the sha256 of the bytes read (equal to DiffID for an
	// uncompressed archive).
	Digest string
	// Compression is the compression detected from the magic number.
	Compression Compression
	// Entries counts the archive's entries.
	Entries int
	// Size is the number of bytes of file data written (hard links count
	// once).
	Size int64
	// Refused lists the unsafe entries, in archive order.
	Refused []Issue
	// Skipped lists entries or attributes left out by policy (devices
	// without privilege, aufs metadata, whiteouts of names this same
	// layer adds, ...).
	Skipped []Issue
}

// importPrefix starts the name of Import's temporary directory, beside the
// target.
const importPrefix = ".strata-import-"

// staleAge is how old an unlocked temporary directory must be before an
// import removes it as left over by a crash: a younger one may belong to
// an import that has created it and not yet locked it. (A variable for
// tests.)
var staleAge = time.Minute

// Import unpacks the OCI layer tar read from r (plain, gzip or zstd,
// detected by magic number) into the directory target, in the kernel
// overlay format: ".wh.NAME" entries become 0/0 character devices and
// ".wh..wh..opq" entries the opaque attribute of namespace opts.NS on
// their directory. Regular files, directories, symlinks, hard links,
// fifos and devices are created with their modes, owners (unless
// opts.Rootless), modification times and PAX xattrs (SCHILY.xattr.*).
//
// target must not exist, or be an empty directory. The tree is built in a
// temporary directory beside it and renamed into place at the end, so on
// any error nothing is left at target. The whole input is read, so the
// digests cover everything r delivers. See the package documentation for
// the rules that keep hostile archives inside the target.
func Import(ctx context.Context, r io.Reader, target string, opts ImportOptions) (*ImportResult, error) {
	res := &ImportResult{}
	for _, d := range []string{opts.DiffID, opts.Digest} {
		if d != "" {
			if _, err := ParseDigest(d); err != nil {
				return res, fmt.Errorf("expected %w", err)
			}
		}
	}
	target = filepath.Clean(target)
	if err := checkTarget(target); err != nil {
		return res, err
	}
	parentPath, base := filepath.Split(target)
	if parentPath == "" {
		parentPath = "."
	}
	parent, err := unix.Open(parentPath, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return res, fmt.Errorf("open %s: %w", parentPath, err)
	}
	defer unix.Close(parent)
	cleanStale(parent, importPrefix+base+"-")

	tmpPath, err := os.MkdirTemp(parentPath, importPrefix+base+"-")
	if err != nil {
		return res, err
	}
	tmpName := filepath.Base(tmpPath)
	root, err := openDir(parent, tmpName)
	if err != nil {
		_ = removeAllAt(parent, tmpName)
		return res, fmt.Errorf("open %s: %w", tmpPath, err)
	}
	// The lock marks the directory as in use; cleanStale of another import
	// removes it only when no process holds it.
	if err := unix.Flock(root, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		unix.Close(root)
		_ = removeAllAt(parent, tmpName)
		return res, fmt.Errorf("lock %s: %w", tmpPath, err)
	}
	done := false
	defer func() {
		unix.Close(root)
		if !done {
			_ = removeAllAt(parent, tmpName)
		}
	}()

	u := &unpacker{opts: opts, res: res, root: root, dirs: newDirCache(root, opts.NS),
		log: opts.Logger, buf: make([]byte, 64<<10)}
	if u.log == nil {
		u.log = slog.New(slog.DiscardHandler)
	}
	err = u.unpack(ctx, r)
	u.dirs.close()
	if err != nil {
		// A blob that does not decompress or parse is most likely
		// corrupt: when its digest is known, say so.
		if opts.Digest != "" && u.raw != nil && ctx.Err() == nil {
			if _, derr := io.CopyBuffer(io.Discard, u.raw, u.buf); derr == nil {
				if got := u.raw.digest(); got != opts.Digest {
					return res, fmt.Errorf("%w (corrupt blob: %v)", &DigestError{What: "digest", Want: opts.Digest, Got: got}, err)
				}
			}
		}
		return res, err
	}
	if len(res.Refused) > 0 && !opts.SkipRefused {
		return res, &RefusedError{Refused: res.Refused}
	}
	if opts.Digest != "" && res.Digest != opts.Digest {
		return res, &DigestError{What: "digest", Want: opts.Digest, Got: res.Digest}
	}
	if opts.DiffID != "" && res.DiffID != opts.DiffID {
		return res, &DigestError{What: "diffID", Want: opts.DiffID, Got: res.DiffID}
	}
	if !opts.NoSync {
		if err := unix.Syncfs(root); err != nil {
			return res, fmt.Errorf("syncfs: %w", err)
		}
	}
	if err := commit(parent, tmpName, base); err != nil {
		return res, fmt.Errorf("%s: %w", target, err)
	}
	done = true
	return res, nil
}

// checkTarget accepts a missing target or an empty directory.
func checkTarget(target string) error {
	st, err := os.Lstat(target)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return err
	case !st.IsDir():
		return fmt.Errorf("target %s exists and is not a directory", target)
	}
	f, err := os.Open(target)
	if err != nil {
		return err
	}
	defer f.Close()
	if names, _ := f.Readdirnames(1); len(names) > 0 {
		return fmt.Errorf("target %s is not empty", target)
	}
	return nil
}

// commit renames the finished tree to its final name: atomically, and
// without replacing anything but an empty directory.
func commit(parent int, tmpName, base string) error {
	err := unix.Renameat2(parent, tmpName, parent, base, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EEXIST) {
		// An empty directory stands there (checked before; rename(2)
		// replaces an empty directory and nothing else).
		err = unix.Renameat(parent, tmpName, parent, base)
		if errors.Is(err, unix.ENOTEMPTY) || errors.Is(err, unix.EEXIST) || errors.Is(err, unix.ENOTDIR) {
			return fmt.Errorf("target appeared meanwhile and is not an empty directory: %w", err)
		}
	}
	if err != nil {
		return fmt.Errorf("rename into place: %w", err)
	}
	if err := unix.Fsync(parent); err != nil {
		return fmt.Errorf("fsync parent: %w", err)
	}
	return nil
}

// cleanStale removes temporary directories with the given name prefix that
// a crashed import left in parent: those no process holds locked and that
// are older than [staleAge].
func cleanStale(parent int, prefix string) {
	f, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", parent))
	if err != nil {
		return
	}
	names, _ := f.Readdirnames(-1)
	f.Close()
	for _, n := range names {
		if !strings.HasPrefix(n, prefix) {
			continue
		}
		fd, err := openDir(parent, n)
		if err != nil {
			continue
		}
		var st unix.Stat_t
		stale := unix.Fstat(fd, &st) == nil && time.Since(time.Unix(st.Ctim.Unix())) > staleAge &&
			unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB) == nil
		unix.Close(fd)
		if stale {
			_ = removeAllAt(parent, n)
		}
	}
}

// unpacker is the state of one Import.
type unpacker struct {
	opts ImportOptions
	res  *ImportResult
	log  *slog.Logger
	root int
	dirs *dirCache
	// dirMeta are the directories whose mode and times are set at the
	// end: a read-only directory must still take its entries, and adding
	// entries changes a directory's mtime.
	dirMeta []dirMeta
	buf     []byte
	raw     *hashReader // the input as read, for its digest
	sparse  int64       // bytes declared by the sparse files so far
}

// maxSparseBytes bounds the total size that an archive's sparse files may
// declare (data and holes).
const maxSparseBytes = 64 << 30

// isSparse reports whether hdr is a sparse file in one of the GNU formats
// (old GNU type 'S', or PAX GNU.sparse.* records), whose holes archive/tar
// fills in.
func isSparse(hdr *tar.Header) bool {
	if hdr.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

type dirMeta struct {
	parts []string
	mode  uint32
	atime time.Time
	mtime time.Time
}

// unpack reads the whole archive.
func (u *unpacker) unpack(ctx context.Context, r io.Reader) error {
	raw := newHashReader(r)
	u.raw = raw
	br := bufio.NewReaderSize(raw, 64<<10)
	dr, comp, release, err := decompress(br)
	if err != nil {
		return err
	}
	defer release()
	u.res.Compression = comp
	stream := newHashReader(dr)
	tr := tar.NewReader(stream)
	var lastEnd int64 // end of the last entry's data, rounded to a block
	last := ""
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, tar.ErrInsecurePath) && hdr != nil {
			err = nil // GODEBUG tarinsecurepath=0: our own checks apply.
		}
		if err == io.EOF {
			// archive/tar takes a stream that just stops between entries
			// for a clean end; a real end has a zero block.
			if lastEnd >= 0 && stream.n-lastEnd < blockSize {
				if stream.n == 0 {
					return fmt.Errorf("%w: empty input", ErrTruncated)
				}
				return fmt.Errorf("%w: no end-of-archive marker after entry %q", ErrTruncated, last)
			}
			break
		}
		if err != nil {
			return readError(err, last)
		}
		u.res.Entries++
		last = hdr.Name
		if err := u.entry(ctx, hdr, tr); err != nil {
			var rf *refusal
			if !errors.As(err, &rf) {
				return err
			}
			u.refuse(hdr.Name, rf.reason)
		}
		u.dirs.endEntry()
		if isSparse(hdr) {
			// Draining it here would read its holes as zeros; the next
			// Next skips its data in the archive. Where that data ends
			// is then unknown, so the end-marker check is skipped.
			lastEnd = -1
			continue
		}
		if _, err := io.CopyBuffer(io.Discard, tr, u.buf); err != nil {
			return readError(err, last)
		}
		lastEnd = (stream.n + blockSize - 1) / blockSize * blockSize
	}
	if err := u.finishDirs(); err != nil {
		return err
	}
	// The digests cover everything: padding after the end marker, and
	// the rest of the compressed stream (which also checks its CRC).
	if _, err := io.CopyBuffer(io.Discard, stream, u.buf); err != nil {
		return readError(err, last)
	}
	if _, err := io.CopyBuffer(io.Discard, br, u.buf); err != nil {
		return fmt.Errorf("read archive: %w", err)
	}
	u.res.DiffID = stream.digest()
	u.res.Digest = raw.digest()
	return nil
}

const blockSize = 512

// readError explains an archive read error.
func readError(err error, last string) error {
	where := "at the start of the archive"
	if last != "" {
		where = fmt.Sprintf("after entry %q", last)
	}
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: input ends %s: %w", ErrTruncated, where, err)
	case errors.Is(err, tar.ErrFieldTooLong):
		return fmt.Errorf("%w %s (PAX or long-name record over 1 MiB): %w", ErrHeaderTooLarge, where, err)
	case errors.Is(err, tar.ErrHeader):
		return fmt.Errorf("invalid tar header %s: %w", where, err)
	}
	return fmt.Errorf("read archive %s: %w", where, err)
}

func (u *unpacker) refuse(name, reason string) {
	u.log.Debug("refused", "path", name, "err", reason)
	u.res.Refused = append(u.res.Refused, Issue{Name: name, Reason: reason})
}

func (u *unpacker) skip(name, reason string) {
	u.log.Debug("skipped", "path", name, "err", reason)
	u.res.Skipped = append(u.res.Skipped, Issue{Name: name, Reason: reason})
}

// entry writes one archive entry. A *refusal error refuses it; any other
// error fails the import.
func (u *unpacker) entry(ctx context.Context, hdr *tar.Header, r io.Reader) error {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil // pax global header: no file
	}
	parts, err := splitName(hdr.Name)
	if err != nil {
		return err
	}
	if len(parts) == 0 {
		if hdr.Typeflag != tar.TypeDir {
			return refusef("empty name for a non-directory")
		}
		return u.dir(nil, hdr)
	}
	for _, p := range parts[:len(parts)-1] {
		if k, _ := classify(p); k != ociPlain {
			return refusef("a directory on the path is named like a whiteout")
		}
	}
	dirParts, base := parts[:len(parts)-1], parts[len(parts)-1]
	kind, name := classify(base)
	switch kind {
	case ociMeta:
		u.skip(hdr.Name, "whiteout metadata (aufs), ignored")
		return nil
	case ociOpaque:
		fd, err := u.dirs.get(dirParts, true)
		if err != nil {
			return err
		}
		return whiteout.SetOpaque(fd, "", u.opts.NS)
	case ociWhiteout:
		if err := whiteout.CheckName(name); err != nil {
			return refusef("whiteout of an invalid name: %v", err)
		}
		fd, err := u.dirs.get(dirParts, true)
		if err != nil {
			return err
		}
		return u.whiteout(fd, name, hdr)
	}
	parent, err := u.dirs.get(dirParts, true)
	if err != nil {
		return err
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		return u.dir(parts, hdr)
	case tar.TypeReg, tar.TypeGNUSparse, tar.TypeCont:
		if isSparse(hdr) {
			// The archive holds only a sparse file's data; archive/tar
			// makes up its holes as zeros, byte by byte. Bound that work,
			// or a header declaring a petabyte of holes keeps the
			// unpacker busy for ever.
			u.sparse += hdr.Size
			if hdr.Size < 0 || u.sparse > maxSparseBytes {
				return refusef("sparse file of %d bytes: the archive's sparse files declare more than %d GiB", hdr.Size, maxSparseBytes>>30)
			}
		}
		return u.file(ctx, parent, parts, hdr, r)
	case tar.TypeSymlink:
		return u.symlink(parent, parts, hdr)
	case tar.TypeLink:
		return u.hardlink(parent, parts, hdr)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		return u.special(parent, parts, hdr)
	}
	return refusef("unsupported entry type %q", string(hdr.Typeflag))
}

// whiteout makes name in dirfd a whiteout. OCI (layer.md): a whiteout
// applies to lower layers only; a name this same layer adds stays. For a
// directory that means: the lower one is gone, this one replaces it,
// which the kernel format says by making it opaque. A non-directory
// hides what is below anyway.
func (u *unpacker) whiteout(dirfd int, name string, hdr *tar.Header) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil {
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return whiteout.SetOpaque(dirfd, name, u.opts.NS)
		}
		return nil
	}
	return whiteout.Create(dirfd, name)
}

// prepare makes room for a new entry base in parent: an existing
// directory stays when the entry is a directory (tar merges), anything
// else that is there is replaced (the later entry wins, as with tar).
// It reports whether a directory is there to merge into, and whether a
// whiteout of this layer was replaced.
func (u *unpacker) prepare(parent int, parts []string, isDir bool) (exists, wasWhiteout bool, err error) {
	base := parts[len(parts)-1]
	var st unix.Stat_t
	err = unix.Fstatat(parent, base, &st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return false, false, nil
	}
	if err != nil {
		return false, false, fmt.Errorf("stat %q: %w", strings.Join(parts, "/"), err)
	}
	if isDir && st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return true, false, nil
	}
	u.dirs.invalidate(strings.Join(parts, "/"))
	if err := removeAllAt(parent, base); err != nil {
		return false, false, fmt.Errorf("replace %q: %w", strings.Join(parts, "/"), err)
	}
	return false, whiteout.IsCharWhiteout(&st), nil
}

// dir creates or updates the directory parts (nil: the root). Owner and
// xattrs are set now; mode and times at the end ([unpacker.finishDirs]).
func (u *unpacker) dir(parts []string, hdr *tar.Header) error {
	if len(parts) > 0 {
		parent, err := u.dirs.get(parts[:len(parts)-1], true)
		if err != nil {
			return err
		}
		exists, wasWhiteout, err := u.prepare(parent, parts, true)
		if err != nil {
			return err
		}
		if !exists {
			if err := unix.Mkdirat(parent, parts[len(parts)-1], 0o700); err != nil {
				return fmt.Errorf("mkdir %q: %w", hdr.Name, err)
			}
		}
		if wasWhiteout {
			// See [unpacker.whiteout]: whiteout and directory in one
			// layer make an opaque directory.
			if err := whiteout.SetOpaque(parent, parts[len(parts)-1], u.opts.NS); err != nil {
				return err
			}
		}
	}
	fd, err := u.dirs.get(parts, false)
	if err != nil {
		return err
	}
	if err := u.owner(fd, "", hdr); err != nil {
		return err
	}
	if err := u.xattrs(fd, "", hdr); err != nil {
		return err
	}
	u.dirMeta = append(u.dirMeta, dirMeta{parts: append([]string(nil), parts...), mode: mode(hdr),
		atime: atime(hdr), mtime: hdr.ModTime})
	return nil
}

// finishDirs sets the mode and times of the directories, deepest first.
// The root gets 0755 unless the archive has an entry for it.
func (u *unpacker) finishDirs() error {
	if err := unix.Fchmod(u.root, 0o755); err != nil {
		return fmt.Errorf("chmod root: %w", err)
	}
	sort.SliceStable(u.dirMeta, func(i, j int) bool { return len(u.dirMeta[i].parts) > len(u.dirMeta[j].parts) })
	for _, d := range u.dirMeta {
		fd, err := u.dirs.get(d.parts, false)
		if err != nil {
			// Replaced by a later entry: nothing to do.
			continue
		}
		if err := unix.Fchmod(fd, d.mode); err != nil {
			return fmt.Errorf("chmod %q: %w", strings.Join(d.parts, "/"), err)
		}
		if err := setTimes(fd, ".", d.atime, d.mtime); err != nil {
			return fmt.Errorf("set times of %q: %w", strings.Join(d.parts, "/"), err)
		}
	}
	u.dirs.close()
	return nil
}

// file creates a regular file and writes its data.
func (u *unpacker) file(ctx context.Context, parent int, parts []string, hdr *tar.Header, r io.Reader) error {
	if _, _, err := u.prepare(parent, parts, false); err != nil {
		return err
	}
	base := parts[len(parts)-1]
	fd, err := unix.Openat(parent, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create %q: %w", hdr.Name, err)
	}
	f := os.NewFile(uintptr(fd), hdr.Name)
	defer f.Close()
	n, err := u.writeData(ctx, f, r, hdr.Size)
	u.res.Size += n
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return fmt.Errorf("%w: data of %q ends after %d of %d bytes", ErrTruncated, hdr.Name, n, hdr.Size)
		}
		return fmt.Errorf("write %q: %w", hdr.Name, err)
	}
	if err := u.owner(fd, "", hdr); err != nil {
		return err
	}
	// chmod after chown: chown clears the set-id bits.
	if err := unix.Fchmod(fd, mode(hdr)); err != nil {
		return fmt.Errorf("chmod %q: %w", hdr.Name, err)
	}
	if err := u.xattrs(parent, base, hdr); err != nil {
		return err
	}
	return u.times(parent, base, hdr)
}

// writeData copies size bytes from r to f, leaving holes where whole
// buffers are zero, so that sparse files stay sparse.
func (u *unpacker) writeData(ctx context.Context, f *os.File, r io.Reader, size int64) (int64, error) {
	var off, end int64
	zero := make([]byte, len(u.buf))
	for off < size {
		if err := ctx.Err(); err != nil {
			return off, err
		}
		n := int64(len(u.buf))
		if size-off < n {
			n = size - off
		}
		m, err := io.ReadFull(r, u.buf[:n])
		if m > 0 && !(int64(m) == int64(len(u.buf)) && bytes.Equal(u.buf[:m], zero)) {
			if _, werr := f.WriteAt(u.buf[:m], off); werr != nil {
				return off, werr
			}
			end = off + int64(m)
		}
		off += int64(m)
		if err != nil {
			return off, err
		}
	}
	if end < size {
		if err := f.Truncate(size); err != nil {
			return off, err
		}
	}
	return off, nil
}

// symlink creates a symlink. Its target is data: it may be absolute or
// point anywhere, it is never followed by the unpacker.
func (u *unpacker) symlink(parent int, parts []string, hdr *tar.Header) error {
	if hdr.Linkname == "" {
		return refusef("symlink with an empty target")
	}
	if _, _, err := u.prepare(parent, parts, false); err != nil {
		return err
	}
	base := parts[len(parts)-1]
	if err := unix.Symlinkat(hdr.Linkname, parent, base); err != nil {
		return fmt.Errorf("symlink %q: %w", hdr.Name, err)
	}
	if err := u.owner(parent, base, hdr); err != nil {
		return err
	}
	if err := u.xattrs(parent, base, hdr); err != nil {
		return err
	}
	return u.times(parent, base, hdr)
}

// hardlink links parts to an entry made earlier by this archive. The link
// target is resolved like an entry name (no "..", no symlinked parent),
// and linkat does not follow a symlink target.
func (u *unpacker) hardlink(parent int, parts []string, hdr *tar.Header) error {
	src, err := splitName(hdr.Linkname)
	if err != nil {
		return refusef("hard link target %q: %v", hdr.Linkname, err)
	}
	if len(src) == 0 {
		return refusef("hard link to the root")
	}
	for _, p := range src {
		if k, _ := classify(p); k != ociPlain {
			return refusef("hard link target %q is named like a whiteout", hdr.Linkname)
		}
	}
	srcParent, err := u.dirs.get(src[:len(src)-1], false)
	if err != nil {
		var rf *refusal
		if errors.As(err, &rf) {
			return refusef("hard link target %q: %s", hdr.Linkname, rf.reason)
		}
		return err
	}
	srcBase := src[len(src)-1]
	var sst unix.Stat_t
	if err := unix.Fstatat(srcParent, srcBase, &sst, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return refusef("hard link target %q not in the archive", hdr.Linkname)
		}
		return fmt.Errorf("stat %q: %w", hdr.Linkname, err)
	}
	switch {
	case sst.Mode&unix.S_IFMT == unix.S_IFDIR:
		return refusef("hard link to directory %q", hdr.Linkname)
	case whiteout.IsCharWhiteout(&sst):
		return refusef("hard link to whiteout %q", hdr.Linkname)
	}
	var dst unix.Stat_t
	base := parts[len(parts)-1]
	if unix.Fstatat(parent, base, &dst, unix.AT_SYMLINK_NOFOLLOW) == nil && dst.Dev == sst.Dev && dst.Ino == sst.Ino {
		return nil // already that file
	}
	if _, _, err := u.prepare(parent, parts, false); err != nil {
		return err
	}
	if err := unix.Linkat(srcParent, srcBase, parent, base, 0); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return refusef("hard link target %q was removed by this entry", hdr.Linkname)
		}
		return fmt.Errorf("link %q to %q: %w", hdr.Name, hdr.Linkname, err)
	}
	return nil
}

// special creates a fifo or a device node.
func (u *unpacker) special(parent int, parts []string, hdr *tar.Header) error {
	if _, _, err := u.prepare(parent, parts, false); err != nil {
		return err
	}
	base := parts[len(parts)-1]
	typ := uint32(unix.S_IFIFO)
	switch hdr.Typeflag {
	case tar.TypeChar:
		typ = unix.S_IFCHR
	case tar.TypeBlock:
		typ = unix.S_IFBLK
	}
	dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
	if err := unix.Mknodat(parent, base, typ|0o600, int(dev)); err != nil {
		if typ != unix.S_IFIFO && (errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES)) {
			what := fmt.Sprintf("device %d:%d", hdr.Devmajor, hdr.Devminor)
			if u.opts.SkipDevices {
				u.skip(hdr.Name, what+": no privilege to create it")
				return nil
			}
			return fmt.Errorf("create %s %q: %w (needs CAP_MKNOD; or skip devices)", what, hdr.Name, err)
		}
		return fmt.Errorf("mknod %q: %w", hdr.Name, err)
	}
	if err := u.owner(parent, base, hdr); err != nil {
		return err
	}
	if err := unix.Fchmodat(parent, base, mode(hdr), 0); err != nil {
		return fmt.Errorf("chmod %q: %w", hdr.Name, err)
	}
	if err := u.xattrs(parent, base, hdr); err != nil {
		return err
	}
	return u.times(parent, base, hdr)
}

// owner sets the owner of name in dirfd ("" for dirfd itself) unless the
// import is rootless.
func (u *unpacker) owner(dirfd int, name string, hdr *tar.Header) error {
	if u.opts.Rootless {
		return nil
	}
	flags := unix.AT_SYMLINK_NOFOLLOW
	if name == "" {
		flags |= unix.AT_EMPTY_PATH
	}
	if err := unix.Fchownat(dirfd, name, hdr.Uid, hdr.Gid, flags); err != nil {
		return fmt.Errorf("chown %q to %d:%d: %w (import rootless to keep your own ids)", hdr.Name, hdr.Uid, hdr.Gid, err)
	}
	return nil
}

// paxXattr starts the PAX record of an extended attribute.
const paxXattr = "SCHILY.xattr."

// xattrs sets the attributes of the PAX records on name in dirfd ("" for
// dirfd itself). Overlay-private attributes are refused: in a layer they
// would fake redirects, opacity or whiteouts that the OCI format does not
// express.
func (u *unpacker) xattrs(dirfd int, name string, hdr *tar.Header) error {
	var keys []string
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, paxXattr) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		attr := k[len(paxXattr):]
		if whiteout.IsPrivateXattr(attr) {
			u.refuse(hdr.Name, fmt.Sprintf("overlay-private attribute %s", attr))
			continue
		}
		err := sysx.Setxattr(dirfd, name, attr, []byte(hdr.PAXRecords[k]), 0)
		if err == nil {
			continue
		}
		if u.opts.Rootless && (errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EOPNOTSUPP)) {
			u.skip(hdr.Name, fmt.Sprintf("attribute %s: %v", attr, err))
			continue
		}
		return fmt.Errorf("set attribute %s on %q: %w", attr, hdr.Name, err)
	}
	return nil
}

// times sets the access and modification times of name in dirfd.
func (u *unpacker) times(dirfd int, name string, hdr *tar.Header) error {
	if err := setTimes(dirfd, name, atime(hdr), hdr.ModTime); err != nil {
		return fmt.Errorf("set times of %q: %w", hdr.Name, err)
	}
	return nil
}

func setTimes(dirfd int, name string, atime, mtime time.Time) error {
	// Not UnixNano: it overflows for times an archive may carry (before
	// 1678 or after 2262).
	ts := []unix.Timespec{{Sec: atime.Unix(), Nsec: int64(atime.Nanosecond())},
		{Sec: mtime.Unix(), Nsec: int64(mtime.Nanosecond())}}
	return unix.UtimesNanoAt(dirfd, name, ts, unix.AT_SYMLINK_NOFOLLOW)
}

// mode returns the permission bits of hdr, with set-id and sticky bits.
func mode(hdr *tar.Header) uint32 { return uint32(hdr.Mode) & 0o7777 }

// atime is the entry's access time, or its modification time when the
// archive has none (OCI layers usually do not).
func atime(hdr *tar.Header) time.Time {
	if hdr.AccessTime.IsZero() {
		return hdr.ModTime
	}
	return hdr.AccessTime
}
