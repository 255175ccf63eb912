package cmd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"strata/inspect"
	"strata/layer"
	"strata/unionfs"
	"strata/whiteout"
)

// export and import: OCI layer tars <-> layer dirs. The logic lives in
// package layer.

// exportFlags are the flags of "strata export".
type exportFlags struct {
	options  []string
	upper    string
	xattr    string
	gzip     bool
	compress string
	output   string
	force    bool
}

func (f *exportFlags) register(fs *pflag.FlagSet) {
	fs.StringArrayVarP(&f.options, "options", "o", nil, "the layer, as for mount: upperdir=DIR[,userxattr] (lowerdir= and workdir= are accepted and ignored)")
	fs.StringVar(&f.upper, "upper", "", "the layer directory to export (instead of -o upperdir=)")
	fs.StringVar(&f.xattr, "xattr", "auto", "namespace of the overlay markers in the layer: trusted, user, or auto (user with -o userxattr, else both)")
	fs.BoolVar(&f.gzip, "gzip", false, "gzip the output (same as --compress=gzip)")
	fs.StringVar(&f.compress, "compress", "none", "compression: none, gzip or zstd")
	fs.StringVarP(&f.output, "output", "O", "-", "write the tar to FILE (atomically) or - for stdout")
	fs.BoolVar(&f.force, "force", false, "export even if a live mount uses the layer as its upper dir")
}

const exportHelp = `Writes a layer directory (typically the upper dir of a mount) as an OCI image
layer tar: whiteouts become .wh.NAME entries, opaque directories get a
.wh..wh..opq entry, hard links stay hard links, extended attributes become
SCHILY.xattr PAX records (overlay-private ones are left out). The output is
deterministic: the same tree gives the same diffID.

The diffID (sha256 of the uncompressed tar) and, when compressed, the digest
of the output are printed as "diffid sha256:..." and "digest sha256:..."
lines, followed by "size N" (bytes written): on stdout when the tar goes to
a file, on stderr when it goes to stdout. The tar is never written to a
terminal.

Examples:
  strata export -o upperdir=/var/up --gzip -O layer.tar.gz
  strata export --upper /var/up | docker import - img`

// importFlags are the flags of "strata import".
type importFlags struct {
	userxattr   bool
	rootless    bool
	skipDevices bool
	skipRefused bool
	diffID      string
	digest      string
}

func (f *importFlags) register(fs *pflag.FlagSet) {
	unprivileged := os.Geteuid() != 0
	fs.BoolVar(&f.userxattr, "userxattr", unprivileged, "mark opaque directories with user.overlay.opaque (for -o userxattr mounts) instead of trusted.overlay.opaque")
	fs.BoolVar(&f.rootless, "rootless", unprivileged, "keep your own uid/gid instead of the archive's, skip attributes that need privilege")
	fs.BoolVar(&f.skipDevices, "skip-devices", unprivileged, "skip device nodes that cannot be created without privilege (else fail)")
	fs.BoolVar(&f.skipRefused, "skip-refused", false, "leave out unsafe entries (listed) and import the rest (else fail)")
	fs.StringVar(&f.diffID, "diffid", "", "fail unless the uncompressed tar has this sha256:... digest")
	fs.StringVar(&f.digest, "digest", "", "fail unless the input (as compressed) has this sha256:... digest")
}

const importHelp = `Unpacks an OCI image layer tar (plain, gzip or zstd, detected) into DIR in the
kernel overlay format, ready to be a lower (or upper) dir: .wh.NAME entries
become whiteouts (0/0 character devices), .wh..wh..opq makes its directory
opaque. DIR must not exist or be empty; the layer is built beside it and
renamed into place at the end, so a failure leaves nothing at DIR.

Unsafe entries are refused and fail the import: names with "..", anything
under a symlink the archive made (a -> /etc, then a/passwd), hard links out
of the layer, overlay-private attributes. Absolute names are taken as
relative to DIR, as GNU tar does. Without root, the defaults are
--userxattr --rootless --skip-devices.

Prints "diffid sha256:..." and "digest sha256:..." on stdout, and each
skipped or refused entry on stderr.`

func init() {
	register(&command{
		name: "export", args: "[flags] (-o upperdir=DIR | --upper DIR)", summary: "write a layer dir (an upper dir) as an OCI layer tar",
		help: exportHelp,
		setup: func(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
			f := &exportFlags{}
			f.register(fs)
			return func(ctx context.Context, e *env, args []string) error { return runExport(ctx, e, f, args) }
		},
	})
	register(&command{
		name: "import", args: "[flags] TAR|- DIR", summary: "unpack an OCI layer tar into a layer dir",
		help: importHelp,
		setup: func(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
			f := &importFlags{}
			f.register(fs)
			return func(ctx context.Context, e *env, args []string) error { return runImport(ctx, e, f, args) }
		},
	})
}

// exportSource returns the layer dir and the namespaces of its markers.
func (f *exportFlags) exportSource(args []string) (string, []whiteout.NS, error) {
	if len(args) > 0 {
		return "", nil, usagef("takes no arguments (the layer is given with -o upperdir= or --upper)")
	}
	upper, userxattr := f.upper, false
	if len(f.options) > 0 {
		data := strings.Join(f.options, ",")
		o, err := inspect.ParseOptions(data)
		var oe *unionfs.OptionError
		if errors.As(err, &oe) && oe.Option == "lowerdir" {
			// Exporting needs no lower layers: parse with a placeholder.
			o, err = inspect.ParseOptions("lowerdir=/," + data)
		}
		if err != nil {
			return "", nil, usagef("%v", err)
		}
		if o.Upper == "" {
			return "", nil, usagef("-o needs upperdir=DIR")
		}
		if upper != "" && upper != o.Upper {
			return "", nil, usagef("--upper and -o upperdir= name different directories")
		}
		upper, userxattr = o.Upper, o.UserXattr
	}
	if upper == "" {
		return "", nil, usagef("missing the layer: -o upperdir=DIR or --upper DIR")
	}
	var ns []whiteout.NS
	switch f.xattr {
	case "auto":
		if userxattr {
			ns = []whiteout.NS{whiteout.User}
		}
	case "trusted":
		ns = []whiteout.NS{whiteout.Trusted}
	case "user":
		ns = []whiteout.NS{whiteout.User}
	default:
		return "", nil, usagef("--xattr must be auto, trusted or user, not %q", f.xattr)
	}
	return upper, ns, nil
}

func runExport(ctx context.Context, e *env, f *exportFlags, args []string) error {
	upper, ns, err := f.exportSource(args)
	if err != nil {
		return err
	}
	comp, err := layer.ParseCompression(f.compress)
	if err != nil {
		return usagef("--compress: %v", err)
	}
	if f.gzip {
		if comp == layer.Zstd {
			return usagef("--gzip and --compress=zstd contradict each other")
		}
		comp = layer.Gzip
	}
	abs, err := absPath(upper)
	if err != nil {
		return err
	}
	if st, err := os.Stat(abs); err != nil {
		return err
	} else if !st.IsDir() {
		return fmt.Errorf("%s: not a directory", upper)
	}
	if !f.force {
		if mnt := mountUsing(abs, true); mnt != "" {
			return fmt.Errorf("%s is the upper dir of the live mount %s: unmount it first (or --force; the tar may then mix old and new state)", upper, mnt)
		}
	}
	report := e.stdout
	var out io.Writer
	var commit func() error
	var abort func()
	if f.output == "-" {
		if isTerminal(e.stdout) {
			return usagef("refusing to write a tar archive to a terminal: use --output FILE or a pipe")
		}
		out, report = e.stdout, e.stderr
		commit, abort = func() error { return nil }, func() {}
	} else {
		tmp, err := os.CreateTemp(filepath.Dir(f.output), "."+filepath.Base(f.output)+".tmp-")
		if err != nil {
			return err
		}
		out = tmp
		abort = func() { tmp.Close(); os.Remove(tmp.Name()) }
		commit = func() error {
			if err := tmp.Chmod(0o644); err != nil {
				return err
			}
			if err := tmp.Sync(); err != nil {
				return err
			}
			if err := tmp.Close(); err != nil {
				return err
			}
			return os.Rename(tmp.Name(), f.output)
		}
	}
	res, err := layer.Export(ctx, abs, out, layer.ExportOptions{NS: ns, Compression: comp, Logger: e.log})
	if err == nil {
		err = commit()
	}
	if err != nil {
		abort()
		return err
	}
	fmt.Fprintf(report, "diffid %s\n", res.DiffID)
	if comp != layer.Uncompressed {
		fmt.Fprintf(report, "digest %s\n", res.Digest)
	}
	fmt.Fprintf(report, "size %d\n", res.Size)
	for _, s := range res.Skipped {
		fmt.Fprintf(e.stderr, "strata export: skipped %s\n", s)
	}
	return nil
}

func runImport(ctx context.Context, e *env, f *importFlags, args []string) error {
	if len(args) != 2 {
		return usagef("want TAR (or -) and DIR, got %d arguments", len(args))
	}
	for _, d := range []string{f.diffID, f.digest} {
		if d != "" {
			if _, err := layer.ParseDigest(d); err != nil {
				return usagef("%v", err)
			}
		}
	}
	var in io.Reader
	if args[0] == "-" {
		in = os.Stdin
	} else {
		file, err := os.Open(args[0])
		if err != nil {
			return err
		}
		defer file.Close()
		in = file
	}
	ns := whiteout.Trusted
	if f.userxattr {
		ns = whiteout.User
	}
	res, err := layer.Import(ctx, in, args[1], layer.ImportOptions{
		NS: ns, Rootless: f.rootless, SkipDevices: f.skipDevices, SkipRefused: f.skipRefused,
		DiffID: f.diffID, Digest: f.digest, Logger: e.log,
	})
	if res != nil {
		for _, s := range res.Skipped {
			fmt.Fprintf(e.stderr, "strata import: skipped %s\n", s)
		}
		if err == nil {
			for _, r := range res.Refused {
				fmt.Fprintf(e.stderr, "strata import: refused %s\n", r)
			}
		}
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "diffid %s\n", res.DiffID)
	if res.Compression != layer.Uncompressed {
		fmt.Fprintf(e.stdout, "digest %s\n", res.Digest)
	}
	return nil
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// mountUsing returns the mount point of a live strata or kernel overlay
// mount that uses dir as its upper dir (asUpper) or as any layer, or "".
// Not knowing (no /proc) is not a reason to refuse.
func mountUsing(dir string, asUpper bool) string {
	entries, err := status()
	if err != nil {
		return ""
	}
	for _, s := range entries {
		if s.Upper == dir {
			return s.Mountpoint
		}
		if !asUpper {
			for _, l := range s.Lowers {
				if l == dir {
					return s.Mountpoint
				}
			}
		}
	}
	return ""
}
