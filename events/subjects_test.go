package events

import "testing"

func TestParseEventSubject_RoundTrip(t *testing.T) {
	tests := []struct {
		name    string
		subject string
		want    Address
	}{
		{"decision", EventSubject(KindVM, "web-1"), Address{Kind: KindVM, ID: "web-1"}},
		{"observation", ObservationSubject("h1", KindVM, "web-1"), Address{Observed: true, Host: "h1", Kind: KindVM, ID: "web-1"}},
		{"host observation", ObservationSubject("h1", KindHost, "h1"), Address{Observed: true, Host: "h1", Kind: KindHost, ID: "h1"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseEventSubject(tc.subject)
			if err != nil || got != tc.want {
				t.Fatalf("ParseEventSubject(%q) = %+v, %v; want %+v", tc.subject, got, err, tc.want)
			}
		})
	}
}

func TestParseEventSubject_Rejects(t *testing.T) {
	for _, subject := range []string{"", "loom", "loom.evt.vm", "loom.evt.vm.a.b", "loom.obs.h1.vm", "loom.goal.h1.vm", "x.evt.vm.a", "loom.evt..a", "loom.obs.h1..a"} {
		if a, err := ParseEventSubject(subject); err == nil {
			t.Errorf("ParseEventSubject(%q) = %+v, want error", subject, a)
		}
	}
}

func TestParseGoalSubject(t *testing.T) {
	host, vm, err := ParseGoalSubject(GoalSubject("h1", "web-1"))
	if err != nil || host != "h1" || vm != "web-1" {
		t.Fatalf("got %q %q %v", host, vm, err)
	}
	for _, bad := range []string{"loom.goal.h1", "loom.goal..x", "loom.evt.h1.x", "loom.goal.h1.x.y"} {
		if _, _, err := ParseGoalSubject(bad); err == nil {
			t.Errorf("ParseGoalSubject(%q): want error", bad)
		}
	}
}

func TestValidateName(t *testing.T) {
	good := []string{"a", "web-1", "Web_2", "0abc", "x23456789012345678901234567890123456789012345678901234567890123"}
	bad := []string{"", "-a", "_a", "a.b", "a*", "a>", "a b", "ä", "a/b", "x234567890123456789012345678901234567890123456789012345678901234"}
	for _, n := range good {
		if err := ValidateName("vm", n); err != nil {
			t.Errorf("ValidateName(%q) = %v, want ok", n, err)
		}
	}
	for _, n := range bad {
		if err := ValidateName("vm", n); err == nil {
			t.Errorf("ValidateName(%q) = ok, want error", n)
		}
	}
}

func TestDerivedIDs_Deterministic(t *testing.T) {
	first, again := MsgID("a", "c", 0), MsgID("a", "c", 0)
	if first != again || first == MsgID("a", "c", 1) || first == MsgID("b", "c", 0) {
		t.Fatal("MsgID must be a function of (actor, command, index) only")
	}
	// Separators matter: ("ab","c") and ("a","bc") are different commands.
	if MsgID("ab", "c", 0) == MsgID("a", "bc", 0) || DeriveUID("ab", "c") == DeriveUID("a", "bc") {
		t.Fatal("derived ids must not collide across field boundaries")
	}
	uid := DeriveUID("alice", "cmd-1")
	if uid != DeriveUID("alice", "cmd-1") || len(uid) != 36 || uid[14] != '5' {
		t.Fatalf("DeriveUID = %q, want a stable UUID-shaped string", uid)
	}
}
