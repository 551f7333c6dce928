package events

import "fmt"

// Liveness messages, on loom.live.<host> in LOOM_LIVENESS (one message per
// subject). Their HeaderType tells them apart. They are not events: the
// stream keeps only the last, and decisions about a host's liveness
// (host.lost, host.rejoined) go to LOOM_EVENTS.
const (
	// LivenessRenewal is a Renewal.
	LivenessRenewal = "host.renewal"
	// LivenessLostMarker is a LostMarker.
	LivenessLostMarker = "host.lost_marker"
)

// Renewal is a host agent's liveness renewal on loom.live.<host>. Each is
// published with the subject sequence of the previous one, so renewals form
// a chain that a lost marker can break.
type Renewal struct {
	Host string `msgpack:"host" json:"host"`
	// TTLMillis is how long the renewal keeps the host alive.
	TTLMillis int64 `msgpack:"ttl_ms" json:"ttl_ms"`
	// Agent identifies the agent process (its start ULID).
	Agent string `msgpack:"agent" json:"agent"`
}

// LostMarker is the failure detector's claim that a host went silent. It is
// published expecting the subject sequence of the renewal it supersedes, so
// it races the host's next renewal: exactly one of the two lands. Only a
// marker that landed permits host.lost.
type LostMarker struct {
	Host string `msgpack:"host" json:"host"`
	// RenewalSeq is the sequence of the renewal that was not followed in
	// time.
	RenewalSeq uint64 `msgpack:"renewal_seq" json:"renewal_seq"`
	// Detector identifies the failure detector process that wrote it.
	Detector string `msgpack:"detector" json:"detector"`
}

// DecodeLiveness decodes a message of loom.live.<host> by its type header:
// a *Renewal or a *LostMarker.
func DecodeLiveness(typ string, data []byte) (any, error) {
	switch typ {
	case LivenessRenewal:
		var r Renewal
		if err := Unmarshal(data, &r); err != nil {
			return nil, fmt.Errorf("%w: renewal: %w", ErrCorrupt, err)
		}
		return &r, nil
	case LivenessLostMarker:
		var m LostMarker
		if err := Unmarshal(data, &m); err != nil {
			return nil, fmt.Errorf("%w: lost marker: %w", ErrCorrupt, err)
		}
		return &m, nil
	}
	return nil, fmt.Errorf("%w: liveness message of type %q", ErrUnknownType, typ)
}
