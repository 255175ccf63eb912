package layer

import "strings"

// OCI whiteout names (image-spec layer.md, "Whiteouts").
const (
	// WhiteoutPrefix starts the name of an entry that deletes the name
	// that follows it: ".wh.NAME" deletes NAME.
	WhiteoutPrefix = ".wh."
	// WhiteoutMetaPrefix starts names reserved for metadata (aufs used
	// ".wh..wh.plnk" and ".wh..wh.aufs"); only [OpaqueWhiteout] means
	// something to OCI.
	WhiteoutMetaPrefix = ".wh..wh."
	// OpaqueWhiteout, as an entry inside a directory, makes that directory
	// opaque: nothing of the same directory in lower layers shows through.
	OpaqueWhiteout = ".wh..wh..opq"
)

// ociKind classifies the base name of a tar entry.
type ociKind int

const (
	ociPlain    ociKind = iota // an ordinary name
	ociWhiteout                // ".wh.NAME": NAME is deleted
	ociOpaque                  // ".wh..wh..opq": the parent is opaque
	ociMeta                    // other ".wh..wh." names: metadata, ignored
)

// classify returns what the base name of a tar entry means and, for a
// whiteout, the name it deletes.
func classify(base string) (ociKind, string) {
	switch {
	case base == OpaqueWhiteout:
		return ociOpaque, ""
	case strings.HasPrefix(base, WhiteoutMetaPrefix):
		return ociMeta, ""
	case strings.HasPrefix(base, WhiteoutPrefix):
		return ociWhiteout, base[len(WhiteoutPrefix):]
	}
	return ociPlain, base
}
