package overlay

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
)

// fakeRunner answers commands from a script instead of running them and
// records each command line it was given.
type fakeRunner struct {
	outputs map[string]string // command line -> standard output
	fails   map[string]string // command line -> standard error of a failure
	ran     []string
}

func (f *fakeRunner) run(_ context.Context, args []string) ([]byte, error) {
	line := strings.Join(args, " ")
	f.ran = append(f.ran, line)
	if stderr, ok := f.fails[line]; ok {
		return nil, &CommandError{Args: args, Stderr: stderr, Err: errors.New("exit status 2")}
	}
	return []byte(f.outputs[line]), nil
}

// mutations returns the command lines that ran and change something: all
// but the listings.
func (f *fakeRunner) mutations() []string {
	var changed []string
	for _, line := range f.ran {
		if !strings.Contains(line, " show") {
			changed = append(changed, line)
		}
	}
	return changed
}

func readTestdata(t *testing.T, name string) string {
	t.Helper()
	data, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}
