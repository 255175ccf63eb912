package layer

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"
)

// Compression is how a layer tar is compressed.
type Compression int

const (
	// Uncompressed is a plain tar (media type ...layer.v1.tar).
	Uncompressed Compression = iota
	// Gzip is a gzip-compressed tar (...layer.v1.tar+gzip).
	Gzip
	// Zstd is a zstd-compressed tar (...layer.v1.tar+zstd).
	Zstd
)

// String returns "none", "gzip" or "zstd".
func (c Compression) String() string {
	switch c {
	case Gzip:
		return "gzip"
	case Zstd:
		return "zstd"
	}
	return "none"
}

// ParseCompression parses the names [Compression.String] returns ("" is
// also none).
func ParseCompression(s string) (Compression, error) {
	switch s {
	case "", "none":
		return Uncompressed, nil
	case "gzip":
		return Gzip, nil
	case "zstd":
		return Zstd, nil
	}
	return Uncompressed, fmt.Errorf("unknown compression %q (want none, gzip or zstd)", s)
}

// Magic numbers of the formats we read, and of some we refuse by name.
var (
	gzipMagic  = []byte{0x1f, 0x8b}
	zstdMagic  = []byte{0x28, 0xb5, 0x2f, 0xfd}
	xzMagic    = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}
	bzip2Magic = []byte("BZh")
)

// maxZstdWindow bounds the memory a zstd stream may make the decoder
// allocate. 128 MiB is the window of "zstd --long"; image tools use less.
const maxZstdWindow = 128 << 20

// decompress detects the compression of br by its magic number and returns
// a reader of the uncompressed stream, and a function that releases the
// decoder.
func decompress(br *bufio.Reader) (io.Reader, Compression, func(), error) {
	magic, err := br.Peek(6)
	if err != nil && err != io.EOF && err != bufio.ErrBufferFull {
		return nil, 0, nil, fmt.Errorf("read archive: %w", err)
	}
	switch {
	case bytes.HasPrefix(magic, gzipMagic):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, 0, nil, fmt.Errorf("gzip: %w", err)
		}
		return zr, Gzip, func() { zr.Close() }, nil
	case bytes.HasPrefix(magic, zstdMagic):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxZstdWindow))
		if err != nil {
			return nil, 0, nil, fmt.Errorf("zstd: %w", err)
		}
		return zr, Zstd, zr.Close, nil
	case bytes.HasPrefix(magic, xzMagic):
		return nil, 0, nil, fmt.Errorf("xz-compressed archive: not supported (decompress it first)")
	case bytes.HasPrefix(magic, bzip2Magic):
		return nil, 0, nil, fmt.Errorf("bzip2-compressed archive: not supported (decompress it first)")
	}
	return br, Uncompressed, func() {}, nil
}

// compressor wraps w in a writer for c. The returned close function
// flushes and ends the compressed stream (it does not close w).
func compressor(w io.Writer, c Compression) (io.Writer, func() error, error) {
	switch c {
	case Uncompressed:
		return w, func() error { return nil }, nil
	case Gzip:
		// The zero gzip header (no name, no mtime) keeps output
		// deterministic.
		zw := gzip.NewWriter(w)
		return zw, zw.Close, nil
	case Zstd:
		zw, err := zstd.NewWriter(w, zstd.WithEncoderConcurrency(1))
		if err != nil {
			return nil, nil, fmt.Errorf("zstd: %w", err)
		}
		return zw, zw.Close, nil
	}
	return nil, nil, fmt.Errorf("unknown compression %d", c)
}
