package events

// Old versions of event types, and the upcasters that read them as the
// newest. A stored event is never rewritten: readers meet every version
// ever written, forever, and the golden sample of each stays in schemas/.

// upcast is the decoder of an old version Old, read as the newest by up.
func upcast[Old any, New Event](up func(Old) New) func([]byte) (Event, error) {
	return func(payload []byte) (Event, error) {
		var old Old
		if err := Unmarshal(payload, &old); err != nil {
			return nil, err
		}
		return up(old), nil
	}
}

// versions registers a type whose older versions upcast to its Go shape,
// the newest.
func versions[T Event](olds map[int]func([]byte) (Event, error)) typeInfo {
	info := typeInfo{version: len(olds) + 1, decoders: map[int]func([]byte) (Event, error){}}
	for v, decode := range olds {
		info.decoders[v] = decode
	}
	info.decoders[info.version] = decodeAs[T]()
	return info
}

// vmPlacedV1 is vm.placed before leases: a placement named no grants.
// Read as v2 it runs under no lease, which agents refuse to start.
type vmPlacedV1 struct {
	UID           string `msgpack:"uid"`
	Host          string `msgpack:"host"`
	AllocationSeq uint64 `msgpack:"alloc_seq"`
}

func upcastVMPlacedV1(v vmPlacedV1) VMPlaced {
	return VMPlaced{UID: v.UID, Host: v.Host, AllocationSeq: v.AllocationSeq}
}

// vmCreatedV1 is vm.created before host-loss policies: such a VM restarts
// elsewhere.
type vmCreatedV1 struct {
	UID       string  `msgpack:"uid"`
	Image     string  `msgpack:"image"`
	CPU       int     `msgpack:"cpu"`
	MemoryMiB int     `msgpack:"mem_mib"`
	Desired   Desired `msgpack:"desired"`
}

func upcastVMCreatedV1(v vmCreatedV1) VMCreated {
	return VMCreated{UID: v.UID, Image: v.Image, CPU: v.CPU, MemoryMiB: v.MemoryMiB, Desired: v.Desired, OnHostLost: RestartElsewhere}
}

// vmCreatedV2 is vm.created before virtual networks: such a VM is on none.
type vmCreatedV2 struct {
	UID        string         `msgpack:"uid"`
	Image      string         `msgpack:"image"`
	CPU        int            `msgpack:"cpu"`
	MemoryMiB  int            `msgpack:"mem_mib"`
	Desired    Desired        `msgpack:"desired"`
	OnHostLost HostLostPolicy `msgpack:"on_host_lost"`
}

func upcastVMCreatedV2(v vmCreatedV2) VMCreated {
	return VMCreated{UID: v.UID, Image: v.Image, CPU: v.CPU, MemoryMiB: v.MemoryMiB, Desired: v.Desired, OnHostLost: v.OnHostLost}
}

// imageRegisteredV1 is image.registered before images could boot a
// kernel directly.
type imageRegisteredV1 struct {
	Format    string `msgpack:"format"`
	SizeBytes int64  `msgpack:"size"`
	Source    string `msgpack:"source,omitempty"`
	Checksum  string `msgpack:"checksum,omitempty"`
}

func upcastImageRegisteredV1(v imageRegisteredV1) ImageRegistered {
	return ImageRegistered{Format: v.Format, SizeBytes: v.SizeBytes, Source: v.Source, Checksum: v.Checksum}
}

// vmObservedV1 is vm.observed before leases: an observation named no
// epochs it acted under.
type vmObservedV1 struct {
	UID         string        `msgpack:"uid"`
	Incarnation uint64        `msgpack:"incarnation"`
	State       ObservedState `msgpack:"state"`
	Fault       *Fault        `msgpack:"fault,omitempty"`
	Unrequested bool          `msgpack:"unrequested,omitempty"`
}

func upcastVMObservedV1(v vmObservedV1) VMObserved {
	return VMObserved{UID: v.UID, Incarnation: v.Incarnation, State: v.State, Fault: v.Fault, Unrequested: v.Unrequested}
}

// hostRegisteredV1 is host.registered before host keys: such a host is in
// the legacy mode, its observations unsigned.
type hostRegisteredV1 struct {
	CPU       int               `msgpack:"cpu"`
	MemoryMiB int               `msgpack:"mem_mib"`
	Address   string            `msgpack:"addr,omitempty"`
	Labels    map[string]string `msgpack:"labels,omitempty"`
}

func upcastHostRegisteredV1(v hostRegisteredV1) HostRegistered {
	return HostRegistered{CPU: v.CPU, MemoryMiB: v.MemoryMiB, Address: v.Address, Labels: v.Labels}
}
