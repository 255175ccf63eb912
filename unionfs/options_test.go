package unionfs

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseOptions(t *testing.T) {
	o, err := ParseOptions(`lowerdir=/a\:b:/c\,d:/e,upperdir=/u,workdir=/w,userxattr,nosuid,noatime,allow_other,timeout=2.5,fsync=0`)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"/a:b", "/c,d", "/e"}; !reflect.DeepEqual(o.Lowers, want) {
		t.Errorf("Lowers = %q, want %q", o.Lowers, want)
	}
	if o.Upper != "/u" || o.Work != "/w" || !o.UserXattr || !o.AllowOther || !o.NoSync {
		t.Errorf("parsed %+v", o)
	}
	if !reflect.DeepEqual(o.MountFlags, []string{"nosuid", "noatime"}) {
		t.Errorf("MountFlags = %q", o.MountFlags)
	}
	if o.EntryTimeout != 2500*time.Millisecond {
		t.Errorf("EntryTimeout = %v", o.EntryTimeout)
	}
}

func TestParseOptionsErrors(t *testing.T) {
	cases := map[string]string{
		"":                                            "lowerdir",
		"upperdir=/u,workdir=/w":                      "lowerdir",
		"lowerdir=":                                   "needs at least one",
		"lowerdir=/a::/b":                             "data-only",
		"lowerdir=/a,upperdir=/u":                     "together",
		"lowerdir=/a,bogus":                           "unknown option",
		"lowerdir=/a,redirect_dir=on":                 "not supported",
		"lowerdir=/a,index=on":                        "not supported",
		"lowerdir=/a,metacopy=on":                     "not supported",
		"lowerdir=/a,override_creds":                  "not supported",
		"lowerdir=/a,squash_to_uid=x":                 "numeric",
		"lowerdir=/a,uidmapping=0:1000":               "triples",
		"lowerdir=/a,fsync=2":                         "0 or 1",
		"lowerdir=/a,squash_to_root,uidmapping=0:1:1": "cannot be combined",
	}
	for in, want := range cases {
		_, err := ParseOptions(in)
		var oe *OptionError
		if err == nil || !errors.As(err, &oe) || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseOptions(%q) = %v, want an OptionError containing %q", in, err, want)
		}
	}
	many := "lowerdir=" + strings.Repeat("/l:", MaxLowers) + "/l"
	if _, err := ParseOptions(many); err == nil {
		t.Errorf("%d lowers accepted", MaxLowers+1)
	}
}

func TestKernelOptionsAccepted(t *testing.T) {
	// Values matching what strata does are accepted, like mount(8) helpers
	// pass them.
	for _, in := range []string{"redirect_dir=off", "index=off", "metacopy=off", "xino=auto", "nfs_export=off", "rw", "defaults", "dev", "suid", "exec"} {
		if _, err := ParseOptions("lowerdir=/a," + in); err != nil {
			t.Errorf("%s: %v", in, err)
		}
	}
}

func TestOptionsRoundTrip(t *testing.T) {
	for _, in := range []string{
		"lowerdir=/a",
		`lowerdir=/with\:colon:/with\,comma:/back\\slash,upperdir=/u\,1,workdir=/w`,
		"lowerdir=/a,upperdir=/u,workdir=/w,userxattr,ro,nodev,allow_other,squash_to_uid=5,squash_to_gid=6,fsync=0,timeout=7",
		"lowerdir=/a,uidmapping=0:1000:1:1:100000:65536,gidmapping=0:1000:1",
	} {
		o, err := ParseOptions(in)
		if err != nil {
			t.Fatalf("%s: %v", in, err)
		}
		o2, err := ParseOptions(o.String())
		if err != nil {
			t.Fatalf("reparse %s: %v", o.String(), err)
		}
		if !reflect.DeepEqual(o, o2) {
			t.Errorf("round trip of %q:\n got %+v\nwant %+v", in, o2, o)
		}
	}
}

func TestKernelData(t *testing.T) {
	o, err := ParseOptions(`lowerdir=/a\:b:/c,upperdir=/u,workdir=/w,userxattr,fsync=0`)
	if err != nil {
		t.Fatal(err)
	}
	data, err := o.KernelData()
	if err != nil {
		t.Fatal(err)
	}
	if want := `lowerdir=/a\:b:/c,upperdir=/u,workdir=/w,userxattr,volatile`; data != want {
		t.Errorf("KernelData = %q, want %q", data, want)
	}
	o.SquashUID = 0
	if _, err := o.KernelData(); err == nil || !strings.Contains(err.Error(), "squash") {
		t.Errorf("KernelData with squash: %v, want a squash error", err)
	}
	// Every FUSE-only option is refused by name, none dropped.
	for opt, name := range map[string]string{"allow_other": "allow_other", "default_permissions": "default_permissions",
		"squash_to_gid=3": "squash", "uidmapping=0:1:1": "uidmapping", "fsname=x": "fsname", "timeout=5": "timeout"} {
		o, err := ParseOptions("lowerdir=/a,upperdir=/u,workdir=/w," + opt)
		if err != nil {
			t.Fatalf("%s: %v", opt, err)
		}
		if _, err := o.KernelData(); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("KernelData with %s: %v, want an error naming %s", opt, err, name)
		}
	}
}

func TestValidate(t *testing.T) {
	dir := t.TempDir()
	mk := func(p ...string) string {
		path := filepath.Join(append([]string{dir}, p...)...)
		if err := os.MkdirAll(path, 0o755); err != nil {
			t.Fatal(err)
		}
		return path
	}
	l, u, w := mk("l"), mk("u"), mk("w")
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o644)
	cases := []struct {
		o    Options
		want string
	}{
		{Options{Lowers: []string{l}, Upper: u, Work: w}, ""},
		{Options{Lowers: []string{filepath.Join(dir, "missing")}}, "lowerdir"},
		{Options{Lowers: []string{file}}, "not a directory"},
		{Options{Lowers: []string{l}, Upper: u, Work: u}, "same directory"},
		{Options{Lowers: []string{l}, Upper: u, Work: mk("u", "w")}, "inside upperdir"},
		{Options{Lowers: []string{l}, Upper: mk("w2", "u"), Work: mk("w2")}, "inside workdir"},
		{Options{Lowers: []string{mk("u", "l")}, Upper: u, Work: w}, "inside upperdir"},
		{Options{Lowers: []string{dir}, Upper: u, Work: w}, "inside lowerdir"},
	}
	for i, c := range cases {
		err := c.o.Validate()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("case %d: %v", i, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("case %d: got %v, want error containing %q", i, err, c.want)
		}
	}
	if _, err := os.Stat("/dev/shm"); err == nil {
		shm, err := os.MkdirTemp("/dev/shm", "strata-test-")
		if err == nil {
			defer os.RemoveAll(shm)
			var st1, st2 = statDev(t, dir), statDev(t, shm)
			if st1 != st2 {
				o := Options{Lowers: []string{l}, Upper: u, Work: shm}
				if err := o.Validate(); err == nil || !strings.Contains(err.Error(), "same filesystem") {
					t.Errorf("work on another filesystem: %v", err)
				}
			}
		}
	}
}

func statDev(t *testing.T, p string) uint64 {
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Dev
}

func FuzzParseOptions(f *testing.F) {
	for _, s := range []string{"lowerdir=/a", `lowerdir=/a\:b:/c,upperdir=/u,workdir=/w`, "lowerdir=/a,uidmapping=0:1:2", `lowerdir=\\,fsname=x\,y`, "lowerdir=a,,ro"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		o, err := ParseOptions(s)
		if err != nil {
			return
		}
		o2, err := ParseOptions(o.String())
		if err != nil {
			t.Fatalf("ParseOptions(%q).String() = %q does not parse: %v", s, o.String(), err)
		}
		if !reflect.DeepEqual(o, o2) {
			t.Fatalf("round trip of %q via %q:\n got %+v\nwant %+v", s, o.String(), o2, o)
		}
	})
}
