package unionfs

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"strata/whiteout"
)

// FSType is the filesystem type strata mounts show in /proc/mounts
// ("fuse." + Name).
const FSType = "fuse.strata"

// Server is a live FUSE mount of a Stack.
type Server struct {
	fuse       *fuse.Server
	stack      *Stack
	mountpoint string
	lockFd     int
}

// newRoot makes the root node: every layer's root merged. Layer roots are
// never opaque for the kernel (a "y" on them is ignored); an "x" still
// tells readdir to filter xattr whiteouts.
func newRoot(s *Stack) (*node, error) {
	root := &node{s: s, layer: 0, tmpfd: -1}
	root.loc.Store(&location{})
	for _, l := range s.layers {
		op, err := whiteout.GetOpacity(l.fd, "", s.ns)
		if err != nil {
			return nil, &LayerError{"layer", l.path, err}
		}
		if op == whiteout.Opaque {
			op = whiteout.NotOpaque
		}
		root.dirs = append(root.dirs, dirLayer{layer: l.index, opacity: op})
	}
	var st unix.Stat_t
	if err := unix.Fstat(s.layers[0].fd, &st); err != nil {
		return nil, err
	}
	root.ino = s.identity(s.layers[0], st.Ino)
	return root, nil
}

// Mount serves the union described by o at mountpoint and returns once
// the mount is live. It validates o first and changes nothing on disk if
// validation fails. Mount sets the process umask to 0: strata creates
// objects with the modes callers asked for, to which the kernel has
// already applied the callers' umask.
func Mount(mountpoint string, o Options) (*Server, error) {
	o.AutoXattr()
	if err := o.Resolve(); err != nil {
		return nil, err
	}
	if err := o.Validate(); err != nil {
		return nil, err
	}
	mnt, err := checkMountpoint(mountpoint)
	if err != nil {
		return nil, err
	}
	lockFd := -1
	if o.Upper != "" && !o.ReadOnly {
		if lockFd, err = claimUpper(&o); err != nil {
			return nil, err
		}
	}
	syscall.Umask(0)
	s, err := NewStack(o)
	if err != nil {
		unlockUpper(lockFd)
		return nil, err
	}
	root, err := newRoot(s)
	if err != nil {
		s.Close()
		unlockUpper(lockFd)
		return nil, err
	}
	fsopts := fuseOptions(&o, root)
	srv, err := serve(mnt, root, fsopts, !o.NoSelfAccess)
	if err != nil {
		s.Close()
		unlockUpper(lockFd)
		return nil, fmt.Errorf("mount %s: %w", mnt, err)
	}
	raiseReadahead(mnt, s.log)
	// Passthrough is probed at the first open, when INIT has surely been
	// answered (the daemon does not wait for it, see serve).
	s.ptMu.Lock()
	s.ptServer = srv
	s.ptMu.Unlock()
	s.log.Info("mounted", "mountpoint", mnt, "options", o.String())
	return &Server{fuse: srv, stack: s, mountpoint: mnt, lockFd: lockFd}, nil
}

// readahead is the most the kernel reads ahead of a sequential reader of
// a file of the mount, in bytes: one READ request of the largest size.
const readahead = 1 << 20

// raiseReadahead lets the kernel read ahead as far as the mount's
// negotiated maximum. The kernel starts every FUSE mount at 128 KiB (the
// default of its backing device info, which INIT can only lower), so a
// sequential read would cost a round trip per 128 KiB; only root may raise
// it, through sysfs. The bdi exists once mount(2) returns; INIT, answered
// later, keeps the smaller of this and max_readahead, which is the same.
func raiseReadahead(mnt string, log *slog.Logger) {
	if os.Geteuid() != 0 {
		return
	}
	mounts, err := ReadMounts()
	if err != nil {
		return
	}
	m, found := TopMount(mounts, mnt)
	if !found || m.Engine != EngineFUSE {
		return
	}
	p := fmt.Sprintf("/sys/class/bdi/0:%d/read_ahead_kb", m.Minor)
	cur, err := os.ReadFile(p)
	if err != nil {
		log.Info("cannot read the mount's readahead", "err", err)
		return
	}
	want := readahead >> 10
	if kb, err := strconv.Atoi(strings.TrimSpace(string(cur))); err == nil && kb >= want {
		return
	}
	if err := os.WriteFile(p, []byte(strconv.Itoa(want)), 0o644); err != nil {
		log.Info("cannot raise the mount's readahead", "err", err)
	}
}

// fuseOptions renders o as go-fuse options.
func fuseOptions(o *Options, root *node) *fs.Options {
	entry, attr, neg := o.EntryTimeout, o.AttrTimeout, o.NegativeTimeout
	direct := os.Geteuid() == 0
	// A mount without a writable upper is mounted read-only, as kernel
	// overlay is: every write fails with EROFS in the VFS, also access(2)
	// W_OK and xattr changes on special files.
	readOnly := !o.Writable()
	opts := []string{"default_permissions"}
	if !direct {
		// fusermount3 takes the generic flags as strings (and always adds
		// nosuid,nodev for users, as it must).
		opts = append(opts, o.MountFlags...)
		if readOnly {
			opts = append(opts, "ro")
		}
	}
	fsname := o.FsName
	if fsname == "" {
		fsname = "strata"
	}
	mo := fuse.MountOptions{
		FsName:     fsname,
		Name:       "strata",
		AllowOther: o.AllowOther,
		// The kernel checks permissions against the attributes strata
		// returns, with the caller's credentials, as kernel overlay does
		// on its own inodes; strata itself acts with the mounter's.
		Options:      opts,
		MaxWrite:     1 << 20,
		MaxReadAhead: readahead,
		// Replies carry data from strata's buffers (ReadResultData), which
		// go-fuse would first try to splice, taking a pipe and growing it
		// for every READ before falling back to writev.
		DisableSplice: true,
		// Root mounts directly (no fusermount helper round trip), with
		// the same flags a kernel overlay mount of these options gets.
		DirectMount:          direct,
		DirectMountStrict:    direct,
		DirectMountFlags:     o.mountFlagBits(readOnly),
		Debug:                o.DebugFUSE,
		EnableSymlinkCaching: true,
		// The kernel caches POSIX ACLs (also "none") per inode, so ls -l and
		// permission checks stop asking strata for system.posix_acl_*.
		EnableAcl: true,
	}
	return &fs.Options{
		MountOptions:    mo,
		EntryTimeout:    &entry,
		AttrTimeout:     &attr,
		NegativeTimeout: &neg,
		// Modes are exact: 0000 stays 0000.
		NullPermissions: true,
		RootStableAttr:  &fs.StableAttr{Ino: root.ino, Gen: 1},
	}
}

// serve mounts root at mnt and serves it, as fs.Mount does but with
// directories opened by the kernel (openlessDirs); pollHack false skips
// go-fuse's poll hack (see Options.NoSelfAccess), and Mount returns when
// the mount(2) or fusermount3 call is done: requests wait in the kernel
// until Serve answers INIT.
func serve(mnt string, root *node, opts *fs.Options, pollHack bool) (*fuse.Server, error) {
	raw := &openlessDirs{RawFileSystem: fs.NewNodeFS(root, opts)}
	srv, err := fuse.NewServer(raw, mnt, &opts.MountOptions)
	if err != nil {
		return nil, err
	}
	go srv.Serve()
	if pollHack {
		if err := srv.WaitMount(); err != nil {
			return nil, err
		}
	}
	return srv, nil
}

// probePassthrough reports whether the kernel accepts backing files on
// this mount (FUSE passthrough: Linux >= 6.9 and CAP_SYS_ADMIN), by
// registering a memfd and releasing it.
func probePassthrough(srv *fuse.Server, log *slog.Logger) bool {
	fd, err := unix.MemfdCreate("strata-passthrough-probe", unix.MFD_CLOEXEC)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	id, errno := srv.RegisterBackingFd(&fuse.BackingMap{Fd: int32(fd)})
	if errno != 0 {
		log.Info("FUSE passthrough unavailable; file I/O goes through strata", "errno", errno.Error())
		return false
	}
	srv.UnregisterBackingFd(id)
	return true
}

// checkMountpoint resolves the mount point and checks it is a directory.
func checkMountpoint(p string) (string, error) {
	if p == "" {
		return "", &LayerError{"mountpoint", p, errors.New("missing")}
	}
	abs, err := absPath(p)
	if err != nil {
		return "", &LayerError{"mountpoint", p, err}
	}
	var st unix.Stat_t
	if err := unix.Stat(abs, &st); err != nil {
		return "", &LayerError{"mountpoint", p, err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return "", &LayerError{"mountpoint", p, unix.ENOTDIR}
	}
	return abs, nil
}

// ErrInUse is returned when the upper or work dir is used by another live
// mount. The kernel only warns in that case and leaves the outcome
// undefined; strata refuses unless -o force... is given by the CLI's
// --force.
var ErrInUse = errors.New("already in use by a live mount")

// claimUpper takes an exclusive lock on the work dir for the life of the
// mount, and checks /proc/self/mountinfo for kernel overlay mounts using
// the same upper or work dir. It returns the lock's fd.
func claimUpper(o *Options) (int, error) {
	fd, err := unix.Open(o.Work, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &LayerError{"workdir", o.Work, err}
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil && !o.Force {
		unix.Close(fd)
		if errors.Is(err, unix.EWOULDBLOCK) {
			return -1, &LayerError{"workdir", o.Work, fmt.Errorf("%w (another strata mount; --force to mount anyway)", ErrInUse)}
		}
		return -1, &LayerError{"workdir", o.Work, err}
	}
	if o.Force {
		return fd, nil
	}
	mounts, err := ReadMounts()
	if err != nil {
		return fd, nil // not knowing is not a reason to refuse
	}
	for _, m := range mounts {
		if m.Engine != EngineKernel {
			continue
		}
		if m.Options.Upper == o.Upper || m.Options.Work == o.Work {
			unix.Close(fd)
			return -1, &LayerError{"upperdir", o.Upper, fmt.Errorf("%w: kernel overlay at %s; --force to mount anyway", ErrInUse, m.Mountpoint)}
		}
	}
	return fd, nil
}

func unlockUpper(fd int) {
	if fd >= 0 {
		unix.Close(fd)
	}
}

// Stack returns the server's layer stack.
func (srv *Server) Stack() *Stack { return srv.stack }

// Mountpoint returns the absolute mount point.
func (srv *Server) Mountpoint() string { return srv.mountpoint }

// Wait blocks until the file system is unmounted (by Unmount, umount(8)
// or fusermount3 -u), then releases the layers.
func (srv *Server) Wait() {
	srv.fuse.Wait()
	srv.close()
}

func (srv *Server) close() {
	srv.stack.Close()
	unlockUpper(srv.lockFd)
	srv.lockFd = -1
}

// Unmount unmounts the file system, retrying while it is busy for a short
// while, waits for the server to stop and releases every layer fd.
func (srv *Server) Unmount() error {
	var err error
	for i := 0; i < 50; i++ {
		err = srv.fuse.Unmount()
		if err == nil || !strings.Contains(err.Error(), "busy") {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("unmount %s: %w", srv.mountpoint, err)
	}
	srv.fuse.Wait()
	srv.close()
	return nil
}
