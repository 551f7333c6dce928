package main

import (
	"errors"
	"testing"

	"github.com/loomctl/loom/events"
)

func TestHostFilter_FollowsPlacementsAndGrants(t *testing.T) {
	f := newHostFilter("h1")
	vm := events.EventSubject(events.KindVM, "web")
	disk := events.Resource{Kind: events.ResourceDisk, Name: "web"}
	steps := []struct {
		name    string
		subject string
		ev      events.Event
		seq     uint64
		keep    bool
	}{
		{"created, not placed yet", vm, events.VMCreated{UID: "u"}, 1, false},
		{"the host's own event", events.EventSubject(events.KindHost, "h1"), events.HostAllocated{VM: "web"}, 2, true},
		{"another host's grant", events.LeaseExclusiveSubject(events.Resource{Kind: events.ResourceDisk, Name: "db"}), events.LeaseGranted{Mode: events.LeaseExclusive, LeaseHolder: events.LeaseHolder{ID: "v", Host: "h2"}}, 3, false},
		{"a grant on the host", events.LeaseExclusiveSubject(disk), events.LeaseGranted{Mode: events.LeaseExclusive, LeaseHolder: events.LeaseHolder{ID: "u", Host: "h1"}}, 4, true},
		{"placed on the host", vm, events.VMPlaced{UID: "u", Host: "h1"}, 5, true},
		{"its goal changes", vm, events.VMGoalChanged{UID: "u", Desired: events.DesiredStopped}, 6, true},
		{"its observation", events.ObservationSubject("h1", events.KindVM, "web"), events.VMObserved{UID: "u"}, 7, true},
		{"the grant expires", events.LeaseExclusiveSubject(disk), events.LeaseExpired{Holder: "u", Epoch: 4, Host: "h1"}, 8, true},
		{"another host's release", events.LeaseExclusiveSubject(events.Resource{Kind: events.ResourceDisk, Name: "db"}), events.LeaseReleased{Holder: "v", Epoch: 3}, 9, false},
		{"moved off the host", vm, events.VMPlaced{UID: "u", Host: "h2", From: "h1"}, 10, true},
		{"its goal changes elsewhere", vm, events.VMGoalChanged{UID: "u", Desired: events.DesiredRunning}, 11, false},
	}
	for _, s := range steps {
		rec := &events.Record{Seq: s.seq, Subject: s.subject, Event: s.ev}
		if got := f.keeps(rec, nil); got != s.keep {
			t.Errorf("%s: kept %v, want %v", s.name, got, s.keep)
		}
	}
	if !f.keeps(&events.Record{Seq: 12, Subject: vm}, errors.New("corrupt")) {
		t.Error("an undecodable event was dropped")
	}
	var none *hostFilter
	if !none.keeps(&events.Record{Subject: vm, Event: events.VMCreated{}}, nil) {
		t.Error("no filter dropped an event")
	}
}
