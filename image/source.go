package image

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"

	"strata/layer"
)

// Media types this package reads.
const (
	MediaTypeOCIIndex      = "application/vnd.oci.image.index.v1+json"
	MediaTypeOCIManifest   = "application/vnd.oci.image.manifest.v1+json"
	MediaTypeOCIConfig     = "application/vnd.oci.image.config.v1+json"
	MediaTypeDockerList    = "application/vnd.docker.distribution.manifest.list.v2+json"
	MediaTypeDockerV2      = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerConfig  = "application/vnd.docker.container.image.v1+json"
	MediaTypeOCILayer      = "application/vnd.oci.image.layer.v1.tar"
	MediaTypeOCILayerGzip  = "application/vnd.oci.image.layer.v1.tar+gzip"
	MediaTypeOCILayerZstd  = "application/vnd.oci.image.layer.v1.tar+zstd"
	MediaTypeDockerLayer   = "application/vnd.docker.image.rootfs.diff.tar.gzip"
	mediaTypeDockerLayerTa = "application/vnd.docker.image.rootfs.diff.tar"
)

// layerTypes are the layer media types accepted; the compression itself
// is detected from the data. Non-distributable (foreign) layers are
// accepted when their blob is present.
var layerTypes = map[string]bool{
	MediaTypeOCILayer: true, MediaTypeOCILayerGzip: true, MediaTypeOCILayerZstd: true,
	"application/vnd.oci.image.layer.nondistributable.v1.tar":      true,
	"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": true,
	"application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": true,
	MediaTypeDockerLayer: true, mediaTypeDockerLayerTa: true,
	"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": true,
}

// Annotations naming an image in an OCI index.
const (
	annotationRefName       = "org.opencontainers.image.ref.name"
	annotationContainerdRef = "io.containerd.image.name"
)

// maxJSONSize bounds index, manifest and config blobs read into memory.
const maxJSONSize = 16 << 20

// Descriptor points to a blob (image-spec descriptor.md).
type Descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *Platform         `json:"platform,omitempty"`
}

// Platform is the platform of a manifest in an index.
type Platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
	Variant      string `json:"variant,omitempty"`
}

// String returns "os/arch[/variant]".
func (p *Platform) String() string {
	if p == nil {
		return "any"
	}
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}

type ociIndex struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Manifests     []Descriptor `json:"manifests"`
}

type ociManifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Config        Descriptor   `json:"config"`
	Layers        []Descriptor `json:"layers"`
}

type imageConfig struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
	RootFS       struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

type dockerManifest struct {
	Config   string   `json:"Config"`
	RepoTags []string `json:"RepoTags"`
	Layers   []string `json:"Layers"`
}

// Source is an image archive opened for reading: an OCI image layout
// (directory or tar) or a docker-save tarball.
type Source struct {
	path   string
	format string // "oci" or "docker"
	files  fileset
	cands  []candidate
}

// candidate is one image a source holds.
type candidate struct {
	names    []string
	platform *Platform
	manifest *Descriptor     // OCI
	docker   *dockerManifest // docker-save
}

// Ref describes one image of a source, for listings and errors.
type Ref struct {
	// Names are the image's names (OCI ref annotations, docker RepoTags).
	Names []string
	// Platform is the manifest's platform in an OCI index, if given.
	Platform string
	// Digest is the OCI manifest digest, or the config path of a docker
	// save entry.
	Digest string
}

// OpenSource opens an image archive: a directory or a tar file holding an
// OCI image layout (oci-layout + index.json) or a docker save
// (manifest.json). When both are present (docker 25 and later write
// both), the OCI layout is used.
func OpenSource(p string) (*Source, error) {
	st, err := os.Stat(p)
	if err != nil {
		return nil, fmt.Errorf("image source: %w", err)
	}
	if abs, err := filepath.Abs(p); err == nil {
		p = abs
	}
	s := &Source{path: p}
	if st.IsDir() {
		s.files, err = openDirSet(p)
	} else {
		s.files, err = openTarSet(p)
	}
	if err != nil {
		return nil, fmt.Errorf("image source %s: %w", p, err)
	}
	if err := s.scan(); err != nil {
		s.files.close()
		return nil, fmt.Errorf("image source %s: %w", p, err)
	}
	return s, nil
}

// Close releases the source.
func (s *Source) Close() error { return s.files.close() }

// Format returns "oci" or "docker".
func (s *Source) Format() string { return s.format }

// Refs lists the images of the source.
func (s *Source) Refs() []Ref {
	var out []Ref
	for _, c := range s.cands {
		r := Ref{Names: c.names}
		if c.manifest != nil {
			r.Digest, r.Platform = c.manifest.Digest, c.platform.String()
		} else {
			r.Digest = c.docker.Config
		}
		out = append(out, r)
	}
	return out
}

func (s *Source) scan() error {
	switch {
	case s.files.exists("oci-layout") && s.files.exists("index.json"):
		s.format = "oci"
		return s.scanOCI()
	case s.files.exists("manifest.json"):
		s.format = "docker"
		return s.scanDocker()
	}
	return errors.New("neither an OCI image layout (oci-layout, index.json) nor a docker save (manifest.json)")
}

func (s *Source) scanOCI() error {
	var layout struct {
		Version string `json:"imageLayoutVersion"`
	}
	if err := s.readJSON("oci-layout", "", -1, &layout); err != nil {
		return err
	}
	if !strings.HasPrefix(layout.Version, "1.") {
		return fmt.Errorf("oci-layout: unsupported imageLayoutVersion %q", layout.Version)
	}
	var idx ociIndex
	if err := s.readJSON("index.json", "", -1, &idx); err != nil {
		return err
	}
	return s.addIndex(idx, nil, 0)
}

// addIndex adds the manifests of an index, following nested indexes.
// names are inherited from the descriptor that pointed to a nested index.
func (s *Source) addIndex(idx ociIndex, names []string, depth int) error {
	if depth > 4 {
		return errors.New("image indexes nested too deep")
	}
	for _, d := range idx.Manifests {
		d := d
		n := refNames(d.Annotations)
		if len(n) == 0 {
			n = names
		}
		switch d.MediaType {
		case MediaTypeOCIIndex, MediaTypeDockerList:
			var sub ociIndex
			if err := s.readBlobJSON("image index", d, &sub); err != nil {
				return err
			}
			if err := s.addIndex(sub, n, depth+1); err != nil {
				return err
			}
		case MediaTypeOCIManifest, MediaTypeDockerV2:
			if d.Platform != nil && d.Platform.OS == "unknown" {
				continue // attestation manifests (buildx) are not images
			}
			s.cands = append(s.cands, candidate{names: n, platform: d.Platform, manifest: &d})
		}
	}
	if len(s.cands) == 0 {
		return errors.New("index.json lists no image manifest")
	}
	return nil
}

// refNames returns the names an OCI descriptor gives its image: the full
// reference containerd records, then the ref.name annotation.
func refNames(a map[string]string) []string {
	var out []string
	for _, k := range []string{annotationContainerdRef, annotationRefName} {
		if v := a[k]; v != "" && (len(out) == 0 || out[0] != v) {
			out = append(out, v)
		}
	}
	return out
}

func (s *Source) scanDocker() error {
	var ms []dockerManifest
	if err := s.readJSON("manifest.json", "", -1, &ms); err != nil {
		return err
	}
	for i := range ms {
		s.cands = append(s.cands, candidate{names: ms[i].RepoTags, docker: &ms[i]})
	}
	if len(s.cands) == 0 {
		return errors.New("manifest.json lists no image")
	}
	return nil
}

// readJSON reads and decodes a JSON file of the source, verifying its
// digest when want is set and its size when size >= 0.
func (s *Source) readJSON(name, want string, size int64, v any) error {
	r, n, err := s.files.open(name)
	if err != nil {
		return err
	}
	defer r.Close()
	if n > maxJSONSize {
		return fmt.Errorf("%s: %d bytes, more than the %d accepted for JSON", name, n, maxJSONSize)
	}
	if size >= 0 && n != size {
		return fmt.Errorf("%s: size %d, descriptor says %d", name, n, size)
	}
	data, err := io.ReadAll(io.LimitReader(r, maxJSONSize+1))
	if err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	if want != "" {
		if got := layer.DigestOf(data); got != want {
			return fmt.Errorf("%s: %w", name, &layer.DigestError{What: "digest", Want: want, Got: got})
		}
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if raw, ok := v.(*json.RawMessage); ok {
		*raw = data
	}
	return nil
}

// blobPath returns the path of a blob in an OCI layout.
func blobPath(digest string) (string, error) {
	hexPart, err := layer.ParseDigest(digest)
	if err != nil {
		return "", err
	}
	return "blobs/sha256/" + hexPart, nil
}

// readBlobJSON reads the JSON blob d; what names it in errors.
func (s *Source) readBlobJSON(what string, d Descriptor, v any) error {
	p, err := blobPath(d.Digest)
	if err == nil {
		err = s.readJSON(p, d.Digest, d.Size, v)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// blobDigestPath matches paths that name their content's digest.
var blobDigestPath = regexp.MustCompile(`^blobs/sha256/([0-9a-f]{64})$`)

// oldConfigPath matches docker's <image id>.json config names; the image
// id is the config's digest.
var oldConfigPath = regexp.MustCompile(`^([0-9a-f]{64})\.json$`)

// resolved is an image read from a source and verified as far as it can
// be without reading the layers.
type resolved struct {
	name           string
	manifestDigest string
	configDigest   string
	config         json.RawMessage
	diffIDs        []string
	layers         []layerBlob
}

// layerBlob is where a layer's tar is in the source.
type layerBlob struct {
	path      string
	digest    string // expected digest of the blob, "" when unknown
	mediaType string
	size      int64 // expected size, -1 when unknown
}

// pick chooses the image ref among the candidates ("" when there is only
// one, or one for this machine's platform).
func (s *Source) pick(ref string) (candidate, error) {
	var cs []candidate
	for _, c := range s.cands {
		if ref == "" || matchRef(c, ref) {
			cs = append(cs, c)
		}
	}
	if len(cs) > 1 {
		// Several platforms of one image: take this machine's.
		var here []candidate
		for _, c := range cs {
			if c.platform != nil && c.platform.OS == runtime.GOOS && c.platform.Architecture == runtime.GOARCH {
				here = append(here, c)
			}
		}
		if len(here) > 0 {
			cs = here
		}
	}
	switch {
	case len(cs) == 1:
		return cs[0], nil
	case len(cs) == 0:
		return candidate{}, fmt.Errorf("no image %q in the source (it holds %s)", ref, s.describe())
	}
	if ref == "" {
		return candidate{}, fmt.Errorf("the source holds %d images, choose one: %s", len(cs), s.describe())
	}
	return candidate{}, fmt.Errorf("%q matches %d images: %s", ref, len(cs), s.describe())
}

func matchRef(c candidate, ref string) bool {
	for _, n := range c.names {
		if n == ref || addLatest(n) == addLatest(ref) || strings.HasSuffix(addLatest(n), "/"+addLatest(ref)) {
			return true
		}
	}
	if c.manifest != nil && (c.manifest.Digest == ref || strings.TrimPrefix(c.manifest.Digest, "sha256:") == ref) {
		return true
	}
	return false
}

func (s *Source) describe() string {
	var parts []string
	for _, r := range s.Refs() {
		d := strings.Join(r.Names, ",")
		if d == "" {
			d = "(unnamed) " + r.Digest
		}
		if r.Platform != "" && r.Platform != "any" {
			d += " [" + r.Platform + "]"
		}
		parts = append(parts, d)
	}
	sort.Strings(parts)
	return strings.Join(parts, "; ")
}

// resolve reads and verifies the manifest and config of the image ref.
func (s *Source) resolve(ref string) (*resolved, error) {
	c, err := s.pick(ref)
	if err != nil {
		return nil, err
	}
	r := &resolved{}
	if len(c.names) > 0 {
		r.name = c.names[0]
	}
	if c.manifest != nil {
		err = s.resolveOCI(c, r)
	} else {
		err = s.resolveDocker(c, r)
	}
	if err != nil {
		return nil, err
	}
	var cfg imageConfig
	if err := json.Unmarshal(r.config, &cfg); err != nil {
		return nil, fmt.Errorf("image config: %w", err)
	}
	if cfg.RootFS.Type != "layers" {
		return nil, fmt.Errorf("image config: rootfs.type %q, want \"layers\"", cfg.RootFS.Type)
	}
	if len(cfg.RootFS.DiffIDs) != len(r.layers) {
		return nil, fmt.Errorf("image config lists %d diff_ids for %d layers", len(cfg.RootFS.DiffIDs), len(r.layers))
	}
	r.diffIDs = cfg.RootFS.DiffIDs
	if _, err := ChainIDs(r.diffIDs); err != nil {
		return nil, fmt.Errorf("image config: %w", err)
	}
	for i, l := range r.layers {
		if !s.files.exists(l.path) {
			return nil, fmt.Errorf("layer %d of %d: blob %s missing from the source", i+1, len(r.layers), l.path)
		}
	}
	return r, nil
}

func (s *Source) resolveOCI(c candidate, r *resolved) error {
	var m ociManifest
	if err := s.readBlobJSON("manifest", *c.manifest, &m); err != nil {
		return err
	}
	r.manifestDigest = c.manifest.Digest
	switch m.Config.MediaType {
	case MediaTypeOCIConfig, MediaTypeDockerConfig:
	default:
		return fmt.Errorf("manifest %s: config media type %q is not an image config", c.manifest.Digest, m.Config.MediaType)
	}
	var raw json.RawMessage
	if err := s.readBlobJSON("image config", m.Config, &raw); err != nil {
		return err
	}
	r.config, r.configDigest = raw, m.Config.Digest
	for i, d := range m.Layers {
		if !layerTypes[d.MediaType] {
			return fmt.Errorf("layer %d of %d: unsupported media type %q", i+1, len(m.Layers), d.MediaType)
		}
		p, err := blobPath(d.Digest)
		if err != nil {
			return fmt.Errorf("layer %d of %d: %w", i+1, len(m.Layers), err)
		}
		r.layers = append(r.layers, layerBlob{path: p, digest: d.Digest, mediaType: d.MediaType, size: d.Size})
	}
	return nil
}

func (s *Source) resolveDocker(c candidate, r *resolved) error {
	d := c.docker
	want := ""
	if m := blobDigestPath.FindStringSubmatch(d.Config); m != nil {
		want = "sha256:" + m[1]
	} else if m := oldConfigPath.FindStringSubmatch(d.Config); m != nil {
		want = "sha256:" + m[1]
	}
	var raw json.RawMessage
	if err := s.readJSON(d.Config, want, -1, &raw); err != nil {
		return fmt.Errorf("image config: %w", err)
	}
	r.config = raw
	r.configDigest = want
	if want == "" {
		sum := sha256.Sum256(raw)
		r.configDigest = layer.FormatDigest(sum[:])
	}
	for _, p := range d.Layers {
		lb := layerBlob{path: p, size: -1}
		if m := blobDigestPath.FindStringSubmatch(p); m != nil {
			lb.digest = "sha256:" + m[1]
		}
		r.layers = append(r.layers, lb)
	}
	return nil
}

// openLayer opens the blob of layer i, checking its size.
func (s *Source) openLayer(l layerBlob) (io.ReadCloser, error) {
	rc, n, err := s.files.open(l.path)
	if err != nil {
		return nil, err
	}
	if l.size >= 0 && n != l.size {
		rc.Close()
		return nil, fmt.Errorf("%s: size %d, manifest says %d", l.path, n, l.size)
	}
	return rc, nil
}

// addLatest gives a name without a tag or digest the tag "latest".
func addLatest(name string) string {
	if strings.Contains(name, "@") {
		return name
	}
	last := name[strings.LastIndex(name, "/")+1:]
	if strings.Contains(last, ":") {
		return name
	}
	return name + ":latest"
}
