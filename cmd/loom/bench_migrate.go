package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// What the migrate bench runs: the two tiny guests of bench_qemu.go on two
// private libvirtd daemons (two hosts), each moved from one to the other
// and back, live, with its disk copied.
const (
	// migrateRounds is how many times each guest goes there and back,
	// after one such round that warms both daemons up and is not counted.
	migrateRounds = 4
	// migrateSettleBeats is how many more heartbeats each guest prints
	// before every migration: both run undisturbed when one moves.
	migrateSettleBeats = 2
	// migrateStepLimit bounds one migration; migrateStatsLimit the wait
	// for libvirt's figures on the target once it ended.
	migrateStepLimit  = 2 * time.Minute
	migrateStatsLimit = 10 * time.Second
	// migrateDaemonIndex is the first of the bench's two libvirtd for
	// host.sh.
	migrateDaemonIndex = 241
	// rawPool is the storage pool on each daemon that the raw guest's
	// incoming disks are created in; the agents' is their own, on their
	// storage dir.
	rawPool = "bench-raw"
)

// migrateHost is one of the bench's two hosts: its libvirtd, and where
// each guest's files and incoming streams go on it.
type migrateHost struct {
	name, socket string
	virt         *libvirt.Client
	// uri is this host's libvirtd as the other's dials it.
	uri string
	// rawDir keeps the raw guest's disks and serial logs here, rawSockets
	// the sockets QEMU listens on for its incoming memory and disk.
	rawDir, rawSockets string
	// storage and sockets are the same for the Loom VM, as the host's
	// agent is told.
	storage, sockets string
}

// rawMigration is one migration of the raw guest.
type rawMigration struct {
	call            time.Duration // Migrate, called directly
	total, downtime time.Duration // libvirt's own, read on the target
}

// loomMigration is one migration of the Loom VM, with where its time went
// by the store times of its events: the steps add up to endToEnd.
type loomMigration struct {
	endToEnd        time.Duration // command sent -> the read model shows it moved
	total, downtime time.Duration // libvirt's own, as the target reported them
	toStarted       time.Duration // command sent -> vm.migration_started stored
	toCall          time.Duration // -> the source's Migrate call began (plus storing the source's report)
	call            time.Duration // the source's Migrate call, as the source reports it
	toReports       time.Duration // -> the target's report stored too, if it came later
	toMigrated      time.Duration // -> vm.migrated stored: the handoff
	toReadModel     time.Duration // -> the read model shows it
}

// benchMigrate measures live migration through Loom, from sending
// vm.migrate to the VM read model showing the VM moved, against
// agents/libvirt's peer-to-peer Migrate called directly, on the same kind
// of guest between the same two libvirtd daemons; and libvirt's own total
// and downtime figures of both. Raw and Loom migrations alternate, and
// which goes first swaps each time, so drift hits both alike. --vms is
// ignored.
func benchMigrate(ctx context.Context, cfg benchConfig, dir string, w io.Writer) (err error) {
	log := quietLogger()
	if cfg.verbose {
		log = newLogger(false)
	}
	kind, err := qemuHosts(ctx)
	if err != nil {
		return err
	}
	files, err := os.MkdirTemp(qemuRoot, "bench-")
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, removeBenchFiles(cfg, w, files)) }()
	hosts, daemonDirs := make([]*migrateHost, 2), make([]string, 2)
	for i := range hosts {
		name := hostName(i)
		base := filepath.Join(files, name)
		h := &migrateHost{name: name, rawDir: filepath.Join(base, "raw"), rawSockets: filepath.Join(base, "raw.sockets"),
			storage: filepath.Join(base, "loom"), sockets: filepath.Join(base, "loom.sockets")}
		if err := makeQEMUDirs(files, base, h.rawDir, h.storage); err != nil {
			return err
		}
		for _, d := range []string{h.rawSockets, h.sockets} {
			if err := qemuOwnedDir(d); err != nil {
				return err
			}
		}
		hosts[i], daemonDirs[i] = h, filepath.Join(dir, "libvirtd-"+strconv.Itoa(i+1))
	}

	daemons, err := startSimHosts(ctx, daemonDirs, migrateDaemonIndex, log)
	if err != nil {
		return err
	}
	defer daemons.stop()
	for i, h := range hosts {
		h.socket = daemons.sockets[i]
		h.uri = "qemu+unix:///system?socket=" + h.socket
		// Guests outlive their libvirtd: they go before it, after the
		// agents (which would start their VM again).
		defer func() { err = errors.Join(err, destroyDomains(h.socket, kind.uri)) }()
	}
	for _, h := range hosts {
		if h.virt, err = libvirt.Dial(ctx, libvirt.Config{Socket: h.socket, URI: kind.uri, RPCTimeout: time.Minute}); err != nil {
			return err
		}
		defer func() { _ = h.virt.Close() }()
		if err := h.virt.EnsureDirPool(ctx, rawPool, h.rawDir); err != nil {
			return err
		}
	}
	rawSerial, err := startRawGuest(ctx, hosts[0].virt, kind.image, hosts[0].rawDir)
	if err != nil {
		return err
	}

	conn, stopPlane, _, err := startBenchPlane(ctx, cfg, filepath.Join(dir, "plane"), log, false)
	if err != nil {
		return err
	}
	defer stopPlane()
	agents := make([]plane.AgentConfig, len(hosts))
	for i, h := range hosts {
		agents[i] = plane.AgentConfig{Host: h.name, Socket: h.socket, URI: kind.uri, StorageDir: h.storage, AliveMarker: kind.aliveMarker,
			MigrateURI: h.uri, MigrateListen: "unix:" + h.sockets}
	}
	// An agent stopping ends the run, with its error.
	ctx, stopAgents := runBenchAgents(ctx, conn, agents, log)
	defer stopAgents()

	admin := &client{flags: &clientFlags{actor: "bench", timeout: 30 * time.Second}, nc: conn.Conn}
	vm, err := startLoomVM(ctx, admin, kind.image, []string{hosts[0].name, hosts[1].name})
	if err != nil {
		return err
	}
	at := slices.IndexFunc(hosts, func(h *migrateHost) bool { return h.name == vm.Host })
	if at < 0 {
		return fmt.Errorf("%s runs on %q, not a host of the bench", loomVM, vm.Host)
	}
	raw := &rawGuest{hosts: hosts, serial: rawSerial}
	loom := &loomGuest{c: admin, hosts: hosts, at: at, uid: vm.UID, serial: loomSerial(hosts[at].storage, vm.UID)}
	if err := waitReceiving(ctx, admin, hosts); err != nil {
		return err
	}
	for _, serial := range []string{raw.serial, loom.serial} {
		if err := waitHeartbeats(ctx, serial, kind.aliveMarker, qemuHeartbeats); err != nil {
			return err
		}
	}

	fmt.Fprintf(w, "  two tiny guests (1 vCPU, %d MiB, %s) on two private libvirtd daemons (%s, %s),\n", qemuGuestMiB, kind.uri, hosts[0].name, hosts[1].name)
	fmt.Fprintf(w, "  one through libvirt alone, one a Loom VM; live, peer-to-peer, disk copied, memory and disk over unix sockets;\n")
	fmt.Fprintf(w, "  each goes there and back %d times (%d migrations), after one such round not counted (warm-up);\n", migrateRounds, 2*migrateRounds)
	fmt.Fprintf(w, "  raw and Loom alternate (who goes first swaps each time); both guests print %d heartbeats before each; Loom polls every %s\n",
		migrateSettleBeats, qemuPoll)
	var raws []rawMigration
	var looms []loomMigration
	for leg := range 2 * (migrateRounds + 1) {
		counted := leg >= 2
		turns := []func() error{
			func() error {
				r, err := raw.migrate(ctx)
				if counted {
					raws = append(raws, r)
				}
				return err
			},
			func() error {
				r, err := loom.migrate(ctx)
				if counted {
					looms = append(looms, r)
				}
				return err
			},
		}
		if leg%2 == 1 {
			slices.Reverse(turns)
		}
		for _, turn := range turns {
			if err := settle(ctx, kind.aliveMarker, raw.serial, loom.serial); err != nil {
				return err
			}
			if err := turn(); err != nil {
				return fmt.Errorf("migration %d: %w", leg+1, err)
			}
		}
	}
	printMigrations(w, raws, looms)
	return nil
}

// waitReceiving waits until every host's agent has said where it receives
// migrations, which the control plane needs to send one there.
func waitReceiving(ctx context.Context, c *client, hosts []*migrateHost) error {
	for _, h := range hosts {
		err := pollUntil(ctx, time.Minute, 100*time.Millisecond, h.name+"'s agent ready to receive", func(ctx context.Context) (bool, error) {
			reply, err := c.query(ctx, events.KindHost, events.VerbGet, events.Query{Name: h.name})
			if err != nil {
				return false, err
			}
			return len(reply.Hosts) == 1 && reply.Hosts[0].Agent != nil && reply.Hosts[0].Agent.MigrateURI == h.uri, nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// settle waits until each guest, by its serial log, has printed
// migrateSettleBeats more heartbeats.
func settle(ctx context.Context, marker string, serials ...string) error {
	counts := make([]int, len(serials))
	for i, serial := range serials {
		var err error
		if counts[i], err = heartbeatCount(serial, marker); err != nil {
			return err
		}
	}
	for i, serial := range serials {
		if err := waitHeartbeats(ctx, serial, marker, counts[i]+migrateSettleBeats); err != nil {
			return err
		}
	}
	return nil
}

// rawGuest is the guest migrated through agents/libvirt alone.
type rawGuest struct {
	hosts []*migrateHost
	// at is the host it runs on; serial its serial log there.
	at     int
	serial string
	// moves counts its migrations, to name each one's files.
	moves int
}

// migrate moves the raw guest to the other host as the agent would:
// its disk and serial log to fresh files in that host's pool, memory and
// disk over sockets there; and reads libvirt's figures on the target.
func (g *rawGuest) migrate(ctx context.Context) (rawMigration, error) {
	from, to := g.hosts[g.at], g.hosts[1-g.at]
	g.moves++
	id := fmt.Sprintf("raw-%d", g.moves)
	data, disks, err := events.MigrationData("unix:"+to.rawSockets, id)
	if err != nil {
		return rawMigration{}, err
	}
	m := libvirt.Migration{DestURI: to.uri, DataURI: data, DisksURI: disks,
		DestDisk: filepath.Join(to.rawDir, rawDomain+"."+id+".qcow2"), DestSerial: filepath.Join(to.rawDir, rawDomain+"."+id+".serial")}
	callCtx, cancel := context.WithTimeout(ctx, migrateStepLimit)
	defer cancel()
	start := time.Now()
	err = from.virt.Migrate(callCtx, rawDomain, m)
	r := rawMigration{call: time.Since(start)}
	if err != nil {
		return r, fmt.Errorf("%s -> %s: %w", from.name, to.name, err)
	}
	g.at, g.serial = 1-g.at, m.DestSerial
	stats, err := completedMigration(ctx, to.virt, rawDomain)
	r.total, r.downtime = stats.Total, stats.Downtime
	return r, err
}

// completedMigration reads libvirt's figures for domain's incoming
// migration on its target, waiting for them: libvirt records them once
// the source confirmed the end.
func completedMigration(ctx context.Context, virt *libvirt.Client, domain string) (stats libvirt.MigrationStats, err error) {
	err = pollUntil(ctx, migrateStatsLimit, 20*time.Millisecond, "libvirt's figures of the migration of "+domain, func(ctx context.Context) (bool, error) {
		stats, err = virt.CompletedMigration(ctx, domain)
		if errors.Is(err, libvirt.ErrNoMigrationStats) {
			return false, nil
		}
		return err == nil, err
	})
	return stats, err
}

// loomGuest is the Loom VM.
type loomGuest struct {
	c     *client
	hosts []*migrateHost
	uid   string
	// at is the host it runs on; serial its serial log there.
	at     int
	serial string
	// moves counts its migrations, to give each command its id.
	moves int
}

// migrate moves the Loom VM to the other host with vm.migrate and waits
// until the read model shows it moved, then (untimed) until the target's
// agent has taken it over.
func (g *loomGuest) migrate(ctx context.Context) (loomMigration, error) {
	from, to := g.hosts[g.at], g.hosts[1-g.at]
	g.moves++
	body := events.MigrateVM{CommandMeta: events.CommandMeta{CommandID: fmt.Sprintf("bench-migrate-%d", g.moves)}, Name: loomVM, To: to.name}
	start := time.Now()
	reply, err := g.c.command(ctx, events.KindVM, events.VerbMigrate, &body)
	if err != nil {
		return loomMigration{}, err
	}
	i := slices.IndexFunc(reply.Events, func(e events.Appended) bool { return e.Type == events.TypeVMMigrationStarted })
	if i < 0 {
		return loomMigration{}, fmt.Errorf("the reply appended no %s: %+v", events.TypeVMMigrationStarted, reply.Events)
	}
	startedSeq := reply.Events[i].Seq
	var r loomMigration
	var last events.LastMigration
	what := fmt.Sprintf("%s moved %s -> %s", loomVM, from.name, to.name)
	err = pollUntil(ctx, migrateStepLimit, qemuPoll, what, func(ctx context.Context) (bool, error) {
		vm, err := getVM(ctx, g.c, loomVM, reply.LastSeq())
		if err != nil {
			return false, err
		}
		l := vm.LastMigration
		switch {
		case vm.Migration != nil || l == nil || l.Seq < startedSeq:
			return false, nil
		case !l.Moved && l.Fault != nil:
			return false, fmt.Errorf("migration %s %s: %w", l.ID, l.Reason, l.Fault)
		case !l.Moved:
			return false, fmt.Errorf("migration %s %s", l.ID, l.Reason)
		}
		r.endToEnd, last = time.Since(start), *l
		return true, nil
	})
	if err != nil {
		return r, err
	}
	g.at, g.serial = 1-g.at, loomSerial(to.storage, g.uid)
	r.total, r.downtime = millis(last.TotalMillis), millis(last.DowntimeMillis)
	if err := migrationSteps(ctx, g.c.nc, &r, start, startedSeq, last.Seq); err != nil {
		return r, err
	}
	waitCtx, cancel := context.WithTimeout(ctx, migrateStepLimit)
	defer cancel()
	_, err = waitConverged(waitCtx, g.c, loomVM, last.Seq)
	return r, err
}

// migrationSteps fills in where r's time went, from the store times of
// the Loom VM's migration events from startedSeq to migratedSeq (one
// migration), and start, when the command was sent. The source's call is
// taken to end when its report was stored.
func migrationSteps(ctx context.Context, nc *nats.Conn, r *loomMigration, start time.Time, startedSeq, migratedSeq uint64) error {
	stored := map[events.Type]time.Time{}
	var call time.Duration
	for _, subject := range []string{events.EventSubject(events.KindVM, loomVM), events.ObservationSubject("*", events.KindVM, loomVM)} {
		for seq := startedSeq; seq <= migratedSeq; {
			m, err := bus.NextOnSubject(ctx, nc, events.StreamEvents, subject, seq)
			if errors.Is(err, bus.ErrNoMessage) {
				break
			}
			if err != nil {
				return err
			}
			if m.Seq > migratedSeq {
				break
			}
			seq = m.Seq + 1
			typ := events.Type(m.Header.Get(events.HeaderType))
			if _, seen := stored[typ]; seen {
				continue
			}
			stored[typ] = m.Time
			if typ != events.TypeVMMigrationSent {
				continue
			}
			rec, err := events.DecodeRecord(m.Seq, m.Subject, m.Time, m.Data)
			if err != nil {
				return err
			}
			if sent, ok := rec.Event.(events.VMMigrationSent); ok {
				call = millis(sent.Millis)
			}
		}
	}
	for _, typ := range []events.Type{events.TypeVMMigrationStarted, events.TypeVMMigrationSent, events.TypeVMMigrationReceived, events.TypeVMMigrated} {
		if _, ok := stored[typ]; !ok {
			return fmt.Errorf("no %s between sequences %d and %d", typ, startedSeq, migratedSeq)
		}
	}
	started, sent, migrated := stored[events.TypeVMMigrationStarted], stored[events.TypeVMMigrationSent], stored[events.TypeVMMigrated]
	reports := sent
	if received := stored[events.TypeVMMigrationReceived]; received.After(sent) {
		reports = received
	}
	r.call = call
	r.toStarted = started.Sub(start)
	r.toCall = sent.Add(-call).Sub(started)
	r.toReports = reports.Sub(sent)
	r.toMigrated = migrated.Sub(reports)
	r.toReadModel = r.endToEnd - migrated.Sub(start)
	return nil
}

// signedMs is d rounded as roundMs does, with its sign.
func signedMs(d time.Duration) string {
	if d < 0 {
		return roundMs(d).String()
	}
	return "+" + roundMs(d).String()
}

// millis is a figure in milliseconds as a duration.
func millis(ms int64) time.Duration { return time.Duration(ms) * time.Millisecond }

// printMigrations prints the medians and ranges of both kinds, where
// Loom's time went, and Loom against libvirt alone.
func printMigrations(w io.Writer, raws []rawMigration, looms []loomMigration) {
	rawOf := func(f func(rawMigration) time.Duration) []time.Duration { return durationsOf(raws, f) }
	loomOf := func(f func(loomMigration) time.Duration) []time.Duration { return durationsOf(looms, f) }
	fmt.Fprintf(w, "  libvirt alone (agents/libvirt Migrate, called directly):\n")
	printDurationRow(w, "Migrate call", rawOf(rawCall))
	printDurationRow(w, "libvirt's total (read on the target)", rawOf(rawTotal))
	printDurationRow(w, "libvirt's downtime (read on the target)", rawOf(rawDowntime))
	fmt.Fprintf(w, "  Loom (vm.migrate):\n")
	printDurationRow(w, "command -> read model shows it moved", loomOf(loomEndToEnd))
	printDurationRow(w, "libvirt's total (target's report)", loomOf(loomTotal))
	printDurationRow(w, "libvirt's downtime (target's report)", loomOf(loomDowntime))
	fmt.Fprintf(w, "   where its end-to-end time went (store times of its events):\n")
	printDurationRow(w, "command -> vm.migration_started", loomOf(func(l loomMigration) time.Duration { return l.toStarted }))
	printDurationRow(w, "-> source's call began (+ its report)", loomOf(func(l loomMigration) time.Duration { return l.toCall }))
	printDurationRow(w, "source's Migrate call (its report)", loomOf(loomCall))
	printDurationRow(w, "-> target's report, if later", loomOf(func(l loomMigration) time.Duration { return l.toReports }))
	printDurationRow(w, "-> vm.migrated (the handoff)", loomOf(func(l loomMigration) time.Duration { return l.toMigrated }))
	printDurationRow(w, "-> read model shows it", loomOf(func(l loomMigration) time.Duration { return l.toReadModel }))
	outside := printDurationRow(w, "all but the call: Loom's own part", loomOf(func(l loomMigration) time.Duration { return l.endToEnd - l.call }))
	fmt.Fprintf(w, "    (Loom's own part is %.1f %% of the median source's call)\n", 100*float64(outside)/float64(medianOf(loomOf(loomCall))))
	printMigrateGoals(w, raws, looms)
}

// The figures printMigrations compares.
func rawCall(r rawMigration) time.Duration       { return r.call }
func rawTotal(r rawMigration) time.Duration      { return r.total }
func rawDowntime(r rawMigration) time.Duration   { return r.downtime }
func loomEndToEnd(l loomMigration) time.Duration { return l.endToEnd }
func loomCall(l loomMigration) time.Duration     { return l.call }
func loomTotal(l loomMigration) time.Duration    { return l.total }
func loomDowntime(l loomMigration) time.Duration { return l.downtime }

// printMigrateGoals compares Loom with libvirt alone two ways: the ratio
// and the difference of the medians, and the medians of the ratios and
// differences of pairs, each Loom migration with the raw one beside it,
// which drift and a busy machine sway less; and says whether the goals
// are met.
func printMigrateGoals(w io.Writer, raws []rawMigration, looms []loomMigration) {
	compare := func(what string, loom func(loomMigration) time.Duration, raw func(rawMigration) time.Duration) (ofMedians, paired float64, diff time.Duration) {
		l, r := medianOf(durationsOf(looms, loom)), medianOf(durationsOf(raws, raw))
		ratios, diffs := make([]float64, len(raws)), make([]time.Duration, len(raws))
		for i := range raws {
			ratios[i] = float64(loom(looms[i])) / float64(raw(raws[i]))
			diffs[i] = loom(looms[i]) - raw(raws[i])
		}
		slices.Sort(ratios)
		ofMedians, paired = float64(l)/float64(r), ratios[(len(ratios)-1)/2]
		fmt.Fprintf(w, "    %-40s %7.3f %7.3f %10s %10s\n", what, ofMedians, paired, signedMs(l-r), signedMs(medianOf(diffs)))
		return ofMedians, paired, l - r
	}
	fmt.Fprintf(w, "  Loom against libvirt alone: ratio and difference of the medians, and paired: the median of the %d pairs'\n", len(raws))
	fmt.Fprintf(w, "  (each Loom migration with the raw one beside it)\n")
	fmt.Fprintf(w, "    %-40s %7s %7s %10s %10s\n", "", "ratio", "paired", "diff", "paired")
	endOfMedians, endPaired, _ := compare("Loom end-to-end / raw Migrate call", loomEndToEnd, rawCall)
	compare("Loom's source call / raw Migrate call", loomCall, rawCall)
	compare("Loom's libvirt total / raw libvirt total", loomTotal, rawTotal)
	_, _, downDiff := compare("Loom's downtime / raw downtime", loomDowntime, rawDowntime)

	const goal = 1.10
	verdict := "unclear: the two ratios disagree (libvirt alone varies that much here)"
	switch {
	case endOfMedians < goal && endPaired < goal:
		verdict = "meets"
	case endOfMedians >= goal && endPaired >= goal:
		verdict = "MISSES"
	}
	fmt.Fprintf(w, "  goal \"Loom adds under 10 %% to the total\": Loom end-to-end against the raw Migrate call, both ratios < %.2f: %s\n", goal, verdict)
	rawDowns := durationsOf(raws, rawDowntime)
	spread := fmt.Sprintf("libvirt alone's own range is %s .. %s", roundMs(slices.Min(rawDowns)), roundMs(slices.Max(rawDowns)))
	verdict = "meets"
	switch {
	case medianOf(durationsOf(looms, loomDowntime)) > slices.Max(rawDowns):
		verdict = "MISSES (" + spread + ")"
	case downDiff > 0:
		verdict = "meets: Loom's median is higher but within noise (" + spread + ")"
	}
	fmt.Fprintf(w, "  goal \"nothing to the downtime\": libvirt's downtime figure through Loom against libvirt alone, medians: %s\n", verdict)
}
