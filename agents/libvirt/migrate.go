package libvirt

import (
	"context"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// Migration says where a domain goes. The target libvirtd must see the
// kernel, initrd and serial paths the domain names (Loom keeps them on the
// same paths on every host); its disk vda is copied.
type Migration struct {
	// DestURI is the target libvirtd as the source libvirtd dials it (the
	// migration is peer-to-peer): qemu+tcp://host/system, or, between
	// daemons on one machine, qemu+unix:///system?socket=/path/libvirt-sock.
	DestURI string
	// DataURI is where the target's QEMU listens for the memory stream:
	// tcp://host[:port] or unix:///path.sock (a socket QEMU creates, so
	// its directory must be writable by the QEMU user). Empty: libvirt's
	// default, tcp to the target's host name on a port from its
	// migration_port_min..max.
	DataURI string
	// DisksURI is where the target's NBD server listens for the copy of
	// vda, in the same forms as DataURI. Empty: libvirt's default, like
	// DataURI's.
	DisksURI string
	// DestDisk is the absolute path of the file vda becomes on the target.
	// Its whole content is copied into it (the backing chain flattened).
	// If it does not exist, the target libvirtd creates it, which it can
	// only do inside an active storage pool (see EnsureDirPool); an
	// existing file is overwritten and must have vda's virtual size.
	DestDisk string
	// DestSerial, if set, is the file the domain's serial port (and
	// console) writes to on the target, instead of the path it writes to
	// here, which need not exist there.
	DestSerial string
	// Bandwidth caps the memory and disk streams, in MiB/s; 0 leaves them
	// uncapped.
	Bandwidth uint64
}

// migrateFlags are the flags of every Loom migration:
//   - LIVE: the guest runs while its memory is copied.
//   - PEER2PEER: the source libvirtd drives the whole protocol and dials
//     the target itself; the agent makes one call on its own daemon.
//   - PERSIST_DEST, UNDEFINE_SOURCE: the definition moves with the domain.
//   - NON_SHARED_DISK with migrate_disks=vda: vda's whole chain is copied
//     over NBD into one file (NON_SHARED_INC would need the backing files
//     on the target, and libvirt cannot create an incremental target).
//   - ABORT_ON_ERROR: an I/O error on the source ends the migration
//     instead of migrating a guest paused on it.
//
// Not TUNNELLED: libvirt 9.0 with QEMU 7.2 refuses non-shared storage over
// a tunnel ("not supported with tunnelled migration and this QEMU"), and
// then fails the NBD set-up ("argument key 'host' must not have null
// value"); unix:// data and disk URIs cross network namespaces instead.
// Not UNSAFE: libvirt's safety check is about disks both hosts would share,
// and vda is copied, not shared.
const migrateFlags = golibvirt.MigrateLive | golibvirt.MigratePeer2peer |
	golibvirt.MigratePersistDest | golibvirt.MigrateUndefineSource |
	golibvirt.MigrateNonSharedDisk | golibvirt.MigrateAbortOnError

// abortRetry is how often a cancelled Migrate asks libvirt again to abort
// the job while waiting for it to end: an abort sent before the job has
// begun finds no job to abort.
const abortRetry = 200 * time.Millisecond

// Migrate live-migrates the named running (or paused) domain to m.DestURI
// and returns when the migration has ended. On success the domain runs on
// the target from m.DestDisk, persistent there, and is undefined here. On
// failure it still runs here on its own disk, as libvirt guarantees; a
// DestDisk the target created stays behind.
//
// The migration lasts as long as it needs: Config.RPCTimeout does not
// bound it, ctx does. When ctx ends, Migrate aborts the job and waits up to
// RPCTimeout for it to end: it returns an error matching ctx.Err() if the
// domain stayed here, or nil if the migration had gone too far to abort
// and completed. With ErrClosed, ErrDisconnected or an "outcome unknown"
// error, look the domain up on both hosts.
//
// Not idempotent: a repeat after a success fails with ErrNotFound.
func (c *Client) Migrate(ctx context.Context, domain string, m Migration) error {
	if err := c.migrate(ctx, domain, m); err != nil {
		return fmt.Errorf("migrate domain %s: %w", domain, err)
	}
	return nil
}

func (c *Client) migrate(ctx context.Context, domain string, m Migration) error {
	if err := m.validate(); err != nil {
		return err
	}
	dom, err := c.lookup(ctx, domain)
	if err != nil {
		return err
	}
	// Both definitions the target gets name the new disk: the live one
	// (destination_xml) and the persistent one (persistent_xml; without it
	// the target would keep the source's definition, on the source's path).
	const xmlFlags = golibvirt.DomainXMLSecure | golibvirt.DomainXMLMigratable
	liveXML, err := call(ctx, c, func() (string, error) { return c.rpc.DomainGetXMLDesc(dom, xmlFlags) })
	if err != nil {
		return fmt.Errorf("read live xml: %w", err)
	}
	inactiveXML, err := call(ctx, c, func() (string, error) {
		return c.rpc.DomainGetXMLDesc(dom, xmlFlags|golibvirt.DomainXMLInactive)
	})
	if err != nil {
		return fmt.Errorf("read persistent xml: %w", err)
	}
	destXML, err := withDiskFile(liveXML, snapshotDisk, m.DestDisk)
	if err != nil {
		return fmt.Errorf("live definition: %w", err)
	}
	persistXML, err := withDiskFile(inactiveXML, snapshotDisk, m.DestDisk)
	if err != nil {
		return fmt.Errorf("persistent definition: %w", err)
	}
	if m.DestSerial != "" {
		if destXML, err = withSerialFile(destXML, m.DestSerial); err != nil {
			return fmt.Errorf("live definition: %w", err)
		}
		if persistXML, err = withSerialFile(persistXML, m.DestSerial); err != nil {
			return fmt.Errorf("persistent definition: %w", err)
		}
	}
	return c.perform(ctx, dom, m.DestURI, migrateParams(m, destXML, persistXML))
}

// migrateParams are the typed parameters of the perform call.
func migrateParams(m Migration, destXML, persistXML string) []golibvirt.TypedParam {
	str := func(field, value string) golibvirt.TypedParam {
		return golibvirt.TypedParam{Field: field, Value: *golibvirt.NewTypedParamValueString(value)}
	}
	params := []golibvirt.TypedParam{
		str(golibvirt.MigrateParamDestXML, destXML),
		str(golibvirt.MigrateParamPersistXML, persistXML),
		str(golibvirt.MigrateParamMigrateDisks, snapshotDisk),
	}
	if m.DataURI != "" {
		params = append(params, str(golibvirt.MigrateParamURI, m.DataURI))
	}
	if m.DisksURI != "" {
		params = append(params, str(golibvirt.MigrateParamDisksURI, m.DisksURI))
	}
	if m.Bandwidth > 0 {
		params = append(params, golibvirt.TypedParam{Field: golibvirt.MigrateParamBandwidth,
			Value: *golibvirt.NewTypedParamValueUllong(m.Bandwidth)})
	}
	return params
}

// perform runs the peer-to-peer perform call, which lasts as long as the
// migration, outside call's RPC timeout; when ctx ends it aborts the job
// and returns how the job ended.
func (c *Client) perform(ctx context.Context, dom golibvirt.Domain, destURI string, params []golibvirt.TypedParam) error {
	if err := c.usable(ctx); err != nil {
		return err
	}
	done := make(chan error, 1) // buffered: an abandoned call must not block
	started := c.goTracked(func() {
		_, err := c.rpc.DomainMigratePerform3Params(dom, golibvirt.OptString{destURI}, params, nil, migrateFlags)
		done <- err
	})
	if !started {
		return ErrClosed
	}
	select {
	case err := <-done:
		return translate(err, c.isGone())
	case <-c.lifetime.Done():
		return ErrClosed
	case <-ctx.Done():
	}

	// Cancelled: abort the job, and again while it has not ended (an abort
	// that comes before the job has begun finds nothing to abort), then
	// let libvirt's answer to the perform call say where the domain is.
	abortCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.RPCTimeout)
	defer cancel()
	retry := time.NewTicker(abortRetry)
	defer retry.Stop()
	var abortErr error
	for {
		abortErr = call0(abortCtx, c, func() error { return c.rpc.DomainAbortJob(dom) })
		select {
		case err := <-done:
			if err == nil {
				return nil // past the point of no return: it completed
			}
			return fmt.Errorf("%w: aborted: %w", ctx.Err(), translate(err, c.isGone()))
		case <-c.lifetime.Done():
			return ErrClosed
		case <-abortCtx.Done():
			return fmt.Errorf("%w: outcome unknown: the job did not end within %s of the abort (last abort: %v)",
				ctx.Err(), c.cfg.RPCTimeout, abortErr)
		case <-retry.C:
		}
	}
}

// validate reports what makes m unusable, before any RPC.
func (m Migration) validate() error {
	dest, err := url.Parse(m.DestURI)
	if err != nil || m.DestURI == "" {
		return fmt.Errorf("%w: destination uri %q: want qemu+tcp://host/system or qemu+unix:///system?socket=PATH", ErrInvalidMigration, m.DestURI)
	}
	if driver, _, _ := strings.Cut(dest.Scheme, "+"); driver != "qemu" {
		return fmt.Errorf("%w: destination uri %q: driver %q, want qemu", ErrInvalidMigration, m.DestURI, driver)
	}
	if err := checkStreamURI("data uri", m.DataURI); err != nil {
		return err
	}
	if err := checkStreamURI("disks uri", m.DisksURI); err != nil {
		return err
	}
	if !filepath.IsAbs(m.DestDisk) {
		return fmt.Errorf("%w: destination disk %q is not an absolute path", ErrInvalidMigration, m.DestDisk)
	}
	if m.DestSerial != "" && !filepath.IsAbs(m.DestSerial) {
		return fmt.Errorf("%w: destination serial log %q is not an absolute path", ErrInvalidMigration, m.DestSerial)
	}
	for what, text := range map[string]string{"destination uri": m.DestURI, "data uri": m.DataURI,
		"disks uri": m.DisksURI, "destination disk": m.DestDisk, "destination serial log": m.DestSerial} {
		if err := checkText(ErrInvalidMigration, what, text); err != nil {
			return err
		}
	}
	return nil
}

// checkStreamURI accepts "", tcp://host[:port] and unix:///path.
func checkStreamURI(what, uri string) error {
	if uri == "" {
		return nil
	}
	u, err := url.Parse(uri)
	switch {
	case err != nil:
		return fmt.Errorf("%w: %s %q: %w", ErrInvalidMigration, what, uri, err)
	case u.Scheme == "tcp" && u.Hostname() != "":
		return nil
	case u.Scheme == "unix" && u.Host == "" && filepath.IsAbs(u.Path):
		return nil
	default:
		return fmt.Errorf("%w: %s %q: want tcp://host[:port] or unix:///path", ErrInvalidMigration, what, uri)
	}
}
