//go:build integration

package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	lv "github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/agents/libvirt/libvirttest"
	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/internal/eventually"
)

// TestCLI_AuditReplay is issue 5's replay, through the binary's own verbs:
// a real control plane and two hosts on real libvirtd, a history written by
// loom's commands, the live answers noted at one sequence, more changes,
// then loom audit replay as an auditor who may only read LOOM_EVENTS, with
// the control plane stopped: the same answers as live at that sequence,
// byte for byte, every time, by --seq or by --at; a corrupt message stops
// it unless --skip-corrupt; the live read models are untouched.
func TestCLI_AuditReplay(t *testing.T) {
	p := startAuditedPlane(t)
	loom := func(args ...string) string {
		t.Helper()
		stdout, stderr, err := cli(t.Context(), append([]string{"--nats", p.adminURL}, args...)...)
		if err != nil {
			t.Fatalf("loom %s: %v\n%s%s", strings.Join(args, " "), err, stdout, stderr)
		}
		return stdout
	}
	loom("image", "register", "demo", "--size", "67108864")
	for _, h := range []string{"host-1", "host-2"} {
		loom("host", "register", h, "--cpu", "4", "--mem", "4096")
	}
	loom("vm", "create", "web-1", "--image", "demo", "--mem", "256", "--wait", "30s")
	loom("vm", "create", "web-2", "--image", "demo", "--mem", "256", "--wait", "30s")
	loom("lease", "acquire", "image/demo", "--mode", "shared", "--holder", "probe", "--host", "host-2")
	// An unconverged goal: web-1's host's agent is down when web-1 is told
	// to stop, so nobody reports it stopped.
	var web1 events.VMView
	if err := json.Unmarshal([]byte(loom("vm", "get", "web-1", "-o", "json")), &web1); err != nil {
		t.Fatal(err)
	}
	p.agents[web1.Host].stop(t)
	loom("vm", "stop", "web-1")

	// The live answers at sequence n: the stream is quiet, and the live read
	// models have applied all of it.
	queries := [][]string{
		{"vm", "get", "web-1", "-o", "json"}, {"vm", "get", "web-2", "-o", "json"}, {"vm", "list"}, {"vm", "list", "--all", "-o", "json"},
		{"vm", "list", "--unconverged"}, {"vm", "list", "--unconverged", "-o", "json"}, {"host", "list"}, {"host", "list", "-o", "json"},
		{"host", "get", "host-1"}, {"lease", "get", "image/demo"}, {"lease", "get", "image/demo", "-o", "json"}, {"lease", "list"},
		{"image", "get", "demo"}, {"vm", "get", "web-1"},
	}
	var n uint64
	live := map[string]string{}
	eventually.WaitFor(t, 30*time.Second, "a quiet stream that the live read models reflect", func() error {
		before := p.lastSeq(t)
		if _, err := p.queryAt(events.KindVM, before); err != nil {
			return err
		}
		for _, q := range queries {
			live[strings.Join(q, " ")] = loom(q...)
		}
		if after := p.lastSeq(t); after != before {
			return fmt.Errorf("the stream moved from %d to %d meanwhile", before, after)
		}
		n = before
		return nil
	})
	unconverged := live["vm list --unconverged"]
	if !strings.Contains(unconverged, "web-1") || strings.Contains(unconverged, "web-2") ||
		!strings.Contains(live["lease get image/demo"], "probe") {
		t.Fatalf("at %d live says: unconverged\n%s\nleases on image/demo\n%s", n, unconverged, live["lease get image/demo"])
	}
	t.Logf("live answers noted at sequence %d", n)

	// More history: web-1 converges, web-2 goes, the probe lets go, web-3 comes.
	p.startAgent(t, web1.Host)
	eventually.WaitFor(t, 30*time.Second, "web-1 converged", func() error {
		if out := loom("vm", "list", "--unconverged"); strings.Contains(out, "web-1") {
			return errors.New(out)
		}
		return nil
	})
	loom("vm", "delete", "web-2", "--wait", "30s")
	loom("lease", "release", "image/demo", "--holder", "probe")
	loom("vm", "create", "web-3", "--image", "demo", "--mem", "512", "--wait", "30s")
	for _, q := range []string{"vm list", "lease get image/demo", "host list"} {
		if now := loom(strings.Fields(q)...); now == live[q] {
			t.Fatalf("%s answers as it did at %d: the test would not see a replay past the point\n%s", q, n, now)
		}
	}

	// The auditor's side: the control plane stopped, no loom.q service, a
	// connection that may only read the stream.
	p.stopPlane(t)
	liveDir := filepath.Join(p.dir, "projections")
	liveFiles := hashTree(t, liveDir)
	if _, _, err := cli(t.Context(), "--nats", p.auditorURL, "--timeout", "1s", "vm", "list"); err == nil {
		t.Fatal("the auditor's connection asked the live read models: it should have no right to")
	}
	replay := func(args ...string) (string, string) {
		t.Helper()
		stdout, stderr, err := cli(t.Context(), append([]string{"--nats", p.auditorURL, "audit", "replay"}, args...)...)
		if err != nil {
			t.Fatalf("loom audit replay %s: %v\n%s", strings.Join(args, " "), err, stderr)
		}
		return stdout, stderr
	}
	seq := fmt.Sprint(n)
	for _, q := range queries {
		name := strings.Join(q, " ")
		first, stderr := replay(append([]string{"--seq", seq}, q...)...)
		if !strings.HasPrefix(stderr, "sequence "+seq+", stored ") {
			t.Fatalf("replay %s said on stderr:\n%s", name, stderr)
		}
		second, _ := replay(append(q, "--seq", seq)...)
		if first != second {
			t.Fatalf("replay %s twice, into fresh directories:\n%s\nthen\n%s", name, first, second)
		}
		want := live[name]
		if name == "vm get web-1" {
			// Live counted "observed at" back from its own clock, a replay
			// from the stored time of the point.
			observedAt := regexp.MustCompile(`(?m)^observed at .*$`)
			first, want = observedAt.ReplaceAllString(first, ""), observedAt.ReplaceAllString(want, "")
		}
		if first != want {
			t.Fatalf("replay --seq %d %s:\n%s\nlive said:\n%s", n, name, first, want)
		}
	}

	// --at: a time between sequences n and n+1 by the stream's clock.
	at, next := p.message(t, n), p.message(t, n+1)
	mid := at.Time.Add(next.Time.Sub(at.Time) / 2).UTC().Format(time.RFC3339Nano)
	stdout, stderr := replay("--at", mid, "vm", "list", "--unconverged")
	if stdout != unconverged || !strings.Contains(stderr, fmt.Sprintf("--at %s: sequence %d, stored %s", mid, n, at.Time.UTC().Format(time.RFC3339Nano))) {
		t.Fatalf("replay --at %s (between %s and %s):\n%s%s", mid, at.Time.Format(time.RFC3339Nano), next.Time.Format(time.RFC3339Nano), stderr, stdout)
	}

	// --dir: kept, resumed from an earlier point, refused behind itself,
	// refused on a directory that is not a replay's.
	dir := filepath.Join(t.TempDir(), "replay")
	replay("--seq", fmt.Sprint(n-5), "--dir", dir, "host", "list")
	stdout, stderr = replay("--seq", seq, "--dir", dir, "vm", "list", "--unconverged")
	if stdout != unconverged || !strings.Contains(stderr, fmt.Sprintf("replayed sequences %d to %d into %s", n-4, n, dir)) {
		t.Fatalf("replay resumed in %s:\n%s%s", dir, stderr, stdout)
	}
	wantFault(t, p.auditorURL, events.CodeInvalidArgument, "past "+fmt.Sprint(n-1), "--seq", fmt.Sprint(n-1), "--dir", dir, "vm", "list")
	wantFault(t, p.auditorURL, events.CodeInvalidArgument, "not empty and holds no earlier replay", "--seq", seq, "--dir", liveDir, "vm", "list")
	wantFault(t, p.auditorURL, events.CodeInvalidArgument, "ends at sequence", "--seq", "999999", "vm", "list")
	wantFault(t, p.auditorURL, events.CodeInvalidArgument, "one point", "vm", "list")

	// A corrupt message, published straight onto a VM's subject.
	ack, err := p.conn.JS.Publish(t.Context(), events.EventSubject(events.KindVM, "web-1"), []byte("not an event"))
	if err != nil {
		t.Fatal(err)
	}
	bad := fmt.Sprint(ack.Sequence)
	before, _ := replay("--seq", fmt.Sprint(ack.Sequence-1), "vm", "list", "--all")
	wantFault(t, p.auditorURL, events.CodeCorruptEvent, "sequence "+bad+" on loom.evt.vm.web-1 does not decode", "--seq", bad, "vm", "list", "--all")
	stdout, stderr = replay("--seq", bad, "--skip-corrupt", "vm", "list", "--all")
	if stdout != before || !strings.Contains(stderr, "flagged and skipped: sequence "+bad+" on loom.evt.vm.web-1 (corrupt_event)") ||
		!strings.Contains(stderr, "--skip-corrupt went past 1 undecodable: sequence "+bad) {
		t.Fatalf("replay --skip-corrupt past %s:\n%s%s\nbefore it:\n%s", bad, stderr, stdout, before)
	}

	if after := hashTree(t, liveDir); !equalTrees(liveFiles, after) {
		t.Fatalf("the live read models changed during the replays:\nbefore %v\nafter %v", liveFiles, after)
	}
}

// wantFault runs loom audit replay with args as the auditor and wants it to
// fail with code, saying text.
func wantFault(t *testing.T, url string, code events.Code, text string, args ...string) {
	t.Helper()
	_, stderr, err := cli(t.Context(), append([]string{"--nats", url, "audit", "replay"}, args...)...)
	var f *events.Fault
	if !errors.As(err, &f) || f.Code != code || !strings.Contains(f.Message, text) {
		t.Fatalf("loom audit replay %s: %v (%s), want %s saying %q", strings.Join(args, " "), err, stderr, code.Name(), text)
	}
}

// cli runs the loom binary's root command in-process, with its stdout and
// stderr apart.
func cli(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	root := newRoot()
	var out, errOut bytes.Buffer
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errOut)
	err = root.ExecuteContext(ctx)
	return out.String(), errOut.String(), err
}

// auditedPlane is Loom on one machine, on a NATS server with two
// identities: loom, which may do anything, and an auditor, who may only
// read LOOM_EVENTS.
type auditedPlane struct {
	dir                  string
	adminURL, auditorURL string
	conn                 *plane.Connection
	log                  *slog.Logger
	plane                *runningPart
	sockets              map[string]string
	agents               map[string]*runningPart
}

// auditorPermissions are what reading LOOM_EVENTS takes: its info, leader
// gets of its messages, and ordered consumers on it.
var auditorPermissions = &server.Permissions{
	Publish: &server.SubjectPermission{Allow: []string{
		"$JS.API.INFO",
		"$JS.API.STREAM.INFO." + events.StreamEvents,
		"$JS.API.STREAM.MSG.GET." + events.StreamEvents,
		"$JS.API.CONSUMER.CREATE." + events.StreamEvents + ".>",
		"$JS.API.CONSUMER.INFO." + events.StreamEvents + ".>",
		"$JS.API.CONSUMER.MSG.NEXT." + events.StreamEvents + ".>",
		"$JS.API.CONSUMER.DELETE." + events.StreamEvents + ".>",
	}},
	Subscribe: &server.SubjectPermission{Allow: []string{"_INBOX.>"}},
}

func startAuditedPlane(t *testing.T) *auditedPlane {
	t.Helper()
	p := &auditedPlane{dir: t.TempDir(), sockets: map[string]string{}, agents: map[string]*runningPart{}}
	p.log = testLog(t)
	ns, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: filepath.Join(p.dir, "nats"), NoSigs: true, NoLog: true,
		MaxPayload: 8 << 20, JetStreamMaxMemory: 1 << 30,
		Users: []*server.User{{Username: "loom", Password: "loom"}, {Username: "auditor", Password: "audit", Permissions: auditorPermissions}},
	})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(func() {
		ns.Shutdown()
		ns.WaitForShutdown()
	})
	if !ns.ReadyForConnections(15 * time.Second) {
		t.Fatal("nats server not ready in 15s")
	}
	addr := strings.TrimPrefix(ns.ClientURL(), "nats://")
	p.adminURL, p.auditorURL = "nats://loom:loom@"+addr, "nats://auditor:audit@"+addr
	p.conn, err = plane.Connect(t.Context(), plane.NATSConfig{URL: p.adminURL}, p.dir, "it", p.log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.conn.Close)
	ready := make(chan struct{})
	p.plane = startPart(func(ctx context.Context) error {
		return plane.RunControlPlane(ctx, p.conn, plane.ControlPlaneConfig{DataDir: p.dir, Ready: ready}, p.log)
	})
	t.Cleanup(func() { p.plane.stop(t) })
	select {
	case <-ready:
	case err := <-p.plane.done:
		t.Fatalf("control plane: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("control plane not ready in 30s")
	}
	for i, name := range []string{"host-1", "host-2"} {
		socket := libvirttest.StartDaemon(t, 250+i)
		// test:///default lives as long as a connection to it: hold one, so
		// the host keeps its domains while its agent is down.
		held, err := lv.Dial(t.Context(), lv.Config{Socket: socket, URI: "test:///default", RPCTimeout: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = held.Close() })
		p.sockets[name] = socket
		p.startAgent(t, name)
	}
	t.Cleanup(func() {
		for _, a := range p.agents {
			a.stop(t)
		}
	})
	return p
}

// startAgent starts the agent of host name. Its TTL outlasts the test, so
// an agent stopped for a while is not declared lost.
func (p *auditedPlane) startAgent(t *testing.T, name string) {
	cfg := plane.AgentConfig{Host: name, Socket: p.sockets[name], URI: "test:///default", TTL: 2 * time.Minute, StopGrace: time.Second}
	p.agents[name] = startPart(func(ctx context.Context) error {
		return plane.RunAgent(ctx, p.conn, cfg, p.log.With("agent", name))
	})
}

func (p *auditedPlane) stopPlane(t *testing.T) { p.plane.stop(t) }

func (p *auditedPlane) lastSeq(t *testing.T) uint64 {
	t.Helper()
	last, err := bus.LastSeq(t.Context(), p.conn.JS, events.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	return last
}

func (p *auditedPlane) message(t *testing.T, seq uint64) bus.Message {
	t.Helper()
	m, err := bus.MessageAt(t.Context(), p.conn.Conn, events.StreamEvents, seq)
	if err != nil {
		t.Fatalf("message %d: %v", seq, err)
	}
	return m
}

// queryAt asks the live read models to list kind once they reflect minSeq.
func (p *auditedPlane) queryAt(kind events.Kind, minSeq uint64) (*events.QueryReply, error) {
	c := &client{flags: &clientFlags{timeout: 10 * time.Second}, nc: p.conn.Conn}
	return c.query(context.Background(), kind, events.VerbList, events.Query{MinSeq: minSeq})
}

// runningPart is something the test runs until it stops it.
type runningPart struct {
	cancel context.CancelFunc
	done   chan error
}

func startPart(run func(ctx context.Context) error) *runningPart {
	ctx, cancel := context.WithCancel(context.Background())
	part := &runningPart{cancel: cancel, done: make(chan error, 1)}
	go func() { part.done <- run(ctx) }()
	return part
}

// stop stops the part and waits for it; it may be called more than once.
func (r *runningPart) stop(t *testing.T) {
	t.Helper()
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	select {
	case err := <-r.done:
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("stopped with: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("did not stop within 20s")
	}
}

// testLog keeps the logs of the control plane and agents, shown only if
// the test fails.
func testLog(t *testing.T) *slog.Logger {
	buf := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs of the control plane and agents:\n%s", buf.String())
		}
	})
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// hashTree is the SHA-256 of every file under dir, by path.
func hashTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	files := map[string]string{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files[path] = fmt.Sprintf("%x", sha256.Sum256(data))
		return nil
	})
	if err != nil || len(files) == 0 {
		t.Fatalf("hash %s: %d files, %v", dir, len(files), err)
	}
	return files
}

func equalTrees(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for path, sum := range a {
		if b[path] != sum {
			return false
		}
	}
	return true
}
