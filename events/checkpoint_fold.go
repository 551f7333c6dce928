package events

import (
	"fmt"
	"slices"
)

// applyCheckpointDecision folds a checkpoint decision of this incarnation.
// A request or restore becomes the goal's step, and with it the goal's
// incarnation; a deletion moves the goal on only if the files are on the
// VM's host, which must remove them.
func (s *VMState) applyCheckpointDecision(rec *Record) {
	s.Checkpoints = slices.Clone(s.Checkpoints) // entries change in place: never under another reader's copy
	placed := s.Phase == PhasePlaced
	switch ev := rec.Event.(type) {
	case VMCheckpointRequested:
		if ev.UID != s.UID {
			return
		}
		s.Checkpoints = append(s.Checkpoints, Checkpoint{ID: ev.Checkpoint, Kind: ev.Kind, State: CheckpointRequested,
			Scheduled: ev.Scheduled, Host: s.Host, RequestedAt: rec.Envelope.Time, RequestedSeq: rec.Seq})
		if placed {
			s.Step = &GoalStep{Op: CheckpointOpTake, Checkpoint: ev.Checkpoint, Kind: ev.Kind}
			s.Incarnation = rec.Seq
		}
	case VMRestoreRequested:
		if ev.UID != s.UID {
			return
		}
		s.Desired = ev.Desired
		if placed {
			s.Step = &GoalStep{Op: CheckpointOpRestore, Checkpoint: ev.Checkpoint, Kind: ev.Kind,
				Restore: ev.Restore, Disk: ev.Disk, Memory: ev.Memory}
			s.Incarnation = rec.Seq
		}
	case VMCheckpointDeleted:
		if ev.UID != s.UID {
			return
		}
		c, ok := s.CheckpointOf(ev.Checkpoint)
		if !ok {
			return
		}
		if ev.Stranded || (c.Disk == "" && c.Memory == "" && c.State != CheckpointRequested) {
			s.dropCheckpoint(ev.Checkpoint) // nothing its host could remove, or no host that could
			return
		}
		c.State = CheckpointDeleting
		if placed && c.Host == s.Host {
			s.Incarnation = rec.Seq
		}
	case VMCheckpointScheduled:
		if ev.UID != s.UID {
			return
		}
		s.Schedule = nil
		if ev.EveryMillis > 0 {
			s.Schedule = &CheckpointSchedule{EveryMillis: ev.EveryMillis, Keep: ev.Keep, Kind: ev.Kind}
		}
	}
}

// applyCheckpointReport folds the VM's host's report on a checkpoint step.
// Like any observation, it counts only from the host the VM is on, for
// this incarnation; one under lease epochs that are not the VM's is
// refused (ErrStaleEpoch).
func (s *VMState) applyCheckpointReport(rec *Record) error {
	addr, err := ParseEventSubject(rec.Subject)
	if err != nil || !addr.Observed || addr.Host != s.Host {
		return nil
	}
	s.Checkpoints = slices.Clone(s.Checkpoints) // entries change in place: never under another reader's copy
	stale := func(leases []LeaseEpoch) error {
		if len(leases) > 0 && !slices.Equal(leases, s.Leases) {
			return fmt.Errorf("%w: vm %s on %s reported a checkpoint step under %v, it runs under %v", ErrStaleEpoch, s.Name, addr.Host, leases, s.Leases)
		}
		return nil
	}
	switch ev := rec.Event.(type) {
	case VMCheckpointTaken:
		if ev.UID != s.UID {
			return nil
		}
		if err := stale(ev.Leases); err != nil {
			return err
		}
		if c, ok := s.CheckpointOf(ev.Checkpoint); ok {
			if c.State != CheckpointDeleting {
				c.State = CheckpointTaken
			}
			c.Host, c.Disk, c.Memory = addr.Host, ev.Disk, ev.Memory
			c.DiskBytes, c.MemoryBytes, c.Millis, c.TakenSeq, c.Fault = ev.DiskBytes, ev.MemoryBytes, ev.Millis, rec.Seq, nil
		}
		s.stepDone(CheckpointOpTake, ev.Checkpoint)
	case VMRestored:
		if ev.UID != s.UID {
			return nil
		}
		if err := stale(ev.Leases); err != nil {
			return err
		}
		if c, ok := s.CheckpointOf(ev.Checkpoint); ok {
			c.Restores++
		}
		if s.Step != nil && s.Step.Restore == ev.Restore {
			s.Step = nil
		}
	case VMCheckpointFailed:
		if ev.UID != s.UID {
			return nil
		}
		if err := stale(ev.Leases); err != nil {
			return err
		}
		if c, ok := s.CheckpointOf(ev.Checkpoint); ok && (ev.Op == CheckpointOpTake && c.State == CheckpointRequested || ev.Op == CheckpointOpRemove) {
			if ev.Op == CheckpointOpTake {
				c.State = CheckpointFailedSt
			}
			c.Fault = ev.Fault
		}
		s.stepDone(ev.Op, ev.Checkpoint)
	case VMCheckpointRemoved:
		if ev.UID != s.UID {
			return nil
		}
		for _, id := range ev.Checkpoints {
			if c, ok := s.CheckpointOf(id); ok && c.State == CheckpointDeleting {
				s.dropCheckpoint(id)
			}
		}
	}
	return nil
}

// stepDone clears the goal's step if it is op on checkpoint.
func (s *VMState) stepDone(op, checkpoint string) {
	if s.Step != nil && s.Step.Op == op && s.Step.Checkpoint == checkpoint {
		s.Step = nil
	}
}

// dropCheckpoint takes id out of the catalog.
func (s *VMState) dropCheckpoint(id string) {
	s.Checkpoints = slices.DeleteFunc(s.Checkpoints, func(c Checkpoint) bool { return c.ID == id })
	if len(s.Checkpoints) == 0 {
		s.Checkpoints = nil // the same bytes as a VM that never had one
	}
}

// dropList is what the VM's host must remove: the files of its deleted
// checkpoints that are on it.
func (s *VMState) dropList() []CheckpointFiles {
	var out []CheckpointFiles
	for _, c := range s.Checkpoints {
		if c.State == CheckpointDeleting && c.Host == s.Host {
			out = append(out, CheckpointFiles{Checkpoint: c.ID, Disk: c.Disk, Memory: c.Memory})
		}
	}
	return out
}
