package image

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"strata/layer"
	"strata/whiteout"
)

// storeVersion is the layout version in store.json.
const storeVersion = 1

// ErrNotFound is wrapped by the error for an image the store does not
// hold.
var ErrNotFound = errors.New("image not found")

// Options configure [Open].
type Options struct {
	// UserXattr makes a new store keep opaque directories in
	// user.overlay.* (the kernel's userxattr format). Without it a new
	// store uses trusted.overlay.* when the process is root and
	// user.overlay.* otherwise. An existing store keeps its format; asking
	// for user.overlay.* on a trusted.overlay.* store is an error.
	UserXattr bool
	// Logger receives progress messages; nil discards them.
	Logger *slog.Logger
}

// Store is a layer store on disk; see the package documentation for its
// layout. Its methods are safe for concurrent use, also by several
// processes.
type Store struct {
	root     string // immutable
	ns       whiteout.NS
	rootless bool
	log      *slog.Logger
}

type storeMeta struct {
	Version int    `json:"version"`
	Xattr   string `json:"xattr"`
}

// Image is an image in the store, as recorded in images/<name>.json.
type Image struct {
	// Name is the image's name in the store.
	Name string `json:"name"`
	// ID is the digest of the image config (docker's image ID).
	ID string `json:"id"`
	// ManifestDigest is the OCI manifest's digest; empty for docker-save
	// sources.
	ManifestDigest string `json:"manifestDigest,omitempty"`
	// Layers are the layers, bottom first (the config's order).
	Layers []Layer `json:"layers"`
	// LowerDirs are the layers' diff dirs relative to the store, top
	// first: the order of lowerdir= ([Store.LowerDirs] gives them
	// absolute).
	LowerDirs []string `json:"lowerdirs"`
	// Config is the image config as in the source.
	Config json.RawMessage `json:"config"`
	// Source is the archive the image was unpacked from.
	Source string `json:"source,omitempty"`
	// Unpacked is when the record was written.
	Unpacked time.Time `json:"unpacked"`
}

// Layer is one layer of an [Image].
type Layer struct {
	ChainID string `json:"chainID"`
	DiffID  string `json:"diffID"`
	// Digest and MediaType describe the blob it came from, when known.
	Digest    string `json:"digest,omitempty"`
	MediaType string `json:"mediaType,omitempty"`
	// Size is the number of bytes of file data in the unpacked layer.
	Size int64 `json:"size"`
}

// Size returns the bytes of file data of all the image's layers.
func (img *Image) Size() int64 {
	var n int64
	for _, l := range img.Layers {
		n += l.Size
	}
	return n
}

// LayerInfo describes one stored layer.
type LayerInfo struct {
	ChainID, DiffID string
	// Parent is the chainID of the layer below; empty for a base layer.
	Parent string
	// Size is the number of bytes of file data in the layer.
	Size int64
	// Images names the images that use the layer; empty for a layer no
	// image refers to (left by an interrupted unpack, or by an image
	// replaced under the same name).
	Images []string
}

// Open opens the store at root, creating it if needed.
func Open(root string, opts Options) (*Store, error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", root, err)
	}
	s := &Store{root: abs, rootless: os.Geteuid() != 0, log: opts.Logger}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	for _, d := range []string{"", "layers", "images", "locks", "tmp"} {
		if err := os.MkdirAll(filepath.Join(abs, d), 0o700); err != nil {
			return nil, fmt.Errorf("store %s: %w", root, err)
		}
	}
	want := whiteout.Trusted
	if opts.UserXattr || s.rootless {
		want = whiteout.User
	}
	meta := storeMeta{Version: storeVersion, Xattr: want.String()}
	data, _ := json.Marshal(meta)
	metaPath := filepath.Join(abs, "store.json")
	// Not through tmp/: Open holds no lock, and tmp/ may be cleaned.
	if err := writeNew(abs, metaPath, data); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("store %s: %w", root, err)
	}
	data, err = os.ReadFile(metaPath)
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", root, err)
	}
	if err := json.Unmarshal(data, &meta); err != nil {
		return nil, fmt.Errorf("store %s: store.json: %w", root, err)
	}
	if meta.Version != storeVersion {
		return nil, fmt.Errorf("store %s: layout version %d, this strata reads %d", root, meta.Version, storeVersion)
	}
	switch meta.Xattr {
	case "trusted":
		s.ns = whiteout.Trusted
	case "user":
		s.ns = whiteout.User
	default:
		return nil, fmt.Errorf("store %s: store.json: unknown xattr format %q", root, meta.Xattr)
	}
	if opts.UserXattr && s.ns != whiteout.User {
		return nil, fmt.Errorf("store %s keeps layers in the trusted.overlay format; use another store for userxattr", root)
	}
	return s, nil
}

// Root returns the store's absolute path.
func (s *Store) Root() string { return s.root }

// NS returns the xattr namespace of the opaque directories in the store's
// layers: mounts of its images need -o userxattr when it is whiteout.User.
func (s *Store) NS() whiteout.NS { return s.ns }

func (s *Store) path(elem ...string) string {
	return filepath.Join(append([]string{s.root}, elem...)...)
}

// UnpackOptions configure [Store.Unpack].
type UnpackOptions struct {
	// Ref selects the image of a source that holds several (a name, a
	// tag, or an OCI manifest digest). Empty: the source must hold one
	// image (or one for this platform).
	Ref string
	// Name is the image's name in the store. Empty: the image's own name
	// (OCI ref annotation, docker RepoTag), else its config digest.
	Name string
}

// UnpackResult describes a finished unpack.
type UnpackResult struct {
	// Image is the image record written.
	Image *Image
	// New lists the chainIDs this unpack added, Reused those that were
	// there already.
	New, Reused []string
	// Skipped lists what the layers held that could not be unpacked
	// without privilege (devices, trusted.* attributes).
	Skipped []layer.Issue
}

// testHook, when set by tests, is called at the steps of an unpack that
// crash tests interrupt.
var testHook func(event, chainID string)

// Unpack stores the image ref of src: it verifies the manifest, config
// and every layer blob and diffID, unpacks the layers the store lacks and
// writes the image record. On error the store is unchanged. See the
// package documentation for the concurrency rules.
func (s *Store) Unpack(ctx context.Context, src *Source, opts UnpackOptions) (*UnpackResult, error) {
	if s.ns == whiteout.Trusted && s.rootless {
		return nil, fmt.Errorf("store %s keeps layers in the trusted.overlay format: unpack as root", s.root)
	}
	r, err := src.resolve(opts.Ref)
	if err != nil {
		return nil, err
	}
	name := opts.Name
	if name == "" {
		name = r.name
	}
	if name == "" {
		name = r.configDigest
	}
	if err := checkName(name); err != nil {
		return nil, err
	}
	chains, err := ChainIDs(r.diffIDs)
	if err != nil {
		return nil, err
	}

	storeLock, err := s.lockStore(ctx, false)
	if err != nil {
		return nil, err
	}
	defer storeLock.Close()

	res := &UnpackResult{}
	var held []*os.File
	defer func() {
		for _, f := range held {
			f.Close()
		}
	}()
	type pending struct{ tmp, hex string }
	var pend []pending
	committed := 0
	defer func() {
		for _, p := range pend[committed:] {
			if err := layer.RemoveAll(p.tmp); err != nil {
				s.log.Error("cannot remove temporary layer", "path", p.tmp, "err", err)
			}
		}
	}()
	img := &Image{Name: name, ID: r.configDigest, ManifestDigest: r.manifestDigest, Config: r.config, Source: src.path}
	for i, lb := range r.layers {
		chain, diffID := chains[i], r.diffIDs[i]
		hexPart := chain[len(layer.DigestPrefix):]
		lk, err := lockFile(ctx, s.path("locks", hexPart+".lock"), unix.LOCK_EX)
		if err != nil {
			return nil, err
		}
		held = append(held, lk)
		l := Layer{ChainID: chain, DiffID: diffID, Digest: lb.digest, MediaType: lb.mediaType}
		if info, err := s.readLayer(hexPart); err == nil {
			if info.DiffID != diffID {
				return nil, fmt.Errorf("store corrupt: layer %s has diffid %s, expected %s", chain, info.DiffID, diffID)
			}
			l.Size = info.Size
			img.Layers = append(img.Layers, l)
			res.Reused = append(res.Reused, chain)
			continue
		}
		tmp, err := os.MkdirTemp(s.path("tmp"), "layer-"+hexPart[:12]+"-")
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i+1, err)
		}
		pend = append(pend, pending{tmp, hexPart})
		s.log.Info("unpacking layer", "layer", chain, "diffid", diffID, "blob", lb.path)
		ir, err := s.importLayer(ctx, src, lb, filepath.Join(tmp, "diff"), diffID)
		if err != nil {
			return nil, fmt.Errorf("layer %d of %d (diffID %s): %w", i+1, len(r.layers), diffID, err)
		}
		parent := ""
		if i > 0 {
			parent = chains[i-1]
		}
		if err := writeLayerMeta(tmp, diffID, parent, ir.Size); err != nil {
			return nil, err
		}
		l.Size = ir.Size
		img.Layers = append(img.Layers, l)
		res.New = append(res.New, chain)
		res.Skipped = append(res.Skipped, ir.Skipped...)
		if testHook != nil {
			testHook("imported", chain)
		}
	}

	// Every layer is verified: make them durable, then visible.
	if len(pend) > 0 {
		if err := syncDir(s.path("tmp"), true); err != nil {
			return nil, err
		}
	}
	for _, p := range pend {
		err := unix.Renameat2(unix.AT_FDCWD, p.tmp, unix.AT_FDCWD, s.path("layers", p.hex), unix.RENAME_NOREPLACE)
		if err != nil {
			return nil, fmt.Errorf("commit layer sha256:%s: %w", p.hex, err)
		}
		committed++
		if testHook != nil {
			testHook("committed", "sha256:"+p.hex)
		}
	}
	if err := syncDir(s.path("layers"), false); err != nil {
		return nil, err
	}
	for i := len(chains) - 1; i >= 0; i-- {
		img.LowerDirs = append(img.LowerDirs, filepath.Join("layers", chains[i][len(layer.DigestPrefix):], "diff"))
	}
	img.Unpacked = time.Now().UTC()
	if err := s.writeImage(img); err != nil {
		return nil, err
	}
	res.Image = img
	return res, nil
}

func (s *Store) importLayer(ctx context.Context, src *Source, lb layerBlob, target, diffID string) (*layer.ImportResult, error) {
	rc, err := src.openLayer(lb)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return layer.Import(ctx, rc, target, layer.ImportOptions{
		NS: s.ns, Rootless: s.rootless, SkipDevices: s.rootless,
		DiffID: diffID, Digest: lb.digest,
		NoSync: true, // one syncfs for all layers before the commit
		Logger: s.log,
	})
}

func writeLayerMeta(dir, diffID, parent string, size int64) error {
	files := map[string]string{"diffid": diffID, "size": strconv.FormatInt(size, 10)}
	if parent != "" {
		files["parent"] = parent
	}
	for name, v := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v), 0o644); err != nil {
			return fmt.Errorf("layer metadata: %w", err)
		}
	}
	return nil
}

// readLayer reads the metadata of layers/<hex>. A missing layer gives an
// error wrapping os.ErrNotExist.
func (s *Store) readLayer(hexPart string) (*LayerInfo, error) {
	dir := s.path("layers", hexPart)
	if _, err := os.Stat(filepath.Join(dir, "diff")); err != nil {
		return nil, err
	}
	info := &LayerInfo{ChainID: "sha256:" + hexPart}
	diffID, err := os.ReadFile(filepath.Join(dir, "diffid"))
	if err != nil {
		return nil, err
	}
	info.DiffID = string(diffID)
	if p, err := os.ReadFile(filepath.Join(dir, "parent")); err == nil {
		info.Parent = string(p)
	}
	if n, err := os.ReadFile(filepath.Join(dir, "size")); err == nil {
		info.Size, _ = strconv.ParseInt(string(n), 10, 64)
	}
	return info, nil
}

// checkName accepts names that make a valid file name once escaped.
func checkName(name string) error {
	if name == "" {
		return errors.New("empty image name")
	}
	if strings.HasPrefix(name, ".") {
		return fmt.Errorf("image name %q: must not start with a dot", name)
	}
	for _, c := range name {
		if c < 0x20 || c == 0x7f {
			return fmt.Errorf("image name %q: control character", name)
		}
	}
	if len(url.PathEscape(name))+len(".json") > unix.NAME_MAX {
		return fmt.Errorf("image name %q: too long", name)
	}
	return nil
}

func imageFile(name string) string { return url.PathEscape(name) + ".json" }

// writeImage writes an image record atomically.
func (s *Store) writeImage(img *Image) error {
	data, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(s.path("tmp"), ".image-")
	if err != nil {
		return fmt.Errorf("write image record: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(append(data, '\n')); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), s.path("images", imageFile(img.Name)))
	}
	if err == nil {
		err = syncDir(s.path("images"), false)
	}
	if err != nil {
		return fmt.Errorf("write image record %s: %w", img.Name, err)
	}
	return nil
}

// writeNew creates path with data atomically, failing with os.ErrExist
// if it exists.
func writeNew(tmpDir, path string, data []byte) error {
	f, err := os.CreateTemp(tmpDir, ".store.json-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := unix.Renameat2(unix.AT_FDCWD, f.Name(), unix.AT_FDCWD, path, unix.RENAME_NOREPLACE); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return os.ErrExist
		}
		return err
	}
	return nil
}

// syncDir fsyncs a directory, or with all, syncs its whole filesystem.
func syncDir(dir string, all bool) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if all {
		err = unix.Syncfs(fd)
	} else {
		err = unix.Fsync(fd)
	}
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// Images returns the store's images, sorted by name.
func (s *Store) Images() ([]*Image, error) {
	ents, err := os.ReadDir(s.path("images"))
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	var out []*Image
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		data, err := os.ReadFile(s.path("images", e.Name()))
		if errors.Is(err, os.ErrNotExist) {
			continue // removed meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("read image record: %w", err)
		}
		img := &Image{}
		if err := json.Unmarshal(data, img); err != nil {
			return nil, fmt.Errorf("image record %s: %w", e.Name(), err)
		}
		out = append(out, img)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Get finds an image by name ("alpine" also finds "alpine:latest", and
// "alpine:3" finds "docker.io/library/alpine:3"), by ID or manifest
// digest, or by a unique prefix of at least 4 hex digits of its ID.
func (s *Store) Get(ref string) (*Image, error) {
	imgs, err := s.Images()
	if err != nil {
		return nil, err
	}
	return find(imgs, ref)
}

func find(imgs []*Image, ref string) (*Image, error) {
	for _, img := range imgs {
		if img.Name == ref {
			return img, nil
		}
	}
	var found []*Image
	for _, img := range imgs {
		if addLatest(img.Name) == addLatest(ref) || strings.HasSuffix(addLatest(img.Name), "/"+addLatest(ref)) {
			found = append(found, img)
		}
	}
	if len(found) == 0 {
		h := strings.TrimPrefix(ref, layer.DigestPrefix)
		for _, img := range imgs {
			if img.ID == ref || img.ManifestDigest == ref ||
				(len(h) >= 4 && isHex(h) && strings.HasPrefix(img.ID, layer.DigestPrefix+h)) {
				found = append(found, img)
			}
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("%w: %q", ErrNotFound, ref)
	case 1:
		return found[0], nil
	}
	var names []string
	for _, img := range found {
		names = append(names, img.Name)
	}
	return nil, fmt.Errorf("%q is ambiguous: %s", ref, strings.Join(names, ", "))
}

func isHex(s string) bool {
	for _, c := range s {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// LowerDirs returns the absolute diff dirs of img, top first: the
// lowerdir= of a mount of the image.
func (s *Store) LowerDirs(img *Image) []string {
	out := make([]string, len(img.LowerDirs))
	for i, d := range img.LowerDirs {
		out[i] = s.path(d)
	}
	return out
}

// Layers returns the stored layers, sorted by chainID, with the images
// that use them.
func (s *Store) Layers() ([]LayerInfo, error) {
	imgs, err := s.Images()
	if err != nil {
		return nil, err
	}
	users := map[string][]string{}
	for _, img := range imgs {
		for _, l := range img.Layers {
			users[l.ChainID] = append(users[l.ChainID], img.Name)
		}
	}
	ents, err := os.ReadDir(s.path("layers"))
	if err != nil {
		return nil, fmt.Errorf("list layers: %w", err)
	}
	var out []LayerInfo
	for _, e := range ents {
		info, err := s.readLayer(e.Name())
		if err != nil {
			continue // removed meanwhile
		}
		info.Images = users[info.ChainID]
		out = append(out, *info)
	}
	return out, nil
}

// RemoveOptions configure [Store.Remove] and [Store.Prune].
type RemoveOptions struct {
	// InUse, if set, is called with the diff dirs about to be removed,
	// under the store's exclusive lock; an error stops the removal
	// (cmd uses it to refuse removing layers of live mounts).
	InUse func(dirs []string) error
}

// RemoveResult describes a removal.
type RemoveResult struct {
	// Image is the removed image; nil for a prune.
	Image *Image
	// Removed lists the chainIDs of the layers removed; Kept those of the
	// image's layers that other images still use.
	Removed, Kept []string
}

// Remove removes the image ref and those of its layers no other image
// uses.
func (s *Store) Remove(ctx context.Context, ref string, opts RemoveOptions) (*RemoveResult, error) {
	lk, err := s.lockStore(ctx, true)
	if err != nil {
		return nil, err
	}
	defer lk.Close()
	imgs, err := s.Images()
	if err != nil {
		return nil, err
	}
	img, err := find(imgs, ref)
	if err != nil {
		return nil, err
	}
	used := map[string]bool{}
	for _, o := range imgs {
		if o.Name != img.Name {
			for _, l := range o.Layers {
				used[l.ChainID] = true
			}
		}
	}
	res := &RemoveResult{Image: img}
	for _, l := range img.Layers {
		if used[l.ChainID] {
			res.Kept = append(res.Kept, l.ChainID)
		} else if !contains(res.Removed, l.ChainID) {
			res.Removed = append(res.Removed, l.ChainID)
		}
	}
	if err := s.checkInUse(res.Removed, opts); err != nil {
		return nil, err
	}
	// The record goes first: a crash then leaves unreferenced layers
	// (removed by prune), never a record without its layers.
	if err := os.Remove(s.path("images", imageFile(img.Name))); err != nil {
		return nil, fmt.Errorf("remove image record: %w", err)
	}
	if err := syncDir(s.path("images"), false); err != nil {
		return nil, err
	}
	return res, s.removeLayers(res.Removed)
}

// Prune removes the layers no image uses, and leftovers of interrupted
// unpacks. It returns the removed chainIDs.
func (s *Store) Prune(ctx context.Context, opts RemoveOptions) ([]string, error) {
	lk, err := s.lockStore(ctx, true)
	if err != nil {
		return nil, err
	}
	defer lk.Close()
	infos, err := s.Layers()
	if err != nil {
		return nil, err
	}
	var unused []string
	for _, l := range infos {
		if len(l.Images) == 0 {
			unused = append(unused, l.ChainID)
		}
	}
	if err := s.checkInUse(unused, opts); err != nil {
		return nil, err
	}
	return unused, s.removeLayers(unused)
}

func (s *Store) checkInUse(chains []string, opts RemoveOptions) error {
	if opts.InUse == nil || len(chains) == 0 {
		return nil
	}
	var dirs []string
	for _, c := range chains {
		dirs = append(dirs, s.path("layers", c[len(layer.DigestPrefix):], "diff"))
	}
	return opts.InUse(dirs)
}

// removeLayers removes layers: each is first renamed under tmp/, so that
// no half-removed layer is ever visible under its chainID.
// Preconditions:
//   - store.lock is held exclusively.
func (s *Store) removeLayers(chains []string) error {
	for _, c := range chains {
		hexPart := c[len(layer.DigestPrefix):]
		dead, err := os.MkdirTemp(s.path("tmp"), "rm-")
		if err != nil {
			return err
		}
		if err := os.Rename(s.path("layers", hexPart), filepath.Join(dead, "layer")); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove layer %s: %w", c, err)
		}
		if err := layer.RemoveAll(dead); err != nil {
			return fmt.Errorf("remove layer %s: %w", c, err)
		}
		os.Remove(s.path("locks", hexPart+".lock"))
	}
	return nil
}

// lockStore takes store.lock: exclusively for rm and prune; shared for
// unpack, after cleaning tmp/ if no one else holds the lock. Leftovers
// in tmp/ are only removed under the exclusive lock: then no unpack is
// running, so they are all stale.
func (s *Store) lockStore(ctx context.Context, exclusive bool) (*os.File, error) {
	p := s.path("store.lock")
	if exclusive {
		f, err := lockFile(ctx, p, unix.LOCK_EX)
		if err != nil {
			return nil, err
		}
		s.cleanTmp()
		return f, nil
	}
	f, err := tryLock(p, unix.LOCK_EX)
	if err != nil {
		return nil, err
	}
	if f != nil {
		s.cleanTmp()
		// Converting is not atomic (flock(2)): another process may take
		// the lock in between. Harmless: tmp/ is already clean.
		if err := flockWait(ctx, f, unix.LOCK_SH); err != nil {
			f.Close()
			return nil, err
		}
		return f, nil
	}
	return lockFile(ctx, p, unix.LOCK_SH)
}

// cleanTmp removes everything in tmp/.
// Preconditions:
//   - store.lock is held exclusively.
func (s *Store) cleanTmp() {
	ents, err := os.ReadDir(s.path("tmp"))
	if err != nil {
		return
	}
	for _, e := range ents {
		p := s.path("tmp", e.Name())
		s.log.Info("removing leftover of an interrupted unpack", "path", p)
		if err := layer.RemoveAll(p); err != nil {
			s.log.Warn("cannot remove leftover", "path", p, "err", err)
		}
	}
}

// lockFile opens (creating) path and takes a flock on it, waiting until
// it is free or ctx is done.
func lockFile(ctx context.Context, path string, how int) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := flockWait(ctx, f, how); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}

// tryLock is lockFile without waiting: nil, nil when the lock is busy.
func tryLock(path string, how int) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	err = unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
	if err == nil {
		return f, nil
	}
	f.Close()
	if errors.Is(err, unix.EWOULDBLOCK) {
		return nil, nil
	}
	return nil, fmt.Errorf("lock %s: %w", path, err)
}

// flockWait polls, so that a cancelled context ends the wait (a blocking
// flock cannot be interrupted from Go).
func flockWait(ctx context.Context, f *os.File, how int) error {
	delay := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		if delay < 100*time.Millisecond {
			delay *= 2
		}
	}
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
