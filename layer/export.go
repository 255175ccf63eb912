package layer

import (
	"archive/tar"
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"strata/internal/sysx"
	"strata/whiteout"
)

// ExportOptions configure [Export].
type ExportOptions struct {
	// NS lists the namespaces whose overlay markers (opaque directories,
	// xattr whiteouts) are honoured: whiteout.Trusted for a layer written
	// by a privileged mount, whiteout.User for -o userxattr. Empty means
	// both, for a directory whose origin is unknown. Overlay-private
	// attributes of either namespace are never exported.
	NS []whiteout.NS
	// Compression of the output; the diffID is always of the plain tar.
	Compression Compression
	// Logger receives debug messages; nil discards them.
	Logger *slog.Logger
}

// ExportResult describes a finished export.
type ExportResult struct {
	// DiffID is the sha256 of the uncompressed tar, "sha256:<hex>".
	DiffID string
	// Digest is the sha256 of the bytes written; equal to DiffID when
	// uncompressed.
	Digest string
	// Size is the number of bytes written, TarSize that of the plain tar.
	Size, TarSize int64
	// Entries counts the tar entries written, whiteout markers included.
	Entries int
	// Skipped lists what the OCI format cannot hold (sockets).
	Skipped []Issue
}

// Export writes the layer directory dir as an OCI layer tar to w: kernel
// whiteouts (0/0 character devices, and xattr whiteouts) become ".wh.NAME"
// entries, opaque directories a directory entry followed by
// ".wh..wh..opq", hard links tar hard links (the first name in walk order
// carries the data), and extended attributes SCHILY.xattr PAX records,
// except overlay-private ones. Names are visited in byte order and times
// are kept to the second, so the output, and its diffID, depend only on
// the tree. The directory itself is not an entry.
//
// An entry named ".wh.*" in the tree cannot be expressed in OCI form and
// fails the export; so does a tree that uses the kernel's redirect_dir or
// metacopy features. The tree should not change during the export (it is
// not a snapshot); a file whose size changes fails it.
func Export(ctx context.Context, dir string, w io.Writer, opts ExportOptions) (*ExportResult, error) {
	res := &ExportResult{}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return res, fmt.Errorf("open %s: %w", dir, err)
	}
	defer unix.Close(fd)

	raw := newHashWriter(w)
	bw := bufio.NewWriterSize(raw, 256<<10)
	cw, cclose, err := compressor(bw, opts.Compression)
	if err != nil {
		return res, err
	}
	plain := newHashWriter(cw)
	e := &exporter{ctx: ctx, res: res, tw: tar.NewWriter(plain), ns: opts.NS,
		links: map[fileID]string{}, log: opts.Logger}
	if len(e.ns) == 0 {
		e.ns = whiteout.Both
	}
	if e.log == nil {
		e.log = slog.New(slog.DiscardHandler)
	}
	if err := e.walk(fd, ""); err != nil {
		return res, err
	}
	if err := e.tw.Close(); err != nil {
		return res, err
	}
	if err := cclose(); err != nil {
		return res, err
	}
	if err := bw.Flush(); err != nil {
		return res, err
	}
	res.DiffID, res.TarSize = plain.digest(), plain.n
	res.Digest, res.Size = raw.digest(), raw.n
	return res, nil
}

// fileID identifies an inode, for hard-link groups.
type fileID struct{ dev, ino uint64 }

type exporter struct {
	ctx   context.Context
	res   *ExportResult
	tw    *tar.Writer
	ns    []whiteout.NS
	links map[fileID]string // first tar name of each multiply-linked inode
	log   *slog.Logger
}

// epoch is the time of the marker entries, which have no file behind them
// (kernel whiteouts are often links to one shared inode, whose times mean
// nothing).
var epoch = time.Unix(0, 0)

// walk writes the entries of the directory dirfd, whose tar name prefix
// is rel ("" or ending in "/").
func (e *exporter) walk(dirfd int, rel string) error {
	names, err := readNames(dirfd)
	if err != nil {
		return fmt.Errorf("read directory %q: %w", rel, err)
	}
	for _, name := range names {
		if err := e.ctx.Err(); err != nil {
			return err
		}
		if err := e.entry(dirfd, rel, name); err != nil {
			return err
		}
	}
	return nil
}

func (e *exporter) entry(dirfd int, rel, name string) error {
	path := rel + name
	if strings.HasPrefix(name, WhiteoutPrefix) {
		return fmt.Errorf("%q: a name starting with %q cannot be expressed in an OCI layer", path, WhiteoutPrefix)
	}
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("stat %q: %w", path, err)
	}
	wh, err := e.isWhiteout(dirfd, name, &st)
	if err != nil {
		return err
	}
	if wh {
		return e.marker(rel + WhiteoutPrefix + name)
	}
	attrs, err := e.xattrs(dirfd, name, path)
	if err != nil {
		return err
	}
	hdr := &tar.Header{
		Name:    path,
		Mode:    int64(st.Mode & 0o7777),
		Uid:     int(st.Uid),
		Gid:     int(st.Gid),
		ModTime: time.Unix(st.Mtim.Sec, 0),
		Format:  tar.FormatPAX,
	}
	for k, v := range attrs {
		if hdr.PAXRecords == nil {
			hdr.PAXRecords = map[string]string{}
		}
		hdr.PAXRecords[paxXattr+k] = v
	}
	typ := st.Mode & unix.S_IFMT
	if typ != unix.S_IFDIR && st.Nlink > 1 {
		id := fileID{st.Dev, st.Ino}
		if first, ok := e.links[id]; ok {
			hdr.Typeflag, hdr.Linkname, hdr.PAXRecords = tar.TypeLink, first, nil
			return e.write(hdr)
		}
		e.links[id] = path
	}
	switch typ {
	case unix.S_IFDIR:
		return e.dir(dirfd, name, hdr)
	case unix.S_IFREG:
		hdr.Typeflag, hdr.Size = tar.TypeReg, st.Size
		return e.file(dirfd, name, hdr, &st)
	case unix.S_IFLNK:
		target, err := sysx.Readlinkat(dirfd, name)
		if err != nil {
			return fmt.Errorf("readlink %q: %w", path, err)
		}
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
		return e.write(hdr)
	case unix.S_IFCHR, unix.S_IFBLK, unix.S_IFIFO:
		hdr.Typeflag = map[uint32]byte{unix.S_IFCHR: tar.TypeChar, unix.S_IFBLK: tar.TypeBlock, unix.S_IFIFO: tar.TypeFifo}[typ]
		if typ != unix.S_IFIFO {
			hdr.Devmajor, hdr.Devminor = int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
		}
		return e.write(hdr)
	}
	e.res.Skipped = append(e.res.Skipped, Issue{Name: path, Reason: "socket: tar cannot hold it"})
	return nil
}

// isWhiteout reports whether name is a whiteout in one of the namespaces.
func (e *exporter) isWhiteout(dirfd int, name string, st *unix.Stat_t) (bool, error) {
	if whiteout.IsCharWhiteout(st) {
		return true, nil
	}
	if !whiteout.MaybeXattrWhiteout(st) {
		return false, nil
	}
	for _, ns := range e.ns {
		ok, err := whiteout.HasWhiteoutXattr(dirfd, name, ns)
		if err != nil || ok {
			return ok, err
		}
	}
	return false, nil
}

// xattrs returns the exportable extended attributes of name. It fails on
// overlay attributes that change what the layer means in ways OCI cannot
// express.
func (e *exporter) xattrs(dirfd int, name, path string) (map[string]string, error) {
	names, err := sysx.ListxattrAll(dirfd, name)
	if err != nil {
		return nil, fmt.Errorf("list attributes of %q: %w", path, err)
	}
	var out map[string]string
	for _, attr := range names {
		for _, ns := range e.ns {
			switch attr {
			case ns.Prefix() + "redirect", ns.Prefix() + "metacopy":
				return nil, fmt.Errorf("%q has %s: layers of kernel mounts with redirect_dir or metacopy cannot be exported", path, attr)
			}
		}
		if whiteout.IsPrivateXattr(attr) {
			continue
		}
		val, err := sysx.GetxattrAll(dirfd, name, attr)
		if errors.Is(err, unix.ENODATA) {
			continue // removed meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("read attribute %s of %q: %w", attr, path, err)
		}
		if out == nil {
			out = map[string]string{}
		}
		out[attr] = string(val)
	}
	return out, nil
}

// dir writes a directory, its opacity marker and its contents.
func (e *exporter) dir(dirfd int, name string, hdr *tar.Header) error {
	path := hdr.Name
	hdr.Typeflag, hdr.Name = tar.TypeDir, path+"/"
	if err := e.write(hdr); err != nil {
		return err
	}
	for _, ns := range e.ns {
		o, err := whiteout.GetOpacity(dirfd, name, ns)
		if err != nil {
			return err
		}
		if o == whiteout.Opaque {
			if err := e.marker(path + "/" + OpaqueWhiteout); err != nil {
				return err
			}
			break
		}
	}
	fd, err := openDir(dirfd, name)
	if err != nil {
		return fmt.Errorf("open %q: %w", path, err)
	}
	defer unix.Close(fd)
	return e.walk(fd, path+"/")
}

// file writes a regular file with its data.
func (e *exporter) file(dirfd int, name string, hdr *tar.Header, st *unix.Stat_t) error {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %q: %w", hdr.Name, err)
	}
	f := os.NewFile(uintptr(fd), hdr.Name)
	defer f.Close()
	var now unix.Stat_t
	if err := unix.Fstat(fd, &now); err != nil {
		return fmt.Errorf("stat %q: %w", hdr.Name, err)
	}
	if now.Ino != st.Ino || now.Size != st.Size {
		return fmt.Errorf("%q changed during the export", hdr.Name)
	}
	if err := e.write(hdr); err != nil {
		return err
	}
	n, err := io.Copy(e.tw, io.LimitReader(f, hdr.Size))
	if err != nil {
		return fmt.Errorf("write data of %q: %w", hdr.Name, err)
	}
	if n != hdr.Size {
		return fmt.Errorf("%q changed during the export: read %d of %d bytes", hdr.Name, n, hdr.Size)
	}
	return nil
}

// marker writes an empty OCI whiteout or opacity entry.
func (e *exporter) marker(name string) error {
	return e.write(&tar.Header{Name: name, Typeflag: tar.TypeReg, ModTime: epoch, Format: tar.FormatPAX})
}

func (e *exporter) write(hdr *tar.Header) error {
	if err := e.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("write header of %q: %w", hdr.Name, err)
	}
	e.res.Entries++
	return nil
}

// readNames returns the names in the directory dirfd, sorted.
func readNames(dirfd int) ([]string, error) {
	dup, err := unix.Dup(dirfd)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(dup), "dir")
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	return names, nil
}

// readlinkat reads a symlink's target, whatever its length.
