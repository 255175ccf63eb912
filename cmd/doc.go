// Package cmd is strata's command line: it parses flags and arguments,
// validates them, calls the library packages and prints results. It holds
// no filesystem logic.
//
// Each subcommand lives in its own file and registers itself in an init
// function with [register]. Exit codes are decided only in [Main]: 0 ok, 1
// failure, 2 usage error, 130 interrupted.
package cmd
