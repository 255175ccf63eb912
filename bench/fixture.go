package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// fixtureVersion changes whenever the generator changes what it writes, so a
// cached fixture from an older harness is rebuilt instead of reused.
const fixtureVersion = 3

// profile sets the sizes of the fixture and of the workloads run on it.
// Every field is part of the fixture's identity: a cached fixture is reused
// only when its profile is equal to the requested one.
type profile struct {
	Name        string `json:"name"`
	BottomFiles int    `json:"bottom_files"` // small files in the bottom layer's deep tree
	RepoFiles   int    `json:"repo_files"`   // work-tree files of the git repo in the middle layer
	BigBytes    int64  `json:"big_bytes"`    // the large top-layer file: sequential read, copy-up, write size
	RandBytes   int64  `json:"rand_bytes"`   // the random-read file in the top layer
	RandReads   int    `json:"rand_reads"`   // 4 KiB preads per random-read run
	CreateFiles int    `json:"create_files"` // 4 KiB files per create run (and per rm -rf run)
	UntarFiles  int    `json:"untar_files"`  // files in the tar archive
	RenameFiles int    `json:"rename_files"` // lower files renamed per run
	UnlinkFiles int    `json:"unlink_files"` // lower files unlinked per run
}

const (
	kib = 1 << 10
	mib = 1 << 20
	gib = 1 << 30
)

// Profiles: full is the fixture, quick scales it down so a whole run
// takes minutes, smoke is what the test suite runs.
var (
	fullProfile = profile{Name: "full", BottomFiles: 40000, RepoFiles: 4000, BigBytes: 1 * gib, RandBytes: 256 * mib,
		RandReads: 20000, CreateFiles: 20000, UntarFiles: 10000, RenameFiles: 5000, UnlinkFiles: 5000}
	quickProfile = profile{Name: "quick", BottomFiles: 5000, RepoFiles: 500, BigBytes: 64 * mib, RandBytes: 64 * mib,
		RandReads: 5000, CreateFiles: 2500, UntarFiles: 1250, RenameFiles: 600, UnlinkFiles: 600}
	smokeProfile = profile{Name: "smoke", BottomFiles: 300, RepoFiles: 40, BigBytes: 4 * mib, RandBytes: 2 * mib,
		RandReads: 200, CreateFiles: 100, UntarFiles: 100, RenameFiles: 30, UnlinkFiles: 30}
)

// Layer names under <fixture>/layers, top first (the order of lowerdir=).
var layerNames = []string{"top", "middle", "bottom"}

// Fixed paths in the merged tree.
const (
	bigFile  = "data/big.bin"
	randFile = "data/random.bin"
	repoDir  = "srv/app"
	tarName  = "untar.tar"
)

// manifest describes a built fixture. It is written last, so its presence
// marks the fixture complete; workers read it to find their inputs.
type manifest struct {
	Version int     `json:"version"`
	Profile profile `json:"profile"`
	UID     int     `json:"uid"` // owner of every layer entry (the rootless engines' user)
	GID     int     `json:"gid"`
	Built   string  `json:"built"`

	BigFile  string `json:"big_file"`  // merged-relative
	RandFile string `json:"rand_file"` // merged-relative
	Repo     string `json:"repo"`      // merged-relative
	Tar      string `json:"tar"`       // file name in the fixture dir
	TarFiles int    `json:"tar_files"`
	// Targets are bottom-layer files that no upper layer touches, spread
	// over the tree; rename and unlink take the first N of them.
	Targets []string `json:"targets"`

	OpaqueDir    string   `json:"opaque_dir"`    // merged-relative, opaque in the middle layer
	WhiteoutDirs []string `json:"whiteout_dirs"` // bottom dirs hidden by a whiteout in the middle layer
	Counts       counts   `json:"counts"`
}

// counts records what the generator wrote, for the report header.
type counts struct {
	BottomFiles  int `json:"bottom_files"`
	BottomDirs   int `json:"bottom_dirs"`
	Symlinks     int `json:"symlinks"`
	Overrides    int `json:"overrides"`
	Whiteouts    int `json:"whiteouts"`
	OpaqueHidden int `json:"opaque_hidden"`
	RepoFiles    int `json:"repo_files"`
}

// fixture is a built, complete fixture directory.
type fixture struct {
	dir string
	m   manifest
}

// layerDirs returns the absolute lower layer paths, top first.
func (f *fixture) layerDirs() []string {
	dirs := make([]string, len(layerNames))
	for i, n := range layerNames {
		dirs[i] = filepath.Join(f.dir, "layers", n)
	}
	return dirs
}

// lowerdir returns the lowerdir= value for mount options.
func (f *fixture) lowerdir() string { return strings.Join(f.layerDirs(), ":") }

// plainDir is the plain copy of the merged tree (built by ensurePlain).
func (f *fixture) plainDir() string { return filepath.Join(f.dir, "plain") }

func loadManifest(dir string) (manifest, error) {
	var m manifest
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("parse %s/manifest.json: %w", dir, err)
	}
	return m, nil
}

func writeJSON(name string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(name, append(b, '\n'), 0o644)
}

// ensureFixture returns the fixture for p under workDir, building it when it
// is missing, incomplete or from another generator version, and re-owning it
// when it was built for another user.
func ensureFixture(ctx context.Context, workDir string, p profile, owner cred, logw io.Writer) (*fixture, error) {
	dir := filepath.Join(workDir, "fixture-"+p.Name)
	f := &fixture{dir: dir}
	m, err := loadManifest(dir)
	if err == nil && m.Version == fixtureVersion && m.Profile == p {
		f.m = m
		verr := f.verify()
		if verr == nil {
			return f, f.reown(owner, logw)
		}
		fmt.Fprintf(logw, "fixture: %s is damaged (%v), rebuilding\n", dir, verr)
	} else if err == nil {
		fmt.Fprintf(logw, "fixture: %s is from another version or profile, rebuilding\n", dir)
	} else if !errors.Is(err, fs.ErrNotExist) {
		fmt.Fprintf(logw, "fixture: %v, rebuilding\n", err)
	}

	start := time.Now()
	fmt.Fprintf(logw, "fixture: building %s (profile %s)\n", dir, p.Name)
	tmp := dir + ".partial"
	if err := os.RemoveAll(tmp); err != nil {
		return nil, fmt.Errorf("remove stale %s: %w", tmp, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return nil, fmt.Errorf("remove old %s: %w", dir, err)
	}
	g := &generator{root: tmp, p: p, owner: owner}
	m, err = g.build(ctx)
	if err != nil {
		os.RemoveAll(tmp)
		return nil, fmt.Errorf("build fixture: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return nil, fmt.Errorf("build fixture: %w", err)
	}
	f.m = m
	fmt.Fprintf(logw, "fixture: built in %s\n", time.Since(start).Round(time.Second))
	return f, nil
}

// reown gives a reused fixture to owner if it was built for another user.
func (f *fixture) reown(owner cred, logw io.Writer) error {
	if f.m.UID != owner.uid || f.m.GID != owner.gid {
		fmt.Fprintf(logw, "fixture: re-owning %s for %d:%d\n", f.dir, owner.uid, owner.gid)
		if err := chownTree(f.dir, owner); err != nil {
			return err
		}
		f.m.UID, f.m.GID = owner.uid, owner.gid
		if err := writeJSON(filepath.Join(f.dir, "manifest.json"), f.m); err != nil {
			return err
		}
	}
	fmt.Fprintf(logw, "fixture: reusing %s\n", f.dir)
	return nil
}

// verify checks cheaply that the fixture's big pieces are all there.
func (f *fixture) verify() error {
	for _, d := range f.layerDirs() {
		if _, err := os.Stat(d); err != nil {
			return err
		}
	}
	top := filepath.Join(f.dir, "layers", "top")
	for _, c := range []struct {
		name string
		size int64
	}{{filepath.Join(top, f.m.BigFile), f.m.Profile.BigBytes}, {filepath.Join(top, f.m.RandFile), f.m.Profile.RandBytes}} {
		st, err := os.Stat(c.name)
		if err != nil {
			return err
		}
		if st.Size() != c.size {
			return fmt.Errorf("%s: size %d, want %d", c.name, st.Size(), c.size)
		}
	}
	_, err := os.Stat(filepath.Join(f.dir, f.m.Tar))
	return err
}

// generator writes a fixture. All content comes from fixed seeds, so two
// builds of one profile hold the same names, sizes and bytes (only inode
// numbers and ctimes differ).
type generator struct {
	root  string
	p     profile
	owner cred
	rng   *rand.Rand    // names, sizes, choices
	data  *rand.ChaCha8 // file content: incompressible, practically never zero
	buf   []byte
}

func (g *generator) layer(name string) string { return filepath.Join(g.root, "layers", name) }

func (g *generator) build(ctx context.Context) (manifest, error) {
	g.rng = rand.New(rand.NewPCG(0x5747a7a, 1))
	var seed [32]byte
	copy(seed[:], "strata bench fixture content v1")
	g.data = rand.NewChaCha8(seed)
	m := manifest{Version: fixtureVersion, Profile: g.p, UID: g.owner.uid, GID: g.owner.gid,
		BigFile: bigFile, RandFile: randFile, Repo: repoDir, Tar: tarName}
	for _, n := range layerNames {
		if err := os.MkdirAll(g.layer(n), 0o755); err != nil {
			return m, err
		}
	}
	steps := []struct {
		name string
		fn   func(*manifest) error
	}{
		{"bottom and middle layers", g.lowerTrees},
		{"git repo", func(*manifest) error { return g.repoWorkTree(&m) }},
		{"top layer", g.topLayer},
		{"tar archive", g.tarArchive},
		{"ownership", func(*manifest) error { return chownTree(g.root, g.owner) }},
		// git last: its index records each file's owner and ctime, which
		// the chown above changes.
		{"git commit", func(*manifest) error { return g.repoCommit(ctx) }},
	}
	for _, s := range steps {
		if err := ctx.Err(); err != nil {
			return m, err
		}
		if err := s.fn(&m); err != nil {
			return m, fmt.Errorf("%s: %w", s.name, err)
		}
	}
	m.Built = time.Now().UTC().Format(time.RFC3339)
	return m, writeJSON(filepath.Join(g.root, "manifest.json"), m)
}

// writeFile writes size bytes of generated content to name, creating its
// parent directories.
func (g *generator) writeFile(name string, size int) error {
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		return err
	}
	if cap(g.buf) < size {
		g.buf = make([]byte, size)
	}
	b := g.buf[:size]
	g.data.Read(b)
	return os.WriteFile(name, b, 0o644)
}

// smallSize draws a file size shaped like a distribution image: most files
// under 1 KiB, some a few KiB, a tail up to 64 KiB (mean about 5 KiB).
func (g *generator) smallSize() int {
	switch r := g.rng.IntN(100); {
	case r < 55:
		return g.rng.IntN(kib)
	case r < 90:
		return kib + g.rng.IntN(7*kib)
	default:
		return 8*kib + g.rng.IntN(56*kib)
	}
}

var (
	dirWords = []string{"lib", "share", "include", "python3", "site-packages", "locale", "doc", "man",
		"icons", "modules", "perl5", "x86_64-linux-gnu", "gconv", "zoneinfo", "terminfo", "fonts",
		"mime", "pkgconfig", "cmake", "firmware", "plugins", "data", "tests", "vendor"}
	fileExts = []string{".so", ".h", ".py", ".pyc", ".txt", ".conf", ".mo", ".gz", ".json", ""}
)

func depth(p string) int { return strings.Count(p, "/") + 1 }

func isUnder(p, dir string) bool { return p == dir || strings.HasPrefix(p, dir+"/") }

// lowerTrees writes the bottom layer's deep tree and the middle layer's
// changes to it: overrides, whiteouts (0/0 character devices, for files and
// for two whole directories) and one opaque directory.
func (g *generator) lowerTrees(m *manifest) error {
	bottom, middle := g.layer("bottom"), g.layer("middle")
	dirs := []string{"etc", "opt", "usr", "usr/bin", "usr/include", "usr/lib", "usr/share", "var", "var/lib"}
	nDirs := max(len(dirs)+4, g.p.BottomFiles/24)
	for len(dirs) < nDirs {
		// Half the time extend one of the newest dirs, so the tree grows
		// deep (up to 10 levels) rather than only wide.
		var parent string
		if g.rng.IntN(2) == 0 {
			parent = dirs[len(dirs)-1-g.rng.IntN(min(64, len(dirs)))]
		} else {
			parent = dirs[g.rng.IntN(len(dirs))]
		}
		if depth(parent) >= 10 {
			continue
		}
		dirs = append(dirs, fmt.Sprintf("%s/%s-%d", parent, dirWords[g.rng.IntN(len(dirWords))], len(dirs)))
	}
	for _, d := range dirs {
		if err := os.MkdirAll(filepath.Join(bottom, d), 0o755); err != nil {
			return err
		}
	}
	files := make([]string, g.p.BottomFiles)
	perDir := map[string]int{}
	for i := range files {
		d := dirs[g.rng.IntN(len(dirs))]
		files[i] = fmt.Sprintf("%s/f%05d%s", d, i, fileExts[g.rng.IntN(len(fileExts))])
		perDir[d]++
		if err := g.writeFile(filepath.Join(bottom, files[i]), g.smallSize()); err != nil {
			return err
		}
		if i%40 == 0 { // a symlink next to every 40th file, as images have
			if err := os.Symlink(path.Base(files[i]), filepath.Join(bottom, fmt.Sprintf("%s/l%05d", d, i))); err != nil {
				return err
			}
			m.Counts.Symlinks++
		}
	}
	m.Counts.BottomFiles, m.Counts.BottomDirs = len(files), len(dirs)

	// The opaque dir: the depth >= 3 dir with the most files of its own.
	for _, d := range dirs {
		if depth(d) >= 3 && (m.OpaqueDir == "" || perDir[d] > perDir[m.OpaqueDir]) {
			m.OpaqueDir = d
		}
	}
	if m.OpaqueDir == "" {
		return errors.New("tree too small for an opaque dir")
	}
	// Two whole dirs whited out: unrelated to the opaque dir and each other.
	related := func(a, b string) bool { return isUnder(a, b) || isUnder(b, a) }
	for _, i := range g.rng.Perm(len(dirs)) {
		d := dirs[i]
		if len(m.WhiteoutDirs) == 2 {
			break
		}
		if depth(d) < 3 || related(d, m.OpaqueDir) || (len(m.WhiteoutDirs) == 1 && related(d, m.WhiteoutDirs[0])) {
			continue
		}
		m.WhiteoutDirs = append(m.WhiteoutDirs, d)
	}
	hidden := func(f string) bool {
		for _, d := range append([]string{m.OpaqueDir}, m.WhiteoutDirs...) {
			if isUnder(f, d) {
				return true
			}
		}
		return false
	}

	od := filepath.Join(middle, m.OpaqueDir)
	if err := os.MkdirAll(od, 0o755); err != nil {
		return err
	}
	// Both xattr forms, so one fixture serves privileged engines
	// (trusted.*) and rootless ones (user.*, the kernel's userxattr format).
	for _, x := range []string{"trusted.overlay.opaque", "user.overlay.opaque"} {
		if err := unix.Lsetxattr(od, x, []byte("y"), 0); err != nil {
			return fmt.Errorf("set %s on %s: %w", x, od, err)
		}
	}
	for i := 0; i < 5; i++ {
		if err := g.writeFile(filepath.Join(od, fmt.Sprintf("new%02d.txt", i)), g.smallSize()); err != nil {
			return err
		}
	}
	for _, d := range m.WhiteoutDirs {
		if err := mkWhiteout(filepath.Join(middle, d)); err != nil {
			return err
		}
	}

	var candidates []string
	for i, f := range files {
		switch {
		case hidden(f):
			m.Counts.OpaqueHidden++
		case i%97 == 0:
			if err := g.writeFile(filepath.Join(middle, f), g.smallSize()); err != nil {
				return err
			}
			m.Counts.Overrides++
		case i%89 == 0:
			if err := mkWhiteout(filepath.Join(middle, f)); err != nil {
				return err
			}
			m.Counts.Whiteouts++
		default:
			candidates = append(candidates, f)
		}
	}
	need := max(g.p.RenameFiles, g.p.UnlinkFiles)
	if len(candidates) < need {
		return fmt.Errorf("only %d untouched lower files for %d rename/unlink targets", len(candidates), need)
	}
	for i := 0; i < need; i++ {
		m.Targets = append(m.Targets, candidates[i*len(candidates)/need])
	}
	return nil
}

// mkWhiteout creates the kernel's whiteout: a 0/0 character device.
func mkWhiteout(name string) error {
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		return err
	}
	if err := unix.Mknod(name, unix.S_IFCHR|0o644, 0); err != nil {
		return fmt.Errorf("mknod whiteout %s: %w", name, err)
	}
	return nil
}

// repoWorkTree writes the repo's work tree: source-like text files in a
// package tree, with a fixed old mtime so git never sees them as racy.
func (g *generator) repoWorkTree(m *manifest) error {
	root := filepath.Join(g.layer("middle"), repoDir)
	exts := []string{".go", ".c", ".h", ".md", ".py", ".js", ".json", ".txt"}
	nDirs := max(2, g.p.RepoFiles/20)
	dirs := []string{"."}
	for len(dirs) < nDirs {
		parent := dirs[g.rng.IntN(len(dirs))]
		if depth(parent) >= 5 {
			continue
		}
		dirs = append(dirs, path.Join(parent, fmt.Sprintf("pkg%03d", len(dirs))))
	}
	var sb strings.Builder
	for i := 0; i < g.p.RepoFiles; i++ {
		name := filepath.Join(root, dirs[g.rng.IntN(len(dirs))], fmt.Sprintf("file%04d%s", i, exts[g.rng.IntN(len(exts))]))
		sb.Reset()
		lines := 5 + g.rng.IntN(400)
		for l := 0; l < lines; l++ {
			fmt.Fprintf(&sb, "%*sfunc%d_%d(x%d, y%d) // %x\n", g.rng.IntN(4)*4, "", i, l, g.rng.IntN(1000), g.rng.IntN(1000), g.rng.Uint64())
		}
		if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(name, []byte(sb.String()), 0o644); err != nil {
			return err
		}
	}
	m.Counts.RepoFiles = g.p.RepoFiles
	old := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Chtimes(p, old, old)
	})
}

// gitEnv is the environment of every git the harness or a worker runs: no
// system or user config, so results do not depend on the machine's.
func gitEnv(home string) []string {
	return []string{"GIT_CONFIG_NOSYSTEM=1", "HOME=" + home, "LC_ALL=C", "PATH=" + os.Getenv("PATH"),
		"GIT_AUTHOR_DATE=2024-01-02T03:04:05Z", "GIT_COMMITTER_DATE=2024-01-02T03:04:05Z"}
}

// repoCommit commits the work tree, packs the objects (as a clone would
// have them) and checks that git status is clean. It runs as root, then
// hands .git to the fixture's owner.
func (g *generator) repoCommit(ctx context.Context) error {
	root := filepath.Join(g.layer("middle"), repoDir)
	env := gitEnv(g.root)
	for _, args := range [][]string{
		{"init", "-q", "-b", "main"},
		{"add", "-A"},
		{"-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q", "-m", "bench fixture"},
		{"repack", "-a", "-d", "-q"},
		{"update-index", "-q", "--refresh"},
	} {
		if err := runCmd(ctx, root, env, "git", append([]string{"-c", "safe.directory=*"}, args...)...); err != nil {
			return err
		}
	}
	if err := chownTree(filepath.Join(root, ".git"), g.owner); err != nil {
		return err
	}
	out, err := outputCmd(ctx, root, env, "git", "-c", "safe.directory=*", "status", "--porcelain")
	if err != nil {
		return err
	}
	if len(out) != 0 {
		return fmt.Errorf("repo not clean after commit:\n%s", out)
	}
	return nil
}

// topLayer writes the big files of the top layer.
func (g *generator) topLayer(*manifest) error {
	top := g.layer("top")
	for _, f := range []struct {
		name string
		size int64
	}{{bigFile, g.p.BigBytes}, {randFile, g.p.RandBytes}} {
		if err := writeBig(filepath.Join(top, f.name), f.size, g.data); err != nil {
			return err
		}
	}
	return nil
}

// writeBig writes size bytes from src to name, in 1 MiB writes.
func writeBig(name string, size int64, src io.Reader) error {
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.CopyBuffer(f, io.LimitReader(src, size), make([]byte, mib)); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", name, err)
	}
	return f.Close()
}

// tarArchive writes the archive extracted by the untar workload: small
// files, 100 to a directory, owned by root as in a distribution tarball.
func (g *generator) tarArchive(m *manifest) error {
	src := filepath.Join(g.root, "tar-src")
	for i := 0; i < g.p.UntarFiles; i++ {
		name := filepath.Join(src, fmt.Sprintf("pkg/d%03d/file%05d", i/100, i))
		if err := g.writeFile(name, g.rng.IntN(8*kib)); err != nil {
			return err
		}
	}
	m.TarFiles = g.p.UntarFiles
	if err := runCmd(context.Background(), g.root, nil, "tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
		"-cf", tarName, "-C", src, "."); err != nil {
		return err
	}
	return os.RemoveAll(src)
}

// chownTree gives every entry under root to c, skipping entries that
// already belong to it (chown updates ctime, which git's index records).
func chownTree(root string, c cred) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("lstat %s: %w", p, err)
		}
		if int(st.Uid) == c.uid && int(st.Gid) == c.gid {
			return nil
		}
		if err := unix.Lchown(p, c.uid, c.gid); err != nil {
			return fmt.Errorf("chown %s: %w", p, err)
		}
		return nil
	})
}

// plainMarker records, inside the fixture, that the plain copy is complete.
const plainMarker = "plain.json"

// ensurePlain builds the plain engine's tree once per fixture: a copy of the
// merged view as kernel overlay presents it (mounted read-only, lower layers
// only, under scratch), so "plain" holds exactly what the mounts show.
func ensurePlain(ctx context.Context, f *fixture, scratch string, logw io.Writer) error {
	var info struct {
		Version int   `json:"version"`
		Big     int64 `json:"big"`
	}
	if b, err := os.ReadFile(filepath.Join(f.dir, plainMarker)); err == nil && json.Unmarshal(b, &info) == nil &&
		info.Version == fixtureVersion {
		// A harness killed during the plain copy-up run leaves the big file
		// one byte long; anything else means rebuild.
		if st, err := os.Stat(filepath.Join(f.plainDir(), f.m.BigFile)); err == nil && st.Size() == info.Big {
			return nil
		}
	}
	fmt.Fprintf(logw, "fixture: copying the merged tree to %s\n", f.plainDir())
	os.Remove(filepath.Join(f.dir, plainMarker))
	tmp := f.plainDir() + ".partial"
	for _, d := range []string{tmp, f.plainDir()} {
		if err := os.RemoveAll(d); err != nil {
			return err
		}
	}
	mnt := filepath.Join(scratch, "plain-src")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("overlay", mnt, "overlay", unix.MS_RDONLY, "lowerdir="+f.lowerdir()); err != nil {
		return fmt.Errorf("mount kernel overlay to copy the merged tree: %w", err)
	}
	defer unmountPath(mnt, logw)
	if err := runCmd(ctx, "/", nil, "cp", "-a", mnt, tmp); err != nil {
		return fmt.Errorf("copy merged tree: %w", err)
	}
	if err := unmountPath(mnt, logw); err != nil {
		return err
	}
	if err := os.Rename(tmp, f.plainDir()); err != nil {
		return err
	}
	info.Version, info.Big = fixtureVersion, f.m.Profile.BigBytes
	return writeJSON(filepath.Join(f.dir, plainMarker), info)
}

// runCmd runs name with args in dir; its output is returned in the error.
func runCmd(ctx context.Context, dir string, env []string, name string, args ...string) error {
	_, err := outputCmd(ctx, dir, env, name, args...)
	return err
}

// outputCmd runs name with args in dir and returns its stdout. A nil env
// means the harness's environment.
func outputCmd(ctx context.Context, dir string, env []string, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = env
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
