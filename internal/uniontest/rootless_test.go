package uniontest

import (
	"reflect"
	"strings"
	"testing"
)

func TestUnprivilegedAdaptsFixtures(t *testing.T) {
	c := Case{
		Name: "c",
		Lowers: []Layer{
			{File("f", "f", 0o644), Chown("f", 5, 6), Chown("g", 7, 7), Xattr("f", "trusted.t", "t"), Xattr("f", "user.u", "u")},
			{Whiteout("w"), CharDev("wh", 0, 0), Xattr("f", "security.s", "s")},
		},
		Upper: Layer{},
	}
	got, dropped, why := Unprivileged(c, 7, 7)
	if why != "" {
		t.Fatalf("why = %q, want none", why)
	}
	var kept []string
	for _, l := range got.Lowers {
		for _, a := range l {
			kept = append(kept, a.String())
		}
	}
	want := []string{`file "f" 0644 len=1`, `chown "g" 7:7`, `xattr "f" user.u="u"`, `whiteout "w"`, `char "wh" 0:0`}
	if !reflect.DeepEqual(kept, want) {
		t.Errorf("kept %q, want %q", kept, want)
	}
	if len(dropped) != 3 || !strings.Contains(dropped[0], `chown "f" 5:6`) || !strings.Contains(dropped[2], "security.s") {
		t.Errorf("dropped %q", dropped)
	}
	if got.Upper == nil || len(c.Lowers[0]) != 5 {
		t.Errorf("upper %v (want empty, not nil); the original case changed: %d appliers", got.Upper, len(c.Lowers[0]))
	}
	if _, _, why := Unprivileged(Case{Lowers: []Layer{{BlockDev("b", 7, 0)}}}, 0, 0); !strings.Contains(why, `block "b" 7:0`) {
		t.Errorf("block device: why = %q", why)
	}
}

func TestSplitPattern(t *testing.T) {
	for p, want := range map[string][]string{
		"":                       nil,
		"TestX":                  {"TestX"},
		"TestX/user/a|b":         {"TestX", "user", "a|b"},
		"TestX/(a/b|c)/[/]x/\\/": {"TestX", "(a/b|c)", "[/]x", "\\/"},
	} {
		if got := splitPattern(p); !reflect.DeepEqual(got, want) {
			t.Errorf("splitPattern(%q) = %q, want %q", p, got, want)
		}
	}
}
