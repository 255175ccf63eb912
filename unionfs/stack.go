package unionfs

import (
	"fmt"
	"log/slog"
	"math/bits"
	"os"
	"sync"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"strata/cow"
	"strata/whiteout"
)

// layer is one directory tree of the stack.
type layer struct {
	index int    // position in Stack.layers; the upper layer, if any, is 0
	path  string // as given, for messages
	fd    int    // O_PATH directory fd of the layer root, open for the Stack's life
	dev   uint64 // st_dev of the layer root
	fsid  uint64 // index of dev among the stack's filesystems (st_ino composition)
	upper bool
}

// Stack is a union's layers and the state shared by all its nodes. It is
// usable without a mount: offline tools resolve paths through it.
type Stack struct {
	opts     Options
	ns       whiteout.NS
	log      *slog.Logger
	layers   []*layer // upper (if any) first, then the lowers top to bottom
	upper    *layer   // nil without an upper dir
	writable bool     // upper present and not -o ro

	workDirFd int // the workdir itself, -1 when read-only
	workFd    int // workdir/work, -1 when read-only
	copier    *cow.Copier

	fds *dirCache

	// inoShift places the filesystem index in the top bits of an identity;
	// 0 when every layer is on one filesystem (identities are the real
	// inode numbers then, as with kernel overlay on one filesystem).
	inoShift uint
	devFsid  map[uint64]uint64 // immutable after NewStack

	// privileged: the daemon may chown and create device nodes.
	privileged bool

	ptMu sync.Mutex
	// ptServer is the mount's server, set by Mount; at the first open after
	// it is set, ptDecided becomes true and passthrough says whether open
	// files use FUSE passthrough. Protected by ptMu.
	ptServer    *fuse.Server
	ptDecided   bool
	passthrough bool

	copiedMu sync.Mutex
	// copied maps the real inode number of an upper object that was copied
	// up during this mount to the identity it had before. Protected by
	// copiedMu.
	copied map[uint64]uint64
}

// NewStack opens the layers of o, which must have passed Resolve and
// Validate, and prepares the work dir. Close releases it.
func NewStack(o Options) (*Stack, error) {
	s := &Stack{opts: o, ns: o.NS(), log: o.Logger, workDirFd: -1, workFd: -1,
		privileged: os.Geteuid() == 0, copied: map[uint64]uint64{}, devFsid: map[uint64]uint64{}}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	ok := false
	defer func() {
		if !ok {
			s.Close()
		}
	}()
	open := func(role, p string, upper bool) error {
		fd, err := unix.Open(p, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return &LayerError{role, p, err}
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			return &LayerError{role, p, err}
		}
		l := &layer{index: len(s.layers), path: p, fd: fd, dev: st.Dev, upper: upper}
		if _, seen := s.devFsid[st.Dev]; !seen {
			s.devFsid[st.Dev] = uint64(len(s.devFsid))
		}
		l.fsid = s.devFsid[st.Dev]
		s.layers = append(s.layers, l)
		if upper {
			s.upper = l
		}
		return nil
	}
	if o.Upper != "" {
		if err := open("upperdir", o.Upper, true); err != nil {
			return nil, err
		}
	}
	for _, p := range o.Lowers {
		if err := open("lowerdir", p, false); err != nil {
			return nil, err
		}
	}
	if n := len(s.devFsid); n > 1 {
		s.inoShift = 64 - uint(bits.Len(uint(n-1)))
	}
	s.writable = s.upper != nil && !o.ReadOnly
	if s.writable {
		fd, err := unix.Open(o.Work, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, &LayerError{"workdir", o.Work, err}
		}
		s.workDirFd = fd
		if s.workFd, err = cow.PrepareWork(fd); err != nil {
			return nil, &LayerError{"workdir", o.Work, err}
		}
		s.copier = cow.New(cow.Options{WorkFd: s.workFd, NS: s.ns, NoSync: o.NoSync, Logger: s.log})
		if err := s.probeWhiteout(); err != nil {
			return nil, err
		}
	}
	s.fds = newDirCache(dirCacheSize())
	ok = true
	return s, nil
}

// probeWhiteout checks that whiteouts can be created here (any user can on
// Linux >= 5.8; some sandboxes refuse mknod). strata never falls back to
// another whiteout format: the upper dir must stay in the kernel's.
func (s *Stack) probeWhiteout() error {
	name := s.copier.TempName()
	if err := unix.Mknodat(s.workFd, name, unix.S_IFCHR, 0); err != nil {
		return &LayerError{"workdir", s.opts.Work, fmt.Errorf("cannot create whiteouts (mknod c 0 0: %w); strata writes no other whiteout format", err)}
	}
	unix.Unlinkat(s.workFd, name, 0)
	return nil
}

// dirCacheSize bounds the directory fds kept open: a quarter of the fd
// limit, at least 64, at most 16384.
func dirCacheSize() int {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return 1024
	}
	return int(max(64, min(rl.Cur/4, 16384)))
}

// Close closes every fd the stack holds.
func (s *Stack) Close() error {
	for _, l := range s.layers {
		unix.Close(l.fd)
	}
	s.layers = nil
	if s.workFd >= 0 {
		unix.Close(s.workFd)
		s.workFd = -1
	}
	if s.workDirFd >= 0 {
		unix.Close(s.workDirFd)
		s.workDirFd = -1
	}
	if s.fds != nil {
		s.fds.closeAll()
	}
	return nil
}

// Options returns the options the stack was made from.
func (s *Stack) Options() Options { return s.opts }

// identity returns the st_ino strata shows for an object whose real inode
// number is ino in layer l.
func (s *Stack) identity(l *layer, ino uint64) uint64 {
	if l.upper {
		s.copiedMu.Lock()
		id, ok := s.copied[ino]
		s.copiedMu.Unlock()
		if ok {
			return id
		}
	}
	if s.inoShift == 0 {
		return ino
	}
	// An object on a filesystem mounted inside a layer counts as the
	// layer's: collisions are possible there (see README).
	fsid := l.fsid
	if ino>>s.inoShift != 0 {
		// Inode numbers that use the top bits (rare): fold, as kernel
		// xino does on overflow.
		ino = ino ^ (ino >> s.inoShift)
		ino &= (1 << s.inoShift) - 1
	}
	return ino | fsid<<s.inoShift
}

// passthroughOK reports whether open files may use FUSE passthrough.
func (s *Stack) passthroughOK() bool {
	s.ptMu.Lock()
	defer s.ptMu.Unlock()
	if !s.ptDecided && s.ptServer != nil {
		s.passthrough = probePassthrough(s.ptServer, s.log)
		s.ptDecided = true
	}
	return s.passthrough
}

// rememberCopy records that the upper object with real inode number
// upperIno keeps identity id.
func (s *Stack) rememberCopy(upperIno, id uint64) {
	s.copiedMu.Lock()
	s.copied[upperIno] = id
	s.copiedMu.Unlock()
}

func (s *Stack) String() string {
	return fmt.Sprintf("stack(%d layers)", len(s.layers))
}
