package cmd

import (
	"io"
	"log/slog"
	"path/filepath"
)

// absPath makes p absolute and resolves symlinks where it can.
func absPath(p string) (string, error) {
	a, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	if r, err := filepath.EvalSymlinks(a); err == nil {
		return r, nil
	}
	return a, nil
}

func newLogger(w io.Writer, lv *slog.LevelVar) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: lv}))
}
