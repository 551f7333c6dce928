package overlay

import (
	"bytes"
	"context"
	"os/exec"
	"slices"
	"strings"
)

// runner runs one command line and returns its standard output; a failure
// is a *CommandError.
type runner func(ctx context.Context, args []string) ([]byte, error)

// execRun is the runner of the real system.
func execRun(ctx context.Context, args []string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, &CommandError{Args: args, Stderr: strings.TrimSpace(stderr.String()), Err: err}
	}
	return stdout.Bytes(), nil
}

// host runs iproute2 on one host (behind cfg.Prefix) for one overlay.
type host struct {
	cfg Config // validated, defaults applied
	run runner
}

// ip runs ip with args behind the prefix.
func (h host) ip(ctx context.Context, args ...string) ([]byte, error) {
	return h.run(ctx, h.command("ip", args...))
}

// bridge runs bridge with args behind the prefix.
func (h host) bridge(ctx context.Context, args ...string) ([]byte, error) {
	return h.run(ctx, h.command("bridge", args...))
}

func (h host) command(tool string, args ...string) []string {
	return append(append(slices.Clone(h.cfg.Prefix), tool), args...)
}
