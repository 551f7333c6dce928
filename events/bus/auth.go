package bus

import (
	"fmt"
	"slices"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"github.com/loomctl/loom/events"
)

// Role is what an identity on the bus is for (DESIGN "Security").
type Role string

// The roles.
const (
	// RoleAdmin creates and changes streams: nothing else may.
	RoleAdmin Role = "admin"
	// RolePlane is the control plane: it serves commands and queries and
	// alone appends decisions (loom.evt), goals and lost markers.
	RolePlane Role = "plane"
	// RoleAgent is one host's agent: it publishes only under its own
	// host's subjects and reads only its own goals.
	RoleAgent Role = "agent"
	// RoleClient sends commands and queries, and nothing else.
	RoleClient Role = "client"
	// RoleAuditor reads LOOM_EVENTS, and nothing else.
	RoleAuditor Role = "auditor"
)

// Roles lists every role.
var Roles = []Role{RoleAdmin, RolePlane, RoleAgent, RoleClient, RoleAuditor}

// Identity is one nkey user of the bus.
type Identity struct {
	Role Role `json:"role"`
	// Host is the agent's host; empty for other roles.
	Host string `json:"host,omitempty"`
	// Client names a client identity of its own (a person's, a
	// service's); empty for the shared client identity and other roles.
	Client string `json:"client,omitempty"`
	// Key is the nkey's public key ("U...").
	Key string `json:"key"`
}

// Name names the identity: its role, "agent-<host>" or "client-<name>".
// It is the actor of the commands a client identity sends.
func (id Identity) Name() string {
	switch {
	case id.Role == RoleAgent:
		return string(RoleAgent) + "-" + id.Host
	case id.Client != "":
		return string(RoleClient) + "-" + id.Client
	}
	return string(id.Role)
}

// Validate checks the identity's role, host and key.
func (id Identity) Validate() error {
	switch {
	case !slices.Contains(Roles, id.Role):
		return fmt.Errorf("identity %q: unknown role %q", id.Key, id.Role)
	case (id.Role == RoleAgent) != (id.Host != ""):
		return fmt.Errorf("identity %s: an agent names its host, and only an agent does", id.Name())
	case id.Client != "" && id.Role != RoleClient:
		return fmt.Errorf("identity %s: only a client has a client name", id.Name())
	case id.Host != "" && events.ValidateName("host", id.Host) != nil:
		return fmt.Errorf("identity %s: %w", id.Name(), events.ValidateName("host", id.Host))
	case id.Client != "" && events.ValidateName("client", id.Client) != nil:
		return fmt.Errorf("identity %s: %w", id.Name(), events.ValidateName("client", id.Client))
	case !nkeys.IsValidPublicUserKey(id.Key):
		return fmt.Errorf("identity %s: %q is not an nkey user public key", id.Name(), id.Key)
	}
	return nil
}

// InboxPrefix is where an identity's replies arrive. Each identity has its
// own, and may subscribe to nothing else of the kind, so no identity reads
// another's replies.
func InboxPrefix(name string) string { return "_INBOX_" + name }

// JetStream API subjects.
const (
	jsAPI = "$JS.API"
	// jsFlowControl carries flow-control and heartbeat replies of
	// consumers.
	jsFlowControl = "$JS.FC.>"
)

// streamReader is what reading stream s with ordered consumers and leader
// gets takes, filtered to filter (">" for any subject): consumer create
// names the filter in its API subject (nats.go does when a consumer has
// one filter), so the permission can hold it to one.
func streamReader(s, filter string) []string {
	subjects := []string{
		jsAPI + ".INFO",
		jsAPI + ".STREAM.INFO." + s,
		jsAPI + ".CONSUMER.CREATE." + s + ".*." + filter,
		jsAPI + ".CONSUMER.MSG.NEXT." + s + ".*",
		jsAPI + ".CONSUMER.INFO." + s + ".*",
		jsAPI + ".CONSUMER.DELETE." + s + ".*",
	}
	if filter == ">" {
		// A consumer of the whole stream names no filter.
		subjects = append(subjects, jsAPI+".CONSUMER.CREATE."+s+".*")
	}
	return subjects
}

// streamGetter is reading any message of stream s by sequence or subject:
// the subject is in the request's body, beyond a permission's reach.
func streamGetter(s string) []string {
	return []string{jsAPI + ".STREAM.MSG.GET." + s, jsAPI + ".DIRECT.GET." + s, jsAPI + ".DIRECT.GET." + s + ".>"}
}

// Permissions is what id may publish and subscribe to. Replies to requests
// it serves (commands, queries) are allowed by Response, not by publish
// rights on others' inboxes.
func Permissions(id Identity) *server.Permissions {
	inbox := InboxPrefix(id.Name()) + ".>"
	var pub, sub []string
	var respond bool
	switch id.Role {
	case RoleAdmin:
		return &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: []string{">"}},
			Subscribe: &server.SubjectPermission{Allow: []string{">"}},
		}
	case RolePlane:
		pub = []string{"loom.evt.>", "loom.goal.>", "loom.live.>", "$SRV.>", jsFlowControl}
		for _, s := range []string{events.StreamEvents, events.StreamGoals, events.StreamLiveness} {
			pub = append(pub, streamReader(s, ">")...)
			pub = append(pub, streamGetter(s)...)
		}
		// The dispatcher trims a goal subject to its last goal: goals are
		// a projection of LOOM_EVENTS, and a purge there loses nothing of
		// record. LOOM_EVENTS itself it may not purge.
		pub = append(pub, jsAPI+".STREAM.PURGE."+events.StreamGoals)
		// It follows appends as they land (migrations, reports) on core
		// subscriptions too.
		sub = []string{inbox, events.CommandsWildcard, events.QueriesWildcard, "$SRV.>",
			events.EventsWildcard, events.ObservationsWildcard, events.GoalsWildcard, events.LivenessWildcard}
		respond = true
	case RoleAgent:
		pub = []string{"loom.obs." + id.Host + ".>", events.LivenessSubject(id.Host), jsFlowControl}
		pub = append(pub, streamReader(events.StreamGoals, events.HostGoals(id.Host))...)
		pub = append(pub, streamReader(events.StreamEvents, ">")...)
		pub = append(pub, streamGetter(events.StreamEvents)...)
		pub = append(pub, streamGetter(events.StreamLiveness)...)
		pub = append(pub, jsAPI+".STREAM.INFO."+events.StreamLiveness)
		// Lease changes reach it on a core subscription (a grant on a
		// resource its VMs use may be revoked): every lease subject, since
		// which resources its VMs use changes.
		sub = []string{inbox, "loom.evt.lease.>"}
	case RoleClient:
		pub = []string{events.CommandsWildcard, events.QueriesWildcard}
		sub = []string{inbox}
	case RoleAuditor:
		pub = append(streamReader(events.StreamEvents, ">"), streamGetter(events.StreamEvents)...)
		pub = append(pub, jsFlowControl)
		sub = []string{inbox}
	default:
		// An unknown role may do nothing: Validate refuses it first.
		return &server.Permissions{
			Publish:   &server.SubjectPermission{Deny: []string{">"}},
			Subscribe: &server.SubjectPermission{Deny: []string{">"}},
		}
	}
	p := &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: pub},
		Subscribe: &server.SubjectPermission{Allow: sub},
	}
	if respond {
		p.Response = &server.ResponsePermission{MaxMsgs: 1}
	}
	return p
}

// nkeyUsers are the server's users for identities, each in its role's
// account among accounts.
func nkeyUsers(ids []Identity, accounts map[string]*server.Account) ([]*server.NkeyUser, error) {
	users := make([]*server.NkeyUser, 0, len(ids))
	seen := map[string]string{}
	for _, id := range ids {
		if err := id.Validate(); err != nil {
			return nil, err
		}
		if other, dup := seen[id.Key]; dup {
			return nil, fmt.Errorf("identities %s and %s share one key", other, id.Name())
		}
		seen[id.Key] = id.Name()
		users = append(users, &server.NkeyUser{Nkey: id.Key, Permissions: Permissions(id), Account: accounts[accountOf(id.Role)]})
	}
	return users, nil
}
