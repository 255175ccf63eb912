package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// fileset gives access to the files of an image source by their slash
// path relative to its root, for a directory and for a tar alike.
type fileset interface {
	// open returns the regular file name and its size.
	open(name string) (io.ReadCloser, int64, error)
	// exists reports whether name is a regular file.
	exists(name string) bool
	close() error
}

// cleanArchivePath normalises a path inside a source ("./x" and "/x" are
// "x"); ".." leading out of the root is refused.
func cleanArchivePath(name string) (string, error) {
	p := path.Clean("/" + name)[1:]
	if p == "" {
		return "", fmt.Errorf("empty path")
	}
	return p, nil
}

// dirSet is a source directory. Files are opened with RESOLVE_BENEATH:
// symlinks inside it work (extracted docker saves link duplicate layers),
// none leads outside.
type dirSet struct{ fd int }

func openDirSet(dir string) (*dirSet, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return &dirSet{fd: fd}, nil
}

func (d *dirSet) open(name string) (io.ReadCloser, int64, error) {
	p, err := cleanArchivePath(name)
	if err != nil {
		return nil, 0, fmt.Errorf("%q: %w", name, err)
	}
	fd, err := unix.Openat2(d.fd, p, &unix.OpenHow{Flags: unix.O_RDONLY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS})
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", p, err)
	}
	f := os.NewFile(uintptr(fd), p)
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, 0, fmt.Errorf("%s: not a regular file", p)
	}
	return f, st.Size(), nil
}

func (d *dirSet) exists(name string) bool {
	f, _, err := d.open(name)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

func (d *dirSet) close() error { return unix.Close(d.fd) }

// tarSet is a source tar file, indexed once; files are read in place
// through section readers.
type tarSet struct {
	f     *os.File
	files map[string]tarFile
	links map[string]string // symlink or hard link name -> target path
}

type tarFile struct{ off, size int64 }

// maxLinkHops bounds the symlink chains followed inside a source tar.
const maxLinkHops = 8

func openTarSet(name string) (*tarSet, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	magic := make([]byte, 4)
	n, _ := io.ReadFull(f, magic)
	if bytes.HasPrefix(magic[:n], []byte{0x1f, 0x8b}) || bytes.HasPrefix(magic[:n], []byte{0x28, 0xb5, 0x2f, 0xfd}) {
		f.Close()
		return nil, fmt.Errorf("%s is compressed: decompress the image archive first (the layers inside may be compressed)", name)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	t := &tarSet{f: f, files: map[string]tarFile{}, links: map[string]string{}}
	// archive/tar reads exactly the header blocks and seeks over data
	// (f is an io.Seeker), so the offset after Next is the data's start.
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, tar.ErrInsecurePath) && hdr != nil {
			err = nil
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("read %s: %w", name, err)
		}
		p, err := cleanArchivePath(hdr.Name)
		if err != nil {
			continue
		}
		switch hdr.Typeflag {
		case tar.TypeReg:
			off, err := f.Seek(0, io.SeekCurrent)
			if err != nil {
				f.Close()
				return nil, err
			}
			t.files[p] = tarFile{off: off, size: hdr.Size}
		case tar.TypeSymlink:
			// Relative to the link's directory; absolute means the
			// archive root.
			target := hdr.Linkname
			if !strings.HasPrefix(target, "/") {
				target = path.Join(path.Dir(p), target)
			}
			if tp, err := cleanArchivePath(target); err == nil {
				t.links[p] = tp
			}
		case tar.TypeLink:
			if tp, err := cleanArchivePath(hdr.Linkname); err == nil {
				t.links[p] = tp
			}
		}
	}
	return t, nil
}

func (t *tarSet) resolve(name string) (tarFile, string, error) {
	p, err := cleanArchivePath(name)
	if err != nil {
		return tarFile{}, "", fmt.Errorf("%q: %w", name, err)
	}
	for range maxLinkHops {
		if tf, ok := t.files[p]; ok {
			return tf, p, nil
		}
		target, ok := t.links[p]
		if !ok {
			return tarFile{}, "", fmt.Errorf("%s: %w", p, os.ErrNotExist)
		}
		p = target
	}
	return tarFile{}, "", fmt.Errorf("%s: too many levels of links", name)
}

func (t *tarSet) open(name string) (io.ReadCloser, int64, error) {
	tf, _, err := t.resolve(name)
	if err != nil {
		return nil, 0, err
	}
	r := bufio.NewReaderSize(io.NewSectionReader(t.f, tf.off, tf.size), 256<<10)
	return io.NopCloser(r), tf.size, nil
}

func (t *tarSet) exists(name string) bool {
	_, _, err := t.resolve(name)
	return err == nil
}

func (t *tarSet) close() error { return t.f.Close() }
