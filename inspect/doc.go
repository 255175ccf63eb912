// Package inspect holds the offline layer tools: explain, diff, fsck and
// merge. They read (and, for fsck --repair and merge --apply, write) layer
// directories in the kernel's overlay format without mounting them; the CLI
// (cmd/inspect_cmds.go) only parses flags and prints what this package
// returns.
//
// # The rule: the mount's resolution decides
//
// Every verdict about the merged tree (is a path visible, which layer
// decides, which directories merge) comes from [unionfs.Stack.Resolve] and
// [unionfs.Stack.ReadDir], the very code that serves a mount, so a tool
// can never disagree with what a mount shows. This package adds only what
// a mount does not need: what each layer holds on its own at a path
// (probed with one openat(O_PATH|O_NOFOLLOW) per component, so symlinks
// inside layers are never followed), and why a layer's object is hidden.
//
// # Terms
//
// Layers are numbered as in [unionfs.Stack.Layers]: with an upper dir it
// is layer 0 and the lowers follow top to bottom (lowerdir=top:...:bottom
// are layers 1..n); without one the top lower is layer 0. "Lowers-only
// stack" is the stack without its upper dir: what the upper changes is the
// difference between the two.
//
// A workdir is optional for every tool here (none writes through it, and
// explain and diff never touch it). A stack given with upperdir but no
// workdir is resolved with the upper dir as the topmost read-only layer,
// which the resolution code treats exactly as an upper layer.
//
// # What it does not do
//
// It mounts nothing and never follows a symlink inside a layer. Redirects
// (overlay.redirect, written by kernel mounts with redirect_dir=on) are
// followed as a mount follows them: every tool reads an object where the
// resolution found it ([unionfs.Resolution].LayerPath, Looked), explain
// names the redirects, diff shows a renamed directory as a deletion and an
// addition, merge folds a redirect the upper dir and the top lower resolve
// among themselves and refuses one that reaches the layers below (the new
// layer would need it, and strata writes no redirects). metacopy and index
// are not implemented (strata does not either); fsck reports layers that
// use them, and redirects whose lookups fail.
package inspect
