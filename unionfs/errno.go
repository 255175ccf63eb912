package unionfs

import (
	"context"
	"errors"
	"log/slog"
	"syscall"

	"golang.org/x/sys/unix"
)

// toErrno is the one translation of errors into FUSE replies. An error that
// wraps an errno returns it; a cancelled context is EINTR; anything else is
// an inconsistency, logged at Error, and EIO — never ENOSYS, which the
// kernel would cache as "not implemented" for the whole mount.
func (s *Stack) toErrno(ctx context.Context, op string, n *node, err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var errno unix.Errno
	if errors.As(err, &errno) {
		if errno == unix.ENOSYS {
			return syscall.EIO
		}
		if s.log.Enabled(ctx, slog.LevelDebug) {
			s.log.Debug("op failed", "op", op, "path", n.debugPath(), "errno", errno.Error(), "err", err)
		}
		return syscall.Errno(errno)
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return syscall.EINTR
	}
	s.log.Error("internal error", "op", op, "path", n.debugPath(), "err", err)
	return syscall.EIO
}
