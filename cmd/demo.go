package cmd

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"strata/unionfs"
	"strata/whiteout"
)

const demoHelp = `Builds the classic overlay example in a temporary directory,
  lower: a ("a from lower"), c ("c from lower")
  upper: a ("a from upper"), b ("b from upper")
mounts it with strata, and walks through the classic steps: write to an
upper file, write to a lower file (copy-up), delete a name the lower layer
also holds (whiteout), create a new file. After each step it prints the
merged view and each layer, markers included. Then it unmounts and removes
the directory (unless --keep).`

func init() {
	register(&command{
		name: "demo", args: "[flags]", summary: "mount an example stack, change it, show every layer", help: demoHelp,
		setup: func(f *pflag.FlagSet) func(context.Context, *env, []string) error {
			keep := f.Bool("keep", false, "keep the example directory")
			dir := f.String("dir", "", "build the example here (default: a new temporary directory)")
			return func(ctx context.Context, e *env, args []string) error {
				if len(args) > 0 {
					return usagef("takes no arguments")
				}
				return runDemo(ctx, e, *dir, *keep)
			}
		},
	})
}

func runDemo(ctx context.Context, e *env, dir string, keep bool) (err error) {
	if dir == "" {
		if dir, err = os.MkdirTemp("", "strata-demo-"); err != nil {
			return err
		}
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if !keep {
		defer os.RemoveAll(dir)
	}
	p := func(n string) string { return filepath.Join(dir, n) }
	for _, d := range []string{"lower", "upper", "work", "merged"} {
		if err := os.Mkdir(p(d), 0o755); err != nil {
			return err
		}
	}
	files := map[string]string{"lower/a": "a from lower\n", "lower/c": "c from lower\n", "upper/a": "a from upper\n", "upper/b": "b from upper\n"}
	for name, data := range files {
		if err := os.WriteFile(p(name), []byte(data), 0o644); err != nil {
			return err
		}
	}
	o, err := unionfs.ParseOptions(fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", p("lower"), p("upper"), p("work")))
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		o.UserXattr = true
	}
	fmt.Fprintf(e.stdout, "$ strata mount -o %s %s\n", o.String(), p("merged"))
	// Unmount whatever happens to the output (a closed pipe) or to us
	// (Ctrl-C).
	signal.Ignore(syscall.SIGPIPE)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	srv, err := unionfs.Mount(p("merged"), o)
	if err != nil {
		return err
	}
	go func() {
		if _, ok := <-sigs; ok {
			srv.Unmount()
			os.RemoveAll(dir)
			os.Exit(130)
		}
	}()
	defer func() {
		if uerr := srv.Unmount(); uerr != nil && err == nil {
			err = uerr
		}
		fmt.Fprintf(e.stdout, "\n$ strata umount %s\n", p("merged"))
		if keep {
			fmt.Fprintf(e.stdout, "example kept in %s\n", dir)
		}
	}()
	ns := o.NS()
	show := func(title string) {
		fmt.Fprintf(e.stdout, "\n== %s\n", title)
		for _, d := range []string{"merged", "upper", "lower"} {
			fmt.Fprintf(e.stdout, "  %s/\n", d)
			showDir(e.stdout, p(d), ns)
		}
	}
	show("mounted: the upper a hides the lower a; b and c show through")
	steps := []struct {
		cmd  string
		what string
		do   func() error
	}{
		{"echo more >> merged/b", "write to an upper file: it changes in place", func() error { return appendFile(p("merged/b"), "more\n") }},
		{"echo more >> merged/c", "write to a lower file: c is copied up first; the lower c is untouched", func() error { return appendFile(p("merged/c"), "more\n") }},
		{"rm merged/a", "delete a name the lower layer also holds: a whiteout (char 0/0) hides the lower a", func() error { return os.Remove(p("merged/a")) }},
		{"echo new > merged/d", "create a new file: it lands in the upper layer", func() error { return os.WriteFile(p("merged/d"), []byte("new\n"), 0o644) }},
	}
	for _, st := range steps {
		fmt.Fprintf(e.stdout, "\n$ %s\n", st.cmd)
		if err := st.do(); err != nil {
			return err
		}
		show(st.what)
	}
	return nil
}

func appendFile(path, data string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// showDir prints each entry of dir: type, name, content or marker.
func showDir(w io.Writer, dir string, ns whiteout.NS) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		fmt.Fprintf(w, "    (%v)\n", err)
		return
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Name() < entries[j].Name() })
	if len(entries) == 0 {
		fmt.Fprintf(w, "    (empty)\n")
	}
	for _, ent := range entries {
		path := filepath.Join(dir, ent.Name())
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			fmt.Fprintf(w, "    %s: %v\n", ent.Name(), err)
			continue
		}
		switch {
		case whiteout.IsCharWhiteout(&st):
			fmt.Fprintf(w, "    c--------- %-4s whiteout (character device 0/0)\n", ent.Name())
		case st.Mode&unix.S_IFMT == unix.S_IFDIR:
			op, _ := whiteout.GetOpacity(unix.AT_FDCWD, path, ns)
			marker := ""
			if op != whiteout.NotOpaque {
				marker = fmt.Sprintf(" (%s=%s)", ns.Opaque(), op)
			}
			fmt.Fprintf(w, "    d %s/%s\n", ent.Name(), marker)
		default:
			data, _ := os.ReadFile(path)
			fmt.Fprintf(w, "    - %-4s %q\n", ent.Name(), strings.TrimSpace(string(data)))
		}
	}
}
