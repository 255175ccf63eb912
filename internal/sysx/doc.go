// Package sysx holds the few Linux system call wrappers that strata needs
// and golang.org/x/sys/unix lacks: the *xattrat family (Linux 6.13) with a
// fallback through /proc/self/fd for older kernels, and small helpers on
// top of them. It has no policy: callers decide what an error means.
package sysx
