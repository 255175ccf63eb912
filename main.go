// Command strata mounts a stack of directories as one tree, with the
// semantics and on-disk format of Linux overlayfs, over FUSE.
package main

import (
	"context"
	"os"

	"strata/cmd"
)

func main() {
	os.Exit(cmd.Main(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}
