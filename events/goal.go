package events

// Goal is the document on loom.goal.<host>.<vm>: what the VM's host must
// make true. It is rebuilt from the VM's decisions, never edited.
type Goal struct {
	VM   string `msgpack:"vm" json:"vm"`
	UID  string `msgpack:"uid" json:"uid"`
	Host string `msgpack:"host" json:"host"`
	// Desired is the state to reach; AbsentReason says why when absent.
	Desired      Desired `msgpack:"desired" json:"desired"`
	AbsentReason string  `msgpack:"absent_reason,omitempty" json:"absent_reason,omitempty"`
	// Incarnation is the stream sequence of the decision that produced this
	// goal. A goal subject's incarnation only grows, and agents act only on
	// incarnations above the one they last reported.
	Incarnation uint64 `msgpack:"incarnation" json:"incarnation"`
	// Spec is the domain to run.
	Spec DomainSpec `msgpack:"spec" json:"spec"`
	// Leases are the grants the VM runs under. Before it defines, starts
	// or resumes the domain, the agent checks through the stream leader
	// that each is still current, and refuses otherwise.
	Leases []LeaseEpoch `msgpack:"leases,omitempty" json:"leases,omitempty"`
	// Step is a checkpoint to take or restore, done once: the host knows
	// it did it by the files it made.
	Step *GoalStep `msgpack:"step,omitempty" json:"step,omitempty"`
	// Drop lists deleted checkpoints whose files the host must remove.
	Drop []CheckpointFiles `msgpack:"drop,omitempty" json:"drop,omitempty"`
	// Keep lists, on the absent goal of a host the VM left, the
	// checkpoints whose files stay there.
	Keep []CheckpointFiles `msgpack:"keep,omitempty" json:"keep,omitempty"`
	// Migrate asks the source to move the domain; Incoming tells the
	// target to expect it.
	Migrate  *MigrateStep  `msgpack:"migrate,omitempty" json:"migrate,omitempty"`
	Incoming *IncomingStep `msgpack:"incoming,omitempty" json:"incoming,omitempty"`
}

// HeaderIncarnation carries a goal's incarnation on LOOM_GOALS, so a reader
// can compare goals without decoding them. The dispatcher sets it; agents
// and the dispatcher itself read it.
const HeaderIncarnation = "Loom-Incarnation"

// DomainSpec is what a host needs to define the VM's domain.
type DomainSpec struct {
	Image     string `msgpack:"image" json:"image"`
	CPU       int    `msgpack:"cpu" json:"cpu"`
	MemoryMiB int    `msgpack:"mem_mib" json:"mem_mib"`
	// Disk is the image the VM's disk is a copy-on-write overlay of, as
	// registered; the dispatcher fills it in from the images read model.
	Disk *ImageDisk `msgpack:"disk,omitempty" json:"disk,omitempty"`
	// Net is the VM's address on its virtual network, from the nets read
	// model; nil when it is on none (or has no address yet).
	Net *NetAddress `msgpack:"net,omitempty" json:"net,omitempty"`
}

// NetAddress is a VM's interface on a virtual network.
type NetAddress struct {
	Net    string `msgpack:"net" json:"net"`
	VNI    uint32 `msgpack:"vni" json:"vni"`
	Addr   string `msgpack:"addr" json:"addr"`
	Prefix int    `msgpack:"prefix" json:"prefix"`
	MAC    string `msgpack:"mac" json:"mac"`
}

// ImageDisk is where a VM's image is on the hosts, and how it boots.
type ImageDisk struct {
	Source string     `msgpack:"source" json:"source"`
	Format string     `msgpack:"format" json:"format"`
	Boot   *ImageBoot `msgpack:"boot,omitempty" json:"boot,omitempty"`
}

// GoalOf is the goal a VM's state implies, and whether it has one: a VM
// has a goal from its placement until it is gone.
func GoalOf(s *VMState) (Goal, bool) {
	if s.Incarnation == 0 || s.Host == "" || (s.Phase != PhasePlaced && s.Phase != PhaseDeleting) {
		return Goal{}, false
	}
	return Goal{
		VM: s.Name, UID: s.UID, Host: s.Host,
		Desired: s.Desired, AbsentReason: s.AbsentReason,
		Incarnation: s.Incarnation,
		Spec:        DomainSpec{Image: s.Image, CPU: s.CPU, MemoryMiB: s.MemoryMiB},
		Leases:      s.Leases,
		Step:        s.Step,
		Drop:        s.dropList(),
		Migrate:     s.migrateStep(),
	}, true
}

// migrateStep is the source's step of the migration under way.
func (s *VMState) migrateStep() *MigrateStep {
	m := s.Migration
	if m == nil {
		return nil
	}
	return &MigrateStep{Migration: m.ID, To: m.To, DestURI: m.DestURI, DataURI: m.DataURI, DisksURI: m.DisksURI,
		DestDisk: m.DestDisk, Cancel: m.Cancelling}
}

// IncomingGoalOf is the goal on the target of a VM's migration under way:
// expect the domain, running, under the source's grants until the move is
// recorded.
func IncomingGoalOf(s *VMState) (Goal, bool) {
	m := s.Migration
	if m == nil || s.Phase != PhasePlaced {
		return Goal{}, false
	}
	g, _ := GoalOf(s)
	g.Host, g.Step, g.Drop, g.Migrate = m.To, nil, nil, nil
	g.Incoming = &IncomingStep{Migration: m.ID, From: m.From, Disk: m.DestDisk}
	return g, true
}
