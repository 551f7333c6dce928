package projections

import (
	"errors"
	"fmt"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/hostkey"
)

// delivery is one message of LOOM_EVENTS as the runner receives it: the
// record, decoded, or why it does not decode, and what the consumer's
// goroutine could work out for the runner beforehand.
type delivery struct {
	// rec always carries Seq, Subject and Data, even when err is set.
	rec events.Record
	// err is events.DecodeRecord's: corrupt bytes, an unknown type or
	// version.
	err error
	// addr is the parsed subject, unless addrErr.
	addr    events.Address
	addrErr error
	// hash is events.Hash(Data) when the subject parses: the subject's new
	// head, and what an observation's signature covers.
	hash []byte
	// sig is an observation's signature, as its headers give it.
	sig hostkey.Claim
	// pending is how many messages the stream held after this one when it
	// was delivered; zero means the runner has caught up.
	pending uint64
}

// decodeDelivery prepares a message for the runner. It runs on the
// consumer's goroutine, so that it overlaps the runner's work, and is pure
// (v, that goroutine's own, only remembers keys it parsed): the signature
// check it makes ahead is used only where the runner would make the same.
func decodeDelivery(seq uint64, subject string, stored time.Time, data []byte, header nats.Header, pending uint64, v *hostkey.Verifier) delivery {
	d := delivery{pending: pending}
	d.rec, d.err = events.DecodeRecord(seq, subject, stored, data)
	d.addr, d.addrErr = events.ParseEventSubject(subject)
	if d.addrErr == nil {
		d.hash = events.Hash(data)
		if d.addr.Observed {
			d.sig = bus.ReadClaim(v, header, subject, d.hash)
		}
	}
	return d
}

// rejection is a message that decodes but cannot be applied here: it is
// flagged and skipped like one that does not decode.
type rejection struct {
	reason string
	// code is the catalog code it is flagged with; corrupt_event if zero.
	code events.Code
}

func (r *rejection) Error() string { return r.reason }

func rejectf(format string, args ...any) error {
	return &rejection{reason: fmt.Sprintf(format, args...)}
}

// batch is what one run of events changes, held in memory until it is
// written in one Pebble batch. Applying is a pure fold of the events: no
// clock, no randomness, and the result does not depend on where batches
// begin and end.
type batch struct {
	s *Store
	r *runner
	// last is the last sequence applied, in this batch or before it.
	last uint64
	// heads are the loom.evt subjects' new heads, by subject.
	heads map[string]events.Head
	// results are the events that carry a command id, in stream order.
	results []commandEvent
	// flagged are the messages skipped, in stream order.
	flagged []Flagged
	// vmHosts is the Host of every VM the batch touched, as it was before.
	vmHosts map[string]string
	// hostEntries are the host map entries the batch changed.
	hostEntries map[hostEntry]struct{}
	// leaseBefore is the grant of every lease slot the batch touched, as
	// it stood before the batch (Epoch zero: none).
	leaseBefore map[leaseEntry]events.LeaseGrant
	// applied counts the events folded.
	applied int
}

func newBatch(s *Store, r *runner) *batch {
	return &batch{s: s, r: r, heads: map[string]events.Head{},
		vmHosts: map[string]string{}, hostEntries: map[hostEntry]struct{}{},
		leaseBefore: map[leaseEntry]events.LeaseGrant{}}
}

// reset empties the batch for the events after last. The runner reuses
// one batch, so its maps keep their room.
func (b *batch) reset(last uint64) {
	b.last, b.applied = last, 0
	clear(b.heads)
	clear(b.vmHosts)
	clear(b.hostEntries)
	clear(b.leaseBefore)
	b.results, b.flagged = b.results[:0], b.flagged[:0]
}

// apply folds one delivery into the batch. Only a failure of the store is
// returned; a message that cannot be applied is flagged.
func (b *batch) apply(d *delivery) error {
	rec := &d.rec
	if rec.Seq <= b.last {
		return nil // a redelivery of what is already applied
	}
	b.last = rec.Seq
	err := d.err
	if err == nil && d.addrErr != nil {
		err = &rejection{reason: d.addrErr.Error()}
	}
	if err == nil && d.addr.Observed && !b.s.opts.Unsafe.NoSignatureCheck {
		// Before the head moves: the signature names the message before.
		err = b.checkSignature(d)
	}
	if d.hash != nil {
		// The head moves even for a message that is flagged below: it is
		// the subject's last message all the same, and writers append
		// after it.
		if err := b.setHead(rec.Subject, d.addr, events.Head{Seq: rec.Seq, Hash: d.hash}); err != nil {
			return err
		}
	}
	if err == nil {
		err = b.fold(rec, d.addr)
	}
	var rejected *rejection
	switch {
	case err == nil:
		b.applied++
		b.recordCommand(rec)
		return nil
	case d.err != nil:
		b.flag(rec, decodeCode(d.err), d.err.Error())
		return nil
	case errors.As(err, &rejected):
		code := rejected.code
		if code == 0 {
			code = events.CodeCorruptEvent
		}
		b.flag(rec, code, rejected.reason)
		return nil
	}
	return err
}

// fold routes a decoded event to the read model of its aggregate.
func (b *batch) fold(rec *events.Record, addr events.Address) error {
	env := &rec.Envelope
	if env.Kind != addr.Kind || env.AggregateID != addr.ID {
		return rejectf("envelope is for %s %q, its subject for %s %q", env.Kind, env.AggregateID, addr.Kind, addr.ID)
	}
	if events.IsObservation(env.Type) != addr.Observed {
		return rejectf("%s on %s: decisions belong on loom.evt subjects, observations on loom.obs", env.Type, rec.Subject)
	}
	switch addr.Kind {
	case events.KindHost:
		return b.foldHost(rec, addr)
	case events.KindImage:
		return b.foldImage(rec)
	case events.KindNet:
		return b.foldNet(rec)
	case events.KindVM:
		return b.foldVM(rec)
	case events.KindLease:
		return b.foldLease(rec, addr)
	}
	return nil // a kind these read models do not fold; its head and command result are kept
}

// applyTo folds rec into r's state with fold (an Apply method), leaving
// the state as it was if fold fails. The Apply methods of events fail
// before they touch any map, so a shallow copy restores the state.
func applyTo[T any](r *row[T], rec *events.Record, fold func(*T, *events.Record) error) error {
	before := r.state
	if err := fold(&r.state, rec); err != nil {
		r.state = before
		rej := &rejection{reason: err.Error()}
		if errors.Is(err, events.ErrStaleEpoch) {
			rej.code = events.CodeStaleObservation
		}
		return rej
	}
	return nil
}

// decodeCode is the catalog code of an events.DecodeRecord error.
func decodeCode(err error) events.Code {
	if errors.Is(err, events.ErrUnknownType) || errors.Is(err, events.ErrUnknownVersion) {
		return events.CodeUnknownEvent
	}
	return events.CodeCorruptEvent
}

// commit writes the batch: the rows that changed, the heads, the command
// results, the flagged messages and the last applied sequence, all in one
// Pebble batch, so a reader or a restart sees all of it or none of it. It
// writes in key order, which makes Pebble's memtable inserts cheaper.
//
// The commit does not sync: the stream is the source of truth. A crash may
// lose the last batches, applied sequence included, and the runner then
// applies them again from the sequence it finds on restart.
func (b *batch) commit() (changedVMs []string, err error) {
	pb := b.s.db.NewBatch()
	defer func() { _ = pb.Close() }()
	enc := b.r.enc
	if err := pb.Set(keyApplied, encodeSeq(b.last), nil); err != nil {
		return nil, err
	}
	if err := b.writeCommands(pb, enc); err != nil {
		return nil, err
	}
	if err := b.writeFlagged(pb, enc); err != nil {
		return nil, err
	}
	if err := b.writeHeads(pb); err != nil {
		return nil, err
	}
	if err := b.writeHostEntries(pb, enc); err != nil {
		return nil, err
	}
	if err := b.r.hosts.write(pb, enc, nil); err != nil {
		return nil, err
	}
	if err := b.r.images.write(pb, enc, nil); err != nil {
		return nil, err
	}
	if err := b.r.nets.write(pb, enc, nil); err != nil {
		return nil, err
	}
	if err := b.writeLeaseEntries(pb, enc); err != nil {
		return nil, err
	}
	if err := b.r.leases.write(pb, enc, nil); err != nil {
		return nil, err
	}
	var moved []vmMove
	err = b.r.vms.write(pb, enc, func(name string, r *row[events.VMState]) error {
		changedVMs = append(changedVMs, name)
		if before := b.vmHosts[name]; before != r.state.Host {
			moved = append(moved, vmMove{vm: name, from: before, to: r.state.Host})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := writeVMIndex(pb, moved); err != nil {
		return nil, err
	}
	if err := pb.Commit(pebble.NoSync); err != nil {
		return nil, fmt.Errorf("commit up to sequence %d: %w", b.last, err)
	}
	return changedVMs, nil
}

// committed keeps the batch's rows for the next batches.
func (b *batch) committed() {
	b.r.hosts.committed()
	b.r.images.committed()
	b.r.nets.committed()
	b.r.vms.committed()
	b.r.leases.committed()
}

// abandon forgets the rows the batch changed in memory.
func (b *batch) abandon() {
	b.r.hosts.abandon()
	b.r.images.abandon()
	b.r.nets.abandon()
	b.r.vms.abandon()
	b.r.leases.abandon()
}
