package agents

import (
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// mine tells whether m, a message on one of this host's observation
// subjects, is one of this agent's own reports: signed with the host key
// for the place it holds in its subject. prevSeq is the sequence of the
// subject's message before it, when the agent read the subject whole;
// otherwise (known false) the sequence its append expected, from its
// header, which the server checked when it stored it.
//
// Without a host key every message is taken as the agent's own, as before
// keys. With one, a message someone else put there (the read models flag
// it) is chained after, but never taken for what the agent reported: else
// a forged "running" would stop the agent from reporting its own, and the
// VM would never converge in the read models, which ignore the forgery.
func (a *Agent) mine(m bus.Message, prevSeq uint64, known bool) bool {
	key := a.cfg.HostKey
	if key == nil {
		return true
	}
	if !known {
		if prevSeq, known = bus.ExpectedOnSubject(m.Header, m.Subject); !known {
			return false
		}
	}
	return key.Signed(m.Subject, prevSeq, events.Hash(m.Data), m.Header.Get(events.HeaderSig))
}
