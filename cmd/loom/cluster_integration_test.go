//go:build integration

package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/internal/eventually"
)

// TestCLI_ThreeServersOneLoom runs three loom serve, each with its
// embedded server in one cluster (routes over TLS) and its own control
// plane, as the README tells an operator to set them up: a command sent
// through one is read through another and seen in the history through the
// third, and with one server stopped the other two still serve commands.
func TestCLI_ThreeServersOneLoom(t *testing.T) {
	base, err := shortTempDir(t)
	if err != nil {
		t.Fatal(err)
	}
	const n = 3
	dirs, clients, routes, https := make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	for i := range n {
		dirs[i] = filepath.Join(base, fmt.Sprintf("n%d", i+1))
		clients[i], https[i] = freeAddr(t), freeAddr(t)
		routes[i] = "nats-route://" + freeAddr(t)
	}
	var out lockedBuffer
	if err := execute(t.Context(), &out, "init", "--data-dir", dirs[0]); err != nil {
		t.Fatal(err)
	}
	// The others take the first one's credentials but its certificate, and
	// loom init signs each its own with the same CA.
	for _, dir := range dirs[1:] {
		copyCreds(t, plane.CredsDir(dirs[0]), plane.CredsDir(dir))
		if err := execute(t.Context(), &out, "init", "--data-dir", dir); err != nil {
			t.Fatal(err)
		}
	}

	stops := make([]func(), n)
	for i := range n {
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() {
			var log lockedBuffer
			done <- execute(ctx, &log, "serve", "--data-dir", dirs[i], "--listen", clients[i], "--http", https[i],
				"--cluster-listen", strings.TrimPrefix(routes[i], "nats-route://"), "--routes", strings.Join(routes, ","),
				"--server-name", fmt.Sprintf("n%d", i+1), "--replicas", "3")
		}()
		stopped := false
		stops[i] = func() {
			if stopped {
				return
			}
			stopped = true
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("loom serve n%d ended with %v", i+1, err)
				}
			case <-time.After(60 * time.Second):
				t.Errorf("loom serve n%d did not stop in 60s", i+1)
			}
		}
		t.Cleanup(stops[i])
	}

	// Each control plane comes up: its streams set up through the cluster.
	for i := range n {
		eventually.WaitFor(t, 90*time.Second, fmt.Sprintf("n%d ready", i+1), func() error {
			resp, err := http.Get("http://" + https[i] + "/readyz")
			if err != nil {
				return err
			}
			_ = resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("readyz: %s", resp.Status)
			}
			return nil
		})
	}

	via := func(i int, args ...string) (string, error) {
		var out lockedBuffer
		err := execute(t.Context(), &out, append([]string{"--nats", "tls://" + clients[i], "--creds", plane.CredsDir(dirs[i]), "--timeout", "5s"}, args...)...)
		return out.String(), err
	}
	register := func(i int, host string) {
		t.Helper()
		eventually.WaitFor(t, 60*time.Second, "host register "+host+" through n"+fmt.Sprint(i+1), func() error {
			_, err := via(i, "host", "register", host, "--cpu", "4", "--mem", "4096", "--command-id", "register-"+host)
			return err
		})
	}
	listed := func(i int, hosts ...string) {
		t.Helper()
		eventually.WaitFor(t, 30*time.Second, fmt.Sprintf("hosts %v listed through n%d", hosts, i+1), func() error {
			list, err := via(i, "host", "list")
			if err != nil {
				return err
			}
			for _, h := range hosts {
				if !strings.Contains(list, h+" ") {
					return fmt.Errorf("host list lacks %s:\n%s", h, list)
				}
			}
			return nil
		})
	}

	register(2, "h1")
	listed(0, "h1")
	history, err := via(1, "events", "tail", "--no-follow", "--type", "host.registered")
	if err != nil || !strings.Contains(history, "host.registered") || !strings.Contains(history, "by client/") {
		t.Fatalf("events tail through n2: %v\n%s", err, history)
	}

	stops[0]()
	register(1, "h2")
	listed(2, "h1", "h2")
}

// copyCreds copies the credentials directory from into to, all but the
// server's certificate and key.
func copyCreds(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() == "server.pem" || e.Name() == "server-key.pem" {
			continue
		}
		data, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}
