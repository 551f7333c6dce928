package events

import (
	"strings"
	"testing"
)

func TestLeaseSubjects_RoundTrip(t *testing.T) {
	r := Resource{Kind: ResourceImage, Name: "demo"}
	for _, tc := range []struct {
		subject string
		holder  string
	}{
		{LeaseSubject(r, LeaseExclusive, "u1"), ""},
		{LeaseSubject(r, LeaseShared, "u1"), "u1"},
	} {
		addr, err := ParseEventSubject(tc.subject)
		if err != nil {
			t.Fatal(err)
		}
		if addr.Kind != KindLease || addr.ID != "image/demo" || addr.Holder != tc.holder || addr.Observed {
			t.Errorf("%s parsed as %+v", tc.subject, addr)
		}
	}
	if got := LeaseWildcard(r); got != "loom.evt.lease.image.demo.>" {
		t.Errorf("wildcard %s", got)
	}
	for _, bad := range []string{"loom.evt.lease.image.demo", "loom.evt.lease.image.demo.y", "loom.evt.lease.image.demo.s",
		"loom.evt.lease.vm.demo.x", "loom.evt.lease.image.-bad.x", "loom.evt.lease.image.demo.s.u1.more"} {
		if addr, err := ParseEventSubject(bad); err == nil {
			t.Errorf("%s parsed as %+v", bad, addr)
		}
	}
	for _, bad := range []string{"", "image", "image/", "vm/x", "disk/a.b", "image/a/b"} {
		if _, err := ParseResource(bad); err == nil {
			t.Errorf("resource %q accepted", bad)
		}
	}
}

// leaseHistory applies events on a resource's subjects in stream order.
type leaseHistory struct {
	h *history
	r Resource
	s LeaseState
}

func (l *leaseHistory) apply(mode LeaseMode, holder string, ev Event) (*Record, error) {
	subject := LeaseSubject(l.r, mode, holder)
	rec := l.h.add(subject, ev, "c")
	addr, _ := ParseEventSubject(subject)
	before := l.s.Last
	err := l.s.Apply(rec, addr.Holder)
	if err != nil && l.s.Last != before {
		l.h.t.Fatalf("a rejected %s moved the state", rec.Envelope.Type)
	}
	return rec, err
}

func (l *leaseHistory) must(mode LeaseMode, holder string, ev Event) *Record {
	l.h.t.Helper()
	rec, err := l.apply(mode, holder, ev)
	if err != nil {
		l.h.t.Fatal(err)
	}
	return rec
}

func grant(mode LeaseMode, holder, host string) LeaseGranted {
	return LeaseGranted{Mode: mode, LeaseHolder: LeaseHolder{ID: holder, VM: "vm-" + holder, Host: host}}
}

func TestLeaseState_SharedAndExclusiveExcludeEachOther(t *testing.T) {
	l := &leaseHistory{h: &history{t: t}, r: Resource{ResourceImage, "demo"}}
	a := l.must(LeaseShared, "a", grant(LeaseShared, "a", "h1"))
	b := l.must(LeaseShared, "b", grant(LeaseShared, "b", "h2"))
	if !l.s.Held() || len(l.s.Shared) != 2 || l.s.Shared["a"].Epoch != a.Seq || l.s.Last != b.Seq || l.s.Grants != 2 {
		t.Fatalf("two shared grants: %+v", l.s)
	}
	if _, err := l.apply(LeaseExclusive, "", grant(LeaseExclusive, "c", "h3")); err == nil {
		t.Fatal("an exclusive grant folded while shared grants stood")
	}
	l.must(LeaseShared, "a", LeaseReleased{Holder: "a", Epoch: a.Seq})
	l.must(LeaseShared, "b", LeaseExpired{Holder: "b", Epoch: b.Seq, Host: "h2", MarkerSeq: 1})
	if l.s.Held() {
		t.Fatalf("released and expired, still held: %+v", l.s)
	}
	x := l.must(LeaseExclusive, "", grant(LeaseExclusive, "c", "h3"))
	if g, ok := l.s.Grant(LeaseExclusive, "c"); !ok || g.Epoch != x.Seq || g.Host != "h3" || g.GrantedBy != "t" {
		t.Fatalf("exclusive grant: %+v %v", g, ok)
	}
	// A shared grant that landed while the exclusive one stood is void.
	v := l.must(LeaseShared, "d", grant(LeaseShared, "d", "h1"))
	if g := l.s.Shared["d"]; !g.Void || g.Epoch != v.Seq {
		t.Fatalf("shared grant under an exclusive one: %+v", g)
	}
	l.must(LeaseExclusive, "", LeaseBreaking{Holder: "c", Epoch: x.Seq, Reason: "r"})
	if !l.s.Exclusive.Breaking || l.s.Exclusive.BreakingBy != "t" || !l.s.Held() {
		t.Fatalf("breaking: %+v", l.s.Exclusive)
	}
	l.must(LeaseExclusive, "", LeaseBroken{Holder: "c", Epoch: x.Seq})
	if l.s.Exclusive.Epoch != 0 {
		t.Fatalf("broken, still standing: %+v", l.s.Exclusive)
	}
	// The void grant stays void after the exclusive one ended; its holder
	// must ask again.
	if g := l.s.Shared["d"]; !g.Void || l.s.Held() {
		t.Fatalf("void grant after the break: %+v held=%v", g, l.s.Held())
	}
}

func TestLeaseState_RejectsEndsOfGrantsThatDoNotStand(t *testing.T) {
	l := &leaseHistory{h: &history{t: t}, r: Resource{ResourceDisk, "d1"}}
	x := l.must(LeaseExclusive, "", grant(LeaseExclusive, "a", "h1"))
	for name, tc := range map[string]struct {
		mode   LeaseMode
		holder string
		ev     Event
	}{
		"release by a non-holder":        {LeaseExclusive, "", LeaseReleased{Holder: "b", Epoch: x.Seq}},
		"release under another epoch":    {LeaseExclusive, "", LeaseReleased{Holder: "a", Epoch: x.Seq + 1}},
		"shared release of an exclusive": {LeaseShared, "a", LeaseReleased{Holder: "a", Epoch: x.Seq}},
		"holder not its subject's":       {LeaseShared, "b", LeaseReleased{Holder: "a", Epoch: x.Seq}},
		"exclusive grant on shared":      {LeaseShared, "b", grant(LeaseExclusive, "b", "h1")},
		"break of what does not stand":   {LeaseExclusive, "", LeaseBreaking{Holder: "b", Epoch: x.Seq}},
		"a second exclusive grant":       {LeaseExclusive, "", grant(LeaseExclusive, "b", "h2")},
		"another kind's event":           {LeaseExclusive, "", HostCordoned{}},
	} {
		before := l.s
		_, err := l.apply(tc.mode, tc.holder, tc.ev)
		if err == nil {
			t.Errorf("%s: folded", name)
		}
		if l.s.Exclusive != before.Exclusive || len(l.s.Shared) != len(before.Shared) {
			t.Errorf("%s: changed the state", name)
		}
	}
	if err := (&AcquireLease{CommandMeta: CommandMeta{CommandID: "c"}, Resource: "disk/d1", Mode: "sole", LeaseHolder: LeaseHolder{ID: "a"}}).Validate(); err == nil || !strings.Contains(err.Error(), "mode") {
		t.Errorf("a bad mode: %v", err)
	}
}
