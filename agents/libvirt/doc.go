// Package libvirt is the host agent's adapter to libvirtd. It is the only
// package in Loom that imports go-libvirt.
//
// go-libvirt RPCs take no context; this package adds one. Every method takes a
// ctx, returns ctx.Err() promptly when it ends, and bounds each RPC with
// Config.RPCTimeout. A call abandoned this way may still take effect in
// libvirtd: callers reconcile by reading state again, never by assuming the
// verb did not happen.
//
// Protocol for callers:
//
//  1. Dial once and hold the Client. With test:///default the simulated host
//     is reset when its last connection closes, so a reconnect is a new host.
//  2. Watch Disconnected(). When it closes, every call fails with
//     ErrDisconnected; Close the Client and Dial again.
//  3. Drive domains with the idempotent verbs (Define, Start, Destroy, Suspend,
//     Resume, Undefine) and observe them with List, Lookup and Events.
//  4. Checkpoint with TakeSnapshot and roll back with RestoreMemory. Libvirt
//     keeps no snapshot metadata: the caller records the files. After a
//     snapshot the domain's definitions name the new overlay; Define it
//     with DiskPath = DiskSource, never the frozen layer it was defined on.
//  5. Close the Client when done; Close waits for the goroutines it owns.
//
// Domain names come from outside and are checked by ValidateName before any
// RPC. Libvirt's own failures are returned as *Error, which carries libvirt's
// numeric code; ErrNotFound and the other sentinels match with errors.Is.
package libvirt
