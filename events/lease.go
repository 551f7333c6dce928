package events

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// KindLease is the aggregate kind of a lease: one per resource.
const KindLease Kind = "lease"

// Lease event types.
const (
	TypeLeaseGranted  Type = "lease.granted"
	TypeLeaseReleased Type = "lease.released"
	TypeLeaseExpired  Type = "lease.expired"
	TypeLeaseBreaking Type = "lease.breaking"
	TypeLeaseBroken   Type = "lease.broken"
)

// ResourceKind is what a lease covers.
type ResourceKind string

// The resource kinds.
const (
	ResourceImage ResourceKind = "image"
	ResourceDisk  ResourceKind = "disk"
)

// Resource names what a lease covers: "image/<name>" or "disk/<name>".
// It is the lease aggregate's id.
type Resource struct {
	Kind ResourceKind
	Name string
}

func (r Resource) String() string { return string(r.Kind) + "/" + r.Name }

// ParseResource parses "image/<name>" or "disk/<name>".
func ParseResource(s string) (Resource, error) {
	kind, name, ok := strings.Cut(s, "/")
	r := Resource{Kind: ResourceKind(kind), Name: name}
	if !ok || (r.Kind != ResourceImage && r.Kind != ResourceDisk) {
		return Resource{}, fmt.Errorf("resource %q: want image/<name> or disk/<name>", s)
	}
	if err := ValidateName(kind, name); err != nil {
		return Resource{}, fmt.Errorf("resource %q: %w", s, err)
	}
	return r, nil
}

// LeaseMode is how a lease holds its resource.
type LeaseMode string

// The lease modes. An exclusive grant excludes every other grant; shared
// grants exclude only exclusive ones.
const (
	LeaseExclusive LeaseMode = "exclusive"
	LeaseShared    LeaseMode = "shared"
)

// Valid tells whether m is a lease mode.
func (m LeaseMode) Valid() bool { return m == LeaseExclusive || m == LeaseShared }

// A resource's lease lives on several subjects, so that shared holders
// never serialize on one:
//
//	loom.evt.lease.<kind>.<name>.x           the exclusive grant and its end
//	loom.evt.lease.<kind>.<name>.s.<holder>  one shared holder's grant and its end
//
// An exclusive grant is appended on .x expecting the last sequence of the
// whole resource (the wildcard below): any grant since it read the state
// rejects it. A shared grant is appended on its holder's subject expecting
// that subject's own last sequence, which keeps its hash chain whole; it
// does not check .x, so an exclusive grant may land between its read and
// its append. Such a shared grant is void: the fold (LeaseState.Apply)
// decides it from stream order, and it is never current.
const leaseExclusiveToken, leaseSharedToken = "x", "s"

// LeaseSubject is where the grant of holder in mode on r lives.
func LeaseSubject(r Resource, mode LeaseMode, holder string) string {
	if mode == LeaseExclusive {
		return LeaseExclusiveSubject(r)
	}
	return leaseRoot(r) + "." + leaseSharedToken + "." + holder
}

// LeaseExclusiveSubject is where r's exclusive grants live.
func LeaseExclusiveSubject(r Resource) string {
	return leaseRoot(r) + "." + leaseExclusiveToken
}

// LeaseWildcard matches every subject of r's lease.
func LeaseWildcard(r Resource) string { return leaseRoot(r) + ".>" }

func leaseRoot(r Resource) string {
	return subjectEvents + "." + string(KindLease) + "." + string(r.Kind) + "." + r.Name
}

// parseLeaseSubject parses the tokens after loom.evt.lease.
func parseLeaseSubject(subject string, tokens []string) (Address, error) {
	r, err := ParseResource(tokens[0] + "/" + tokens[1])
	if err != nil {
		return Address{}, fmt.Errorf("subject %q: %w", subject, err)
	}
	switch {
	case len(tokens) == 3 && tokens[2] == leaseExclusiveToken:
		return checkAddress(subject, Address{Kind: KindLease, ID: r.String()})
	case len(tokens) == 4 && tokens[2] == leaseSharedToken && tokens[3] != "":
		return checkAddress(subject, Address{Kind: KindLease, ID: r.String(), Holder: tokens[3]})
	}
	return Address{}, fmt.Errorf("subject %q: not a lease subject", subject)
}

// LeaseHolder names who holds a grant: a VM incarnation on a host, or any
// client that names itself.
type LeaseHolder struct {
	// ID is the holder's own subject token: a VM's UID for VMs.
	ID string `msgpack:"holder" json:"holder"`
	// VM and Host say where the holder runs; Host decides which agent is
	// told of changes, and whose loss expires the grant.
	VM   string `msgpack:"vm,omitempty" json:"vm,omitempty"`
	Host string `msgpack:"host,omitempty" json:"host,omitempty"`
}

// LeaseGranted records a grant. Its stream sequence is its epoch: a
// fencing token that only grows.
type LeaseGranted struct {
	Mode        LeaseMode `msgpack:"mode" json:"mode"`
	LeaseHolder `msgpack:",inline"`
}

// LeaseReleased records that the holder gave the grant of Epoch back.
type LeaseReleased struct {
	Holder string `msgpack:"holder" json:"holder"`
	Epoch  uint64 `msgpack:"epoch" json:"epoch"`
	Reason string `msgpack:"reason,omitempty" json:"reason,omitempty"`
}

// LeaseExpired records that the grant of Epoch ended because its holder's
// host was declared lost: MarkerSeq is the LOOM_LIVENESS sequence of the
// lost marker that won, as host.lost recorded it.
type LeaseExpired struct {
	Holder    string `msgpack:"holder" json:"holder"`
	Epoch     uint64 `msgpack:"epoch" json:"epoch"`
	Host      string `msgpack:"host" json:"host"`
	MarkerSeq uint64 `msgpack:"marker_seq" json:"marker_seq"`
}

// LeaseBreaking records that an operator forced a break of a live grant:
// it ends once its holder cannot write any more (its domain reported
// stopped under Epoch, or its host lost).
type LeaseBreaking struct {
	Holder string `msgpack:"holder" json:"holder"`
	Epoch  uint64 `msgpack:"epoch" json:"epoch"`
	Reason string `msgpack:"reason,omitempty" json:"reason,omitempty"`
}

// LeaseBroken records that an operator's break took effect.
type LeaseBroken struct {
	Holder string `msgpack:"holder" json:"holder"`
	Epoch  uint64 `msgpack:"epoch" json:"epoch"`
	Reason string `msgpack:"reason,omitempty" json:"reason,omitempty"`
}

func (LeaseGranted) EventType() Type  { return TypeLeaseGranted }
func (LeaseReleased) EventType() Type { return TypeLeaseReleased }
func (LeaseExpired) EventType() Type  { return TypeLeaseExpired }
func (LeaseBreaking) EventType() Type { return TypeLeaseBreaking }
func (LeaseBroken) EventType() Type   { return TypeLeaseBroken }

// LeaseGrant is one grant as the read models keep it.
type LeaseGrant struct {
	Resource    string    `msgpack:"resource" json:"resource"`
	Mode        LeaseMode `msgpack:"mode" json:"mode"`
	LeaseHolder `msgpack:",inline"`
	Epoch       uint64 `msgpack:"epoch" json:"epoch"`
	// GrantedBy is the actor of the grant's command.
	GrantedBy string `msgpack:"granted_by,omitempty" json:"granted_by,omitempty"`
	// Breaking is set by a forced break that waits for the holder to stop.
	Breaking   bool   `msgpack:"breaking,omitempty" json:"breaking,omitempty"`
	BreakingBy string `msgpack:"breaking_by,omitempty" json:"breaking_by,omitempty"`
	// Void marks a shared grant that landed while an exclusive one stood:
	// it was never current.
	Void bool `msgpack:"void,omitempty" json:"void,omitempty"`
}

// LeaseState is a resource's lease folded from the events on all its
// subjects.
type LeaseState struct {
	Resource string `msgpack:"resource" json:"resource"`
	// Exclusive is the exclusive grant standing; Epoch zero when none.
	Exclusive LeaseGrant `msgpack:"exclusive" json:"exclusive"`
	// Shared are the shared grants standing (void ones included, until
	// their holder's next event), by holder.
	Shared map[string]LeaseGrant `msgpack:"shared,omitempty" json:"shared,omitempty"`
	// Last is the sequence of the resource's last event, on any subject:
	// what an exclusive grant expects on the lease's wildcard.
	Last uint64 `msgpack:"last" json:"last"`
	// Grants counts the grants ever made; a disk exists once one was.
	Grants uint64 `msgpack:"grants" json:"grants"`
}

// Held tells whether any grant stands that is not void.
func (l *LeaseState) Held() bool {
	if l.Exclusive.Epoch != 0 {
		return true
	}
	for _, g := range l.Shared {
		if !g.Void {
			return true
		}
	}
	return false
}

// Standing lists the grants standing, void ones included: the exclusive
// grant first, then the shared ones by holder.
func (l *LeaseState) Standing() []LeaseGrant {
	var out []LeaseGrant
	if l.Exclusive.Epoch != 0 {
		out = append(out, l.Exclusive)
	}
	for _, holder := range slices.Sorted(maps.Keys(l.Shared)) {
		out = append(out, l.Shared[holder])
	}
	return out
}

// Holding lists the grants that hold the resource: Standing without the
// void ones.
func (l *LeaseState) Holding() []LeaseGrant {
	return slices.DeleteFunc(l.Standing(), func(g LeaseGrant) bool { return g.Void })
}

// Grant is holder's standing grant in mode, if there is one (void or not).
func (l *LeaseState) Grant(mode LeaseMode, holder string) (LeaseGrant, bool) {
	if mode == LeaseExclusive {
		return l.Exclusive, l.Exclusive.Epoch != 0 && l.Exclusive.ID == holder
	}
	g, ok := l.Shared[holder]
	return g, ok
}

// Apply folds one event of the resource's subjects into the state. holder
// is the holder of the shared subject it was appended on, empty for the
// exclusive subject.
func (l *LeaseState) Apply(rec *Record, holder string) error {
	if rec.Envelope.Kind != KindLease {
		return fmt.Errorf("lease %s: event %s of kind %s", l.Resource, rec.Envelope.Type, rec.Envelope.Kind)
	}
	l.Resource = rec.Envelope.AggregateID
	mode := LeaseExclusive
	if holder != "" {
		mode = LeaseShared
	}
	var ending string // the holder whose grant ends, if any
	var epoch uint64
	if h := eventHolder(rec.Event); h != "" && holder != "" && h != holder {
		return fmt.Errorf("lease %s: %s for %s on the subject of %s", l.Resource, rec.Envelope.Type, h, holder)
	}
	switch ev := rec.Event.(type) {
	case LeaseGranted:
		if ev.Mode != mode {
			return fmt.Errorf("lease %s: %s grant for %s on the subject of %s grants", l.Resource, ev.Mode, ev.ID, mode)
		}
		if err := l.grant(rec, ev); err != nil {
			return err
		}
	case LeaseReleased:
		ending, epoch = ev.Holder, ev.Epoch
	case LeaseExpired:
		ending, epoch = ev.Holder, ev.Epoch
	case LeaseBroken:
		ending, epoch = ev.Holder, ev.Epoch
	case LeaseBreaking:
		g, ok := l.Grant(mode, ev.Holder)
		if !ok || g.Epoch != ev.Epoch {
			return fmt.Errorf("lease %s: break of %s epoch %d, which does not stand", l.Resource, ev.Holder, ev.Epoch)
		}
		g.Breaking, g.BreakingBy = true, rec.Envelope.Actor
		l.put(mode, g)
	default:
		return fmt.Errorf("lease %s: %w %s", l.Resource, errNotForAggregate, rec.Envelope.Type)
	}
	if ending != "" {
		g, ok := l.Grant(mode, ending)
		if !ok || g.Epoch != epoch {
			return fmt.Errorf("lease %s: %s of %s epoch %d, which does not stand", l.Resource, rec.Envelope.Type, ending, epoch)
		}
		l.remove(mode, ending)
	}
	l.Last = rec.Seq
	return nil
}

// eventHolder is the holder an event of a lease names.
func eventHolder(ev Event) string {
	switch ev := ev.(type) {
	case LeaseGranted:
		return ev.ID
	case LeaseReleased:
		return ev.Holder
	case LeaseExpired:
		return ev.Holder
	case LeaseBreaking:
		return ev.Holder
	case LeaseBroken:
		return ev.Holder
	}
	return ""
}

func (l *LeaseState) grant(rec *Record, ev LeaseGranted) error {
	g := LeaseGrant{Resource: rec.Envelope.AggregateID, Mode: ev.Mode, LeaseHolder: ev.LeaseHolder,
		Epoch: rec.Seq, GrantedBy: rec.Envelope.Actor}
	if ev.Mode == LeaseExclusive {
		// The append checked the whole resource, so nothing stands; a
		// stream that says otherwise was not written by Loom.
		if l.Held() {
			return fmt.Errorf("lease %s: exclusive grant to %s while the lease is held", l.Resource, ev.ID)
		}
	} else if l.Exclusive.Epoch != 0 {
		g.Void = true
	}
	l.put(ev.Mode, g)
	l.Grants++
	return nil
}

func (l *LeaseState) put(mode LeaseMode, g LeaseGrant) {
	if mode == LeaseExclusive {
		l.Exclusive = g
		return
	}
	if l.Shared == nil {
		l.Shared = map[string]LeaseGrant{}
	}
	l.Shared[g.ID] = g
}

func (l *LeaseState) remove(mode LeaseMode, holder string) {
	if mode == LeaseExclusive {
		l.Exclusive = LeaseGrant{}
		return
	}
	delete(l.Shared, holder)
}

// LeaseEpoch is one grant a goal runs under: the agent checks it is
// current before it defines, starts or resumes the domain.
type LeaseEpoch struct {
	Resource string    `msgpack:"resource" json:"resource"`
	Mode     LeaseMode `msgpack:"mode" json:"mode"`
	Epoch    uint64    `msgpack:"epoch" json:"epoch"`
}

// Lease command verbs, on loom.cmd.lease.<verb>.
const (
	VerbAcquire = "acquire"
	VerbRelease = "release"
	VerbBreak   = "break"
)

// AcquireLease asks for a grant on a resource. Acquiring what the holder
// already holds in that mode answers with the standing grant.
type AcquireLease struct {
	CommandMeta `msgpack:",inline"`
	Resource    string    `msgpack:"resource" json:"resource"`
	Mode        LeaseMode `msgpack:"mode" json:"mode"`
	LeaseHolder `msgpack:",inline"`
}

// ReleaseLease gives a grant back. Epoch, if set, must be the grant's.
type ReleaseLease struct {
	CommandMeta `msgpack:",inline"`
	Resource    string `msgpack:"resource" json:"resource"`
	Holder      string `msgpack:"holder" json:"holder"`
	Epoch       uint64 `msgpack:"epoch,omitempty" json:"epoch,omitempty"`
	Reason      string `msgpack:"reason,omitempty" json:"reason,omitempty"`
}

// BreakLease ends a holder's grant for an operator. A grant whose holder
// can no longer write (its host lost) breaks at once; a live one only with
// Force, which marks it breaking until its holder stops.
type BreakLease struct {
	CommandMeta `msgpack:",inline"`
	Resource    string `msgpack:"resource" json:"resource"`
	Holder      string `msgpack:"holder" json:"holder"`
	Force       bool   `msgpack:"force,omitempty" json:"force,omitempty"`
	Reason      string `msgpack:"reason,omitempty" json:"reason,omitempty"`
}

// MaxReasonLen bounds the free-text reasons commands carry.
const MaxReasonLen = 256

// Validate checks an AcquireLease's arguments.
func (c *AcquireLease) Validate() error {
	if _, err := ParseResource(c.Resource); err != nil {
		return err
	}
	if !c.Mode.Valid() {
		return fmt.Errorf("mode %q: want exclusive or shared", c.Mode)
	}
	if err := ValidateName("holder", c.ID); err != nil {
		return err
	}
	if c.VM != "" {
		if err := ValidateName("vm", c.VM); err != nil {
			return err
		}
	}
	if c.Host != "" {
		if err := ValidateName("host", c.Host); err != nil {
			return err
		}
	}
	return c.CommandMeta.Validate()
}

// Validate checks a ReleaseLease's arguments.
func (c *ReleaseLease) Validate() error {
	return validateLeaseEnd(c.CommandMeta, c.Resource, c.Holder, c.Reason)
}

// Validate checks a BreakLease's arguments.
func (c *BreakLease) Validate() error {
	return validateLeaseEnd(c.CommandMeta, c.Resource, c.Holder, c.Reason)
}

func validateLeaseEnd(m CommandMeta, resource, holder, reason string) error {
	if _, err := ParseResource(resource); err != nil {
		return err
	}
	if err := ValidateName("holder", holder); err != nil {
		return err
	}
	if len(reason) > MaxReasonLen {
		return fmt.Errorf("reason is %d bytes, at most %d allowed", len(reason), MaxReasonLen)
	}
	return m.Validate()
}
