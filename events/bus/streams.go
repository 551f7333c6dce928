package bus

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
)

// DuplicateWindow is how long the server remembers Nats-Msg-Ids. Loom's own
// idempotency (the command-results read model) covers retries beyond it.
const DuplicateWindow = 2 * time.Minute

// StreamsConfig says how Loom's streams are replicated and stored.
type StreamsConfig struct {
	// Replicas is 1 on one machine, 3 or 5 on a cluster.
	Replicas int
	// Memory stores the streams in memory: tests and benchmarks only.
	Memory bool
}

// StreamConfigs are the settings Loom requires of its three streams.
func StreamConfigs(cfg StreamsConfig) []jetstream.StreamConfig {
	replicas := max(cfg.Replicas, 1)
	storage := jetstream.FileStorage
	if cfg.Memory {
		storage = jetstream.MemoryStorage
	}
	return []jetstream.StreamConfig{
		{
			Name:        events.StreamEvents,
			Description: "Loom's system of record: decisions (loom.evt) and observations (loom.obs)",
			Subjects:    []string{events.EventsWildcard, events.ObservationsWildcard},
			Storage:     storage,
			Replicas:    replicas,
			Retention:   jetstream.LimitsPolicy,
			Discard:     jetstream.DiscardNew,
			MaxMsgs:     -1, MaxBytes: -1, MaxAge: 0, MaxMsgsPerSubject: -1, MaxMsgSize: -1,
			Duplicates:         DuplicateWindow,
			DenyDelete:         true,
			DenyPurge:          true,
			AllowDirect:        true,
			AllowAtomicPublish: true,
		},
		{
			Name:        events.StreamGoals,
			Description: "The current goal state of each VM on each host",
			Subjects:    []string{events.GoalsWildcard},
			Storage:     storage,
			Replicas:    replicas,
			Retention:   jetstream.LimitsPolicy,
			Discard:     jetstream.DiscardOld,
			MaxMsgs:     -1, MaxBytes: -1, MaxAge: 0, MaxMsgSize: -1,
			MaxMsgsPerSubject: 1,
			Duplicates:        DuplicateWindow,
			AllowDirect:       true,
		},
		{
			Name:        events.StreamLiveness,
			Description: "Host liveness renewals and lost markers",
			Subjects:    []string{events.LivenessWildcard},
			Storage:     storage,
			Replicas:    replicas,
			Retention:   jetstream.LimitsPolicy,
			Discard:     jetstream.DiscardOld,
			MaxMsgs:     -1, MaxBytes: -1, MaxAge: 0, MaxMsgSize: -1,
			MaxMsgsPerSubject: 1,
			Duplicates:        DuplicateWindow,
			AllowDirect:       true,
		},
	}
}

// ErrStreamSettings means a stream exists with settings Loom cannot accept
// and cannot change.
var ErrStreamSettings = errors.New("stream settings differ from what loom requires")

// EnsureStreams creates Loom's streams, or updates them to the required
// settings. It is idempotent. It refuses (ErrStreamSettings) when a stream's
// storage differs or when the server rejects the update, rather than run
// on a system of record whose guarantees are not the ones Loom states.
func EnsureStreams(ctx context.Context, js jetstream.JetStream, cfg StreamsConfig) error {
	for _, want := range StreamConfigs(cfg) {
		if err := ensureStream(ctx, js, want); err != nil {
			return err
		}
	}
	return nil
}

// CheckStreams checks, without changing anything, that Loom's streams
// exist with the settings cfg asks for: what an identity that may not
// change streams does before it relies on them.
func CheckStreams(ctx context.Context, js jetstream.JetStream, cfg StreamsConfig) error {
	for _, want := range StreamConfigs(cfg) {
		stream, err := js.Stream(ctx, want.Name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			return fmt.Errorf("%w: %s does not exist; an admin identity creates it (loom serve with the admin credentials does)", ErrStreamSettings, want.Name)
		}
		if err != nil {
			return fmt.Errorf("look up stream %s: %w", want.Name, err)
		}
		if diffs := StreamDiff(stream.CachedInfo().Config, want); len(diffs) != 0 {
			return fmt.Errorf("%w: %s differs from what Loom expects in %v; refusing to run on it", ErrStreamSettings, want.Name, diffs)
		}
	}
	return nil
}

func ensureStream(ctx context.Context, js jetstream.JetStream, want jetstream.StreamConfig) error {
	stream, err := js.Stream(ctx, want.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		if _, err := js.CreateStream(ctx, want); err != nil {
			return fmt.Errorf("create stream %s: %w", want.Name, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up stream %s: %w", want.Name, err)
	}
	have := stream.CachedInfo().Config
	diffs := StreamDiff(have, want)
	if len(diffs) == 0 {
		return nil
	}
	if have.Storage != want.Storage {
		return fmt.Errorf("%w: %s is stored as %s, want %s (a stream's storage cannot change)",
			ErrStreamSettings, want.Name, have.Storage, want.Storage)
	}
	if _, err := js.UpdateStream(ctx, want); err != nil {
		return fmt.Errorf("%w: %s differs in %v and the update was refused: %w", ErrStreamSettings, want.Name, diffs, err)
	}
	return nil
}

// StreamDiff names the settings Loom cares about where have differs from
// want.
func StreamDiff(have, want jetstream.StreamConfig) []string {
	var diffs []string
	check := func(name string, a, b any) {
		if !reflect.DeepEqual(a, b) {
			diffs = append(diffs, fmt.Sprintf("%s: have %v, want %v", name, a, b))
		}
	}
	check("subjects", have.Subjects, want.Subjects)
	check("storage", have.Storage, want.Storage)
	check("replicas", have.Replicas, want.Replicas)
	check("retention", have.Retention, want.Retention)
	check("max_age", have.MaxAge, want.MaxAge)
	check("max_msgs", have.MaxMsgs, want.MaxMsgs)
	check("max_bytes", have.MaxBytes, want.MaxBytes)
	check("max_msgs_per_subject", have.MaxMsgsPerSubject, want.MaxMsgsPerSubject)
	check("duplicate_window", have.Duplicates, want.Duplicates)
	check("deny_delete", have.DenyDelete, want.DenyDelete)
	check("deny_purge", have.DenyPurge, want.DenyPurge)
	check("allow_direct", have.AllowDirect, want.AllowDirect)
	check("allow_atomic", have.AllowAtomicPublish, want.AllowAtomicPublish)
	return diffs
}
