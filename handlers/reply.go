package handlers

import (
	"cmp"
	"errors"
	"slices"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/loomctl/loom/events"
)

// respond sends reply in the request's format. A reply with an error also
// carries micro's error headers, so `nats req` and micro clients see it.
//
// It publishes on the reply subject itself rather than through
// micro.Request: requests are answered from worker goroutines after the
// micro handler has returned, and micro's Request is not safe for that.
func (s *Service) respond(req *request, format events.Format, reply *events.Reply) {
	if req.reply == "" {
		return
	}
	data, err := events.EncodeAs(format, reply)
	if err != nil {
		s.log.Error("encode reply", keySubject, req.subject, keyErr, err)
		reply = &events.Reply{Error: events.Errorf(events.CodeInternal, "encode reply: %v", err)}
		data, _ = events.EncodeAs(format, reply)
	}
	msg := &nats.Msg{Subject: req.reply, Data: data}
	if f := reply.Error; f != nil {
		msg.Header = nats.Header{}
		msg.Header.Set(micro.ErrorCodeHeader, strconv.Itoa(int(f.Code)))
		msg.Header.Set(micro.ErrorHeader, headerSafe(f.Error()))
	}
	if err := s.cfg.Conn.PublishMsg(msg); err != nil {
		s.log.Warn("send reply", keySubject, req.subject, keyErr, err)
	}
}

// headerSafe keeps a message on one header line.
func headerSafe(s string) string {
	return strings.NewReplacer("\r", " ", "\n", " ").Replace(s)
}

// failed is a reply with a fault and the events appended before it.
func failed(f *events.Fault, appended []events.Appended) *events.Reply {
	return &events.Reply{Events: appended, Error: f}
}

// unavailable is the fault of a failed read or append: the bus or the read
// model did not answer (a Fault in err's chain, such as a read model's lag,
// is kept). Retrying is safe.
func unavailable(what string, err error) *events.Fault {
	var f *events.Fault
	if errors.As(err, &f) {
		return f
	}
	return events.Errorf(events.CodeUnavailable, "%s: %v; retrying is safe", what, err)
}

// lagging is the fault of a read model that did not reach seq in time.
func lagging(seq uint64, err error) *events.Fault {
	if err == nil {
		return nil
	}
	return events.Errorf(events.CodeTimeout, "the read model did not reach stream sequence %d in time (%v); retrying is safe", seq, err)
}

// merge joins two lists of appended events, without repeats, in stream order.
func merge(a, b []events.Appended) []events.Appended {
	out := slices.Concat(a, b)
	slices.SortFunc(out, func(x, y events.Appended) int { return cmp.Compare(x.Seq, y.Seq) })
	return slices.CompactFunc(out, func(x, y events.Appended) bool { return x.Seq == y.Seq })
}

// find returns the event of type t among appended.
func find(appended []events.Appended, t events.Type) (events.Appended, bool) {
	for _, a := range appended {
		if a.Type == t {
			return a, true
		}
	}
	return events.Appended{}, false
}
