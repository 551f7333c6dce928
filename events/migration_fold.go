package events

import (
	"fmt"
	"slices"
)

// applyMigrationDecision folds a migration decision of this incarnation.
// Each moves the goal on: the source's step, the target's expectation,
// and at the end the VM's place.
func (s *VMState) applyMigrationDecision(rec *Record) error {
	switch ev := rec.Event.(type) {
	case VMMigrationStarted:
		if ev.UID != s.UID || s.Phase != PhasePlaced || s.Host != ev.From {
			return nil
		}
		s.Migration = &Migration{ID: ev.Migration, From: ev.From, To: ev.To, AllocSeq: rec.Seq - 1, StartedSeq: rec.Seq,
			DestURI: ev.DestURI, DataURI: ev.DataURI, DisksURI: ev.DisksURI, DestDisk: ev.DestDisk}
		s.Incarnation = rec.Seq
	case VMMigrationCancelling:
		if m := s.Migration; ev.UID == s.UID && m != nil && m.ID == ev.Migration {
			m2 := *m
			m2.Cancelling = true
			s.Migration, s.Incarnation = &m2, rec.Seq
		}
	case VMMigrationFailed:
		m := s.Migration
		if ev.UID != s.UID || m == nil || m.ID != ev.Migration {
			return nil
		}
		s.LastMigration = &LastMigration{ID: m.ID, From: m.From, To: m.To, Reason: ev.Reason, Fault: ev.Fault, Seq: rec.Seq}
		s.Migration, s.Incarnation = nil, rec.Seq
		// Whatever arrived on the target goes.
		s.Left, s.LeftReason, s.LeftAt, s.LeftGone = m.To, AbsentMigrationFailed, rec.Seq, false
	case VMMigrated:
		m := s.Migration
		if ev.UID != s.UID || m == nil || m.ID != ev.Migration {
			return nil
		}
		leases := make([]LeaseEpoch, 0, len(ev.Grants))
		for _, g := range ev.Grants {
			if g.Back == 0 || g.Back >= rec.Seq {
				return fmt.Errorf("vm %s: migrated with a grant %d back from %d", s.Name, g.Back, rec.Seq)
			}
			leases = append(leases, LeaseEpoch{Resource: g.Resource, Mode: g.Mode, Epoch: rec.Seq - g.Back})
		}
		s.LastMigration = &LastMigration{ID: m.ID, From: m.From, To: m.To, Moved: true,
			TotalMillis: m.TotalMillis, DowntimeMillis: m.DowntimeMillis, UnreachableMillis: m.UnreachableMillis, Seq: rec.Seq}
		s.Left, s.LeftReason, s.LeftAt, s.LeftGone = m.From, AbsentMigrated, rec.Seq, false
		s.Host, s.Leases, s.Incarnation, s.Migration = m.To, leases, rec.Seq, nil
		s.Observed = Observation{}
	}
	return nil
}

// applyMigrationReport folds a host's report on a migration under way:
// the target's that it runs the domain, the source's that it sent it or
// did not. Reports of another migration, or from a host that is not its
// source or target, change nothing.
func (s *VMState) applyMigrationReport(rec *Record) error {
	addr, err := ParseEventSubject(rec.Subject)
	m := s.Migration
	if err != nil || !addr.Observed || m == nil {
		return nil
	}
	next := *m
	switch ev := rec.Event.(type) {
	case VMMigrationReceived:
		if ev.UID != s.UID || ev.Migration != m.ID || addr.Host != m.To {
			return nil
		}
		next.Received, next.ReceivedDisk = true, ev.Disk
		next.TotalMillis, next.DowntimeMillis = ev.TotalMillis, ev.DowntimeMillis
	case VMMigrationSent:
		if ev.UID != s.UID || ev.Migration != m.ID || addr.Host != m.From {
			return nil
		}
		if len(ev.Leases) > 0 && !slices.Equal(ev.Leases, s.Leases) {
			return fmt.Errorf("%w: vm %s on %s reported a migration under %v, it runs under %v", ErrStaleEpoch, s.Name, addr.Host, ev.Leases, s.Leases)
		}
		next.Sent, next.UnreachableMillis = true, ev.UnreachableMillis
	case VMMigrationAborted:
		if ev.UID != s.UID || ev.Migration != m.ID || addr.Host != m.From {
			return nil
		}
		next.Aborted = ev.Fault
	}
	s.Migration = &next
	return nil
}

// CheckpointsOn lists the files of the VM's checkpoints on host: what a
// host the VM left keeps.
func (s *VMState) CheckpointsOn(host string) []CheckpointFiles {
	var out []CheckpointFiles
	for _, c := range s.Checkpoints {
		if c.Host == host && (c.Disk != "" || c.Memory != "") {
			out = append(out, CheckpointFiles{Checkpoint: c.ID, Disk: c.Disk, Memory: c.Memory})
		}
	}
	return out
}
