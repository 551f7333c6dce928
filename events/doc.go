// Package events is Loom's vocabulary: the envelope every event travels in,
// the event, command and goal types, the aggregate states they fold into,
// the subjects they live on, and the deterministic msgpack codec.
//
// It imports nothing of Loom's. Everything else (handlers, projections,
// agents, cmd) speaks in these types.
//
// # Protocol
//
// A decision is an [Envelope] appended to LOOM_EVENTS on loom.evt.<kind>.<id>.
// Its position is the stream sequence; its PrevHash is the SHA-256 of the
// stored bytes of the previous event on the same subject, so a subject's
// events form a hash chain. Encoding is deterministic: the same envelope
// always encodes to the same bytes ([Marshal] sorts map keys and uses the
// most compact integer forms), so hashes are stable across processes.
//
// Apply functions ([HostState.Apply], [VMState.Apply], ...) are pure folds:
// time comes from the event, never from the clock.
package events
