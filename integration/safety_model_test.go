//go:build integration

package integration

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/anishathalye/porcupine"
	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/events"
)

// The lease model the history is checked against, written from the
// lease rules (DESIGN.md, issue 3), not from the handlers' decide code:
// per resource, at most one exclusive holder and no shared holder beside
// it, or any number of shared holders; acquiring what one holds answers
// with it; releasing or breaking needs a grant.

// leaseOp is one client operation.
type leaseOp struct {
	Verb     string // acquire, release, break
	Resource string
	Mode     events.LeaseMode
	Holder   string
}

// The outcomes an operation can have, as the model sees them.
const (
	outOK       = "ok"
	outHeld     = "lease_held"
	outNotFound = "lease_not_found"
	outLive     = "lease_live"
	// outUnknown: no answer (timeout, connection lost): it may or may not
	// have taken effect.
	outUnknown = "unknown"
	// outNoop: an answer saying it did not take effect (conflict, a host
	// declared lost).
	outNoop = "noop"
)

// leaseState is one resource's grants, encoded so that equal states are
// equal strings: "x:holder", or "s:" and the sorted shared holders.
type leaseState string

func decodeState(s leaseState) (exclusive string, shared []string) {
	str := string(s)
	switch {
	case strings.HasPrefix(str, "x:"):
		return str[2:], nil
	case len(str) > 2:
		return "", strings.Split(str[2:], ",")
	}
	return "", nil
}

func encodeState(exclusive string, shared []string) leaseState {
	if exclusive != "" {
		return leaseState("x:" + exclusive)
	}
	slices.Sort(shared)
	return leaseState("s:" + strings.Join(shared, ","))
}

// stepLease is the model's step: every state the operation can lead to
// with that outcome (none: the outcome is impossible there).
func stepLease(state, input, output any) []any {
	s, op, out := state.(leaseState), input.(leaseOp), output.(string)
	exclusive, shared := decodeState(s)
	holds := exclusive == op.Holder || slices.Contains(shared, op.Holder)
	holdsMode := (op.Mode == events.LeaseExclusive && exclusive == op.Holder) ||
		(op.Mode == events.LeaseShared && slices.Contains(shared, op.Holder))
	switch op.Verb {
	case "acquire":
		grantable := exclusive == "" && (op.Mode == events.LeaseShared || len(shared) == 0)
		var after leaseState
		switch {
		case holdsMode:
			after = s
		case grantable && op.Mode == events.LeaseExclusive:
			after = encodeState(op.Holder, nil)
		case grantable:
			after = encodeState("", append(slices.Clone(shared), op.Holder))
		}
		switch out {
		case outOK:
			if after != "" {
				return []any{after}
			}
		case outHeld:
			if after == "" {
				return []any{s}
			}
		case outUnknown:
			if after != "" {
				return []any{s, after}
			}
			return []any{s}
		case outNoop:
			return []any{s}
		}
	case "release":
		after := encodeState("", slices.DeleteFunc(slices.Clone(shared), func(h string) bool { return h == op.Holder }))
		if exclusive != "" && exclusive != op.Holder {
			after = s
		}
		switch out {
		case outOK:
			if holds {
				return []any{after}
			}
		case outNotFound:
			if !holds {
				return []any{s}
			}
		case outUnknown:
			return []any{s, after}
		case outNoop:
			return []any{s}
		}
	case "break": // without force, on a holder whose host is alive
		switch out {
		case outLive:
			if holds {
				return []any{s}
			}
		case outNotFound:
			if !holds {
				return []any{s}
			}
		case outUnknown, outNoop:
			return []any{s}
		}
	}
	return nil
}

var leaseModel = (&porcupine.NondeterministicModel{
	Init: func() []any { return []any{encodeState("", nil)} },
	Step: stepLease,
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		by := map[string][]porcupine.Operation{}
		for _, op := range history {
			r := op.Input.(leaseOp).Resource
			by[r] = append(by[r], op)
		}
		var out [][]porcupine.Operation
		for _, r := range slices.Sorted(mapsKeys(by)) {
			out = append(out, by[r])
		}
		return out
	},
	DescribeOperation: func(input, output any) string {
		op := input.(leaseOp)
		return fmt.Sprintf("%s %s %s %s -> %v", op.Verb, op.Resource, op.Mode, op.Holder, output)
	},
}).ToModel()

func mapsKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// history records client operations for porcupine.
type history struct {
	mu    sync.Mutex
	start time.Time
	ops   []porcupine.Operation
}

func (h *history) record(client int, op leaseOp, call time.Time, out string) {
	ret := int64(time.Since(h.start))
	if out == outUnknown {
		ret = math.MaxInt64 // it may take effect at any time after its call
	}
	h.mu.Lock()
	h.ops = append(h.ops, porcupine.Operation{ClientId: client, Input: op, Call: int64(call.Sub(h.start)), Output: out, Return: ret})
	h.mu.Unlock()
}

// leaseClient runs random lease operations on resources, as holder on
// host, until ctx ends, recording each.
func leaseClient(ctx context.Context, nc *nats.Conn, h *history, client int, seed uint64, resources []string, host string) {
	rng := rand.New(rand.NewPCG(seed, uint64(client)))
	holder := fmt.Sprintf("c%d", client)
	for n := 0; ctx.Err() == nil; n++ {
		op := leaseOp{Resource: resources[rng.IntN(len(resources))], Holder: holder, Mode: events.LeaseShared}
		if rng.IntN(3) == 0 {
			op.Mode = events.LeaseExclusive
		}
		meta := events.CommandMeta{CommandID: fmt.Sprintf("safety-%d-%d-%d", seed, client, n)}
		var verb string
		var body any
		switch r := rng.IntN(10); {
		case r < 5:
			op.Verb, verb = "acquire", events.VerbAcquire
			body = &events.AcquireLease{CommandMeta: meta, Resource: op.Resource, Mode: op.Mode,
				LeaseHolder: events.LeaseHolder{ID: holder, Host: host}}
		case r < 9:
			op.Verb, verb, op.Mode = "release", events.VerbRelease, ""
			body = &events.ReleaseLease{CommandMeta: meta, Resource: op.Resource, Holder: holder}
		default:
			op.Verb, verb, op.Mode = "break", events.VerbBreak, ""
			body = &events.BreakLease{CommandMeta: meta, Resource: op.Resource, Holder: holder}
		}
		call := time.Now()
		h.record(client, op, call, sendLease(ctx, nc, verb, body))
	}
}

// sendLease sends one lease command and classifies its answer.
func sendLease(ctx context.Context, nc *nats.Conn, verb string, body any) string {
	data, err := events.Marshal(body)
	if err != nil {
		panic(err)
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := nc.RequestWithContext(rctx, events.CommandSubject(events.KindLease, verb), data)
	if err != nil {
		return outUnknown
	}
	var reply events.Reply
	if err := events.Unmarshal(resp.Data, &reply); err != nil {
		return outUnknown
	}
	var f *events.Fault
	if reply.Error == nil {
		return outOK
	}
	f = reply.Error
	switch f.Code {
	case events.CodeLeaseHeld:
		return outHeld
	case events.CodeLeaseNotFound:
		return outNotFound
	case events.CodeLeaseLive:
		return outLive
	case events.CodeConflict, events.CodeInvalidArgument, events.CodeHostNotFound:
		return outNoop
	}
	return outUnknown
}

var errNotLinearizable = errors.New("the lease history is not linearizable")

// checkHistory checks the recorded history against the model.
func (h *history) check(timeout time.Duration) (int, error) {
	h.mu.Lock()
	ops := slices.Clone(h.ops)
	h.mu.Unlock()
	res, _ := porcupine.CheckOperationsVerbose(leaseModel, ops, timeout)
	switch res {
	case porcupine.Ok:
		return len(ops), nil
	case porcupine.Illegal:
		return len(ops), errNotLinearizable
	}
	return len(ops), fmt.Errorf("porcupine gave up after %s on %d operations", timeout, len(ops))
}
