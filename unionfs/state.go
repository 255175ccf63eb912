package unionfs

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// State describes a live FUSE mount for "strata status": the mount table
// shows a FUSE mount's type and source but not its layers.
type State struct {
	Mountpoint string    `json:"mountpoint"`
	Options    string    `json:"options"`
	Pid        int       `json:"pid"`
	Started    time.Time `json:"started"`
}

// StateDir is where this user's mount state files live: /run/strata for
// root, else $XDG_RUNTIME_DIR/strata, else a per-user temp dir.
func StateDir() string {
	if os.Geteuid() == 0 {
		return "/run/strata"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "strata")
	}
	return filepath.Join(os.TempDir(), "strata-"+strconv.Itoa(os.Geteuid()))
}

func statePath(mountpoint string) string {
	h := sha256.Sum256([]byte(mountpoint))
	return filepath.Join(StateDir(), hex.EncodeToString(h[:8])+".json")
}

// WriteState records the server's mount; RemoveState deletes the record.
func (srv *Server) WriteState() error {
	if err := os.MkdirAll(StateDir(), 0o700); err != nil {
		return err
	}
	o := srv.stack.opts
	st := State{Mountpoint: srv.mountpoint, Options: o.String(), Pid: os.Getpid(), Started: time.Now()}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp := statePath(srv.mountpoint) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, statePath(srv.mountpoint))
}

// RemoveState deletes the server's state record.
func (srv *Server) RemoveState() {
	os.Remove(statePath(srv.mountpoint))
}

// ReadState returns the recorded state of a FUSE mount at mountpoint, if
// this user has one and its server still runs.
func ReadState(mountpoint string) (State, error) {
	var st State
	b, err := os.ReadFile(statePath(mountpoint))
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("state of %s: %w", mountpoint, err)
	}
	if st.Mountpoint != mountpoint {
		return st, fmt.Errorf("state of %s names %s", mountpoint, st.Mountpoint)
	}
	return st, nil
}
