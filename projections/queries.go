package projections

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/nats-io/nats.go/micro"

	"github.com/loomctl/loom/events"
)

// answerFunc answers one decoded query from a consistent view.
type answerFunc func(v *view, q *events.Query) *events.QueryReply

// queryEndpoint is one query the read models answer.
type queryEndpoint struct {
	kind   events.Kind
	verb   string
	answer answerFunc
}

// queryEndpoints are the queries of loom.q.*: AddQueryEndpoints serves
// them and Answer answers them, from this one table.
func queryEndpoints() []queryEndpoint {
	return []queryEndpoint{
		{events.KindVM, events.VerbGet, answerVM},
		{events.KindVM, events.VerbList, answerVMs},
		{events.KindHost, events.VerbGet, answerHost},
		{events.KindHost, events.VerbList, answerHosts},
		{events.KindImage, events.VerbGet, answerImage},
		{events.KindImage, events.VerbList, answerImages},
		{events.KindNet, events.VerbGet, answerNet},
		{events.KindNet, events.VerbList, answerNets},
		{events.KindLease, events.VerbGet, answerLease},
		{events.KindLease, events.VerbList, answerLeases},
	}
}

// check refuses a query the endpoint cannot answer whatever the read
// models hold.
func (ep queryEndpoint) check(q *events.Query) *events.Fault {
	if ep.verb == events.VerbGet && q.Name == "" {
		return events.Errorf(events.CodeInvalidArgument, "name is required")
	}
	return nil
}

// AddQueryEndpoints serves the read models on svc: loom.q.vm.get,
// loom.q.vm.list, loom.q.host.get, loom.q.host.list, loom.q.image.get,
// loom.q.image.list, loom.q.net.get, loom.q.net.list, loom.q.lease.get
// and loom.q.lease.list, in svc's queue group. A request body is an
// events.Query in JSON or msgpack (an empty body lists everything); the
// reply is an events.QueryReply in the request's format. A query with
// MinSeq waits, off the subscription's goroutine, until the read models
// have applied it, at most Options.QueryWait. Errors come as
// QueryReply.Error and as micro's error headers.
func (s *Store) AddQueryEndpoints(svc micro.Service) error {
	for _, ep := range queryEndpoints() {
		subject := events.QuerySubject(ep.kind, ep.verb)
		name := "query_" + string(ep.kind) + "_" + ep.verb
		if err := svc.AddEndpoint(name, s.queryHandler(ep), micro.WithEndpointSubject(subject)); err != nil {
			return fmt.Errorf("add endpoint %s: %w", subject, err)
		}
	}
	return nil
}

// Answer answers q as loom.q.<kind>.<verb> would, without NATS: a replayed
// store has no service in front of it. A query with MinSeq waits until the
// read models have applied it, at most Options.QueryWait or until ctx
// ends. Errors come as QueryReply.Error, with codes from the catalog.
func (s *Store) Answer(ctx context.Context, kind events.Kind, verb string, q *events.Query) *events.QueryReply {
	for _, ep := range queryEndpoints() {
		if ep.kind != kind || ep.verb != verb {
			continue
		}
		if f := ep.check(q); f != nil {
			return s.failed(f)
		}
		ctx, cancel := context.WithTimeout(ctx, s.opts.QueryWait)
		defer cancel()
		return s.answer(ctx, q, ep.answer)
	}
	return s.failed(events.Errorf(events.CodeUnknownCommand, "no query is served on %s", events.QuerySubject(kind, verb)))
}

// queryHandler decodes a request and answers it at once when the read
// models have applied its MinSeq; otherwise a query worker waits and
// answers.
func (s *Store) queryHandler(ep queryEndpoint) micro.Handler {
	return micro.HandlerFunc(func(req micro.Request) {
		data := req.Data()
		format := events.SniffFormat(data)
		var q events.Query
		if len(bytes.TrimSpace(data)) > 0 {
			if err := events.DecodeStrict(format, data, &q); err != nil {
				s.respond(req, format, s.failed(events.Errorf(events.CodeBadRequest, "query body: %v", err)), true)
				return
			}
		}
		if f := ep.check(&q); f != nil {
			s.respond(req, format, s.failed(f), true)
			return
		}
		if q.MinSeq <= s.Applied() {
			ctx, cancel := context.WithTimeout(s.queries.base, s.opts.QueryWait)
			defer cancel()
			s.respond(req, format, s.answer(ctx, &q, ep.answer), true)
			return
		}
		started := s.queries.run(func(ctx context.Context) {
			ctx, cancel := context.WithTimeout(ctx, s.opts.QueryWait)
			defer cancel()
			s.respond(req, format, s.answer(ctx, &q, ep.answer), false)
		})
		if !started {
			s.respond(req, format, s.failed(events.Errorf(events.CodeUnavailable, "the read models are closing; retrying is safe")), true)
		}
	})
}

// answer waits for the query's MinSeq, then answers from one view.
func (s *Store) answer(ctx context.Context, q *events.Query, answer answerFunc) *events.QueryReply {
	if err := s.WaitFor(ctx, q.MinSeq); err != nil {
		return s.failed(events.FaultOf(err))
	}
	var reply *events.QueryReply
	err := s.read(ctx, func(v *view) error {
		reply = answer(v, q)
		return nil
	})
	if err != nil {
		return s.failed(events.Errorf(events.CodeUnavailable, "read models: %v; retrying is safe", err))
	}
	return reply
}

func (s *Store) failed(f *events.Fault) *events.QueryReply {
	return &events.QueryReply{Seq: s.Applied(), Error: f}
}

// respond sends reply in the request's format; a reply with an error also
// carries micro's error headers, so `nats req` shows the code.
//
// inline says whether the micro handler is still running. micro reads what
// Request.Error records once the handler returns, so a query worker that
// answers later sends the same headers through Respond instead.
func (s *Store) respond(req micro.Request, format events.Format, reply *events.QueryReply, inline bool) {
	if req.Reply() == "" {
		return
	}
	data, err := events.EncodeAs(format, reply)
	if err != nil {
		reply = s.failed(events.Errorf(events.CodeInternal, "encode reply: %v", err))
		data, _ = events.EncodeAs(format, reply)
	}
	f := reply.Error
	switch {
	case f == nil:
		err = req.Respond(data)
	case inline:
		err = req.Error(strconv.Itoa(int(f.Code)), headerSafe(f.Error()), data)
	default:
		err = req.Respond(data, micro.WithHeaders(micro.Headers{
			micro.ErrorCodeHeader: {strconv.Itoa(int(f.Code))},
			micro.ErrorHeader:     {headerSafe(f.Error())},
		}))
	}
	if err != nil {
		s.log.Warn("answer query", keySubject, req.Subject(), keyErr, err)
	}
}

// headerSafe keeps a message on one header line.
func headerSafe(s string) string {
	return strings.NewReplacer("\r", " ", "\n", " ").Replace(s)
}

func answerVM(v *view, q *events.Query) *events.QueryReply {
	state, _, found, err := v.vm(q.Name)
	if err != nil {
		return faulted(v, events.Errorf(events.CodeInternal, "read vm %s: %v", q.Name, err))
	}
	if !found || !(VMFilter{IncludeGone: q.IncludeGone}).keeps(&state) {
		return faulted(v, events.Errorf(events.CodeVMNotFound, "no VM named %q", q.Name))
	}
	return &events.QueryReply{Seq: v.seq, VMs: []events.VMView{vmView(state)}}
}

func answerVMs(v *view, q *events.Query) *events.QueryReply {
	vms, err := v.vms(VMFilter{Host: q.Host, IncludeGone: q.IncludeGone})
	if err != nil {
		return faulted(v, events.Errorf(events.CodeInternal, "list vms: %v", err))
	}
	reply := &events.QueryReply{Seq: v.seq, VMs: make([]events.VMView, 0, len(vms))}
	for _, vm := range vms {
		reply.VMs = append(reply.VMs, vmView(vm))
	}
	return reply
}

func answerHost(v *view, q *events.Query) *events.QueryReply {
	row, _, err := v.hostRow(q.Name)
	if err != nil {
		return faulted(v, events.Errorf(events.CodeInternal, "read host %s: %v", q.Name, err))
	}
	if !row.State.Registered {
		return faulted(v, events.Errorf(events.CodeHostNotFound, "no host registered as %q", q.Name))
	}
	return &events.QueryReply{Seq: v.seq, Hosts: []events.HostView{hostView(row.State)}}
}

// answerHosts lists the registered hosts; a host whose agent has reported
// before anyone registered it is not listed.
func answerHosts(v *view, _ *events.Query) *events.QueryReply {
	rows, err := v.hosts()
	if err != nil {
		return faulted(v, events.Errorf(events.CodeInternal, "list hosts: %v", err))
	}
	reply := &events.QueryReply{Seq: v.seq, Hosts: make([]events.HostView, 0, len(rows))}
	for _, row := range rows {
		if row.State.Registered {
			reply.Hosts = append(reply.Hosts, hostView(row.State))
		}
	}
	return reply
}

func answerImage(v *view, q *events.Query) *events.QueryReply {
	state, _, _, err := v.image(q.Name)
	if err != nil {
		return faulted(v, events.Errorf(events.CodeInternal, "read image %s: %v", q.Name, err))
	}
	if !state.Registered {
		return faulted(v, events.Errorf(events.CodeImageNotFound, "no image registered as %q", q.Name))
	}
	return &events.QueryReply{Seq: v.seq, Images: []events.ImageState{state}}
}

func answerImages(v *view, _ *events.Query) *events.QueryReply {
	images, err := v.images()
	if err != nil {
		return faulted(v, events.Errorf(events.CodeInternal, "list images: %v", err))
	}
	reply := &events.QueryReply{Seq: v.seq, Images: make([]events.ImageState, 0, len(images))}
	for _, image := range images {
		if image.Registered {
			reply.Images = append(reply.Images, image)
		}
	}
	return reply
}

// answerLease lists the grants standing on one resource (Name); a
// resource nobody ever held is an error, one held before and free now an
// empty list.
func answerLease(v *view, q *events.Query) *events.QueryReply {
	if _, err := events.ParseResource(q.Name); err != nil {
		return faulted(v, events.Errorf(events.CodeInvalidArgument, "%v", err))
	}
	state, err := v.lease(q.Name)
	if err != nil {
		return faulted(v, events.Errorf(events.CodeInternal, "read lease %s: %v", q.Name, err))
	}
	if state.Grants == 0 {
		return faulted(v, events.Errorf(events.CodeLeaseNotFound, "no lease was ever granted on %s", q.Name))
	}
	return &events.QueryReply{Seq: v.seq, Leases: state.Standing()}
}

// answerLeases lists the standing grants, filtered by resource, host and
// holder.
func answerLeases(v *view, q *events.Query) *events.QueryReply {
	if q.Resource != "" {
		if _, err := events.ParseResource(q.Resource); err != nil {
			return faulted(v, events.Errorf(events.CodeInvalidArgument, "%v", err))
		}
	}
	grants, err := v.leases(LeaseFilter{Resource: q.Resource, Host: q.Host, Holder: q.Holder})
	if err != nil {
		return faulted(v, events.Errorf(events.CodeInternal, "list leases: %v", err))
	}
	return &events.QueryReply{Seq: v.seq, Leases: grants}
}

func faulted(v *view, f *events.Fault) *events.QueryReply {
	return &events.QueryReply{Seq: v.seq, Error: f}
}

func vmView(state events.VMState) events.VMView {
	return events.VMView{VMState: state, Converged: state.Converged()}
}

// hostView is a host with its capacity; VMs counts the VMs holding an
// allocation on it.
func hostView(state events.HostState) events.HostView {
	usedCPU, usedMiB := state.Used()
	freeCPU, freeMiB := state.Free()
	return events.HostView{HostState: state, UsedCPU: usedCPU, UsedMiB: usedMiB,
		FreeCPU: freeCPU, FreeMiB: freeMiB, VMs: len(state.Allocations)}
}

// queryWorkers run the queries that wait for their MinSeq, at most a
// bound at once, so waiting never holds up a subscription's goroutine.
type queryWorkers struct {
	// base is the parent of the workers' contexts; stop cancels it.
	base   context.Context
	cancel context.CancelFunc
	// slots holds one token per worker running.
	slots chan struct{}

	mu       sync.Mutex // guards stopped and the Add side of running
	stopped  bool
	inflight sync.WaitGroup
}

func (w *queryWorkers) init(concurrency int) {
	w.base, w.cancel = context.WithCancel(context.Background())
	w.slots = make(chan struct{}, concurrency)
}

// run starts fn on a worker, waiting for a free one; false once stopped.
func (w *queryWorkers) run(fn func(ctx context.Context)) bool {
	select {
	case w.slots <- struct{}{}:
	case <-w.base.Done():
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		<-w.slots
		return false
	}
	w.inflight.Add(1)
	go func() {
		defer func() {
			<-w.slots
			w.inflight.Done()
		}()
		fn(w.base)
	}()
	return true
}

// stop cancels the workers and waits for them to finish.
func (w *queryWorkers) stop() {
	w.mu.Lock()
	w.stopped = true
	w.mu.Unlock()
	w.cancel()
	w.inflight.Wait()
}
