package stress_test

import (
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"strata/unionfs"
	"strata/whiteout"
)

// Fuzz targets. Plain "go test" replays the seeds (f.Add and
// testdata/fuzz/FuzzX); a fuzzing run is
//
//	go test ./internal/stress -run '^$' -fuzz '^FuzzMarkers$' -fuzztime 60s
//	go test ./internal/stress -run '^$' -fuzz '^FuzzResolve$' -fuzztime 60s

// privNS is the namespace this process can write overlay markers in.
func privNS() whiteout.NS {
	if os.Geteuid() == 0 {
		return whiteout.Trusted
	}
	return whiteout.User
}

// FuzzMarkers builds one directory entry from the input (its type, size,
// device number, whiteout and opaque attributes in either namespace) and
// checks whiteout.IsWhiteout and whiteout.GetOpacity against a reference
// written from the kernel's rules: a whiteout is a 0/0 character device or
// a zero-size regular file with NS.overlay.whiteout; opacity is exactly
// "y" or "x" in NS.overlay.opaque.
func FuzzMarkers(f *testing.F) {
	f.Add(byte(0), byte(0), byte(0), []byte(nil), []byte("y"))
	f.Add(byte(1), byte(0), byte(0), []byte(""), []byte("x"))
	f.Add(byte(2), byte(1), byte(5), []byte(nil), []byte("yy"))
	f.Add(byte(3), byte(0), byte(0), []byte("anything"), []byte("n"))
	f.Add(byte(4), byte(0), byte(0), []byte(nil), []byte("Y"))
	f.Add(byte(0x81), byte(0), byte(0), []byte{}, []byte("x\x00"))
	f.Fuzz(func(t *testing.T, kind, major, minor byte, whiteoutVal, opaqueVal []byte) {
		dir := t.TempDir()
		name := "e"
		p := filepath.Join(dir, name)
		ns := privNS()
		other := whiteout.User
		if kind&0x80 != 0 && ns == whiteout.Trusted {
			// Markers of the other namespace must not count.
			ns, other = whiteout.User, whiteout.Trusted
		}
		var err error
		switch kind & 7 {
		case 0: // regular, empty
			err = os.WriteFile(p, nil, 0o644)
		case 1: // regular, not empty
			err = os.WriteFile(p, []byte{kind}, 0o644)
		case 2: // character device
			err = unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(uint32(major%8), uint32(minor))))
		case 3:
			err = os.Mkdir(p, 0o755)
		case 4:
			err = os.Symlink("target", p)
		case 5:
			err = unix.Mkfifo(p, 0o644)
		case 6:
			err = unix.Mknod(p, unix.S_IFBLK|0o600, int(unix.Mkdev(uint32(major%8), uint32(minor))))
		default:
			err = unix.Mknod(p, unix.S_IFCHR, 0)
		}
		if err != nil {
			t.Skipf("cannot make the entry: %v", err)
		}
		// Set what the filesystem allows; the reference sees what stuck.
		if whiteoutVal != nil {
			unix.Lsetxattr(p, ns.Whiteout(), whiteoutVal, 0)
			unix.Lsetxattr(p, other.Whiteout(), whiteoutVal, 0)
		}
		if opaqueVal != nil {
			unix.Lsetxattr(p, ns.Opaque(), opaqueVal, 0)
			unix.Lsetxattr(p, other.Opaque(), []byte("y"), 0)
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			t.Fatal(err)
		}
		has := func(attr string) ([]byte, bool) {
			buf := make([]byte, 4096)
			n, err := unix.Lgetxattr(p, attr, buf)
			if err != nil {
				return nil, false
			}
			return buf[:n], true
		}
		_, hasWh := has(ns.Whiteout())
		wantWh := (st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0) ||
			(st.Mode&unix.S_IFMT == unix.S_IFREG && st.Size == 0 && hasWh)
		wantOp := whiteout.NotOpaque
		if v, ok := has(ns.Opaque()); ok && len(v) == 1 {
			switch v[0] {
			case 'y':
				wantOp = whiteout.Opaque
			case 'x':
				wantOp = whiteout.XattrWhiteouts
			}
		}
		fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		gotWh, err := whiteout.IsWhiteout(fd, name, &st, ns)
		if err != nil {
			t.Fatalf("IsWhiteout: %v", err)
		}
		if gotWh != wantWh {
			t.Errorf("IsWhiteout(mode %o rdev %d size %d, %s whiteout xattr %v) = %v, want %v",
				st.Mode, st.Rdev, st.Size, ns, hasWh, gotWh, wantWh)
		}
		gotOp, err := whiteout.GetOpacity(fd, name, ns)
		if err != nil {
			t.Fatalf("GetOpacity: %v", err)
		}
		if gotOp != wantOp {
			t.Errorf("GetOpacity(%q) = %v, want %v", opaqueVal, gotOp, wantOp)
		}
	})
}

// refKind is an entry of a reference layer.
type refKind uint8

const (
	refFile refKind = iota + 1
	refDir
	refOpaque // a directory marked opaque
	refWhiteout
	refSymlink
)

func (k refKind) isDir() bool { return k == refDir || k == refOpaque }

// refLayers are layers as name maps, topmost first.
type refLayers []map[string]refKind

// refResult is what the reference says a path resolves to.
type refResult struct {
	found         bool
	kind          refKind
	layer         int
	dirs          []int // for a directory: the layers merged, top first
	whiteoutLayer int
	missingAt     string
}

// resolve is the reference lookup, written from overlayfs.rst top down:
// walk the components; at each, the layers that make up the parent are
// searched top first; the first holding the name decides (whiteout:
// nothing; non-directory: it, and nothing may follow); a directory merges
// with the same name in the next layers of the parent until one is opaque
// or holds a non-directory or a whiteout.
func (ls refLayers) resolve(p string) refResult {
	cur := make([]int, len(ls))
	for i := range cur {
		cur[i] = i
	}
	comps := strings.Split(p, "/")
	prefix := ""
	for i, c := range comps {
		q := path.Join(prefix, c)
		last := i == len(comps)-1
		var next []int
		var first refKind
		for _, li := range cur {
			k, ok := ls[li][q]
			if !ok {
				continue
			}
			if first == 0 {
				if k == refWhiteout {
					if last {
						return refResult{whiteoutLayer: li}
					}
					return refResult{whiteoutLayer: -1, missingAt: q}
				}
				if !k.isDir() {
					if last {
						return refResult{found: true, kind: k, layer: li, whiteoutLayer: -1}
					}
					return refResult{whiteoutLayer: -1, missingAt: q}
				}
				first = k
				next = append(next, li)
				if k == refOpaque {
					break
				}
				continue
			}
			if !k.isDir() {
				break
			}
			next = append(next, li)
			if k == refOpaque {
				break
			}
		}
		if first == 0 {
			if last {
				return refResult{whiteoutLayer: -1}
			}
			return refResult{whiteoutLayer: -1, missingAt: q}
		}
		if last {
			return refResult{found: true, kind: refDir, layer: next[0], dirs: next, whiteoutLayer: -1}
		}
		cur, prefix = next, q
	}
	return refResult{whiteoutLayer: -1}
}

// listing is the reference readdir of a directory that resolved to dirs.
func (ls refLayers) listing(p string, dirs []int) map[string]refKind {
	out := map[string]refKind{}
	for _, li := range dirs {
		for q := range ls[li] {
			if path.Dir(q) != p && !(p == "" && !strings.Contains(q, "/")) {
				continue
			}
			name := path.Base(q)
			if _, seen := out[name]; seen {
				continue
			}
			r := ls.resolve(q)
			if r.found {
				out[name] = r.kind
			} else {
				out[name] = 0 // hidden; remembered so lower layers do not add it
			}
		}
	}
	for n, k := range out {
		if k == 0 {
			delete(out, n)
		}
	}
	return out
}

var fuzzNames = []string{"a", "b", "c"}

// decodeLayers turns fuzz input into 2 or 3 layers of entries. Each pair
// of bytes is one entry: layer and kind from the first, the path (1 to 3
// components over a, b, c) from the second. Entries a layer cannot hold
// (a name twice, or below a non-directory of the same layer) are
// dropped; missing parents are plain directories.
func decodeLayers(data []byte) refLayers {
	n := 2
	if len(data) > 0 && data[0]&1 == 1 {
		n = 3
	}
	ls := make(refLayers, n)
	for i := range ls {
		ls[i] = map[string]refKind{}
	}
	for i := 1; i+1 < len(data) && i < 80; i += 2 {
		li := int(data[i]) % n
		kind := refKind(1 + (data[i]>>2)%5)
		b := data[i+1]
		depth := 1 + int(b%3)
		var comps []string
		for j := 0; j < depth; j++ {
			b /= 3
			comps = append(comps, fuzzNames[int(b+byte(j))%3])
		}
		p := strings.Join(comps, "/")
		l := ls[li]
		if _, ok := l[p]; ok {
			continue
		}
		ok := true
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			if k, there := l[d]; there && !k.isDir() {
				ok = false
			}
		}
		if !ok {
			continue
		}
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			if _, there := l[d]; !there {
				l[d] = refDir
			}
		}
		l[p] = kind
	}
	return ls
}

// build writes layer li under root.
func (ls refLayers) build(t *testing.T, root string, ns whiteout.NS) {
	for li, l := range ls {
		dir := filepath.Join(root, "l"+string(rune('0'+li)))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		var paths []string
		for p := range l {
			paths = append(paths, p)
		}
		sort.Strings(paths) // parents first
		for _, p := range paths {
			full := filepath.Join(dir, p)
			var err error
			switch l[p] {
			case refFile:
				err = os.WriteFile(full, []byte(p), 0o644)
			case refDir:
				err = os.Mkdir(full, 0o755)
			case refOpaque:
				if err = os.Mkdir(full, 0o755); err == nil {
					err = unix.Lsetxattr(full, ns.Opaque(), []byte("y"), 0)
				}
			case refWhiteout:
				err = unix.Mknod(full, unix.S_IFCHR, 0)
			case refSymlink:
				err = os.Symlink("../"+p, full)
			}
			if err != nil {
				t.Skipf("cannot build layer entry %s: %v", p, err)
			}
		}
	}
}

func kindOf(mode uint32) refKind {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return refFile
	case unix.S_IFDIR:
		return refDir
	case unix.S_IFLNK:
		return refSymlink
	}
	return 0
}

// FuzzResolve builds 2-3 layers from the input and resolves every path
// (and a child of each) with unionfs.OpenStack(...).Resolve and ReadDir,
// comparing with the reference model above.
func FuzzResolve(f *testing.F) {
	f.Add([]byte{0, 0, 1, 4, 1, 9, 2})
	f.Add([]byte{1, 0, 0, 1, 0, 2, 0, 5, 3, 12, 3})
	f.Add([]byte{1, 8, 7, 1, 7, 2, 7, 16, 20, 13, 20, 6, 26})
	f.Add([]byte{0, 12, 1, 1, 4, 16, 4, 5, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		ls := decodeLayers(data)
		ns := privNS()
		root := t.TempDir()
		ls.build(t, root, ns)
		var lowers []string
		for li := range ls {
			lowers = append(lowers, filepath.Join(root, "l"+string(rune('0'+li))))
		}
		o, err := unionfs.ParseOptions("lowerdir=" + strings.Join(lowers, ":"))
		if err != nil {
			t.Fatal(err)
		}
		o.UserXattr = ns == whiteout.User
		s, err := unionfs.OpenStack(o)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		paths := map[string]bool{"": true}
		for _, l := range ls {
			for p := range l {
				paths[p] = true
				paths[p+"/a"] = true
			}
		}
		for p := range paths {
			want := refResult{found: true, kind: refDir, layer: 0, whiteoutLayer: -1}
			if p != "" {
				want = ls.resolve(p)
			} else {
				for li := range ls {
					want.dirs = append(want.dirs, li)
				}
			}
			got, err := s.Resolve(p)
			if err != nil {
				t.Fatalf("Resolve(%q): %v", p, err)
			}
			var gotDirs []int
			for _, d := range got.Dirs {
				gotDirs = append(gotDirs, d.Layer)
			}
			if got.Found != want.found || got.WhiteoutLayer != want.whiteoutLayer || got.MissingAt != want.missingAt ||
				(want.found && (got.Layer != want.layer || kindOf(got.Stat.Mode) != kindDisk(want.kind) ||
					!equalInts(gotDirs, want.dirs))) {
				t.Errorf("Resolve(%q) = found %v layer %d kind %v dirs %v whiteout %d missing %q; reference: found %v layer %d kind %v dirs %v whiteout %d missing %q\nlayers: %v",
					p, got.Found, got.Layer, kindOf(got.Stat.Mode), gotDirs, got.WhiteoutLayer, got.MissingAt,
					want.found, want.layer, kindDisk(want.kind), want.dirs, want.whiteoutLayer, want.missingAt, ls)
				continue
			}
			if !want.found || !want.kind.isDir() {
				continue
			}
			ents, err := s.ReadDir(p)
			if err != nil {
				t.Errorf("ReadDir(%q): %v", p, err)
				continue
			}
			gotL := map[string]refKind{}
			for _, e := range ents {
				gotL[e.Name] = kindOf(e.Mode)
			}
			wantL := ls.listing(p, want.dirs)
			for n, k := range wantL {
				wantL[n] = kindDisk(k)
			}
			if !equalListing(gotL, wantL) {
				t.Errorf("ReadDir(%q) = %v, reference %v\nlayers: %v", p, gotL, wantL, ls)
			}
		}
	})
}

// kindDisk maps a reference kind to the type the disk shows.
func kindDisk(k refKind) refKind {
	if k == refOpaque {
		return refDir
	}
	return k
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func equalListing(a, b map[string]refKind) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
