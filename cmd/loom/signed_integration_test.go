//go:build integration

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/audit"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/hostkey"
	"github.com/loomctl/loom/internal/eventually"
)

// TestCLI_SignedObservations is issue 6's signed observations through the
// binary: loom up gives each simulated host a key, registers it with it,
// and its agent signs; a VM converges on those signed reports. Then
// someone who may publish on the VM's host's subjects puts there a report
// signed by the other host's key, an unsigned one, and an old one again:
// the VM's state does not move, the agent goes on after them (a pause
// converges), loom audit verify names each with its code and sequence, and
// loom audit replay lists them as flagged.
func TestCLI_SignedObservations(t *testing.T) {
	fleet := startFleet(t)
	dir, url, loom, must := fleet.dir, fleet.url, fleet.loom, fleet.must

	// Every host is registered with the key its agent signs with.
	keys := map[string]*hostkey.Key{}
	var hosts []events.HostView
	eventually.WaitFor(t, 30*time.Second, "both hosts registered with keys", func() error {
		hosts = nil
		if err := json.Unmarshal([]byte(must("host", "list", "-o", "json")), &hosts); err != nil {
			return err
		}
		if len(hosts) != 2 || hosts[0].Key == "" || hosts[1].Key == "" {
			return fmt.Errorf("hosts %+v", hosts)
		}
		return nil
	})
	for _, h := range hosts {
		// One key per host: its agent's NATS identity signs its reports.
		path := plane.CredsFile(plane.CredsDir(dir), plane.AgentName(h.Name))
		key, err := hostkey.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		pub, err := os.ReadFile(hostkey.PublicPath(path))
		if err != nil || h.Key != key.Public() || strings.TrimSpace(string(pub)) != key.Public() {
			t.Fatalf("host %s registered with key %q; its key file holds %s, its .pub %q (%v)", h.Name, h.Key, key.Public(), pub, err)
		}
		keys[h.Name] = key
	}
	if table := must("host", "list"); !strings.Contains(table, hosts[0].Key[:12]+"…") {
		t.Errorf("host list does not show the keys:\n%s", table)
	}

	must("vm", "create", "web-1", "--image", "demo", "--cpu", "1", "--mem", "256", "--wait", "30s")
	vm := vmGet(t, must)
	var other string
	for name := range keys {
		if name != vm.Host {
			other = name
		}
	}

	// The attacks, on real NATS, as anyone allowed to publish there: the
	// bus's permissions are the first line (they keep other identities
	// off the host's subjects); the signatures hold against one that gets
	// past them, here the admin.
	opts, err := plane.AccessIn(filepath.Join(dir, "creds"), "admin").Options()
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	subject := events.ObservationSubject(vm.Host, events.KindVM, "web-1")
	first, err := bus.NextOnSubject(t.Context(), nc, events.StreamEvents, subject, 1)
	if err != nil {
		t.Fatal(err)
	}
	stopped := events.VMObserved{UID: vm.UID, Incarnation: vm.Incarnation, State: events.ObservedStopped}
	want := map[uint64]events.Code{}
	want[publishObservation(t, js, nc, subject, stopped, keys[other])] = events.CodeForgedObservation
	want[publishObservation(t, js, nc, subject, stopped, nil)] = events.CodeUnsignedObservation
	want[publishAgain(t, js, nc, first)] = events.CodeReplayedObservation

	// The VM's state did not move; its agent goes on after the attacks.
	must("vm", "pause", "web-1", "--wait", "30s")
	if vm := vmGet(t, must); vm.Observed.State != events.ObservedPaused || !vm.Converged {
		t.Fatalf("after the attacks and a pause: observed %s, converged %v", vm.Observed.State, vm.Converged)
	}

	// loom audit verify names each.
	var r audit.Report
	out, _ := loom("audit", "verify", "--key", filepath.Join(dir, "seal.pub"), "-o", "json")
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("audit verify: %v\n%s", err, out)
	}
	got := map[uint64]events.Code{}
	for _, p := range r.Problems {
		got[p.Seq] = p.Code
	}
	if fmt.Sprint(got) != fmt.Sprint(want) || r.Signed == 0 {
		t.Fatalf("audit verify found %v (%d signed, %d unchecked), want exactly %v", r.Problems, r.Signed, r.Unchecked, want)
	}
	text, err := loom("audit", "verify", "--key", filepath.Join(dir, "seal.pub"))
	if err == nil || !strings.Contains(text, "forged_observation") || !strings.Contains(text, "observations: ") {
		t.Fatalf("audit verify, as a person reads it: %v\n%s", err, text)
	}

	// The replayed read models flag them too.
	replayed := must("audit", "replay", "--seq", strconv.FormatUint(r.Last, 10), "vm", "get", "web-1")
	for seq, code := range want {
		if line := fmt.Sprintf("flagged and skipped: sequence %d on %s (%s)", seq, subject, code.Name()); !strings.Contains(replayed, line) {
			t.Errorf("audit replay lacks %q:\n%s", line, replayed)
		}
	}
}

// vmGet is web-1 as loom vm get -o json shows it.
func vmGet(t *testing.T, must func(...string) string) events.VMView {
	t.Helper()
	var vm events.VMView
	if err := json.Unmarshal([]byte(must("vm", "get", "web-1", "-o", "json")), &vm); err != nil {
		t.Fatal(err)
	}
	return vm
}

// publishObservation appends report on subject after its last message,
// signed with key (unsigned if nil), as someone other than its agent.
func publishObservation(t *testing.T, js jetstream.JetStream, nc *nats.Conn, subject string, report events.VMObserved, key *hostkey.Key) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	last, err := bus.LastOnSubject(ctx, nc, events.StreamEvents, subject)
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := events.ParseEventSubject(subject)
	env, data, err := events.Seal(report, events.KindVM, addr.ID, events.Origin{Actor: "agent:" + addr.Host, Time: time.Now()}, 0, events.Hash(last.Data))
	if err != nil {
		t.Fatal(err)
	}
	msg := bus.EventMsg(subject, &env, data, "")
	if key != nil {
		msg.Header.Set(events.HeaderSigKey, key.Public())
		msg.Header.Set(events.HeaderSig, key.Sign(subject, last.Seq, events.Hash(data)))
	}
	a, err := bus.AppendMsg(ctx, js, msg, &env, bus.Expect{Seq: last.Seq})
	if err != nil {
		t.Fatal(err)
	}
	return a.Seq
}

// publishAgain appends m again on its subject, headers and bytes as they
// were but for the expected sequence, set so the server stores it.
func publishAgain(t *testing.T, js jetstream.JetStream, nc *nats.Conn, m bus.Message) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	last, err := bus.LastOnSubject(ctx, nc, events.StreamEvents, m.Subject)
	if err != nil {
		t.Fatal(err)
	}
	msg := &nats.Msg{Subject: m.Subject, Data: m.Data, Header: nats.Header{}}
	for k, v := range m.Header {
		if !strings.HasPrefix(k, "Nats-") {
			msg.Header[k] = v
		}
	}
	a, err := bus.PublishExpecting(ctx, js, msg, bus.Expect{Seq: last.Seq})
	if err != nil {
		t.Fatal(err)
	}
	return a.Seq
}
