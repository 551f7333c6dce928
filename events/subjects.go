package events

import (
	"fmt"
	"strings"
)

// Stream names.
const (
	StreamEvents   = "LOOM_EVENTS"   // the system of record: decisions and observations
	StreamGoals    = "LOOM_GOALS"    // the current goal of each VM on each host
	StreamLiveness = "LOOM_LIVENESS" // host liveness renewals and lost markers
)

// Subject roots.
const (
	subjectEvents       = "loom.evt"
	subjectObservations = "loom.obs"
	subjectGoals        = "loom.goal"
	subjectLiveness     = "loom.live"
	subjectCommands     = "loom.cmd"
	subjectQueries      = "loom.q"
)

// Wildcards that the streams capture.
const (
	EventsWildcard       = subjectEvents + ".>"
	ObservationsWildcard = subjectObservations + ".>"
	GoalsWildcard        = subjectGoals + ".>"
	LivenessWildcard     = subjectLiveness + ".>"
	CommandsWildcard     = subjectCommands + ".>"
	QueriesWildcard      = subjectQueries + ".>"
)

// Kind is the kind of an aggregate.
type Kind string

// The aggregate kinds.
const (
	KindHost  Kind = "host"
	KindImage Kind = "image"
	KindVM    Kind = "vm"
)

// EventSubject is where decisions about one aggregate live.
func EventSubject(kind Kind, id string) string {
	return subjectEvents + "." + string(kind) + "." + id
}

// ObservationSubject is where the agent of host reports on one aggregate.
// Only that agent writes it.
func ObservationSubject(host string, kind Kind, id string) string {
	return subjectObservations + "." + host + "." + string(kind) + "." + id
}

// HostObservations matches everything the agent of host has observed.
func HostObservations(host string) string {
	return subjectObservations + "." + host + ".>"
}

// GoalSubject carries the current goal of vm on host.
func GoalSubject(host, vm string) string { return subjectGoals + "." + host + "." + vm }

// HostGoals matches the goals of every VM on host.
func HostGoals(host string) string { return subjectGoals + "." + host + ".*" }

// LivenessSubject carries host's renewals and lost markers.
func LivenessSubject(host string) string { return subjectLiveness + "." + host }

// CommandSubject is where a command verb on kind is served.
func CommandSubject(kind Kind, verb string) string {
	return subjectCommands + "." + string(kind) + "." + verb
}

// QuerySubject is where a query on kind is served.
func QuerySubject(kind Kind, verb string) string {
	return subjectQueries + "." + string(kind) + "." + verb
}

// Address names what a subject on LOOM_EVENTS is about.
type Address struct {
	// Observed is true for loom.obs subjects; Host then names the writer.
	Observed bool
	Host     string
	Kind     Kind
	ID       string
	// Holder is the holder of a shared lease subject,
	// loom.evt.lease.<kind>.<name>.s.<holder>; ID is then "<kind>/<name>".
	Holder string
}

// ParseEventSubject parses loom.evt.<kind>.<id>, the lease subjects
// (lease.go) and loom.obs.<host>.<kind>.<id>.
func ParseEventSubject(subject string) (Address, error) {
	tokens := strings.Split(subject, ".")
	switch {
	case len(tokens) >= 6 && tokens[0] == "loom" && tokens[1] == "evt" && tokens[2] == string(KindLease):
		return parseLeaseSubject(subject, tokens[3:])
	case len(tokens) == 4 && tokens[0] == "loom" && tokens[1] == "evt":
		return checkAddress(subject, Address{Kind: Kind(tokens[2]), ID: tokens[3]})
	case len(tokens) == 5 && tokens[0] == "loom" && tokens[1] == "obs":
		return checkAddress(subject, Address{Observed: true, Host: tokens[2], Kind: Kind(tokens[3]), ID: tokens[4]})
	}
	return Address{}, fmt.Errorf("subject %q: not an event subject", subject)
}

// ParseGoalSubject parses loom.goal.<host>.<vm>.
func ParseGoalSubject(subject string) (host, vm string, err error) {
	tokens := strings.Split(subject, ".")
	if len(tokens) != 4 || tokens[0] != "loom" || tokens[1] != "goal" || tokens[2] == "" || tokens[3] == "" {
		return "", "", fmt.Errorf("subject %q: not a goal subject", subject)
	}
	return tokens[2], tokens[3], nil
}

func checkAddress(subject string, a Address) (Address, error) {
	if a.Kind == "" || a.ID == "" || (a.Observed && a.Host == "") {
		return Address{}, fmt.Errorf("subject %q: empty token", subject)
	}
	return a, nil
}
