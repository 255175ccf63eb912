package cow

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// chunk bounds each copy_file_range call, so that a long copy notices
// cancellation.
const chunk = 64 << 20

// CopyData copies size bytes of src to dst, both open file descriptors, the
// cheapest way the kernel allows: a reflink (FICLONE) shares the extents;
// otherwise copy_file_range copies each data extent found with
// SEEK_DATA/SEEK_HOLE, so holes stay holes; a read/write loop is the last
// resort, for filesystems that support neither. dst must be empty.
func CopyData(ctx context.Context, dst, src int, size int64) error {
	if size == 0 {
		return nil
	}
	if err := unix.IoctlFileClone(dst, src); err == nil {
		return nil
	}
	// FICLONE fails with EOPNOTSUPP/EINVAL/EXDEV where reflinks are not
	// possible; every failure means "try the next way".
	if err := unix.Ftruncate(dst, size); err != nil {
		return fmt.Errorf("size copy: %w", err)
	}
	off := int64(0)
	for off < size {
		if err := ctx.Err(); err != nil {
			return err
		}
		start, err := unix.Seek(src, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole is left; Ftruncate made it
		}
		if err != nil {
			// No SEEK_DATA support: treat the rest as data.
			start = off
		}
		end, err := unix.Seek(src, start, unix.SEEK_HOLE)
		if err != nil || end > size {
			end = size
		}
		if err := copyRange(ctx, dst, src, start, end); err != nil {
			return err
		}
		off = end
	}
	return nil
}

// copyRange copies [start, end) of src to the same offsets of dst.
func copyRange(ctx context.Context, dst, src int, start, end int64) error {
	roff, woff := start, start
	for roff < end {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := unix.CopyFileRange(src, &roff, dst, &woff, int(min(end-roff, chunk)), 0)
		if err != nil {
			if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
				return readWrite(ctx, dst, src, roff, end)
			}
			return fmt.Errorf("copy_file_range: %w", err)
		}
		if n == 0 {
			return fmt.Errorf("copy_file_range: source shrank at %d: %w", roff, unix.EIO)
		}
	}
	return nil
}

// readWrite copies [off, end) with pread/pwrite.
func readWrite(ctx context.Context, dst, src int, off, end int64) error {
	buf := make([]byte, 1<<20)
	for off < end {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := unix.Pread(src, buf[:min(int64(len(buf)), end-off)], off)
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if n == 0 {
			return fmt.Errorf("read: source shrank at %d: %w", off, unix.EIO)
		}
		if _, err := unix.Pwrite(dst, buf[:n], off); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		off += int64(n)
	}
	return nil
}
