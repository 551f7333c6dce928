package libvirt

import (
	"context"
	"fmt"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// MigrationProgress is how far a running migration has got, as the source
// libvirtd reports it. Fields libvirt did not report are zero.
//
// Libvirt first copies vda (Disk*, which moves in steps of QEMU's 16 MiB
// mirror buffer), then memory (Memory*); Data* is the sum. Memory is copied in passes: pages the guest dirties are copied
// again, so MemoryProcessed can exceed MemoryTotal, and MemoryRemaining is
// what the current pass has left.
type MigrationProgress struct {
	// Active is false when the domain runs no outgoing migration: before
	// it began, after it ended, or while it fails. Everything else is then
	// zero. While the target prepares (it starts its QEMU, about 1 s) only
	// Elapsed grows.
	Active bool
	// Failing is true while a failed or aborted migration winds down
	// (seconds, under TCG); the domain stays on the source.
	Failing bool
	// Elapsed is the time since the job began.
	Elapsed time.Duration
	// DataTotal, DataProcessed and DataRemaining are bytes of disk and
	// memory together.
	DataTotal, DataProcessed, DataRemaining uint64
	// MemoryTotal, MemoryProcessed and MemoryRemaining are bytes of guest
	// memory.
	MemoryTotal, MemoryProcessed, MemoryRemaining uint64
	// MemoryBytesPerSecond is the memory stream's current throughput.
	MemoryBytesPerSecond uint64
	// DirtyBytesPerSecond is how fast the guest dirties memory; the
	// migration converges only while it stays well below the throughput.
	DirtyBytesPerSecond uint64
	// MemoryPasses counts the passes over memory so far.
	MemoryPasses uint64
	// DiskTotal, DiskProcessed and DiskRemaining are bytes of vda.
	DiskTotal, DiskProcessed, DiskRemaining uint64
	// DiskBytesPerSecond is the disk copy's throughput, when reported.
	DiskBytesPerSecond uint64
}

// Fraction is the share of the data copied so far, 0 to 1, for a progress
// bar: 1 - DataRemaining/DataTotal. It can move back: DataTotal grows by
// the memory size when the memory copy starts, and dirtied memory is
// copied again.
func (p MigrationProgress) Fraction() float64 {
	if p.DataTotal == 0 {
		return 0
	}
	remaining := min(p.DataRemaining, p.DataTotal)
	return 1 - float64(remaining)/float64(p.DataTotal)
}

// MigrationStats are libvirt's figures for a completed incoming migration.
type MigrationStats struct {
	// Total is the time from the start of the job on the source to the
	// guest running on the target.
	Total time.Duration
	// Downtime is libvirt's own figure for how long the guest was paused
	// at the switch-over: from the source pausing its CPUs to the target
	// resuming them, the target's clock minus the source's, so it is only
	// as right as the hosts' clocks agree.
	Downtime time.Duration
	// DowntimeNet is Downtime without the time the data took between the
	// hosts (libvirt's downtime_net).
	DowntimeNet time.Duration
	// Setup is the time spent before the transfer began.
	Setup time.Duration
	// MemoryTotal and MemoryProcessed are bytes of guest memory, and of
	// memory sent (pages sent twice count twice).
	MemoryTotal, MemoryProcessed uint64
	// MemoryBytesPerSecond is the memory stream's throughput at the end.
	MemoryBytesPerSecond uint64
	// MemoryPasses counts the passes over memory.
	MemoryPasses uint64
}

// MigrationProgress reads how far the named domain's outgoing migration
// has got, on the source host. It is safe to call while
// Migrate runs, from any goroutine. Once the domain has migrated away it
// is not found here (ErrNotFound).
func (c *Client) MigrationProgress(ctx context.Context, domain string) (MigrationProgress, error) {
	typ, params, err := c.jobStats(ctx, domain, 0)
	if err != nil {
		return MigrationProgress{}, fmt.Errorf("migration progress of domain %s: %w", domain, err)
	}
	operation := golibvirt.DomainJobOperation(uintParam(params, golibvirt.DomainJobOperationStr))
	if operation != golibvirt.DomainJobOperationStrMigrationOut {
		return MigrationProgress{}, nil
	}
	switch typ {
	case golibvirt.DomainJobBounded, golibvirt.DomainJobUnbounded:
		return parseProgress(params), nil
	case golibvirt.DomainJobFailed, golibvirt.DomainJobCancelled:
		return MigrationProgress{Failing: true}, nil
	}
	return MigrationProgress{}, nil
}

// CompletedMigration reads libvirt's figures for the last incoming
// migration of the named domain, on its target host. There, and only
// there, libvirt keeps them: the source undefines the domain, and with it
// its completed job, when the migration ends. They last until the
// domain's next job (a checkpoint, another migration) or a restart of
// libvirtd; reading them keeps them. Without them, the error matches
// ErrNoMigrationStats.
func (c *Client) CompletedMigration(ctx context.Context, domain string) (MigrationStats, error) {
	// Without KEEP_COMPLETED the first read would also discard them.
	typ, params, err := c.jobStats(ctx, domain, golibvirt.DomainJobStatsCompleted|golibvirt.DomainJobStatsKeepCompleted)
	if err != nil {
		return MigrationStats{}, fmt.Errorf("completed migration of domain %s: %w", domain, err)
	}
	operation := golibvirt.DomainJobOperation(uintParam(params, golibvirt.DomainJobOperationStr))
	if typ != golibvirt.DomainJobCompleted || operation != golibvirt.DomainJobOperationStrMigrationIn {
		return MigrationStats{}, fmt.Errorf("completed migration of domain %s: %w (last job: type %d, operation %d)",
			domain, ErrNoMigrationStats, typ, operation)
	}
	return parseStats(params), nil
}

// jobStats reads the named domain's job statistics.
func (c *Client) jobStats(ctx context.Context, domain string, flags golibvirt.DomainGetJobStatsFlags) (golibvirt.DomainJobType, []golibvirt.TypedParam, error) {
	dom, err := c.lookup(ctx, domain)
	if err != nil {
		return 0, nil, err
	}
	type stats struct {
		typ    int32
		params []golibvirt.TypedParam
	}
	s, err := call(ctx, c, func() (stats, error) {
		typ, params, err := c.rpc.DomainGetJobStats(dom, flags)
		return stats{typ, params}, err
	})
	if err != nil {
		return 0, nil, err
	}
	return golibvirt.DomainJobType(s.typ), s.params, nil
}

func parseProgress(params []golibvirt.TypedParam) MigrationProgress {
	get := func(field string) uint64 { return uintParam(params, field) }
	return MigrationProgress{
		Active:               true,
		Elapsed:              milliseconds(get(golibvirt.DomainJobTimeElapsed)),
		DataTotal:            get(golibvirt.DomainJobDataTotal),
		DataProcessed:        get(golibvirt.DomainJobDataProcessed),
		DataRemaining:        get(golibvirt.DomainJobDataRemaining),
		MemoryTotal:          get(golibvirt.DomainJobMemoryTotal),
		MemoryProcessed:      get(golibvirt.DomainJobMemoryProcessed),
		MemoryRemaining:      get(golibvirt.DomainJobMemoryRemaining),
		MemoryBytesPerSecond: get(golibvirt.DomainJobMemoryBps),
		DirtyBytesPerSecond:  get(golibvirt.DomainJobMemoryDirtyRate) * get(golibvirt.DomainJobMemoryPageSize),
		MemoryPasses:         get(golibvirt.DomainJobMemoryIteration),
		DiskTotal:            get(golibvirt.DomainJobDiskTotal),
		DiskProcessed:        get(golibvirt.DomainJobDiskProcessed),
		DiskRemaining:        get(golibvirt.DomainJobDiskRemaining),
		DiskBytesPerSecond:   get(golibvirt.DomainJobDiskBps),
	}
}

func parseStats(params []golibvirt.TypedParam) MigrationStats {
	get := func(field string) uint64 { return uintParam(params, field) }
	return MigrationStats{
		Total:                milliseconds(get(golibvirt.DomainJobTimeElapsed)),
		Downtime:             milliseconds(get(golibvirt.DomainJobDowntime)),
		DowntimeNet:          milliseconds(get(golibvirt.DomainJobDowntimeNet)),
		Setup:                milliseconds(get(golibvirt.DomainJobSetupTime)),
		MemoryTotal:          get(golibvirt.DomainJobMemoryTotal),
		MemoryProcessed:      get(golibvirt.DomainJobMemoryProcessed),
		MemoryBytesPerSecond: get(golibvirt.DomainJobMemoryBps),
		MemoryPasses:         get(golibvirt.DomainJobMemoryIteration),
	}
}

// uintParam returns the named integer parameter, 0 when it is absent,
// negative or not an integer.
func uintParam(params []golibvirt.TypedParam, field string) uint64 {
	for _, p := range params {
		if p.Field != field {
			continue
		}
		switch v := p.Value.I.(type) {
		case uint64:
			return v
		case uint32:
			return uint64(v)
		case int64:
			return uint64(max(v, 0))
		case int32:
			return uint64(max(v, 0))
		}
		return 0
	}
	return 0
}

func milliseconds(ms uint64) time.Duration {
	return time.Duration(ms) * time.Millisecond
}
