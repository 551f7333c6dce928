package handlers

import (
	"reflect"
	"testing"
	"time"

	"github.com/loomctl/loom/events"
)

// code is the fault's code, 0 for none.
func code(f *events.Fault) events.Code {
	if f == nil {
		return 0
	}
	return f.Code
}

func checkDecision(t *testing.T, gotEvent events.Event, gotFault *events.Fault, wantEvent events.Event, wantCode events.Code) {
	t.Helper()
	if code(gotFault) != wantCode {
		t.Fatalf("fault=%v, want code %d", gotFault, wantCode)
	}
	if !reflect.DeepEqual(gotEvent, wantEvent) {
		t.Fatalf("event=%#v, want %#v", gotEvent, wantEvent)
	}
}

func TestDecideRegisterHost(t *testing.T) {
	cmd := &events.RegisterHost{Name: "h1", CPU: 4, MemoryMiB: 8192, Labels: map[string]string{"zone": "a"}}
	same := events.HostState{Name: "h1", Registered: true, CPU: 4, MemoryMiB: 8192, Labels: map[string]string{"zone": "a"}}
	bigger := same
	bigger.CPU = 8
	relabeled := same
	relabeled.Labels = map[string]string{"zone": "b"}
	const key, otherKey = "UASL4UOHD2OV7V2KTWIQX77KOAW6LDA2Z6WWLZ5COCF72WJIBWUNKPLF", "UBCBWJDJ7JERHGZSQVJOJYTAOCGQ2IKUICZZUMEEY2P4KHHVUMJDFTDW"
	keyed := same
	keyed.Key = key
	withKey := func(k string) *events.RegisterHost {
		c := *cmd
		c.Key = k
		return &c
	}
	tests := []struct {
		name      string
		host      events.HostState
		wantEvent events.Event
		wantCode  events.Code
	}{
		{"new host", events.HostState{}, events.HostRegistered{CPU: 4, MemoryMiB: 8192, Labels: map[string]string{"zone": "a"}}, 0},
		{"same spec again is a no-op", same, nil, 0},
		{"other cpu", bigger, nil, events.CodeHostExists},
		{"other labels", relabeled, nil, events.CodeHostExists},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ev, fault := decideRegisterHost(tc.host, cmd)
			checkDecision(t, ev, fault, tc.wantEvent, tc.wantCode)
		})
	}
	keyTests := []struct {
		name      string
		host      events.HostState
		cmd       *events.RegisterHost
		wantEvent events.Event
		wantCode  events.Code
	}{
		{"new host with a key", events.HostState{}, withKey(key),
			events.HostRegistered{CPU: 4, MemoryMiB: 8192, Labels: map[string]string{"zone": "a"}, Key: key}, 0},
		{"a keyless host gets a key", same, withKey(key),
			events.HostRegistered{CPU: 4, MemoryMiB: 8192, Labels: map[string]string{"zone": "a"}, Key: key}, 0},
		{"the same key again is a no-op", keyed, withKey(key), nil, 0},
		{"another key is refused", keyed, withKey(otherKey), nil, events.CodeHostExists},
		{"the key cannot be removed", keyed, cmd, nil, events.CodeHostExists},
		{"another spec with a key is refused", bigger, withKey(key), nil, events.CodeHostExists},
	}
	for _, tc := range keyTests {
		t.Run(tc.name, func(t *testing.T) {
			ev, fault := decideRegisterHost(tc.host, tc.cmd)
			checkDecision(t, ev, fault, tc.wantEvent, tc.wantCode)
		})
	}
}

func TestDecideCordon(t *testing.T) {
	up := events.HostState{Name: "h1", Registered: true, CPU: 4, MemoryMiB: 1024}
	cordoned := up
	cordoned.Cordoned = true
	tests := []struct {
		name      string
		host      events.HostState
		uncordon  bool
		wantEvent events.Event
		wantCode  events.Code
	}{
		{"cordon", up, false, events.HostCordoned{Reason: "maintenance"}, 0},
		{"cordon a cordoned host", cordoned, false, nil, 0},
		{"uncordon", cordoned, true, events.HostUncordoned{}, 0},
		{"uncordon an uncordoned host", up, true, nil, 0},
		{"cordon unknown host", events.HostState{}, false, nil, events.CodeHostNotFound},
		{"uncordon unknown host", events.HostState{}, true, nil, events.CodeHostNotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ev, fault := decideCordon(tc.host, "h1", tc.uncordon, "maintenance")
			checkDecision(t, ev, fault, tc.wantEvent, tc.wantCode)
		})
	}
}

func TestDecideAllocate(t *testing.T) {
	host := func(cordoned bool, allocs map[string]events.Allocation) *hostView {
		v := newHostView(events.HostState{Name: "h1", Registered: true, CPU: 4, MemoryMiB: 4096, Cordoned: cordoned, Allocations: allocs})
		return &v
	}
	want := allocation{vm: "web", uid: "u1", need: capacity{2, 1024}}
	tests := []struct {
		name      string
		host      *hostView
		reserved  capacity
		wantEvent events.Event
		wantCode  events.Code
	}{
		{"fits", host(false, nil), capacity{}, events.HostAllocated{VM: "web", UID: "u1", CPU: 2, MemoryMiB: 1024}, 0},
		{"fits exactly", host(false, map[string]events.Allocation{"db": {UID: "u2", CPU: 2, MemoryMiB: 3072}}), capacity{}, events.HostAllocated{VM: "web", UID: "u1", CPU: 2, MemoryMiB: 1024}, 0},
		{"no cpu left", host(false, map[string]events.Allocation{"db": {UID: "u2", CPU: 3, MemoryMiB: 1}}), capacity{}, nil, events.CodeNoCapacity},
		{"reserved by other creates", host(false, nil), capacity{3, 0}, nil, events.CodeNoCapacity},
		{"cordoned", host(true, nil), capacity{}, nil, events.CodeNoCapacity},
		{"not registered", &hostView{}, capacity{}, nil, events.CodeNoCapacity},
		{"declared lost", func() *hostView { v := host(false, nil); v.state.Lost = true; return v }(), capacity{}, nil, events.CodeNoCapacity},
		{"already allocated for this uid", host(false, map[string]events.Allocation{"web": {UID: "u1", CPU: 2, MemoryMiB: 1024}}), capacity{4, 4096}, nil, 0},
		{"stale allocation of another incarnation counts", host(false, map[string]events.Allocation{"web": {UID: "old", CPU: 3, MemoryMiB: 1024}}), capacity{}, nil, events.CodeNoCapacity},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ev, fault := decideAllocate(tc.host, tc.reserved, want)
			checkDecision(t, ev, fault, tc.wantEvent, tc.wantCode)
		})
	}
}

func TestDecideLostAndRejoin(t *testing.T) {
	up := events.HostState{Name: "h1", Registered: true}
	lost := events.HostState{Name: "h1", Registered: true, Lost: true, LostMarker: 20}
	rejoined := events.HostState{Name: "h1", Registered: true, LostMarker: 20, Epoch: 25}
	lostTests := []struct {
		name   string
		host   events.HostState
		marker uint64
		want   events.Event
	}{
		{"alive host", up, 20, events.HostLost{MarkerSeq: 20, RenewalSeq: 7}},
		{"unregistered", events.HostState{Name: "h1"}, 20, nil},
		{"already lost at this marker", lost, 20, nil},
		{"lost at a later marker", lost, 15, nil},
		{"lost again, later", lost, 30, events.HostLost{MarkerSeq: 30, RenewalSeq: 7}},
		{"rejoined after this marker", rejoined, 20, nil},
		{"rejoined, then lost again", rejoined, 40, events.HostLost{MarkerSeq: 40, RenewalSeq: 7}},
	}
	for _, tc := range lostTests {
		t.Run("lost/"+tc.name, func(t *testing.T) {
			if got := decideLost(&tc.host, tc.marker, 7); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("decideLost = %#v, want %#v", got, tc.want)
			}
		})
	}
	rejoinTests := []struct {
		name    string
		host    events.HostState
		renewal uint64
		want    events.Event
	}{
		{"lost, renewal after the marker", lost, 21, events.HostRejoined{RenewalSeq: 21}},
		{"lost, renewal from before the marker", lost, 19, nil},
		{"not lost", up, 21, nil},
		{"unregistered", events.HostState{Name: "h1", Lost: true}, 21, nil},
	}
	for _, tc := range rejoinTests {
		t.Run("rejoin/"+tc.name, func(t *testing.T) {
			if got := decideRejoin(&tc.host, tc.renewal); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("decideRejoin = %#v, want %#v", got, tc.want)
			}
		})
	}
}

func TestDecideRelease(t *testing.T) {
	h := events.HostState{Name: "h1", Allocations: map[string]events.Allocation{"web": {UID: "u1", CPU: 1}}}
	tests := []struct {
		name string
		vm   string
		uid  string
		want events.Event
	}{
		{"held", "web", "u1", events.HostReleased{VM: "web", UID: "u1", Reason: ReleaseDeleted}},
		{"another incarnation's", "web", "u0", nil},
		{"not held", "db", "u1", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := decideRelease(h, tc.vm, tc.uid, ReleaseDeleted); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %#v, want %#v", got, tc.want)
			}
		})
	}
}

func TestDecideRegisterImage(t *testing.T) {
	cmd := &events.RegisterImage{Name: "debian", Format: "qcow2", SizeBytes: 10, Source: "/img/debian.qcow2"}
	same := events.ImageState{Name: "debian", Registered: true, Format: "qcow2", SizeBytes: 10, Source: "/img/debian.qcow2"}
	raw := same
	raw.Format = "raw"
	tests := []struct {
		name      string
		image     events.ImageState
		wantEvent events.Event
		wantCode  events.Code
	}{
		{"new image", events.ImageState{}, events.ImageRegistered{Format: "qcow2", SizeBytes: 10, Source: "/img/debian.qcow2"}, 0},
		{"same spec again is a no-op", same, nil, 0},
		{"other format", raw, nil, events.CodeImageExists},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ev, fault := decideRegisterImage(tc.image, cmd)
			checkDecision(t, ev, fault, tc.wantEvent, tc.wantCode)
		})
	}
}

func TestDecideCreate(t *testing.T) {
	origin := events.Origin{Actor: "alice", CommandID: "c1", Time: time.Unix(1700000000, 0)}
	uid := events.DeriveUID("alice", "c1")
	cmd := createCmd("web", "c1", 2, 1024)
	stopped := *cmd
	stopped.Stopped = true
	leave := *cmd
	leave.OnHostLost = events.LeaveStopped
	vm := func(uid string, phase events.Phase) events.VMState {
		return events.VMState{Name: "web", UID: uid, Phase: phase}
	}
	tests := []struct {
		name      string
		vm        events.VMState
		cmd       *events.CreateVM
		wantEvent events.Event
		wantCode  events.Code
	}{
		{"new name", events.VMState{}, cmd, events.VMCreated{UID: uid, Image: "debian", CPU: 2, MemoryMiB: 1024, Desired: events.DesiredRunning, OnHostLost: events.RestartElsewhere}, 0},
		{"created stopped", events.VMState{}, &stopped, events.VMCreated{UID: uid, Image: "debian", CPU: 2, MemoryMiB: 1024, Desired: events.DesiredStopped, OnHostLost: events.RestartElsewhere}, 0},
		{"left stopped on host loss", events.VMState{}, &leave, events.VMCreated{UID: uid, Image: "debian", CPU: 2, MemoryMiB: 1024, Desired: events.DesiredRunning, OnHostLost: events.LeaveStopped}, 0},
		{"name of a gone vm", vm("old", events.PhaseGone), cmd, events.VMCreated{UID: uid, Image: "debian", CPU: 2, MemoryMiB: 1024, Desired: events.DesiredRunning, OnHostLost: events.RestartElsewhere}, 0},
		{"this command's vm already", vm(uid, events.PhasePending), cmd, nil, 0},
		{"this command's vm, placed", vm(uid, events.PhasePlaced), cmd, nil, 0},
		{"name taken", vm("other", events.PhasePlaced), cmd, nil, events.CodeVMExists},
		{"name taken by a pending vm", vm("other", events.PhasePending), cmd, nil, events.CodeVMExists},
		{"name still being deleted", vm("other", events.PhaseDeleting), cmd, nil, events.CodeVMExists},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ev, fault := decideCreate(tc.vm, tc.cmd, origin)
			checkDecision(t, ev, fault, tc.wantEvent, tc.wantCode)
		})
	}
}

func TestDecidePlace(t *testing.T) {
	p := placement{host: "h1", allocSeq: 7}
	vm := func(uid string, phase events.Phase) events.VMState {
		return events.VMState{Name: "web", UID: uid, Phase: phase}
	}
	tests := []struct {
		name      string
		vm        events.VMState
		wantEvent events.Event
		wantCode  events.Code
	}{
		{"pending", vm("u1", events.PhasePending), events.VMPlaced{UID: "u1", Host: "h1", AllocationSeq: 7}, 0},
		{"already placed", vm("u1", events.PhasePlaced), nil, 0},
		{"deleted before placement", vm("u1", events.PhaseGone), nil, events.CodeVMNotFound},
		{"being deleted", vm("u1", events.PhaseDeleting), nil, events.CodeVMNotFound},
		{"another incarnation", vm("u2", events.PhasePending), nil, events.CodeVMNotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ev, fault := decidePlace(tc.vm, "u1", p)
			checkDecision(t, ev, fault, tc.wantEvent, tc.wantCode)
		})
	}
}

func TestDecideWithdraw(t *testing.T) {
	tests := []struct {
		name string
		vm   events.VMState
		want events.Event
	}{
		{"pending", events.VMState{UID: "u1", Phase: events.PhasePending}, events.VMDeleted{UID: "u1", Reason: ReasonNoCapacity}},
		{"placed after all", events.VMState{UID: "u1", Phase: events.PhasePlaced}, nil},
		{"another incarnation", events.VMState{UID: "u2", Phase: events.PhasePending}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := decideWithdraw(tc.vm, "u1", ReasonNoCapacity); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %#v, want %#v", got, tc.want)
			}
		})
	}
}

func TestDecideGoal(t *testing.T) {
	vm := func(phase events.Phase, desired events.Desired) events.VMState {
		return events.VMState{Name: "web", UID: "u1", Phase: phase, Desired: desired}
	}
	goal := func(d events.Desired) events.Event { return events.VMGoalChanged{UID: "u1", Desired: d} }
	tests := []struct {
		name      string
		vm        events.VMState
		verb      string
		wantEvent events.Event
		wantCode  events.Code
	}{
		{"stop running", vm(events.PhasePlaced, events.DesiredRunning), events.VerbStop, goal(events.DesiredStopped), 0},
		{"start stopped", vm(events.PhasePlaced, events.DesiredStopped), events.VerbStart, goal(events.DesiredRunning), 0},
		{"pause running", vm(events.PhasePlaced, events.DesiredRunning), events.VerbPause, goal(events.DesiredPaused), 0},
		{"resume paused", vm(events.PhasePlaced, events.DesiredPaused), events.VerbResume, goal(events.DesiredRunning), 0},
		{"start running is a no-op", vm(events.PhasePlaced, events.DesiredRunning), events.VerbStart, nil, 0},
		{"stop stopped is a no-op", vm(events.PhasePlaced, events.DesiredStopped), events.VerbStop, nil, 0},
		{"pause paused is a no-op", vm(events.PhasePlaced, events.DesiredPaused), events.VerbPause, nil, 0},
		{"resume running is a no-op", vm(events.PhasePlaced, events.DesiredRunning), events.VerbResume, nil, 0},
		{"stop paused", vm(events.PhasePlaced, events.DesiredPaused), events.VerbStop, goal(events.DesiredStopped), 0},
		{"pause stopped", vm(events.PhasePlaced, events.DesiredStopped), events.VerbPause, nil, events.CodeInvalidArgument},
		{"resume stopped", vm(events.PhasePlaced, events.DesiredStopped), events.VerbResume, nil, events.CodeInvalidArgument},
		{"pending takes the goal", vm(events.PhasePending, events.DesiredRunning), events.VerbStop, goal(events.DesiredStopped), 0},
		{"deleting", vm(events.PhaseDeleting, events.DesiredAbsent), events.VerbStart, nil, events.CodeVMDeleting},
		{"gone", vm(events.PhaseGone, events.DesiredAbsent), events.VerbStart, nil, events.CodeVMNotFound},
		{"never created", events.VMState{}, events.VerbStop, nil, events.CodeVMNotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ev, fault := decideGoal(tc.vm, "web", tc.verb)
			checkDecision(t, ev, fault, tc.wantEvent, tc.wantCode)
		})
	}
}

func TestDecideDelete(t *testing.T) {
	tests := []struct {
		name      string
		vm        events.VMState
		wantEvent events.Event
		wantCode  events.Code
	}{
		{"placed", events.VMState{UID: "u1", Phase: events.PhasePlaced}, events.VMDeleted{UID: "u1", Reason: events.AbsentDeleted}, 0},
		{"pending", events.VMState{UID: "u1", Phase: events.PhasePending}, events.VMDeleted{UID: "u1", Reason: events.AbsentDeleted}, 0},
		{"already deleting is a no-op", events.VMState{UID: "u1", Phase: events.PhaseDeleting}, nil, 0},
		{"gone", events.VMState{UID: "u1", Phase: events.PhaseGone}, nil, events.CodeVMNotFound},
		{"never created", events.VMState{}, nil, events.CodeVMNotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ev, fault := decideDelete(tc.vm, "web")
			checkDecision(t, ev, fault, tc.wantEvent, tc.wantCode)
		})
	}
}

func TestChooseHost(t *testing.T) {
	need := capacity{2, 1024}
	tests := []struct {
		name   string
		hosts  []candidate
		want   string
		wantOK bool
	}{
		{"most free memory", []candidate{{"a", true, capacity{4, 2048}}, {"b", true, capacity{4, 8192}}, {"c", true, capacity{8, 4096}}}, "b", true},
		{"tie goes to the smallest name", []candidate{{"c", true, capacity{4, 4096}}, {"a", true, capacity{4, 4096}}, {"b", true, capacity{4, 4096}}}, "a", true},
		{"skips what does not fit", []candidate{{"a", true, capacity{1, 9999}}, {"b", true, capacity{2, 1024}}}, "b", true},
		{"skips cordoned", []candidate{{"a", false, capacity{8, 9999}}, {"b", true, capacity{2, 1024}}}, "b", true},
		{"nothing fits", []candidate{{"a", true, capacity{1, 9999}}, {"b", true, capacity{8, 1023}}}, "", false},
		{"no hosts", nil, "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := chooseHost(tc.hosts, need)
			if got != tc.want || ok != tc.wantOK {
				t.Fatalf("chooseHost=%q,%v, want %q,%v", got, ok, tc.want, tc.wantOK)
			}
		})
	}
}

func TestOrphanReason(t *testing.T) {
	a := events.Allocation{UID: "u1", CPU: 1, MemoryMiB: 1}
	vm := func(uid string, phase events.Phase, host string) events.VMState {
		return events.VMState{Name: "web", UID: uid, Phase: phase, Host: host}
	}
	tests := []struct {
		name  string
		vm    events.VMState
		known bool
		want  string
	}{
		{"placed here", vm("u1", events.PhasePlaced, "h1"), true, ""},
		{"pending: will be placed", vm("u1", events.PhasePending, ""), true, ""},
		{"placed elsewhere", vm("u1", events.PhasePlaced, "h2"), true, ReleaseOrphaned},
		{"deleting", vm("u1", events.PhaseDeleting, "h1"), true, ReleaseDeleted},
		{"gone", vm("u1", events.PhaseGone, ""), true, ReleaseDeleted},
		{"another incarnation", vm("u2", events.PhasePlaced, "h1"), true, ReleaseOrphaned},
		{"no such vm", events.VMState{}, false, ReleaseOrphaned},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := orphanReason("h1", a, tc.vm, tc.known); got != tc.want {
				t.Fatalf("orphanReason=%q, want %q", got, tc.want)
			}
		})
	}
}

func TestHostView_TracksUsage(t *testing.T) {
	v := newHostView(events.HostState{Name: "h1", Registered: true, CPU: 8, MemoryMiB: 8192,
		Allocations: map[string]events.Allocation{"old": {UID: "u0", CPU: 1, MemoryMiB: 100}}})
	apply := func(seq uint64, ev events.Event) {
		t.Helper()
		rec := events.Record{Seq: seq, Envelope: events.Envelope{Kind: events.KindHost, AggregateID: "h1"}, Event: ev}
		if err := v.apply(&rec); err != nil {
			t.Fatal(err)
		}
	}
	apply(2, events.HostAllocated{VM: "web", UID: "u1", CPU: 2, MemoryMiB: 1000})
	apply(3, events.HostAllocated{VM: "old", UID: "u9", CPU: 3, MemoryMiB: 300}) // replaces u0's
	apply(4, events.HostReleased{VM: "web", UID: "nope", Reason: ReleaseOrphaned})
	if got, want := v.used, (capacity{5, 1300}); got != want {
		t.Fatalf("used=%+v, want %+v", got, want)
	}
	apply(5, events.HostReleased{VM: "web", UID: "u1", Reason: ReleaseDeleted})
	cpu, mem := v.state.Used()
	if got, want := v.used, (capacity{cpu, mem}); got != want {
		t.Fatalf("used=%+v, want %+v (the state's own sum)", got, want)
	}
}
