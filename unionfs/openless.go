package unionfs

import (
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// openlessDirs serves directories without OPENDIR and RELEASEDIR requests
// (FUSE_NO_OPENDIR_SUPPORT, Linux >= 5.1). Answering the first OPENDIR
// with ENOSYS tells the kernel to open every directory of the mount by
// itself from then on, with FOPEN_KEEP_CACHE|FOPEN_CACHE_DIR, which strata
// would have set anyway: opendir(3) costs no round trip and closedir(3)
// none either, where each was one before (half the requests of a warm
// find or git status). READDIR, READDIRPLUS and FSYNCDIR then come with
// file handle 0; each gets a handle of its own from go-fuse's bridge for
// the length of the request. Listings stay consistent across the READDIRs
// of one pass through the kept listing of dirHandle.
type openlessDirs struct {
	fuse.RawFileSystem
	// on: the kernel offered FUSE_NO_OPENDIR_SUPPORT. Set by Init, before
	// any other request is served.
	on bool
}

func (o *openlessDirs) Init(s *fuse.Server) {
	o.on = s.KernelSettings().Flags&fuse.CAP_NO_OPENDIR_SUPPORT != 0
	o.RawFileSystem.Init(s)
}

func (o *openlessDirs) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if o.on {
		return fuse.ENOSYS
	}
	return o.RawFileSystem.OpenDir(cancel, in, out)
}

func (o *openlessDirs) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return o.withHandle(cancel, &in.InHeader, in.Fh, func(fh uint64) fuse.Status {
		r := *in
		r.Fh = fh
		return o.RawFileSystem.ReadDir(cancel, &r, out)
	})
}

func (o *openlessDirs) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return o.withHandle(cancel, &in.InHeader, in.Fh, func(fh uint64) fuse.Status {
		r := *in
		r.Fh = fh
		return o.RawFileSystem.ReadDirPlus(cancel, &r, out)
	})
}

func (o *openlessDirs) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return o.withHandle(cancel, &in.InHeader, in.Fh, func(fh uint64) fuse.Status {
		r := *in
		r.Fh = fh
		return o.RawFileSystem.FsyncDir(cancel, &r)
	})
}

// withHandle runs f with the directory handle the kernel sent, or, for
// handle 0 (a directory the kernel opened by itself), with one opened for
// the call and released after it.
func (o *openlessDirs) withHandle(cancel <-chan struct{}, h *fuse.InHeader, fh uint64, f func(uint64) fuse.Status) fuse.Status {
	if fh != 0 {
		return f(fh)
	}
	var out fuse.OpenOut
	if st := o.RawFileSystem.OpenDir(cancel, &fuse.OpenIn{InHeader: *h, Flags: syscall.O_RDONLY | syscall.O_DIRECTORY}, &out); !st.Ok() {
		return st
	}
	defer o.RawFileSystem.ReleaseDir(&fuse.ReleaseIn{InHeader: *h, Fh: out.Fh})
	return f(out.Fh)
}
