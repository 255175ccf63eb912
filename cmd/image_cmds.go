package cmd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/spf13/pflag"

	"strata/image"
	"strata/layer"
	"strata/unionfs"
	"strata/whiteout"
)

// "strata image SUBCOMMAND": container images in a chainID layer store.
// The logic lives in package image; this file parses, dispatches and
// prints.

// imageSub is one subcommand of "strata image".
type imageSub struct {
	name, args, summary, help string
	setup                     func(fs *pflag.FlagSet) func(ctx context.Context, e *env, args []string) error
}

var imageSubs = []*imageSub{
	{name: "unpack", args: "--store DIR [flags] SOURCE", summary: "unpack an OCI layout or docker save into the store",
		help: `SOURCE is an OCI image layout (a directory with oci-layout and index.json, or a
tar of one) or a "docker save" tarball (or its extracted directory). Every
blob digest and every layer's diffID is verified; each layer is unpacked once
into DIR/layers/<chainID>/diff, shared by all images that have it. On any
error the store is left as it was.

A source with several images needs --ref (a name, tag or manifest digest);
several platforms of one image resolve to this machine's. The image is
stored under its own name (OCI ref annotation, docker RepoTag), else its
config digest, unless --name is given.`,
		setup: imageUnpackSetup},
	{name: "ls", args: "--store DIR [--json]", summary: "list images and layers, with sizes and sharing",
		help: `Lists the images (name, ID, layers, size, bytes shared with other images),
then the layers (chainID, size, the images that use it; "-" marks a layer
no image uses, which "strata image prune" removes). Sizes are bytes of file
data.`,
		setup: imageLsSetup},
	{name: "rm", args: "--store DIR [--force] NAME...", summary: "remove images and the layers no other image uses",
		help: `Removes each image and those of its layers no other image uses. A layer that a
live mount uses is not removed (and the image stays) unless --force.`,
		setup: imageRmSetup},
	{name: "prune", args: "--store DIR", summary: "remove layers no image uses, and leftovers of interrupted unpacks",
		setup: imagePruneSetup},
	{name: "mount", args: "--store DIR [flags] IMAGE[:TAG] MOUNTPOINT", summary: "mount an image's layers (read-only, or writable with --upper/--work)",
		help: `Mounts the image's layers, top first, as the lower layers of a union (the
lowerdir= of a mount); with --upper and --work the mount is writable and
changes go to the upper dir (export them with "strata export"). IMAGE is a
name ("alpine" means "alpine:latest"; "alpine:3" also finds
"docker.io/library/alpine:3"), an image ID or a unique prefix of one. A
store made without root uses the userxattr format, and so does the mount.
The mount is made by "strata mount"; --mode, --foreground, --dry-run and -o
(extra mount options) are passed on to it.`,
		setup: imageMountSetup},
}

func init() {
	var list strings.Builder
	list.WriteString("Subcommands:\n")
	for _, s := range imageSubs {
		fmt.Fprintf(&list, "  %-8s %s\n", s.name, s.summary)
	}
	list.WriteString(`
The store (--store DIR, or $STRATA_STORE) holds each layer once, under its
chainID, and one record per image. Run "strata image SUBCOMMAND --help" for
a subcommand's flags.`)
	register(&command{
		name: "image", args: "SUBCOMMAND [flags] [args]", summary: "unpack, list, remove and mount container images",
		help: list.String(),
		setup: func(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
			// Everything after the subcommand is its own.
			fs.SetInterspersed(false)
			return runImage
		},
	})
}

func runImage(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("missing SUBCOMMAND (unpack, ls, rm, prune, mount; see strata image --help)")
	}
	var sub *imageSub
	for _, s := range imageSubs {
		if s.name == args[0] {
			sub = s
		}
	}
	if sub == nil {
		return usagef("unknown subcommand %q (see strata image --help)", args[0])
	}
	fs := pflag.NewFlagSet("strata image "+sub.name, pflag.ContinueOnError)
	fs.SetOutput(e.stderr)
	fs.SortFlags = false
	logLevel := fs.String("log-level", "", "log level: debug, info, warn or error")
	runFn := sub.setup(fs)
	fs.Usage = func() {
		fmt.Fprintf(e.stdout, "Usage: strata image %s %s\n\n%s\n", sub.name, sub.args, sub.summary)
		if sub.help != "" {
			fmt.Fprintf(e.stdout, "\n%s\n", sub.help)
		}
		fmt.Fprintf(e.stdout, "\nFlags:\n%s", fs.FlagUsages())
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil
		}
		return usagef("%s: %v", sub.name, err)
	}
	if *logLevel != "" {
		if err := e.logLevel.UnmarshalText([]byte(*logLevel)); err != nil {
			return usagef("bad --log-level %q", *logLevel)
		}
	}
	return runFn(ctx, e, fs.Args())
}

// storeFlags are the flags every image subcommand takes.
type storeFlags struct {
	store     string
	userxattr bool
}

func (f *storeFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.store, "store", os.Getenv("STRATA_STORE"), "the layer store directory (default $STRATA_STORE)")
}

func (f *storeFlags) open(e *env) (*image.Store, error) {
	if f.store == "" {
		return nil, usagef("missing --store DIR (or $STRATA_STORE)")
	}
	s, err := image.Open(f.store, image.Options{UserXattr: f.userxattr, Logger: e.log})
	if err != nil {
		return nil, err
	}
	return s, nil
}

func imageUnpackSetup(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
	sf := &storeFlags{}
	sf.register(fs)
	ref := fs.String("ref", "", "the image to take from a SOURCE that holds several (name, tag or manifest digest)")
	name := fs.String("name", "", "store the image under this name (default: its own name, else its config digest)")
	fs.BoolVar(&sf.userxattr, "userxattr", false, "make a new store in the userxattr format (automatic without root)")
	return func(ctx context.Context, e *env, args []string) error {
		if len(args) != 1 {
			return usagef("unpack: want exactly one SOURCE, got %d arguments", len(args))
		}
		s, err := sf.open(e)
		if err != nil {
			return err
		}
		src, err := image.OpenSource(args[0])
		if err != nil {
			return err
		}
		defer src.Close()
		res, err := s.Unpack(ctx, src, image.UnpackOptions{Ref: *ref, Name: *name})
		if err != nil {
			return err
		}
		img := res.Image
		fmt.Fprintf(e.stdout, "%s %s: %d layers (%d new, %d already stored), %s\n", img.Name, shortID(img.ID),
			len(img.Layers), len(res.New), len(res.Reused), humanSize(img.Size()))
		for _, sk := range res.Skipped {
			fmt.Fprintf(e.stderr, "strata image unpack: skipped %s\n", sk)
		}
		return nil
	}
}

func imageLsSetup(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
	sf := &storeFlags{}
	sf.register(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	return func(ctx context.Context, e *env, args []string) error {
		if len(args) > 0 {
			return usagef("ls: takes no arguments")
		}
		s, err := sf.open(e)
		if err != nil {
			return err
		}
		imgs, err := s.Images()
		if err != nil {
			return err
		}
		layers, err := s.Layers()
		if err != nil {
			return err
		}
		users := map[string]int{}
		for _, l := range layers {
			users[l.ChainID] = len(l.Images)
		}
		if *asJSON {
			type jsonImage struct {
				*image.Image
				Size   int64 `json:"size"`
				Shared int64 `json:"shared"`
			}
			out := struct {
				Store  string            `json:"store"`
				Xattr  string            `json:"xattr"`
				Images []jsonImage       `json:"images"`
				Layers []image.LayerInfo `json:"layers"`
			}{Store: s.Root(), Xattr: s.NS().String(), Images: []jsonImage{}, Layers: layers}
			for _, img := range imgs {
				img.Config = nil
				out.Images = append(out.Images, jsonImage{img, img.Size(), sharedSize(img, users)})
			}
			if out.Layers == nil {
				out.Layers = []image.LayerInfo{}
			}
			return writeJSON(e.stdout, out)
		}
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "IMAGE\tID\tLAYERS\tSIZE\tSHARED")
		for _, img := range imgs {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", showPath(img.Name), shortID(img.ID), len(img.Layers),
				humanSize(img.Size()), humanSize(sharedSize(img, users)))
		}
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "LAYER (chainID)\tSIZE\tIMAGES")
		sort.Slice(layers, func(i, j int) bool { return layers[i].ChainID < layers[j].ChainID })
		for _, l := range layers {
			names := "-"
			if len(l.Images) > 0 {
				names = strings.Join(l.Images, ",")
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", shortID(l.ChainID), humanSize(l.Size), names)
		}
		return tw.Flush()
	}
}

// sharedSize is the size of an image's layers that other images use too.
func sharedSize(img *image.Image, users map[string]int) int64 {
	var n int64
	for _, l := range img.Layers {
		if users[l.ChainID] > 1 {
			n += l.Size
		}
	}
	return n
}

// inUse refuses removing layers a live mount uses.
func inUse(dirs []string) error {
	for _, d := range dirs {
		if mnt := mountUsing(d, false); mnt != "" {
			return fmt.Errorf("layer %s is in use by the mount %s (unmount it, or --force)", d, mnt)
		}
	}
	return nil
}

func imageRmSetup(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
	sf := &storeFlags{}
	sf.register(fs)
	force := fs.Bool("force", false, "remove layers even if a live mount uses them")
	return func(ctx context.Context, e *env, args []string) error {
		if len(args) == 0 {
			return usagef("rm: want at least one image NAME")
		}
		s, err := sf.open(e)
		if err != nil {
			return err
		}
		opts := image.RemoveOptions{InUse: inUse}
		if *force {
			opts.InUse = nil
		}
		for _, name := range args {
			res, err := s.Remove(ctx, name, opts)
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "removed %s %s: %d layers removed, %d kept (used by other images)\n",
				res.Image.Name, shortID(res.Image.ID), len(res.Removed), len(res.Kept))
		}
		return nil
	}
}

func imagePruneSetup(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
	sf := &storeFlags{}
	sf.register(fs)
	return func(ctx context.Context, e *env, args []string) error {
		if len(args) > 0 {
			return usagef("prune: takes no arguments")
		}
		s, err := sf.open(e)
		if err != nil {
			return err
		}
		removed, err := s.Prune(ctx, image.RemoveOptions{InUse: inUse})
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "removed %d unused layers\n", len(removed))
		return nil
	}
}

// imageMountFlags are the flags of "strata image mount".
type imageMountFlags struct {
	storeFlags
	upper, work string
	options     []string
	mode        string
	foreground  bool
	dryRun      bool
}

func imageMountSetup(fs *pflag.FlagSet) func(context.Context, *env, []string) error {
	f := &imageMountFlags{}
	f.storeFlags.register(fs)
	fs.StringVar(&f.upper, "upper", "", "upper dir: makes the mount writable (needs --work)")
	fs.StringVar(&f.work, "work", "", "work dir, on the same filesystem as --upper")
	fs.StringArrayVarP(&f.options, "options", "o", nil, "extra mount options, as for strata mount (ro, allow_other, ...)")
	fs.StringVar(&f.mode, "mode", "fuse", "engine: fuse, kernel or auto (as strata mount)")
	fs.BoolVarP(&f.foreground, "foreground", "f", false, "stay in the foreground (as strata mount)")
	fs.BoolVar(&f.dryRun, "dry-run", false, "print what would be mounted, mount nothing")
	return func(ctx context.Context, e *env, args []string) error { return runImageMount(ctx, e, f, args) }
}

// imageMountOptions builds the union of an image.
func imageMountOptions(s *image.Store, img *image.Image, f *imageMountFlags) (unionfs.Options, error) {
	if (f.upper == "") != (f.work == "") {
		return unionfs.Options{}, usagef("mount: --upper and --work go together")
	}
	lowers := s.LowerDirs(img)
	if len(lowers) == 0 {
		return unionfs.Options{}, fmt.Errorf("image %s has no layers", img.Name)
	}
	// Through ParseOptions, so that every default (timeouts, squash ids)
	// is the one a plain mount gets, and -o extras are checked alike.
	d := unionfs.DefaultTimeout
	o := unionfs.Options{Lowers: lowers, Upper: f.upper, Work: f.work, UserXattr: s.NS() == whiteout.User,
		SquashUID: -1, SquashGID: -1, EntryTimeout: d, AttrTimeout: d, NegativeTimeout: d}
	data := o.String()
	if len(f.options) > 0 {
		data += "," + strings.Join(f.options, ",")
	}
	o, err := unionfs.ParseOptions(data)
	if err != nil {
		return o, usagef("mount: %v", err)
	}
	return o, nil
}

func runImageMount(ctx context.Context, e *env, f *imageMountFlags, args []string) error {
	if len(args) != 2 {
		return usagef("mount: want IMAGE and MOUNTPOINT, got %d arguments", len(args))
	}
	s, err := f.open(e)
	if err != nil {
		return err
	}
	img, err := s.Get(args[0])
	if err != nil {
		return err
	}
	o, err := imageMountOptions(s, img, f)
	if err != nil {
		return err
	}
	mf := &mountFlags{mode: f.mode, foreground: f.foreground, dryRun: f.dryRun, readyFd: -1}
	if f.mode == "fuse" && o.FsName == "" {
		// The mount table names the image. Only for FUSE: fsname is an
		// option kernel overlay cannot take, and auto would fall back.
		o.FsName = "strata:" + img.Name
	}
	return mountWith(ctx, e, o, args[1], mf)
}

// shortID shortens "sha256:<hex>" to 12 hex digits.
func shortID(d string) string {
	h := strings.TrimPrefix(d, layer.DigestPrefix)
	if len(h) > 12 {
		h = h[:12]
	}
	return h
}

// humanSize prints a byte count in B, kB, MB, GB (powers of 1000, as
// docker images does).
func humanSize(n int64) string {
	units := []string{"B", "kB", "MB", "GB", "TB"}
	f := float64(n)
	i := 0
	for f >= 1000 && i < len(units)-1 {
		f /= 1000
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%dB", n)
	}
	return fmt.Sprintf("%.3g%s", f, units[i])
}
