package inspect

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"strata/unionfs"
	"strata/whiteout"
)

// Layer states in an [Explanation].
const (
	// StateVisible: this layer's object is what the path shows (for a
	// merged directory, the topmost copy, whose attributes show).
	StateVisible = "visible"
	// StateMerged: this layer's directory is merged into the visible one.
	StateMerged = "merged"
	// StateWhiteout: this layer's whiteout decides: the path is hidden.
	StateWhiteout = "whiteout"
	// StateHidden: this layer holds something at the path that does not
	// show; Reason says why.
	StateHidden = "hidden"
	// StateAbsent: this layer holds nothing at the path.
	StateAbsent = "absent"
)

// Explanation is how one path resolves through a stack, and what each
// layer holds there.
type Explanation struct {
	// Path is the explained path, cleaned ("/a/b").
	Path string `json:"path"`
	// Found: the merged tree shows an object at Path.
	Found bool `json:"found"`
	// Type of the visible object ("" when not found).
	Type string `json:"type,omitempty"`
	// Layer decides (for a directory: its topmost copy); -1 when not found.
	Layer int `json:"layer"`
	// Merged lists, for a visible directory, the layers merged into it.
	Merged []MergedDir `json:"merged,omitempty"`
	// WhiteoutLayer is the layer whose whiteout hides the path, or -1.
	WhiteoutLayer int `json:"whiteout_layer"`
	// MissingAt is the parent path that does not resolve to a directory.
	MissingAt string `json:"missing_at,omitempty"`
	// Failed is the error a lookup on the way fails with (a redirect the
	// kernel rejects: EINVAL, EACCES, EPERM), "" when none does.
	Failed string `json:"failed,omitempty"`
	// Redirects lists the redirects the lookup follows on the way (written
	// by a kernel mount with redirect_dir=on when it renamed a directory).
	Redirects []Redirect `json:"redirects,omitempty"`
	// Verdict says it in one line.
	Verdict string `json:"verdict"`
	// Layers says what each layer holds, top first.
	Layers []LayerView `json:"layers"`
}

// MergedDir is one layer's copy of a merged directory.
type MergedDir struct {
	Layer   int    `json:"layer"`   // layer index
	Opacity string `json:"opacity"` // "y", "x" or "-"
	// At is the copy's path in its layer when a redirect moved it.
	At string `json:"at,omitempty"`
}

// Redirect is an overlay.redirect that a lookup follows: the layers below
// the one holding it look the directory up where Value says instead.
type Redirect struct {
	// Path is the directory's path in the merged tree.
	Path string `json:"path"`
	// Layer holds the copy that carries it.
	Layer int `json:"layer"`
	// Value is the attribute as stored: "/a/b" is a path from the layer
	// roots, a name without "/" another entry of the parent directory.
	Value string `json:"value"`
}

// LayerView is what one layer holds at an explained path and what becomes
// of it.
type LayerView struct {
	Layer
	// Holds is what the layer has at the path, on its own.
	Holds Kind   `json:"holds"`
	Mode  string `json:"mode,omitempty"` // permission bits, octal
	UID   uint32 `json:"uid"`            // owner
	GID   uint32 `json:"gid"`            // group
	Size  int64  `json:"size,omitempty"` // of a regular file
	// Target of a symlink.
	Target string `json:"target,omitempty"`
	// Opacity of a directory: "y" opaque, "x" holds xattr whiteouts.
	Opacity string `json:"opacity,omitempty"`
	// At is where the lookup looks in this layer when a redirect moved it
	// from the explained path: Holds, Mode, ... describe what is there.
	At string `json:"at,omitempty"`
	// Redirect is the overlay.redirect of this layer's directory when the
	// lookup follows it.
	Redirect string `json:"redirect,omitempty"`
	// BlockedAt: the layer holds nothing here because its copy of this
	// parent is not a directory (BlockedBy says what it is).
	BlockedAt string `json:"blocked_at,omitempty"`
	BlockedBy Kind   `json:"blocked_by,omitempty"`
	// State is one of the State* constants.
	State string `json:"state"`
	// Reason says why, for the hidden, whiteout and (blocked) absent
	// states.
	Reason string `json:"reason,omitempty"`
	// Notes flag markers that do not mean what they seem (another
	// namespace's, unmarked xattr whiteouts, ".wh." names).
	Notes []string `json:"notes,omitempty"`
}

// Explain resolves each path through the stack, as a lookup through the
// mount does, and reports what every layer holds there and why it shows
// or not.
func (s *Stack) Explain(paths ...string) ([]Explanation, error) {
	out := make([]Explanation, 0, len(paths))
	for _, p := range paths {
		e, err := s.explain(p)
		if err != nil {
			return out, err
		}
		out = append(out, e)
	}
	return out, nil
}

// explainer holds the resolutions and probes of one explained path.
type explainer struct {
	s      *Stack
	comps  []string
	res    []unionfs.Resolution // res[i] resolves comps[:i]
	probes map[[2]int]Object    // (layer, depth) → object
	// failedErr is why the lookup of comps[:len(res)] fails, if it does.
	failedErr error
}

// at returns where the lookup of comps[:depth] looks in layer li: the
// merged path, unless a redirect moved it.
func (x *explainer) at(li, depth int) string {
	if depth < len(x.res) && x.res[depth].Looked != nil {
		return x.res[depth].Looked[li]
	}
	return joinPath(x.comps[:depth])
}

func (s *Stack) explain(path string) (Explanation, error) {
	comps, err := splitPath(path)
	if err != nil {
		return Explanation{}, err
	}
	x := &explainer{s: s, comps: comps, probes: map[[2]int]Object{}}
	// Resolve every prefix: the verdict at each level is the mount's. A
	// lookup that fails (a redirect the kernel rejects) ends the path.
	var failed error
	for i := 0; i <= len(comps); i++ {
		r, err := s.view.Resolve(joinPath(comps[:i]))
		var errno unix.Errno
		if err != nil && errors.As(err, &errno) {
			failed, x.failedErr = err, err
			break
		}
		if err != nil {
			return Explanation{}, err
		}
		x.res = append(x.res, r)
	}
	var r unionfs.Resolution
	if failed == nil {
		r = x.res[len(comps)]
	}
	e := Explanation{Path: joinPath(comps), Found: r.Found, Layer: -1, WhiteoutLayer: -1, MissingAt: r.MissingAt}
	if failed == nil {
		e.WhiteoutLayer = r.WhiteoutLayer
	} else {
		e.Failed = failed.Error()
	}
	if e.MissingAt != "" {
		e.MissingAt = "/" + e.MissingAt
	}
	if len(x.res) > 0 {
		for _, h := range x.res[len(x.res)-1].Redirects {
			e.Redirects = append(e.Redirects, Redirect{Path: h.Path, Layer: h.Layer, Value: h.Value})
		}
	}
	if r.Found {
		e.Layer, e.Type = r.Layer, kindOf(&r.Stat).String()
		for _, d := range r.Dirs {
			md := MergedDir{Layer: d.Layer, Opacity: d.Opacity.String()}
			if d.Path != e.Path {
				md.At = d.Path
			}
			e.Merged = append(e.Merged, md)
		}
	}
	n := len(comps)
	for li, l := range s.layers {
		o, err := x.probe(li, n)
		if err != nil {
			return e, err
		}
		v := LayerView{Layer: l, Holds: o.Kind}
		if at := x.at(li, n); at != e.Path {
			v.At = at
		}
		for _, d := range r.Dirs {
			if d.Layer == li {
				v.Redirect = d.Redirect
			}
		}
		if o.Kind != None {
			if o.Kind != Symlink {
				v.Mode = fmt.Sprintf("%04o", o.Stat.Mode&0o7777)
			}
			v.UID, v.GID = o.Stat.Uid, o.Stat.Gid
			if o.Kind == File {
				v.Size = o.Stat.Size
			}
			v.Target = o.Target
			if o.Kind == Dir && o.Opacity != whiteout.NotOpaque {
				v.Opacity = o.Opacity.String()
			}
		}
		if o.BlockedAt != "" {
			v.BlockedAt, v.BlockedBy = o.BlockedAt, o.BlockedBy
		}
		switch {
		case failed != nil && o.Kind != None:
			v.State, v.Reason = StateHidden, "the lookup fails on the way: "+failed.Error()
		case failed != nil:
			v.State = StateAbsent
		case r.Found && li == r.Layer:
			v.State = StateVisible
		case r.Found && slices.ContainsFunc(r.Dirs, func(d unionfs.DirLayer) bool { return d.Layer == li }):
			v.State = StateMerged
		case !r.Found && li == r.WhiteoutLayer:
			v.State, v.Reason = StateWhiteout, "hides the layers below"
		case o.Kind == None:
			v.State = StateAbsent
			if o.BlockedAt != "" {
				v.Reason = fmt.Sprintf("%s is %s in this layer", o.BlockedAt, withArticle(o.BlockedBy))
			}
		default:
			v.State = StateHidden
			if v.Reason, err = x.why(li); err != nil {
				return e, err
			}
		}
		if v.Notes, err = x.notes(li, o); err != nil {
			return e, err
		}
		e.Layers = append(e.Layers, v)
	}
	if e.Verdict, err = x.verdict(e.Layers); err != nil {
		return e, err
	}
	if len(e.Redirects) > 0 {
		var hops []string
		for _, h := range e.Redirects {
			hops = append(hops, fmt.Sprintf("%s (layer %d) -> %s", h.Path, h.Layer, h.Value))
		}
		e.Verdict += "; redirect followed: " + strings.Join(hops, ", ")
	}
	return e, nil
}

// probe returns what layer li holds at comps[:depth].
func (x *explainer) probe(li, depth int) (Object, error) {
	k := [2]int{li, depth}
	if o, ok := x.probes[k]; ok {
		return o, nil
	}
	o, err := x.s.Probe(li, x.at(li, depth))
	if err != nil {
		return o, err
	}
	x.probes[k] = o
	return o, nil
}

// contributes reports whether layer li is part of what comps[:depth]
// resolves to: a merged directory's layer, the deciding layer, or the
// whiteout that hides it.
func (x *explainer) contributes(li, depth int) bool {
	r := x.res[depth]
	if !r.Found {
		return r.WhiteoutLayer == li
	}
	if r.Stat.Mode&unix.S_IFMT == unix.S_IFDIR {
		return slices.ContainsFunc(r.Dirs, func(d unionfs.DirLayer) bool { return d.Layer == li })
	}
	return r.Layer == li
}

// why explains why layer li's object at the explained path is hidden: at
// the shallowest level where li drops out of the resolution, the layers of
// the parent directory above li show what stopped it (fs/overlayfs/namei.c:
// ovl_lookup: the first layer holding a name decides; a directory merges
// down until an opaque copy, a whiteout or a non-directory).
func (x *explainer) why(li int) (string, error) {
	for depth := 1; depth < len(x.res); depth++ {
		if x.contributes(li, depth) {
			continue
		}
		p := joinPath(x.comps[:depth])
		last := depth == len(x.comps)
		at := p
		if !last {
			at = "parent " + p
		}
		// li contributed to the parent, a directory: walk the parent's
		// layers above li, as the lookup did.
		parent := x.res[depth-1]
		topDir := -1
		for _, d := range parent.Dirs {
			if d.Layer == li {
				break
			}
			o, err := x.probe(d.Layer, depth)
			if err != nil {
				return "", err
			}
			l := x.s.layers[d.Layer]
			switch {
			case o.Kind == None:
				continue
			case o.Kind.IsWhiteout() && topDir < 0:
				return fmt.Sprintf("hidden by %s at %s in %s", withArticle(o.Kind), p, l), nil
			case o.Kind.IsWhiteout():
				return fmt.Sprintf("hidden: the %s at %s in %s ends the merge of the directory", o.Kind, p, l), nil
			case o.Kind != Dir && topDir < 0:
				return fmt.Sprintf("hidden: %s has a non-directory (%s) at %s above", l, o.Kind, p), nil
			case o.Kind != Dir:
				return fmt.Sprintf("hidden: %s has a non-directory (%s) at %s, which ends the merge of the directory", l, o.Kind, p), nil
			case o.Opacity == whiteout.Opaque:
				return fmt.Sprintf("hidden: %s is opaque in %s", at, l), nil
			}
			if topDir < 0 {
				topDir = d.Layer
			}
		}
		if topDir >= 0 {
			// Directories above, none opaque: li's own object ends the
			// merge (only possible at the last level; above it li holds
			// directories).
			o, err := x.probe(li, depth)
			if err != nil {
				return "", err
			}
			if o.Kind.IsWhiteout() {
				return fmt.Sprintf("covered by the directory at %s in %s; this %s ends its merge, hiding the layers below", p, x.s.layers[topDir], o.Kind), nil
			}
			return fmt.Sprintf("hidden: the directory at %s in %s covers it (a non-directory below a directory ends the merge)", p, x.s.layers[topDir]), nil
		}
		return fmt.Sprintf("hidden at %s (the lookup excluded this layer; no marker above explains it)", at), nil
	}
	return "hidden (the lookup excluded this layer; no marker above explains it)", nil
}

// notes flags markers in layer li's object that a reader may misjudge.
func (x *explainer) notes(li int, o Object) ([]string, error) {
	var notes []string
	if len(x.comps) > 0 && strings.HasPrefix(x.comps[len(x.comps)-1], ".wh.") && o.Kind != None {
		notes = append(notes, "a name starting with .wh. is an OCI/AUFS whiteout marker; overlay shows it as an ordinary entry (see strata fsck)")
	}
	if o.Kind == None {
		return notes, nil
	}
	ns := x.s.NS()
	other := whiteout.User
	if ns == whiteout.User {
		other = whiteout.Trusted
	}
	if len(x.res) == len(x.comps)+1 && x.res[len(x.comps)].Found {
		for _, d := range x.res[len(x.comps)].Dirs {
			if d.Layer == li && d.Redirect != "" {
				notes = append(notes, redirectNote(d.Redirect))
			}
		}
	}
	err := x.s.withParent(li, x.at(li, len(x.comps)), func(dirfd int, name string) error {
		if o.Kind == XattrWhiteout {
			if li == 0 && x.s.upper {
				notes = append(notes, "an xattr whiteout in the upper dir: lookup hides the name, but kernel readdir lists it (xattr whiteouts are a lower-layer format)")
			} else if parent, err := x.probe(li, len(x.comps)-1); err == nil && parent.Opacity != whiteout.XattrWhiteouts {
				notes = append(notes, "an xattr whiteout in a directory not marked "+ns.Opaque()+"=x: lookup hides the name, but readdir lists it")
			}
		}
		if o.Kind == File && whiteout.MaybeXattrWhiteout(&o.Stat) {
			if wh, err := whiteout.HasWhiteoutXattr(dirfd, name, other); err == nil && wh {
				notes = append(notes, fmt.Sprintf("carries %s, ignored: this stack reads %s* (check -o userxattr)", other.Whiteout(), ns.Prefix()))
			}
		}
		if o.Kind == Dir {
			if op, err := whiteout.GetOpacity(dirfd, name, other); err == nil && op != whiteout.NotOpaque {
				notes = append(notes, fmt.Sprintf("carries %s=%s, ignored: this stack reads %s* (check -o userxattr)", other.Opaque(), op, ns.Prefix()))
			}
			if len(x.comps) == 0 && o.Opacity == whiteout.Opaque {
				notes = append(notes, "opaque=y on a layer root is ignored")
			}
		}
		return nil
	})
	return notes, err
}

// redirectNote explains a followed redirect value.
func redirectNote(value string) string {
	if strings.HasPrefix(value, "/") {
		return fmt.Sprintf("redirect %q followed: the layers below hold this directory at %s (a kernel mount with redirect_dir=on renamed it)", value, value)
	}
	return fmt.Sprintf("redirect %q followed: the layers below hold this directory as %q in the parent directory (a kernel mount with redirect_dir=on renamed it)", value, value)
}

// verdict says in one line what the path resolves to.
func (x *explainer) verdict(views []LayerView) (string, error) {
	if len(x.res) <= len(x.comps) {
		at := joinPath(x.comps[:len(x.res)])
		return fmt.Sprintf("not visible: the lookup of %s fails: %s", at, x.failedErr), nil
	}
	r := x.res[len(x.comps)]
	layers := x.s.layers
	if r.Found {
		kind := kindOf(&r.Stat)
		if kind != Dir {
			return fmt.Sprintf("%s from %s", kind, layers[r.Layer]), nil
		}
		var ids []string
		for _, d := range r.Dirs {
			ids = append(ids, fmt.Sprint(d.Layer))
		}
		v := fmt.Sprintf("directory from %s", layers[r.Layer])
		if len(r.Dirs) > 1 {
			v = fmt.Sprintf("directory, merged from layers %s (attributes from layer %d)", strings.Join(ids, ", "), r.Layer)
		}
		if last := r.Dirs[len(r.Dirs)-1]; last.Opacity == whiteout.Opaque && len(x.comps) > 0 {
			v += fmt.Sprintf("; opaque in layer %d: hides the layers below", last.Layer)
		}
		return v, nil
	}
	switch {
	case r.WhiteoutLayer >= 0:
		return fmt.Sprintf("not visible: whiteout in %s", layers[r.WhiteoutLayer]), nil
	case r.MissingAt != "":
		m, err := x.s.view.Resolve(r.MissingAt)
		if err != nil {
			return "", err
		}
		switch {
		case m.Found:
			return fmt.Sprintf("not visible: /%s is %s from %s", r.MissingAt, withArticle(kindOf(&m.Stat)), layers[m.Layer]), nil
		case m.WhiteoutLayer >= 0:
			return fmt.Sprintf("not visible: /%s is hidden by a whiteout in %s", r.MissingAt, layers[m.WhiteoutLayer]), nil
		}
		return fmt.Sprintf("not visible: /%s does not exist", r.MissingAt), nil
	}
	for _, v := range views {
		if v.State == StateHidden {
			return "not visible; " + v.Reason, nil
		}
	}
	return "not visible: no layer holds it", nil
}

// withArticle renders a kind with its indefinite article.
func withArticle(k Kind) string {
	if strings.ContainsRune("aeiou", rune(k.String()[0])) || k == XattrWhiteout { // "an ex-attr"
		return "an " + k.String()
	}
	return "a " + k.String()
}
