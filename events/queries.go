package events

// Query verbs, served on loom.q.<kind>.<verb>.
const (
	VerbGet  = "get"
	VerbList = "list"
)

// Query asks a read model for one aggregate (Name set) or a list.
type Query struct {
	// Name selects one aggregate, for get.
	Name string `msgpack:"name,omitempty" json:"name,omitempty"`
	// Host filters VM lists by host.
	Host string `msgpack:"host,omitempty" json:"host,omitempty"`
	// MinSeq is the stream sequence the answer must reflect: the read
	// model waits until it has applied it (read-your-writes).
	MinSeq uint64 `msgpack:"min_seq,omitempty" json:"min_seq,omitempty"`
	// Resource and Holder filter lease lists; Host filters them by the
	// holder's host.
	Resource string `msgpack:"resource,omitempty" json:"resource,omitempty"`
	Holder   string `msgpack:"holder,omitempty" json:"holder,omitempty"`
	// IncludeGone lists deleted VMs too.
	IncludeGone bool `msgpack:"include_gone,omitempty" json:"include_gone,omitempty"`
}

// VMView is a VM as queries show it.
type VMView struct {
	VMState   `msgpack:",inline"`
	Converged bool `msgpack:"converged" json:"converged"`
}

// HostView is a host as queries show it, with its capacity.
type HostView struct {
	HostState `msgpack:",inline"`
	UsedCPU   int `msgpack:"used_cpu" json:"used_cpu"`
	UsedMiB   int `msgpack:"used_mem_mib" json:"used_mem_mib"`
	FreeCPU   int `msgpack:"free_cpu" json:"free_cpu"`
	FreeMiB   int `msgpack:"free_mem_mib" json:"free_mem_mib"`
	VMs       int `msgpack:"vms" json:"vms"`
}

// QueryReply answers a query. Seq is the stream sequence the read model
// had applied when it answered.
type QueryReply struct {
	Seq    uint64       `msgpack:"seq" json:"seq"`
	VMs    []VMView     `msgpack:"vms,omitempty" json:"vms,omitempty"`
	Hosts  []HostView   `msgpack:"hosts,omitempty" json:"hosts,omitempty"`
	Images []ImageState `msgpack:"images,omitempty" json:"images,omitempty"`
	Leases []LeaseGrant `msgpack:"leases,omitempty" json:"leases,omitempty"`
	Nets   []NetState   `msgpack:"nets,omitempty" json:"nets,omitempty"`
	Error  *Fault       `msgpack:"error,omitempty" json:"error,omitempty"`
}
