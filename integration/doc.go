// Package integration tests Loom across its real parts: an embedded NATS
// server with JetStream on disk, the control plane with its Pebble read
// models, and host agents driving real libvirtd daemons on libvirt's test
// driver, one namespaced daemon per host. The tests run behind the
// integration build tag and need root (make test runs them).
package integration
