package image

import (
	"crypto/sha256"
	"fmt"

	"strata/layer"
)

// ChainID returns the chainID of a layer whose parent has chainID parent
// ("" for a base layer) and whose diffID is diffID (image-spec
// config.md, "Layer ChainID").
func ChainID(parent, diffID string) string {
	if parent == "" {
		return diffID
	}
	sum := sha256.Sum256([]byte(parent + " " + diffID))
	return layer.FormatDigest(sum[:])
}

// ChainIDs returns the chainID of each layer of a stack given bottom
// first, as the diffIDs of an image config are.
func ChainIDs(diffIDs []string) ([]string, error) {
	out := make([]string, len(diffIDs))
	parent := ""
	for i, d := range diffIDs {
		if _, err := layer.ParseDigest(d); err != nil {
			return nil, fmt.Errorf("diff_ids[%d]: %w", i, err)
		}
		parent = ChainID(parent, d)
		out[i] = parent
	}
	return out, nil
}
