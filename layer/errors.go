package layer

import (
	"errors"
	"fmt"
	"strings"
)

// ErrTruncated is wrapped by the error of an archive that ends early: in
// the middle of a header or of an entry's data, or without the
// end-of-archive marker.
var ErrTruncated = errors.New("truncated archive")

// ErrHeaderTooLarge is wrapped by the error of an archive with a PAX or
// GNU long-name record over the 1 MiB that archive/tar accepts.
var ErrHeaderTooLarge = errors.New("tar header too large")

// Issue is one archive entry (or tree entry, on export) that was refused
// or skipped, and why.
type Issue struct {
	// Name is the entry's name as written in the archive (or the path in
	// the tree).
	Name string
	// Reason says what was wrong, in a few words.
	Reason string
}

// String returns "NAME: REASON".
func (i Issue) String() string { return fmt.Sprintf("%q: %s", i.Name, i.Reason) }

// RefusedError is the error of an import that refused entries (an entry
// escaping the target, a write through a symlink, ...).
type RefusedError struct {
	// Refused lists every refused entry, in archive order.
	Refused []Issue
}

// Error lists the first few refused entries on one line.
func (e *RefusedError) Error() string {
	const show = 3
	var parts []string
	for i, r := range e.Refused {
		if i == show {
			parts = append(parts, fmt.Sprintf("and %d more", len(e.Refused)-show))
			break
		}
		parts = append(parts, r.String())
	}
	noun := "entries"
	if len(e.Refused) == 1 {
		noun = "entry"
	}
	return fmt.Sprintf("refused %d unsafe archive %s: %s", len(e.Refused), noun, strings.Join(parts, "; "))
}

// DigestError is a digest that did not match the expected one.
type DigestError struct {
	// What names the digest: "diffID" (of the uncompressed tar) or
	// "digest" (of the stored bytes).
	What string
	// Want and Got are "sha256:<hex>" digests.
	Want, Got string
}

// Error says which digest mismatched and both values.
func (e *DigestError) Error() string {
	return fmt.Sprintf("%s mismatch: expected %s, got %s", e.What, e.Want, e.Got)
}
