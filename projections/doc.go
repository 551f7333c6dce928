// Package projections folds LOOM_EVENTS into Loom's read models in Pebble:
// hosts, images, VMs, the head of every decision subject, the results of
// commands, and the messages it had to skip. Everything a person or a
// handler reads comes from here, and all of it can be rebuilt from the
// stream: delete the directory and the runner builds the same keys and
// values again.
//
// # Protocol
//
//	store, err := projections.Open(dir, projections.Options{Logger: log, OnCommit: notify})
//	defer store.Close()                           // after Run has returned
//	store.AddQueryEndpoints(svc)                  // loom.q.{vm,host,image,net,lease}.{get,list}
//	g.Go(func() error { return store.Run(ctx, js) })
//
// Run is the only writer. It reads LOOM_EVENTS with an ordered consumer
// from the sequence after Applied, applies events in stream order and
// skips any at or below Applied (a redelivery can arrive after later
// messages). It applies what has arrived, up to Options.MaxBatch events,
// then writes the changed rows and the new applied sequence in one Pebble
// batch: a reader, or a restart, sees a batch entirely or not at all.
// Applying is a pure fold (time comes from the events), and whether and
// how a row is stored depends only on its state, so where batches begin
// and end never changes the result.
//
// A message that does not decode, or decodes to an event that does not
// belong on its subject, is recorded in the flagged table (FlaggedEvents),
// counted, logged, and skipped; it still moves its subject's head. So is an
// observation of a host registered with a key that is not signed by that
// key for its place in its subject (signatures.go): unsigned, forged or
// replayed. Hosts registered without a key are the legacy mode, whose
// observations are taken unsigned.
//
// Reads (VM, Host, Hosts, VMs, Images, CommandResult, Head, the queries)
// may come from any goroutine. Each reads one Pebble snapshot, so it
// reflects exactly one applied sequence. To read your own writes, WaitFor
// the sequence the append returned, or set a query's MinSeq.
//
// After each commit, Options.OnCommit hears the applied sequence and the
// VMs whose rows changed (the dispatcher's cue), on the runner's goroutine.
//
// ReplayTo is Run for an auditor: it applies the stream in the same way up
// to one sequence and stops there, so the store answers (Answer, the same
// table AddQueryEndpoints serves) as the live read models did at that
// point. By default it stops before a message that does not decode.
//
// # Storage
//
// keys.go lists the keys. They carry a version prefix, so a new version of
// the projections builds beside the old one, which keeps serving until the
// new one has caught up. Rows are msgpack with structs as arrays; Open
// drops the rows of a version written with another layout of the events
// types (layout.go), and the runner rebuilds them. The rows of hosts,
// images and VMs carry the head of their own decision subject, so one
// write records a decision; a host's allocations and orphans have a key
// per entry.
package projections
