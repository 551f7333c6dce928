package agents

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/hostkey"
)

// TestAgent_SignsEveryObservation runs an agent with a host key through a
// VM's goals, an orphan, and a foreign message on its VM's subject: every
// message it appended, on its VM's subject and on its host's, carries its
// key and a signature that verifies at the place the message holds (after
// the subject's previous message, the foreign one included), and only
// there.
func TestAgent_SignsEveryObservation(t *testing.T) {
	s := newFakeSetup(t, "h1")
	key, err := hostkey.Generate()
	if err != nil {
		t.Fatal(err)
	}
	s.cfg.HostKey = key
	stray, _ := parseUUID(events.DeriveUID("t", "stray"))
	s.host.defineDirect("stray", stray, libvirt.StateRunning)
	startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

	// Someone else appends to the VM's subject, unsigned: the agent's next
	// observation follows it, signed at its new place.
	subject := vmSubject("h1", "vm1")
	foreignAt := appendForeign(t, s, uid)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredPaused, 20))
	waitObserved(t, s.bus.JS, "h1", "vm1", 20, events.ObservedPaused)

	v := hostkey.NewVerifier()
	pub, err := v.Key(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	signed := 0
	for _, subject := range []string{subject, events.ObservationSubject("h1", events.KindHost, "h1")} {
		msgs, err := bus.ReadSubject(ctx, s.bus.JS, events.StreamEvents, subject)
		if err != nil {
			t.Fatal(err)
		}
		var prevSeq uint64
		for _, m := range msgs {
			header := m.Header.Get(events.HeaderSig)
			if m.Seq == foreignAt.Seq {
				if header != "" {
					t.Errorf("seq %d: the foreign message is signed", m.Seq)
				}
				prevSeq = m.Seq
				continue
			}
			var sig [hostkey.SignatureSize]byte
			switch {
			case m.Header.Get(events.HeaderSigKey) != key.Public():
				t.Errorf("%s seq %d: signer %q, want %s", subject, m.Seq, m.Header.Get(events.HeaderSigKey), key.Public())
			case !v.Decode(&sig, header):
				t.Errorf("%s seq %d: signature header %q", subject, m.Seq, header)
			case !v.Verify(pub, m.Subject, prevSeq, events.Hash(m.Data), &sig):
				t.Errorf("%s seq %d: the signature does not verify after seq %d", subject, m.Seq, prevSeq)
			case v.Verify(pub, m.Subject, prevSeq+1, events.Hash(m.Data), &sig):
				t.Errorf("%s seq %d: the signature verifies at another place", subject, m.Seq)
			default:
				signed++
			}
			prevSeq = m.Seq
		}
	}
	// vm1: running, paused; h1: agent started, orphan found.
	if signed < 4 {
		t.Fatalf("%d signed observations checked, want at least 4", signed)
	}
}

// TestAgent_ForgedReportDoesNotSilenceIt: someone who may publish on the
// host's subjects puts there, ahead of the agent, the very report it is
// about to make (a paused VM), unsigned or signed by another key. The read
// models ignore it; so must the agent, which reports its own, signed, once
// it has re-read the subject, and again after a restart that finds such a
// message last.
func TestAgent_ForgedReportDoesNotSilenceIt(t *testing.T) {
	s := newFakeSetup(t, "h1")
	key, err := hostkey.Generate()
	if err != nil {
		t.Fatal(err)
	}
	other, err := hostkey.Generate()
	if err != nil {
		t.Fatal(err)
	}
	s.cfg.HostKey = key
	a := startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	subject := vmSubject("h1", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

	forge := func(report events.VMObserved, signer *hostkey.Key) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		last, err := bus.LastOnSubject(ctx, s.bus.Conn, events.StreamEvents, subject)
		if err != nil {
			t.Fatal(err)
		}
		env, data, err := events.Seal(report, events.KindVM, "vm1", events.Origin{Actor: "agent:h1", Time: time.Now()}, 0, events.Hash(last.Data))
		if err != nil {
			t.Fatal(err)
		}
		msg := bus.EventMsg(subject, &env, data, "")
		if signer != nil {
			msg.Header.Set(events.HeaderSigKey, signer.Public())
			msg.Header.Set(events.HeaderSig, signer.Sign(subject, last.Seq, events.Hash(data)))
		}
		if _, err := bus.AppendMsg(ctx, s.bus.JS, msg, &env, bus.Expect{Seq: last.Seq}); err != nil {
			t.Fatal(err)
		}
	}
	// waitOwn waits until the subject's last message is the agent's own
	// report of state at incarnation.
	waitOwn := func(incarnation uint64, state events.ObservedState) {
		t.Helper()
		waitFor(t, 15*time.Second, func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			m, err := bus.LastOnSubject(ctx, s.bus.Conn, events.StreamEvents, subject)
			if err != nil {
				return err
			}
			obs := reportOf(m)
			if obs.Incarnation != incarnation || obs.State != state || m.Header.Get(events.HeaderSigKey) != key.Public() {
				return fmt.Errorf("last on %s: %+v signed by %q; want the agent's own %s at %d", subject, obs, m.Header.Get(events.HeaderSigKey), state, incarnation)
			}
			return nil
		})
	}

	forge(events.VMObserved{UID: uid, Incarnation: 20, State: events.ObservedPaused}, other)
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredPaused, 20))
	waitOwn(20, events.ObservedPaused)

	a.stop(t)
	forge(events.VMObserved{UID: uid, Incarnation: 30, State: events.ObservedRunning}, nil)
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 30))
	startAgent(t, s.cfg)
	waitOwn(30, events.ObservedRunning)
}
