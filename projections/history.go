package projections

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/hostkey"
)

// historyConfig shapes a generated fleet history.
type historyConfig struct {
	hosts, images int
	// liveVMs is how many VMs exist at once, at most; names come from a
	// pool twice as large, so names get new incarnations.
	liveVMs int
	// anomalies mixes in what the read models must ignore or flag:
	// reports from the wrong host, of another incarnation or an older
	// goal, misplaced events, corrupt bytes, unknown types and versions;
	// with keys, also unsigned, forged and replayed observations.
	anomalies bool
	// keys says which hosts are registered with a key, whose agents then
	// sign what they report.
	keys keyMode
}

// keyMode says which hosts of a generated history have keys.
type keyMode int

const (
	// keysNone: every host in the legacy mode, its reports unsigned.
	keysNone keyMode = iota
	// keysAll: every host registered with a key. The keys come from a
	// randomness of their own, so a history with keys has the shape of
	// the same seed's history without.
	keysAll
	// keysMixed: every other host registered with a key, some of the
	// others given one later, the rest in the legacy mode.
	keysMixed
)

// benchFleet is the fleet of the rebuild benchmark.
var benchFleet = historyConfig{hosts: 100, images: 8, liveVMs: 5000}

// history generates a plausible history of a fleet, as handlers and agents
// would append it: hosts and images registered, VMs created, allocated,
// placed, started, stopped, deleted, observed by their hosts' agents, and
// released. It assumes its messages get consecutive stream sequences from
// seq on, and uses them as incarnations and allocation sequences.
type history struct {
	cfg historyConfig
	rng *rand.Rand
	// keyRng makes the hosts' keys.
	keyRng *rand.Rand
	// seq is the stream sequence the next message gets.
	seq uint64
	// commands counts the commands issued, for command ids.
	commands int
	// prev is the hash of the last message on each subject.
	prev  map[string][]byte
	hosts []*genHost
	// images are the registered images' names.
	images []string
	// live are the VMs that exist, by name; names lists them, so that
	// picking one at random is deterministic, and at is where each is in
	// names.
	live  map[string]*genVM
	names []string
	at    map[string]int
	// queue holds what an action produced and next has not returned.
	queue []message
	// livenessSeq is the last made-up LOOM_LIVENESS sequence.
	livenessSeq uint64
	// leases are the grants standing on each resource (history_leases.go).
	leases map[events.Resource]*genLease
	// nets are the virtual networks' states (history_nets.go).
	nets map[string]*events.NetState
	// last is the sequence of the last message on each subject, and
	// sent the last few messages on each observation subject (for
	// replays).
	last map[string]uint64
	sent map[string][]message
	// forged are the sequences of what forge appended on the subjects of
	// hosts with keys, with the code the read models must flag each with.
	forged map[uint64]events.Code
	// forgeries counts those of forged, which picks the next kind.
	forgeries int
}

type genHost struct {
	name     string
	cpu, mem int
	used     map[string]int // cpu by VM
	cordoned bool
	orphans  []string
	// lost is the marker sequence the host was declared lost at; 0 when
	// it is not lost.
	lost uint64
	// key signs its agent's reports once registered; nil in the legacy
	// mode.
	key *hostkey.Key
}

type genVM struct {
	name, uid, host, image string
	cpu, mem               int
	phase                  events.Phase
	desired                events.Desired
	// incarnation is the sequence of the decision that set the goal;
	// observed the last incarnation its agent reported.
	incarnation, observed uint64
	// checkpoints are its taken checkpoints not yet deleted.
	checkpoints []string
	// net is the virtual network it has an address on, if any.
	net string
}

// message is one message to publish: sealed bytes, or corrupt ones.
type message struct {
	// seq is the stream sequence the message must land on.
	seq     uint64
	subject string
	data    []byte
	typ     events.Type
	version int
	// header holds an observation's signature and the subject sequence
	// it expects; nil for the rest.
	header nats.Header
}

func newHistory(cfg historyConfig, seed uint64, firstSeq uint64) *history {
	return &history{cfg: cfg, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), keyRng: rand.New(rand.NewPCG(seed, 0x6b6579)), seq: firstSeq,
		prev: map[string][]byte{}, live: map[string]*genVM{}, at: map[string]int{},
		leases: map[events.Resource]*genLease{}, last: map[string]uint64{}, sent: map[string][]message{},
		forged: map[uint64]events.Code{}}
}

// next is the history's next message.
func (h *history) next() message {
	for len(h.queue) == 0 {
		h.act()
	}
	m := h.queue[0]
	h.queue = h.queue[1:]
	return m
}

// act performs one action: a command's events or an agent's report.
func (h *history) act() {
	switch {
	case len(h.hosts) < h.cfg.hosts:
		h.registerHost()
		return
	case len(h.images) < h.cfg.images:
		h.registerImage()
		return
	case h.nets == nil:
		h.createNets()
		return
	}
	if h.cfg.anomalies && h.rng.IntN(12) == 0 {
		h.anomaly()
		return
	}
	switch n := h.rng.IntN(100); {
	case n < 22 && len(h.live) < h.cfg.liveVMs:
		h.createVM()
	case n < 45:
		h.report()
	case n < 60:
		h.changeGoal()
	case n < 70:
		h.deleteVM()
	case n < 73:
		h.place()
	case n < 76:
		h.progress()
	case n < 78:
		h.orphan()
	case n < 79:
		h.cordon()
	case n < 80:
		if h.cfg.keys == keysMixed && h.rng.IntN(4) == 0 {
			h.giveKey()
			return
		}
		h.liveness()
	case n < 88:
		h.lease()
	case n < 92:
		h.checkpoint()
	case n < 94:
		h.migrate()
	default:
		h.report()
	}
}

// emit seals ev on subject as the index-th event of commandID and queues
// it; it returns the sequence the message will get. An observation of a
// host with a key is signed with it, as its agent would.
func (h *history) emit(subject string, ev events.Event, commandID string, index int) uint64 {
	addr, err := events.ParseEventSubject(subject)
	if err != nil {
		panic(err) // the generator builds its subjects itself
	}
	origin := events.Origin{Actor: "bench", CommandID: commandID, Time: time.Unix(1_800_000_000, 0).Add(time.Duration(h.seq) * time.Millisecond)}
	_, data, err := events.Seal(ev, addr.Kind, addr.ID, origin, index, h.prev[subject])
	if err != nil {
		panic(err)
	}
	m := message{subject: subject, data: data, typ: ev.EventType(), version: events.CurrentVersion(ev.EventType())}
	if addr.Observed {
		if host := h.hostNamed(addr.Host); host != nil && host.key != nil {
			h.sign(&m, host.key)
		}
	}
	return h.emitRaw(m)
}

// sign signs m with key as an agent appending it after its subject's last
// message.
func (h *history) sign(m *message, key *hostkey.Key) {
	prev := h.last[m.subject]
	m.header = nats.Header{}
	m.header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(prev, 10))
	m.header.Set(events.HeaderSigKey, key.Public())
	m.header.Set(events.HeaderSig, key.Sign(m.subject, prev, events.Hash(m.data)))
}

func (h *history) emitRaw(m message) uint64 {
	seq := h.seq
	h.seq++
	m.seq = seq
	h.prev[m.subject] = events.Hash(m.data)
	h.last[m.subject] = seq
	if strings.HasPrefix(m.subject, "loom.obs.") {
		sent := append(h.sent[m.subject], m)
		h.sent[m.subject] = sent[max(0, len(sent)-4):]
	}
	h.queue = append(h.queue, m)
	return seq
}

func (h *history) command() string {
	h.commands++
	return "cmd-" + strconv.Itoa(h.commands)
}

func (h *history) registerHost() {
	host := &genHost{name: fmt.Sprintf("host-%03d", len(h.hosts)), cpu: 64, mem: 256 << 10, used: map[string]int{}}
	h.hosts = append(h.hosts, host)
	if h.cfg.keys == keysAll || (h.cfg.keys == keysMixed && len(h.hosts)%2 == 1) {
		host.key = h.newKey()
	}
	h.emit(events.EventSubject(events.KindHost, host.name), host.registration(len(h.hosts)), h.command(), 0)
}

// registration is what registers host, the i-th.
func (g *genHost) registration(i int) events.HostRegistered {
	reg := events.HostRegistered{CPU: g.cpu, MemoryMiB: g.mem,
		Labels: map[string]string{"rack": strconv.Itoa(i % 4), "zone": "z" + strconv.Itoa(i%2)}}
	if g.key != nil {
		reg.Key = g.key.Public()
	}
	return reg
}

// giveKey registers a host of the legacy mode again, with a key: from
// then on its agent signs.
func (h *history) giveKey() {
	i := h.rng.IntN(len(h.hosts))
	host := h.hosts[i]
	if host.key != nil {
		return
	}
	host.key = h.newKey()
	h.emit(events.EventSubject(events.KindHost, host.name), host.registration(i+1), h.command(), 0)
}

// newKey is a host key made from the history's randomness for keys.
func (h *history) newKey() *hostkey.Key {
	var seed [32]byte
	for i := range seed {
		seed[i] = byte(h.keyRng.IntN(256))
	}
	key, err := hostkey.Derive(seed)
	if err != nil {
		panic(err)
	}
	return key
}

// hostNamed is the host of that name, nil if none.
func (h *history) hostNamed(name string) *genHost {
	if i := slices.IndexFunc(h.hosts, func(g *genHost) bool { return g.name == name }); i >= 0 {
		return h.hosts[i]
	}
	return nil
}

func (h *history) registerImage() {
	name := fmt.Sprintf("image-%d", len(h.images))
	h.images = append(h.images, name)
	h.emit(events.EventSubject(events.KindImage, name), events.ImageRegistered{Format: "qcow2", SizeBytes: 1 << 30,
		Source: "/var/lib/loom/" + name + ".qcow2"}, h.command(), 0)
}

func (h *history) createVM() {
	name := fmt.Sprintf("vm-%05d", h.rng.IntN(2*h.cfg.liveVMs))
	if _, taken := h.live[name]; taken {
		return
	}
	cmd := h.command()
	vm := &genVM{name: name, uid: events.DeriveUID("bench", cmd), image: h.images[h.rng.IntN(len(h.images))],
		cpu: 1 + h.rng.IntN(4), phase: events.PhasePending, desired: events.DesiredRunning}
	vm.mem = 512 * vm.cpu
	if h.rng.IntN(3) == 0 {
		vm.net = "net-" + strconv.Itoa(h.rng.IntN(2))
	}
	h.live[name] = vm
	h.at[name] = len(h.names)
	h.names = append(h.names, name)
	h.emit(events.EventSubject(events.KindVM, name), events.VMCreated{UID: vm.uid, Image: vm.image, CPU: vm.cpu,
		MemoryMiB: vm.mem, Desired: vm.desired, Net: vm.net}, cmd, 0)
	h.placeVM(vm, cmd, 1)
}

// place places a pending VM, as the scheduler retries them.
func (h *history) place() {
	if vm := h.pick(func(vm *genVM) bool { return vm.phase == events.PhasePending }); vm != nil {
		h.placeVM(vm, h.command(), 0)
	}
}

func (h *history) placeVM(vm *genVM, cmd string, index int) {
	var host *genHost
	for _, i := range h.rng.Perm(len(h.hosts))[:min(8, len(h.hosts))] {
		if c := h.hosts[i]; !c.cordoned && c.free() >= vm.cpu {
			host = c
			break
		}
	}
	if host == nil {
		return // stays pending
	}
	host.used[vm.name] = vm.cpu
	allocSeq := h.emit(events.EventSubject(events.KindHost, host.name), events.HostAllocated{VM: vm.name, UID: vm.uid,
		CPU: vm.cpu, MemoryMiB: vm.mem}, cmd, index)
	vm.host, vm.phase = host.name, events.PhasePlaced
	h.bind(vm, cmd)
	vm.incarnation = h.emit(events.EventSubject(events.KindVM, vm.name), events.VMPlaced{UID: vm.uid, Host: host.name,
		AllocationSeq: allocSeq}, cmd, index+1)
}

func (g *genHost) free() int {
	free := g.cpu
	for _, cpu := range g.used {
		free -= cpu
	}
	return free
}

func (h *history) changeGoal() {
	vm := h.pick(func(vm *genVM) bool { return vm.phase == events.PhasePlaced })
	if vm == nil {
		return
	}
	desired := []events.Desired{events.DesiredRunning, events.DesiredStopped, events.DesiredPaused}[h.rng.IntN(3)]
	vm.desired = desired
	vm.incarnation = h.emit(events.EventSubject(events.KindVM, vm.name), events.VMGoalChanged{UID: vm.uid, Desired: desired}, h.command(), 0)
}

func (h *history) deleteVM() {
	vm := h.pick(func(vm *genVM) bool { return vm.phase == events.PhasePlaced || vm.phase == events.PhasePending })
	if vm == nil {
		return
	}
	seq := h.emit(events.EventSubject(events.KindVM, vm.name), events.VMDeleted{UID: vm.uid, Reason: events.AbsentDeleted}, h.command(), 0)
	if vm.phase == events.PhasePending {
		h.forget(vm) // never placed: gone at once
		return
	}
	vm.phase, vm.desired, vm.incarnation = events.PhaseDeleting, events.DesiredAbsent, seq
}

// report is an agent reporting the goal it acted on; once a deleted VM is
// reported absent, its allocation is released.
func (h *history) report() {
	vm := h.pick(func(vm *genVM) bool { return vm.host != "" && vm.observed < vm.incarnation })
	if vm == nil {
		return
	}
	state := map[events.Desired]events.ObservedState{events.DesiredRunning: events.ObservedRunning,
		events.DesiredStopped: events.ObservedStopped, events.DesiredPaused: events.ObservedPaused,
		events.DesiredAbsent: events.ObservedAbsent}[vm.desired]
	vm.observed = vm.incarnation
	h.emit(events.ObservationSubject(vm.host, events.KindVM, vm.name), events.VMObserved{UID: vm.uid,
		Incarnation: vm.incarnation, State: state}, "", 0)
	if vm.phase == events.PhaseDeleting {
		host := h.host(vm.host)
		delete(host.used, vm.name)
		h.emit(events.EventSubject(events.KindHost, host.name), events.HostReleased{VM: vm.name, UID: vm.uid,
			Reason: events.AbsentDeleted}, "release-"+vm.uid, 0)
		h.release(vm)
		h.forget(vm)
	}
}

func (h *history) progress() {
	vm := h.pick(func(vm *genVM) bool { return vm.phase == events.PhasePlaced && vm.observed < vm.incarnation })
	if vm == nil {
		return
	}
	h.emit(events.ObservationSubject(vm.host, events.KindVM, vm.name), events.VMProgress{UID: vm.uid,
		Incarnation: vm.incarnation, Step: "define", Done: 1, Total: 2}, "", 0)
}

func (h *history) orphan() {
	host := h.hosts[h.rng.IntN(len(h.hosts))]
	subject := events.ObservationSubject(host.name, events.KindHost, host.name)
	if len(host.orphans) > 0 && h.rng.IntN(2) == 0 {
		domain := host.orphans[0]
		host.orphans = host.orphans[1:]
		h.emit(subject, events.HostOrphanCleared{Domain: domain}, "", 0)
		return
	}
	domain := "stray-" + strconv.Itoa(h.rng.IntN(1000))
	host.orphans = append(host.orphans, domain)
	h.emit(subject, events.HostOrphanFound{Domain: domain, UUID: events.DeriveUID("orphan", domain), State: events.ObservedRunning}, "", 0)
}

func (h *history) cordon() {
	host := h.hosts[h.rng.IntN(len(h.hosts))]
	subject := events.EventSubject(events.KindHost, host.name)
	host.cordoned = !host.cordoned
	if host.cordoned {
		h.emit(subject, events.HostCordoned{Reason: "maintenance"}, h.command(), 0)
	} else {
		h.emit(subject, events.HostUncordoned{}, h.command(), 0)
	}
}

// liveness declares a host lost, or rejoins a lost one, as the failure
// detector does. Liveness sequences are made up: they live on another
// stream, and the read models only record them.
func (h *history) liveness() {
	host := h.hosts[h.rng.IntN(len(h.hosts))]
	subject := events.EventSubject(events.KindHost, host.name)
	h.livenessSeq += 1 + uint64(h.rng.IntN(50))
	if host.lost == 0 {
		host.lost = h.livenessSeq
		h.emit(subject, events.HostLost{MarkerSeq: host.lost, RenewalSeq: host.lost - 1}, "lost-"+strconv.FormatUint(host.lost, 10), 0)
		return
	}
	host.lost = 0
	h.emit(subject, events.HostRejoined{RenewalSeq: h.livenessSeq}, "rejoin-"+strconv.FormatUint(h.livenessSeq, 10), 0)
}

// anomaly appends something the read models must ignore or flag.
func (h *history) anomaly() {
	vm := h.pick(func(vm *genVM) bool { return vm.host != "" })
	host := h.hosts[h.rng.IntN(len(h.hosts))]
	switch h.rng.IntN(9) {
	case 0: // corrupt bytes on a decision subject
		h.emitRaw(message{subject: events.EventSubject(events.KindVM, "vm-corrupt"), data: []byte{0xc1, 0x00, byte(h.rng.IntN(256))}})
	case 1: // a type this build does not know, on a kind it does not fold
		h.emitUnknown(events.EventSubject("disk", "d-0"), "disk.attached", 1)
	case 2: // a newer version of a known type
		h.emitUnknown(events.EventSubject(events.KindVM, "vm-future"), events.TypeVMCreated, 9)
	case 3: // an agent reporting on another host
		h.emit(events.ObservationSubject(host.name, events.KindHost, "host-elsewhere"), events.HostOrphanFound{Domain: "x"}, "", 0)
	case 4: // a decision on an observation subject
		h.emit(events.ObservationSubject(host.name, events.KindVM, "vm-forged"), events.VMCreated{UID: "forged", Desired: events.DesiredRunning}, "", 0)
	case 5, 6, 7:
		if h.cfg.keys != keysNone && vm != nil {
			h.forge(vm)
		}
	}
	if vm == nil {
		return
	}
	switch h.rng.IntN(4) {
	case 0: // a report from a host the VM is not on
		other := h.hosts[h.rng.IntN(len(h.hosts))].name
		h.emit(events.ObservationSubject(other, events.KindVM, vm.name), events.VMObserved{UID: vm.uid, Incarnation: vm.incarnation, State: events.ObservedCrashed}, "", 0)
	case 1: // a report on another incarnation of the name
		h.emit(events.ObservationSubject(vm.host, events.KindVM, vm.name), events.VMObserved{UID: "an-older-uid", Incarnation: vm.incarnation, State: events.ObservedCrashed}, "", 0)
	case 2: // a late report of an older goal
		if vm.observed > 1 {
			h.emit(events.ObservationSubject(vm.host, events.KindVM, vm.name), events.VMObserved{UID: vm.uid, Incarnation: vm.observed - 1, State: events.ObservedCrashed}, "", 0)
		}
	case 3: // a release of another incarnation's allocation
		h.emit(events.EventSubject(events.KindHost, vm.host), events.HostReleased{VM: vm.name, UID: "an-older-uid", Reason: "stale"}, h.command(), 0)
	}
}

// forge appends, on the subject of vm's host, what its agent did not: an
// unsigned report, one signed by another host's key (or one nobody
// registered), one whose signature was changed, or an old report of the
// subject published again. Against a host without a key they are taken,
// as the legacy mode takes anything.
func (h *history) forge(vm *genVM) {
	subject := events.ObservationSubject(vm.host, events.KindVM, vm.name)
	report := events.VMObserved{UID: vm.uid, Incarnation: vm.incarnation, State: events.ObservedCrashed}
	host := h.hostNamed(vm.host)
	var seq uint64
	var code events.Code
	// The kinds come in turn, not at random, and a kind counts only once
	// it landed on a keyed host: every history with enough forgeries has
	// each kind, whatever its seed.
	switch h.forgeries % 4 {
	case 0:
		seq, code = h.emitSignedBy(host, subject, report, nil), events.CodeUnsignedObservation
	case 1:
		key := h.hosts[h.rng.IntN(len(h.hosts))].key
		if key == nil || key == host.key {
			key = h.newKey()
		}
		seq, code = h.emitSignedBy(host, subject, report, key), events.CodeForgedObservation
	case 2:
		seq, code = h.emit(subject, report, "", 0), events.CodeForgedObservation
		if m := &h.queue[len(h.queue)-1]; m.seq == seq && m.header != nil {
			m.header = cloneHeader(m.header)
			sig := []byte(m.header.Get(events.HeaderSig))
			sig[10] ^= 1
			m.header.Set(events.HeaderSig, string(sig))
		}
	case 3:
		sent := h.sent[subject]
		if len(sent) < 2 {
			return
		}
		old := sent[h.rng.IntN(len(sent)-1)]
		replay := message{subject: subject, data: old.data, typ: old.typ, version: old.version}
		code = events.CodeUnsignedObservation
		if old.header.Get(events.HeaderSig) != "" {
			// Published as it was, the server would refuse it: the
			// sequence it expects is not the subject's last any more.
			replay.header = cloneHeader(old.header)
			replay.header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(h.last[subject], 10))
			code = events.CodeReplayedObservation
			var env events.Envelope
			if err := events.Unmarshal(old.data, &env); err == nil && bytes.Equal(env.PrevHash, h.prev[subject]) {
				// The subject's last message is a copy of the one this
				// report followed: chained, but signed for another place.
				code = events.CodeForgedObservation
			}
		}
		seq = h.emitRaw(replay)
	}
	if host.key != nil {
		h.forged[seq] = code
		h.forgeries++
	}
}

// emitSignedBy emits ev on subject, an observation subject of host, signed
// with key instead of the host's own (nil: unsigned).
func (h *history) emitSignedBy(host *genHost, subject string, ev events.Event, key *hostkey.Key) uint64 {
	own := host.key
	host.key = key
	defer func() { host.key = own }()
	return h.emit(subject, ev, "", 0)
}

func cloneHeader(header nats.Header) nats.Header {
	out := make(nats.Header, len(header))
	for k, v := range header {
		out[k] = append([]string(nil), v...)
	}
	return out
}

// emitUnknown appends a well-formed envelope of a type or version this
// build cannot decode.
func (h *history) emitUnknown(subject string, typ events.Type, version int) {
	addr, _ := events.ParseEventSubject(subject)
	env := events.Envelope{ID: "01J0000000000000000000UNKN", Type: typ, Version: version, Kind: addr.Kind,
		AggregateID: addr.ID, Actor: "future", CommandID: h.command(), PrevHash: h.prev[subject], Payload: []byte{0x80}}
	data, err := events.Marshal(&env)
	if err != nil {
		panic(err)
	}
	h.emitRaw(message{subject: subject, data: data, typ: typ, version: version})
}

// pick is a random live VM that ok accepts, or nil after a few tries.
func (h *history) pick(ok func(*genVM) bool) *genVM {
	for range 8 {
		if len(h.names) == 0 {
			return nil
		}
		if vm := h.live[h.names[h.rng.IntN(len(h.names))]]; ok(vm) {
			return vm
		}
	}
	return nil
}

// forget removes a VM from the live ones, moving the last name into its
// place.
func (h *history) forget(vm *genVM) {
	i, last := h.at[vm.name], len(h.names)-1
	h.names[i] = h.names[last]
	h.at[h.names[i]] = i
	h.names = h.names[:last]
	delete(h.at, vm.name)
	delete(h.live, vm.name)
}

func (h *history) host(name string) *genHost {
	host := h.hostNamed(name)
	if host == nil {
		panic("no host " + name) // the generator names only its own hosts
	}
	return host
}
