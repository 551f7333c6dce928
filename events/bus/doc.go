// Package bus is what handlers, projections and agents share of NATS
// JetStream: the embedded server, the streams and their settings, appending
// an event with optimistic concurrency, and reading a subject's last message
// through the stream leader.
package bus
