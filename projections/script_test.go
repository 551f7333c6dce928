package projections

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus/bustest"
)

var rewrite = flag.Bool("rewrite", false, "rewrite the expected outputs of testdata/ scripts")

// TestScripts runs every script in testdata/ against a real NATS server
// and a real store. A script is a list of cases separated by blank lines:
//
//	# comment
//	command args
//	input lines
//	----
//	expected output
//
// publish appends its input lines as events, one per line:
//
//	<subject> <type> [cmd=<id>] [actor=<a>] [as=<kind>/<id>] <json payload>
//	raw <subject> <hex bytes>
//	unknown <subject> <type> <version>
//
// and waits until the store has applied them. The queries vm, host,
// image <name>, vms [host=<h>] [gone], hosts, images, command <actor>
// <id>, flagged, head <subject> and applied print what the store holds.
// Run with -rewrite to regenerate the outputs, then review the diff.
func TestScripts(t *testing.T) {
	paths, err := filepath.Glob("testdata/*")
	if err != nil || len(paths) == 0 {
		t.Fatalf("no scripts in testdata: %v", err)
	}
	for _, path := range paths {
		t.Run(filepath.Base(path), func(t *testing.T) { runScript(t, path) })
	}
}

// scriptCase is one command of a script with its input and output.
type scriptCase struct {
	// lead are the comment and blank lines before the command.
	lead    []string
	command string
	input   []string
	want    string
	line    int
}

func parseScript(t *testing.T, path string) []scriptCase {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var cases []scriptCase
	var c scriptCase
	var output []string
	state := "lead"
	finish := func() {
		c.want = strings.Join(output, "\n")
		cases = append(cases, c)
		c, output, state = scriptCase{}, nil, "lead"
	}
	for i, line := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
		switch {
		case state == "lead" && (line == "" || strings.HasPrefix(line, "#")):
			c.lead = append(c.lead, line)
		case state == "lead":
			c.command, c.line, state = line, i+1, "input"
		case state == "input" && line == "----":
			state = "output"
		case state == "input":
			c.input = append(c.input, line)
		case state == "output" && line == "":
			finish()
			c.lead = append(c.lead, "")
		default:
			output = append(output, line)
		}
	}
	if state != "lead" {
		finish()
	}
	return cases
}

func runScript(t *testing.T, path string) {
	cases := parseScript(t, path)
	r := &scriptRunner{t: t, bus: bustest.Start(t), data: map[uint64][]byte{}}
	r.store = openStore(t, t.TempDir(), Options{})
	r.pub = newPublisher(t, r.bus)
	run(t, r.store, r.bus.JS)
	var out bytes.Buffer
	for i := range cases {
		c := &cases[i]
		got := strings.TrimRight(r.do(c), "\n")
		if got == "" {
			got = "(none)"
		}
		if !*rewrite && got != c.want {
			t.Errorf("%s:%d: %s\ngot:\n%s\nwant:\n%s", path, c.line, c.command, got, c.want)
		}
		for _, line := range c.lead {
			out.WriteString(line + "\n")
		}
		out.WriteString(c.command + "\n")
		for _, line := range c.input {
			out.WriteString(line + "\n")
		}
		out.WriteString("----\n" + got + "\n")
	}
	if *rewrite {
		if err := os.WriteFile(path, out.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

type scriptRunner struct {
	t     *testing.T
	bus   *bustest.Bus
	store *Store
	pub   *publisher
	// data is what was published at each sequence.
	data map[uint64][]byte
}

func (r *scriptRunner) do(c *scriptCase) string {
	r.t.Helper()
	ctx := context.Background()
	args := strings.Fields(c.command)
	arg := func(i int) string {
		if i >= len(args) {
			r.t.Fatalf("line %d: %s: missing argument %d", c.line, c.command, i)
		}
		return args[i]
	}
	switch args[0] {
	case "publish":
		return r.publish(c)
	case "vm":
		state, head, err := r.store.VM(ctx, arg(1))
		return r.show(state, head, err)
	case "host":
		state, head, err := r.store.Host(ctx, arg(1))
		return r.show(state, head, err)
	case "image":
		state, head, err := r.store.Image(ctx, arg(1))
		return r.show(state, head, err)
	case "vms":
		var filter VMFilter
		for _, a := range args[1:] {
			switch {
			case strings.HasPrefix(a, "host="):
				filter.Host = strings.TrimPrefix(a, "host=")
			case a == "gone":
				filter.IncludeGone = true
			}
		}
		vms, err := r.store.VMs(ctx, filter)
		r.check(err)
		var lines []string
		for _, vm := range vms {
			lines = append(lines, vmLine(vm))
		}
		return strings.Join(lines, "\n")
	case "hosts":
		rows, err := r.store.Hosts(ctx)
		r.check(err)
		var lines []string
		for _, row := range rows {
			lines = append(lines, hostLine(row))
		}
		return strings.Join(lines, "\n")
	case "images":
		images, err := r.store.Images(ctx)
		r.check(err)
		var lines []string
		for _, image := range images {
			lines = append(lines, fmt.Sprintf("%s registered=%v format=%s size=%d by=%s", image.Name, image.Registered,
				image.Format, image.SizeBytes, image.RegisteredBy))
		}
		return strings.Join(lines, "\n")
	case "lease":
		state, err := r.store.Lease(ctx, arg(1))
		return r.show(state, events.Head{}, err)
	case "leaseof":
		state, err := r.store.LeaseOf(ctx, arg(1), arg(2))
		return r.show(state, events.Head{}, err)
	case "leases":
		var filter LeaseFilter
		for _, a := range args[1:] {
			key, value, _ := strings.Cut(a, "=")
			switch key {
			case "resource":
				filter.Resource = value
			case "host":
				filter.Host = value
			case "holder":
				filter.Holder = value
			default:
				r.t.Fatalf("line %d: leases: unknown filter %q", c.line, a)
			}
		}
		grants, err := r.store.Leases(ctx, filter)
		r.check(err)
		var lines []string
		for _, g := range grants {
			line := fmt.Sprintf("%s %s holder=%s vm=%s host=%s epoch=%d by=%s", g.Resource, g.Mode, g.ID, g.VM, g.Host, g.Epoch, g.GrantedBy)
			if g.Breaking {
				line += " breaking-by=" + g.BreakingBy
			}
			if g.Void {
				line += " VOID"
			}
			lines = append(lines, line)
		}
		return strings.Join(lines, "\n")
	case "command":
		appended, found, err := r.store.CommandResult(ctx, arg(1), arg(2))
		r.check(err)
		lines := []string{fmt.Sprintf("found=%v", found)}
		for _, a := range appended {
			lines = append(lines, fmt.Sprintf("%d %s %s", a.Seq, a.Subject, a.Type))
		}
		return strings.Join(lines, "\n")
	case "flagged":
		flagged, err := r.store.FlaggedEvents(ctx)
		r.check(err)
		var lines []string
		for _, f := range flagged {
			lines = append(lines, fmt.Sprintf("%d %s %s: %s", f.Seq, f.Subject, f.Code.Name(), f.Reason))
		}
		return strings.Join(lines, "\n")
	case "head":
		head, err := r.store.Head(ctx, arg(1))
		r.check(err)
		return r.headLine(head)
	case "applied":
		return strconv.FormatUint(r.store.Applied(), 10)
	}
	r.t.Fatalf("line %d: unknown command %q", c.line, c.command)
	return ""
}

func (r *scriptRunner) check(err error) {
	r.t.Helper()
	if err != nil {
		r.t.Fatal(err)
	}
}

// publish appends the case's events and waits until they are applied.
func (r *scriptRunner) publish(c *scriptCase) string {
	r.t.Helper()
	var lines []string
	var last uint64
	for _, line := range c.input {
		fields := strings.Fields(line)
		var seq uint64
		var subject, what string
		switch fields[0] {
		case "raw":
			data, err := hex.DecodeString(fields[2])
			r.check(err)
			subject, what = fields[1], "raw"
			seq = r.pub.raw(subject, data)
			r.data[seq] = data
		case "unknown":
			subject, what = fields[1], fields[2]+" v"+fields[3]
			seq = r.publishUnknown(fields[1], fields[2], fields[3])
		default:
			subject = fields[0]
			seq, what = r.publishEvent(line)
		}
		lines = append(lines, fmt.Sprintf("%d %s %s", seq, subject, what))
		last = seq
	}
	catchUp(r.t, r.store, last)
	return strings.Join(lines, "\n")
}

// publishEvent publishes "<subject> <type> [key=value...] <json>".
func (r *scriptRunner) publishEvent(line string) (uint64, string) {
	r.t.Helper()
	brace := strings.Index(line, "{")
	if brace < 0 {
		r.t.Fatalf("publish %q: no json payload", line)
	}
	fields := strings.Fields(line[:brace])
	subject, typ := fields[0], events.Type(fields[1])
	actor, commandID := "test", ""
	var as string
	for _, kv := range fields[2:] {
		key, value, _ := strings.Cut(kv, "=")
		switch key {
		case "cmd":
			commandID = value
		case "actor":
			actor = value
		case "as":
			as = value
		default:
			r.t.Fatalf("publish %q: unknown option %q", line, key)
		}
	}
	ev := newEvent(r.t, typ)
	dec := json.NewDecoder(strings.NewReader(line[brace:]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(ev); err != nil {
		r.t.Fatalf("publish %q: %v", line, err)
	}
	addr, err := events.ParseEventSubject(subject)
	r.check(err)
	kind, id := addr.Kind, addr.ID
	if as != "" {
		k, i, _ := strings.Cut(as, "/")
		kind, id = events.Kind(k), i
	}
	r.pub.tick++
	origin := events.Origin{Actor: actor, CommandID: commandID, Time: time.Unix(1_800_000_000+r.pub.tick, 0)}
	_, data, err := events.Seal(ev, kind, id, origin, 0, r.pub.prev[subject])
	r.check(err)
	seq := r.pub.raw(subject, data)
	r.data[seq] = data
	return seq, string(typ)
}

// publishUnknown publishes a well-formed envelope of a type or version
// this build does not know.
func (r *scriptRunner) publishUnknown(subject, typ, version string) uint64 {
	r.t.Helper()
	addr, err := events.ParseEventSubject(subject)
	r.check(err)
	v, err := strconv.Atoi(version)
	r.check(err)
	env := events.Envelope{ID: "01J00000000000000000000000", Type: events.Type(typ), Version: v, Kind: addr.Kind,
		AggregateID: addr.ID, Actor: "test", CommandID: "future", Payload: []byte{0x80}}
	data, err := events.Marshal(&env)
	r.check(err)
	seq := r.pub.raw(subject, data)
	r.data[seq] = data
	return seq
}

func (r *scriptRunner) show(state any, head events.Head, err error) string {
	r.t.Helper()
	r.check(err)
	out, err := json.MarshalIndent(state, "", "  ")
	r.check(err)
	return r.headLine(head) + "\n" + string(out)
}

// headLine shows a head's sequence, and whether its hash is the hash of
// what was published there.
func (r *scriptRunner) headLine(head events.Head) string {
	if head.Seq == 0 {
		return "head: none"
	}
	data, ok := r.data[head.Seq]
	if !ok {
		return fmt.Sprintf("head: %d (hash not checked)", head.Seq)
	}
	if !bytes.Equal(head.Hash, events.Hash(data)) {
		return fmt.Sprintf("head: %d HASH MISMATCH", head.Seq)
	}
	return fmt.Sprintf("head: %d (hash ok)", head.Seq)
}

func vmLine(vm events.VMState) string {
	line := fmt.Sprintf("%s %s uid=%s host=%s desired=%s inc=%d", vm.Name, vm.Phase, vm.UID, vm.Host, vm.Desired, vm.Incarnation)
	if o := vm.Observed; o.Seq != 0 {
		line += fmt.Sprintf(" observed=%s@%d", o.State, o.Incarnation)
	}
	if vm.Converged() {
		line += " converged"
	}
	return line
}

func hostLine(row HostRow) string {
	h := row.State
	usedCPU, usedMiB := h.Used()
	line := fmt.Sprintf("%s registered=%v cpu=%d/%d mem=%d/%d", h.Name, h.Registered, usedCPU, h.CPU, usedMiB, h.MemoryMiB)
	vms := sortedKeys(h.Allocations)
	if len(vms) > 0 {
		line += " allocs=" + strings.Join(vms, ",")
	}
	if h.Cordoned {
		line += " cordoned(" + h.CordonReason + ")"
	}
	if h.Lost {
		line += fmt.Sprintf(" lost(marker %d)", h.LostMarker)
	}
	if h.Epoch > 0 {
		line += fmt.Sprintf(" epoch=%d", h.Epoch)
	}
	if orphans := sortedKeys(h.Orphans); len(orphans) > 0 {
		line += " orphans=" + strings.Join(orphans, ",")
	}
	return line + fmt.Sprintf(" head=%d", row.Head.Seq)
}

// newEvent is a pointer to a zero event of type t.
func newEvent(t testing.TB, typ events.Type) events.Event {
	t.Helper()
	known := map[events.Type]events.Event{
		events.TypeHostRegistered: &events.HostRegistered{}, events.TypeHostCordoned: &events.HostCordoned{},
		events.TypeHostUncordoned: &events.HostUncordoned{}, events.TypeHostAllocated: &events.HostAllocated{},
		events.TypeHostReleased: &events.HostReleased{}, events.TypeImageRegistered: &events.ImageRegistered{},
		events.TypeVMCreated: &events.VMCreated{}, events.TypeVMPlaced: &events.VMPlaced{},
		events.TypeVMGoalChanged: &events.VMGoalChanged{}, events.TypeVMDeleted: &events.VMDeleted{},
		events.TypeVMObserved: &events.VMObserved{}, events.TypeVMProgress: &events.VMProgress{},
		events.TypeHostOrphanFound: &events.HostOrphanFound{}, events.TypeHostOrphanCleared: &events.HostOrphanCleared{},
		events.TypeHostLost: &events.HostLost{}, events.TypeHostRejoined: &events.HostRejoined{},
		events.TypeLeaseGranted: &events.LeaseGranted{}, events.TypeLeaseReleased: &events.LeaseReleased{},
		events.TypeLeaseExpired: &events.LeaseExpired{}, events.TypeLeaseBreaking: &events.LeaseBreaking{},
		events.TypeLeaseBroken:           &events.LeaseBroken{},
		events.TypeVMCheckpointRequested: &events.VMCheckpointRequested{}, events.TypeVMRestoreRequested: &events.VMRestoreRequested{},
		events.TypeVMCheckpointDeleted: &events.VMCheckpointDeleted{}, events.TypeVMCheckpointScheduled: &events.VMCheckpointScheduled{},
		events.TypeVMCheckpointTaken: &events.VMCheckpointTaken{}, events.TypeVMRestored: &events.VMRestored{},
		events.TypeVMCheckpointFailed: &events.VMCheckpointFailed{}, events.TypeVMCheckpointRemoved: &events.VMCheckpointRemoved{},
		events.TypeVMMigrationStarted: &events.VMMigrationStarted{}, events.TypeVMMigrated: &events.VMMigrated{},
		events.TypeVMMigrationFailed: &events.VMMigrationFailed{}, events.TypeVMMigrationCancelling: &events.VMMigrationCancelling{},
		events.TypeVMMigrationReceived: &events.VMMigrationReceived{}, events.TypeVMMigrationSent: &events.VMMigrationSent{},
		events.TypeVMMigrationAborted: &events.VMMigrationAborted{}, events.TypeHostAgentStarted: &events.HostAgentStarted{},
		events.TypeNetCreated: &events.NetCreated{}, events.TypeNetAddressBound: &events.NetAddressBound{},
		events.TypeNetAddressReleased: &events.NetAddressReleased{}, events.TypeAuditSealed: &events.AuditSealed{},
	}
	if len(known) != len(events.Types()) {
		t.Fatalf("newEvent knows %d event types, events has %d: add the new ones", len(known), len(events.Types()))
	}
	ev, ok := known[typ]
	if !ok {
		t.Fatalf("unknown event type %q", typ)
	}
	return ev
}
