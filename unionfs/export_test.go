package unionfs

// SetTestHookRemoved makes every remove (unlink, rmdir) call f with the
// name it has just taken out of the upper dir, before it returns; nil
// removes the hook.
func SetTestHookRemoved(f func(name string)) {
	if f == nil {
		testHookRemoved.Store(nil)
		return
	}
	testHookRemoved.Store(&f)
}

// CopiedIdentity returns the identity recorded for the copied-up upper
// object with inode number upperIno, if any.
func (s *Stack) CopiedIdentity(upperIno uint64) (uint64, bool) {
	s.copiedMu.Lock()
	defer s.copiedMu.Unlock()
	id, ok := s.copied[upperIno]
	return id, ok
}
