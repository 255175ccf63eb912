package stress

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Fixture is a layer stack on disk (three lowers, an empty upper, a work
// dir and a mount point) and the model of the merged tree it shows.
//
// Ownership, so that concurrent workers never make the model ambiguous:
// worker i owns "w<i>" and everything under it, and the names
// "shared/d/w<i>-*"; everything else is shared and only read, except two
// commutative changes: appends of fixed-size records to shared/log
// (checked as a multiset) and one user.w<i> attribute per worker on
// shared/x.
type Fixture struct {
	Dir    string
	Lowers []string // top first
	Upper  string
	Work   string
	Mnt    string
	// OpaqueXattr is the attribute that marks opaque dirs in the lowers:
	// trusted.overlay.opaque, or user.overlay.opaque for userxattr mounts.
	OpaqueXattr string
	Workers     int
	// Model is the expected merged tree before any change.
	Model *Tree
	// LogHeader is the lower content of shared/log.
	LogHeader []byte
}

// RecordSize is the size of one record appended to shared/log.
const RecordSize = 32

// Paths of the shared objects that workers change commutatively.
const (
	LogPath    = "shared/log"
	XattrPath  = "shared/x"
	SharedDir  = "shared/d"
	sharedRoot = "shared"
)

// WorkerRoot is the subtree worker i owns.
func WorkerRoot(i int) string { return fmt.Sprintf("w%d", i) }

// layerBuilder writes one lower layer and applies each change to the
// model, bottom layer first: the model then holds what a merged lookup
// must find (a whiteout deletes, an opaque dir replaces, a dir over a dir
// merges, anything over anything else replaces).
type layerBuilder struct {
	root        string
	model       *Tree
	opaqueXattr string
	have        map[string]Kind // what this layer holds; 0 = whiteout
	opaque      map[string]bool // opaque dirs of this layer
	// lowerDirs are the merged tree's directories below this layer.
	lowerDirs map[string]bool
	err       error
}

func newLayerBuilder(root string, model *Tree, opaqueXattr string) *layerBuilder {
	b := &layerBuilder{root: root, model: model, opaqueXattr: opaqueXattr, have: map[string]Kind{},
		opaque: map[string]bool{}, lowerDirs: map[string]bool{}}
	for p, o := range model.M {
		if o.Kind == Dir {
			b.lowerDirs[p] = true
		}
	}
	return b
}

// mergedParent reports whether the parent of p in this layer is merged
// with a directory below. Whiteouts go only there: in a directory that
// merges with nothing the kernel lists them as names that do not resolve
// (a kernel overlay quirk; kernel-made layers never hold such whiteouts).
func (b *layerBuilder) mergedParent(p string) bool {
	d := path.Dir(p)
	if !b.lowerDirs[d] {
		return false
	}
	for ; d != "." && d != ""; d = path.Dir(d) {
		if b.opaque[d] {
			return false
		}
	}
	return true
}

const whiteoutKind Kind = 0

func (b *layerBuilder) fail(err error) {
	if b.err == nil && err != nil {
		b.err = err
	}
}

// canPlace reports whether p can be created in this layer: not there yet,
// and no ancestor is a non-directory in this layer.
func (b *layerBuilder) canPlace(p string) bool {
	if _, ok := b.have[p]; ok {
		return false
	}
	for d := path.Dir(p); d != "." && d != ""; d = path.Dir(d) {
		if k, ok := b.have[d]; ok && k != Dir {
			return false
		}
	}
	return true
}

// parents creates the missing ancestors of p as plain directories.
func (b *layerBuilder) parents(p string) {
	d := path.Dir(p)
	if d == "." || d == "" {
		return
	}
	if k, ok := b.have[d]; ok && k == Dir {
		return
	}
	b.parents(d)
	b.mkdir(d, 0o755, false)
}

func (b *layerBuilder) mkdir(p string, mode uint32, opaque bool) {
	b.parents(p)
	full := filepath.Join(b.root, p)
	b.fail(os.Mkdir(full, 0o700))
	b.fail(os.Chmod(full, os.FileMode(mode)))
	b.have[p] = Dir
	if opaque {
		b.opaque[p] = true
		b.fail(unix.Setxattr(full, b.opaqueXattr, []byte("y"), 0))
		b.model.RemoveAll(p)
		b.model.Put(p, &Obj{Kind: Dir, Mode: mode})
		return
	}
	b.model.Mkdir(p, mode)
}

func (b *layerBuilder) file(p string, data []byte, mode uint32, xattrs map[string]string) {
	b.parents(p)
	full := filepath.Join(b.root, p)
	b.fail(os.WriteFile(full, data, 0o600))
	b.fail(os.Chmod(full, os.FileMode(mode)))
	for k, v := range xattrs {
		b.fail(unix.Lsetxattr(full, k, []byte(v), 0))
	}
	b.have[p] = File
	b.model.RemoveAll(p)
	b.model.Put(p, &Obj{Kind: File, Mode: mode, Data: data, Xattrs: copyMap(xattrs)})
}

func (b *layerBuilder) symlink(p, target string) {
	b.parents(p)
	b.fail(os.Symlink(target, filepath.Join(b.root, p)))
	b.have[p] = Symlink
	b.model.RemoveAll(p)
	b.model.Put(p, &Obj{Kind: Symlink, Target: target})
}

func (b *layerBuilder) whiteout(p string) {
	b.parents(p)
	b.fail(unix.Mknod(filepath.Join(b.root, p), unix.S_IFCHR, 0))
	b.have[p] = whiteoutKind
	b.model.RemoveAll(p)
}

func copyMap(m map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		out[k] = v
	}
	return out
}

// fixtureNames are the names the generator uses below a subtree: few, so
// that the layers collide often.
var fixtureNames = []string{"a", "b", "c", "d", "e"}

// symlinkTargets point inside and outside the tree; strata must never
// follow any of them itself.
var symlinkTargets = []string{"a", "../a", "../../../../etc", "/etc/passwd", "/", "nonexistent", "b/c"}

func randData(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// genSubtree adds random files, dirs, symlinks, whiteouts and opaque dirs
// below prefix to layer b.
func genSubtree(b *layerBuilder, rng *rand.Rand, prefix string, actions int) {
	if _, ok := b.have[prefix]; !ok {
		b.mkdir(prefix, 0o755, false)
	}
	for i := 0; i < actions; i++ {
		depth := 1 + rng.IntN(3)
		p := prefix
		for j := 0; j < depth; j++ {
			p += "/" + fixtureNames[rng.IntN(len(fixtureNames))]
		}
		if !b.canPlace(p) {
			continue
		}
		switch r := rng.IntN(100); {
		case r < 45:
			size := rng.IntN(8 << 10)
			if rng.IntN(20) == 0 {
				size = 256<<10 + rng.IntN(64<<10)
			}
			modes := []uint32{0o644, 0o600, 0o755, 0o640, 0o444}
			var x map[string]string
			if rng.IntN(3) == 0 {
				x = map[string]string{"user.color": fmt.Sprintf("c%d", rng.IntN(100))}
			}
			b.file(p, randData(rng, size), modes[rng.IntN(len(modes))], x)
		case r < 65:
			b.mkdir(p, 0o755, false)
		case r < 80:
			if b.mergedParent(p) {
				b.whiteout(p)
			}
		case r < 90:
			b.mkdir(p, 0o755, true)
		default:
			b.symlink(p, symlinkTargets[rng.IntN(len(symlinkTargets))])
		}
	}
}

// BuildFixture makes a fixture under dir (which must exist and be empty)
// for the given number of workers. opaqueXattr names the opaque marker
// ("trusted.overlay.opaque", or "user.overlay.opaque" for userxattr).
func BuildFixture(dir string, workers int, seed uint64, opaqueXattr string) (*Fixture, error) {
	f := &Fixture{Dir: dir, Upper: filepath.Join(dir, "upper"), Work: filepath.Join(dir, "work"),
		Mnt: filepath.Join(dir, "mnt"), OpaqueXattr: opaqueXattr, Workers: workers, Model: NewTree()}
	for _, d := range []string{"l1", "l2", "l3"} {
		f.Lowers = append(f.Lowers, filepath.Join(dir, d))
	}
	for _, d := range append(append([]string{}, f.Lowers...), f.Upper, f.Work, f.Mnt) {
		if err := os.Mkdir(d, 0o755); err != nil {
			return nil, err
		}
	}
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	hdr := []byte(strings.Repeat("-", RecordSize-1) + "\n")
	copy(hdr, "lower log header")
	f.LogHeader = hdr
	// Bottom layer first.
	for li := len(f.Lowers) - 1; li >= 0; li-- {
		b := newLayerBuilder(f.Lowers[li], f.Model, opaqueXattr)
		switch li {
		case 2:
			b.file("gone", []byte("hidden by a whiteout in l1"), 0o644, nil)
			b.mkdir("op", 0o755, false)
			b.file("op/hidden", []byte("hidden by the opaque op in l2"), 0o644, nil)
			b.file(XattrPath, []byte("shared xattr target"), 0o644, map[string]string{"user.color": "red"})
			b.file(SharedDir+"/f1", []byte("f1 from l3"), 0o644, nil)
			b.file(SharedDir+"/f2", []byte("f2 from l3"), 0o644, nil)
		case 1:
			b.mkdir("op", 0o755, true)
			b.file("op/shown", []byte("in the opaque dir"), 0o644, nil)
			b.file(LogPath, hdr, 0o644, nil)
			b.whiteout(SharedDir + "/f2")
			b.file(SharedDir+"/f3", []byte("f3 from l2"), 0o644, nil)
		case 0:
			b.whiteout("gone")
			b.mkdir(sharedRoot, 0o755, false)
		}
		genSubtree(b, rng, sharedRoot+"/ro", 6)
		for w := 0; w < workers; w++ {
			genSubtree(b, rng, WorkerRoot(w), 14)
		}
		if b.err != nil {
			return nil, fmt.Errorf("build layer %s: %w", b.root, b.err)
		}
	}
	return f, nil
}

// Owner returns the worker that owns path p, or -1 for a shared path.
func (f *Fixture) Owner(p string) int {
	for w := 0; w < f.Workers; w++ {
		r := WorkerRoot(w)
		if p == r || isUnder(p, r) {
			return w
		}
		if strings.HasPrefix(p, SharedDir+"/"+r+"-") {
			return w
		}
	}
	return -1
}

// Split divides the model into one tree per worker and the shared rest.
func (f *Fixture) Split() (workers []*Tree, shared *Tree) {
	shared = &Tree{M: map[string]*Obj{}}
	for w := 0; w < f.Workers; w++ {
		workers = append(workers, &Tree{M: map[string]*Obj{}})
	}
	for p, o := range f.Model.M {
		if w := f.Owner(p); w >= 0 {
			workers[w].M[p] = o.clone()
		} else {
			shared.M[p] = o.clone()
		}
	}
	return workers, shared
}
