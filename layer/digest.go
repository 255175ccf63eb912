package layer

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"strings"
)

// DigestPrefix starts every digest strata writes or accepts: only sha256
// is supported.
const DigestPrefix = "sha256:"

// FormatDigest writes a sha256 sum as "sha256:<hex>".
func FormatDigest(sum []byte) string { return DigestPrefix + hex.EncodeToString(sum) }

// DigestOf returns the digest of b.
func DigestOf(b []byte) string {
	s := sha256.Sum256(b)
	return FormatDigest(s[:])
}

// ParseDigest checks that d is "sha256:" followed by 64 lower-case hex
// digits and returns the hex part.
func ParseDigest(d string) (string, error) {
	alg, hexPart, ok := strings.Cut(d, ":")
	if !ok {
		return "", fmt.Errorf("digest %q: want ALGORITHM:HEX", d)
	}
	if alg != "sha256" {
		return "", fmt.Errorf("digest %q: algorithm %q not supported (only sha256)", d, alg)
	}
	if len(hexPart) != sha256.Size*2 {
		return "", fmt.Errorf("digest %q: want %d hex digits, got %d", d, sha256.Size*2, len(hexPart))
	}
	for _, c := range hexPart {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return "", fmt.Errorf("digest %q: not lower-case hex", d)
		}
	}
	return hexPart, nil
}

// hashReader hashes and counts what is read through it.
type hashReader struct {
	r io.Reader
	h hash.Hash
	n int64
}

func newHashReader(r io.Reader) *hashReader { return &hashReader{r: r, h: sha256.New()} }

func (h *hashReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.h.Write(p[:n])
	h.n += int64(n)
	return n, err
}

func (h *hashReader) digest() string { return FormatDigest(h.h.Sum(nil)) }

// hashWriter hashes and counts what is written through it.
type hashWriter struct {
	w io.Writer
	h hash.Hash
	n int64
}

func newHashWriter(w io.Writer) *hashWriter { return &hashWriter{w: w, h: sha256.New()} }

func (h *hashWriter) Write(p []byte) (int, error) {
	n, err := h.w.Write(p)
	h.h.Write(p[:n])
	h.n += int64(n)
	return n, err
}

func (h *hashWriter) digest() string { return FormatDigest(h.h.Sum(nil)) }
