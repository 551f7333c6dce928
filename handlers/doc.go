// Package handlers is Loom's command side: commands in, events out. It
// serves loom.cmd.<kind>.<verb> as endpoints of a nats.go/micro service,
// decides each command with a pure function of current state, and appends
// the events to LOOM_EVENTS with the subject's expected last sequence.
//
// # Using it
//
// cmd creates the micro service and the Service, adds the endpoints, runs
// the scheduler, and on the way out stops the micro service before closing
// the Service:
//
//	s, err := handlers.New(handlers.Config{JS: js, Conn: nc, Reader: projection})
//	svc, err := micro.AddService(nc, micro.Config{Name: "loom", Version: v})
//	err = s.AddEndpoints(svc)
//	g.Go(func() error { return s.RunScheduler(ctx) })
//	...
//	svc.Stop(); s.Close(ctx)
//
// # Requests and replies
//
// A body is JSON or msgpack (events.SniffFormat), decoded strictly (unknown
// fields are an error). The actor is who sent it, as Config.Actors says:
// the identity the NATS server attests, or on an open bus the Loom-Actor
// header. Every reply is an events.Reply in the request's format: the
// events appended with their sequences, or a Fault with a code from the
// catalog; a fault also travels in micro's error headers. A reply's last
// sequence is what a query names to read its own writes.
//
// # Idempotency
//
// A command is looked up first by (actor, command id) in the read model's
// command results: one that took effect gets its original result, however
// late it is retried. Each event's Nats-Msg-Id derives from (actor, command
// id, index), so within the stream's duplicate window a repeat is dropped
// by the stream too; a VM's UID derives from (actor, command id).
//
// # Appending
//
// Each step of a command appends one event on one subject. It decides on
// the aggregate's state and head from a write-through cache (filled from
// the Reader, advanced by this process's own appends), seals the event
// chained to the head's hash, and appends expecting the head's sequence.
// When another writer moved the subject, the cache entry is dropped, the
// Reader is waited for up to the subject's last sequence (read through the
// stream leader), and the step is decided again, a bounded number of times.
// An outcome that appends nothing (a refusal, or nothing to change) is
// believed only once the subject's last sequence confirms the cache. Steps
// on one aggregate are serialized within the process, so concurrent
// commands on one host queue here rather than lose races on the stream.
//
// # vm.create
//
// A create is a chain of single-subject steps, not an atomic batch: on one
// file-backed server a batch costs milliseconds where a checked publish
// costs tens of microseconds. The steps are vm.created on the VM's subject,
// host.allocated on the chosen host's (the one place a host's capacity is
// decided), and vm.placed on the VM's. Before the first step the create is
// admitted: capacity is set aside in-process on the host with the most free
// memory, so a create that fits nowhere is refused with nothing appended,
// and concurrent creates in one process never admit more than fits. If the
// host fills up first anyway (another replica took the room), the create
// tries elsewhere and, failing that, withdraws its VM (vm.deleted, reason
// no-capacity) and answers no_capacity.
//
// A crash between steps loses nothing: the scheduler (RunScheduler, or
// ReconcileOnce in tests) places every pending VM, with the allocation it
// already has or a new one, and releases allocations whose VM is gone,
// another incarnation, or placed elsewhere. It acts as the original command
// (same actor, command id and step indexes), so its appends and a handler's
// deduplicate against each other, and every one is sequence-checked.
//
// # Observing it
//
// Collectors returns Prometheus metrics: commands by subject and outcome,
// their latency, append conflicts and duplicates, and the scheduler's
// steps. micro's own endpoint stats count requests but not their time or
// errors, since requests are answered by workers after micro's handler
// has returned.
//
// # Locks
//
// In order: an aggregate's lock (locker; never two at once), then
// holds.mu, then a table's mu.
package handlers
