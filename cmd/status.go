package cmd

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/pflag"

	"strata/unionfs"
)

// statusEntry is one line of "strata status".
type statusEntry struct {
	Mountpoint string   `json:"mountpoint"`
	Engine     string   `json:"engine"`
	Source     string   `json:"source"`
	Format     string   `json:"format,omitempty"`
	Lowers     []string `json:"lowers,omitempty"`
	Upper      string   `json:"upper,omitempty"`
	Work       string   `json:"work,omitempty"`
	Pid        int      `json:"pid,omitempty"`
	Note       string   `json:"note,omitempty"`
}

func init() {
	register(&command{
		name: "status", args: "[flags]", summary: "list live strata and kernel overlay mounts",
		help: "Lists every strata (FUSE) and kernel overlay mount of this mount namespace, with its\nlayers and the engine that serves it. The layers of a FUSE mount are known for\nmounts made by this user.",
		setup: func(f *pflag.FlagSet) func(context.Context, *env, []string) error {
			asJSON := f.Bool("json", false, "print JSON")
			return func(ctx context.Context, e *env, args []string) error {
				if len(args) > 0 {
					return usagef("takes no arguments")
				}
				entries, err := status()
				if err != nil {
					return err
				}
				if *asJSON {
					enc := json.NewEncoder(e.stdout)
					enc.SetIndent("", "  ")
					if entries == nil {
						entries = []statusEntry{}
					}
					return enc.Encode(entries)
				}
				tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "MOUNTPOINT\tENGINE\tFORMAT\tLOWERS (top first)\tUPPER\tPID")
				for _, s := range entries {
					lowers := strings.Join(s.Lowers, ":")
					if lowers == "" {
						lowers = "?"
					}
					upper := s.Upper
					if upper == "" {
						upper = "-"
					}
					pid := "-"
					if s.Pid > 0 {
						pid = fmt.Sprint(s.Pid)
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Mountpoint, s.Engine, orDash(s.Format), lowers, upper, pid)
				}
				return tw.Flush()
			}
		},
	})
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func status() ([]statusEntry, error) {
	mounts, err := unionfs.ReadMounts()
	if err != nil {
		return nil, err
	}
	var out []statusEntry
	for _, m := range mounts {
		s := statusEntry{Mountpoint: m.Mountpoint, Engine: string(m.Engine), Source: m.Source}
		o := m.Options
		if m.Engine == unionfs.EngineFUSE {
			if st, err := unionfs.ReadState(m.Mountpoint); err == nil {
				if po, err := unionfs.ParseOptions(st.Options); err == nil {
					o = po
				}
				s.Pid = st.Pid
			} else {
				s.Note = "layers unknown (mounted by another user, or its server is gone)"
			}
		}
		if len(o.Lowers) > 0 {
			s.Lowers, s.Upper, s.Work = o.Lowers, o.Upper, o.Work
			s.Format = o.NS().String()
		}
		out = append(out, s)
	}
	return out, nil
}
