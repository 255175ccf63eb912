package unionfs

import (
	"container/list"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// dirCache keeps O_PATH fds of directories, one per (node, layer), with a
// bound on how many stay open: least recently used entries that nobody
// holds are closed when the bound is passed, and reopened from the parent's
// fd when needed again. Layer roots are not in the cache; the Stack holds
// them for its life.
//
// An O_PATH fd follows its directory when it is renamed, so an entry stays
// valid across renames; nodes drop their entries when they are forgotten or
// when the directory they name in a layer is replaced.
type dirCache struct {
	mu    sync.Mutex
	max   int
	lru   list.List // of *dirFd, most recent first; protected by mu
	count int       // protected by mu
}

// dirFd is one cached fd. refs, elem and gone are protected by dirCache.mu.
type dirFd struct {
	n     *node
	layer int
	fd    int
	refs  int
	elem  *list.Element
	gone  bool // no longer in the cache; close when refs drops to 0
}

func newDirCache(max int) *dirCache { return &dirCache{max: max} }

// dirRef is a held directory fd; release it when done.
type dirRef struct {
	fd int
	e  *dirFd // nil for a layer root
}

// dirfd returns an fd of directory node n in layer li, opening it if needed.
//
// Preconditions:
//   - n is a directory present in layer li.
func (s *Stack) dirfd(n *node, li int) (dirRef, error) {
	if n.isRoot() {
		return dirRef{fd: s.layers[li].fd}, nil
	}
	c := s.fds
	c.mu.Lock()
	if e := n.cachedFd(li); e != nil {
		e.refs++
		c.lru.MoveToFront(e.elem)
		c.mu.Unlock()
		return dirRef{e.fd, e}, nil
	}
	c.mu.Unlock()

	fd, err := s.openCopy(n, li)
	if err != nil {
		return dirRef{}, err
	}

	c.mu.Lock()
	if e := n.cachedFd(li); e != nil {
		// Another goroutine opened it meanwhile.
		e.refs++
		c.lru.MoveToFront(e.elem)
		c.mu.Unlock()
		unix.Close(fd)
		return dirRef{e.fd, e}, nil
	}
	e := &dirFd{n: n, layer: li, fd: fd, refs: 1}
	e.elem = c.lru.PushFront(e)
	n.fds = append(n.fds, e)
	c.count++
	victims := c.evictLocked()
	c.mu.Unlock()
	closeAll(victims)
	return dirRef{fd, e}, nil
}

// openCopy opens n's copy in layer li: its name in the parent's copy, or
// where a redirect moved it (dirLayer.at).
func (s *Stack) openCopy(n *node, li int) (int, error) {
	loc := n.location()
	name := loc.name
	switch at := n.locIn(li); {
	case strings.HasPrefix(at, "/"):
		return s.openLayerPath(li, at)
	case at != "":
		name = at
	}
	pref, err := s.dirfd(loc.parent, li)
	if err != nil {
		return -1, err
	}
	defer s.release(pref)
	return unix.Openat(pref.fd, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
}

// release gives back a reference from dirfd.
func (s *Stack) release(r dirRef) {
	if r.e == nil {
		return
	}
	c := s.fds
	c.mu.Lock()
	r.e.refs--
	closeIt := r.e.gone && r.e.refs == 0
	c.mu.Unlock()
	if closeIt {
		unix.Close(r.e.fd)
	}
}

// evictLocked unlinks unreferenced entries from the back of the LRU while
// the cache is over its bound, and returns their fds to close.
//
// Preconditions: c.mu held.
func (c *dirCache) evictLocked() []int {
	var victims []int
	for el := c.lru.Back(); el != nil && c.count > c.max; {
		e := el.Value.(*dirFd)
		prev := el.Prev()
		if e.refs == 0 {
			c.removeLocked(e)
			victims = append(victims, e.fd)
		}
		el = prev
	}
	return victims
}

// removeLocked takes e out of the LRU and its node.
//
// Preconditions: c.mu held.
func (c *dirCache) removeLocked(e *dirFd) {
	c.lru.Remove(e.elem)
	c.count--
	fds := e.n.fds
	for i, x := range fds {
		if x == e {
			fds[i] = fds[len(fds)-1]
			e.n.fds = fds[:len(fds)-1]
			break
		}
	}
	e.gone = true
}

// drop removes n's cached fds, for all layers (li < 0) or one.
func (s *Stack) dropFds(n *node, li int) {
	c := s.fds
	var victims []int
	c.mu.Lock()
	for i := len(n.fds) - 1; i >= 0; i-- {
		e := n.fds[i]
		if li >= 0 && e.layer != li {
			continue
		}
		c.removeLocked(e)
		if e.refs == 0 {
			victims = append(victims, e.fd)
		}
	}
	c.mu.Unlock()
	closeAll(victims)
}

// closeAll closes every cached fd (unmount).
func (c *dirCache) closeAll() {
	c.mu.Lock()
	var victims []int
	for el := c.lru.Front(); el != nil; el = el.Next() {
		e := el.Value.(*dirFd)
		e.gone = true
		if e.refs == 0 {
			victims = append(victims, e.fd)
		}
	}
	c.lru.Init()
	c.count = 0
	c.mu.Unlock()
	closeAll(victims)
}

// open reports how many fds the cache holds.
func (c *dirCache) open() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.count
}

// cachedFd returns n's entry for layer li.
//
// Preconditions: dirCache.mu held.
func (n *node) cachedFd(li int) *dirFd {
	for _, e := range n.fds {
		if e.layer == li {
			return e
		}
	}
	return nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
