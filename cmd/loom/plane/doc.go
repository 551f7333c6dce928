// Package plane wires Loom's parts together: the NATS connection (an
// embedded server or a cluster), the control plane of `loom serve`
// (projections, queries, handlers, scheduler, dispatcher, metrics) and a
// host agent. The loom binary and the integration tests share it, so what
// the tests run is what an operator runs.
package plane
