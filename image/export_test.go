package image

// SetTestHook installs a function called at the crash-relevant steps of
// an unpack ("imported", "committed").
func SetTestHook(f func(event, chainID string)) { testHook = f }
