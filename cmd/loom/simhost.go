package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// simHosts are simulated hosts: private libvirtd daemons on libvirt's test
// driver, each in its own mount and network namespace, started and stopped
// by ops/libvirt/host.sh. loom up and the converge bench run them.
type simHosts struct {
	script  string
	dirs    []string
	sockets []string
	log     *slog.Logger
}

// startSimHosts starts one daemon per directory, with host.sh indexes
// firstIndex, firstIndex+1, ... (distinct indexes get distinct host UUIDs).
// If one fails to start, those already started are stopped.
func startSimHosts(ctx context.Context, dirs []string, firstIndex int, log *slog.Logger) (*simHosts, error) {
	script, err := findOpsScript("libvirt/host.sh")
	if err != nil {
		return nil, err
	}
	h := &simHosts{script: script, log: log}
	for i, dir := range dirs {
		out, err := exec.CommandContext(ctx, script, "start", dir, strconv.Itoa(firstIndex+i)).Output()
		if err != nil {
			h.stop()
			return nil, fmt.Errorf("start libvirtd in %s: %w (%s)", dir, err, exitText(err))
		}
		h.dirs = append(h.dirs, dir)
		h.sockets = append(h.sockets, strings.TrimSpace(string(out)))
	}
	return h, nil
}

// stop stops every daemon started, logging those that would not stop.
func (h *simHosts) stop() {
	for _, dir := range h.dirs {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		if out, err := exec.CommandContext(ctx, h.script, "stop", dir).CombinedOutput(); err != nil {
			h.log.Warn("stop libvirtd", "dir", dir, "err", err, "output", string(out))
		}
		cancel()
	}
}

// findOpsScript finds ops/<rel> beside the binary's source tree: from the
// working directory upwards, then from the executable's directory upwards.
func findOpsScript(rel string) (string, error) {
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if exe, err := os.Executable(); err == nil {
		starts = append(starts, filepath.Dir(exe))
	}
	for _, dir := range starts {
		for {
			candidate := filepath.Join(dir, "ops", rel)
			if _, err := os.Stat(candidate); err == nil {
				return candidate, nil
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	return "", fmt.Errorf("ops/%s not found above %v: run loom up from the Loom checkout", rel, starts)
}

// exitText is what a failed command printed on stderr.
func exitText(err error) string {
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return strings.TrimSpace(string(exit.Stderr))
	}
	return ""
}
