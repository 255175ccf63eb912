package layer

import "time"

// SetStaleAge sets the age after which unlocked temporary directories are
// removed, and returns a function that restores it.
func SetStaleAge(d time.Duration) func() {
	old := staleAge
	staleAge = d
	return func() { staleAge = old }
}
