package whiteout_test

import (
	"errors"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"strata/whiteout"
)

// TestParseRedirect: the values a kernel lookup accepts (checked against
// Linux 6.18 by mounting: invalid ones fail the lookup with EINVAL).
func TestParseRedirect(t *testing.T) {
	for _, c := range []struct {
		val   string
		abs   bool
		comps []string
		name  string
		bad   bool
	}{
		{val: "/old", abs: true, comps: []string{"old"}},
		{val: "/a/b/c", abs: true, comps: []string{"a", "b", "c"}},
		{val: "old", name: "old"},
		{val: "..", name: ".."}, // passes; the lookup that reaches it fails with EACCES
		{val: "/a/../b", abs: true, comps: []string{"a", "..", "b"}},
		{val: "/old\x00junk", abs: true, comps: []string{"old"}},
		{val: "", bad: true},
		{val: "\x00x", bad: true},
		{val: "/", bad: true},
		{val: "a/b", bad: true},
		{val: "/a//b", bad: true},
		{val: "/a/", bad: true},
		{val: "//a", bad: true},
	} {
		r, err := whiteout.ParseRedirect([]byte(c.val))
		if c.bad {
			if !errors.Is(err, unix.EINVAL) {
				t.Errorf("%q: %+v %v; want EINVAL", c.val, r, err)
			}
			continue
		}
		if err != nil || r.Abs != c.abs || !slices.Equal(r.Comps, c.comps) || r.Name != c.name {
			t.Errorf("%q: %+v %v; want abs=%v comps=%q name=%q", c.val, r, err, c.abs, c.comps, c.name)
		}
	}
}
