package plane

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/hostkey"
	"github.com/loomctl/loom/events/secretfile"
)

// Credentials on disk. A directory holds one nkey seed per identity,
// named after it (admin.nk, plane.nk, client.nk, auditor.nk,
// agent-<host>.nk, client-<name>.nk, mode 0600), and identities.json: the public half of
// every one of them with its role, which is all the server needs.
const (
	credsExt       = ".nk"
	identitiesFile = "identities.json"
)

// CredsDir is where a data directory keeps its credentials.
func CredsDir(dataDir string) string { return filepath.Join(dataDir, "creds") }

// CredsFile is the seed file of the identity name in dir.
func CredsFile(dir, name string) string { return filepath.Join(dir, name+credsExt) }

// ClientName is the identity name of the client identity called name.
func ClientName(name string) string {
	return bus.Identity{Role: bus.RoleClient, Client: name}.Name()
}

// AgentName is the identity name of host's agent.
func AgentName(host string) string {
	return bus.Identity{Role: bus.RoleAgent, Host: host}.Name()
}

// InitCreds makes, in dir, a seed for each of admin, plane, client and
// auditor, for the agent of each host and for each named client, that has
// none yet, and rewrites identities.json from every seed there. It
// returns the names it made. Seeds already there are kept: running it
// again is safe.
func InitCreds(dir string, hosts, clients []string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	names := []string{string(bus.RoleAdmin), string(bus.RolePlane), string(bus.RoleClient), string(bus.RoleAuditor)}
	for _, h := range hosts {
		names = append(names, AgentName(h))
	}
	for _, c := range clients {
		names = append(names, ClientName(c))
	}
	var made []string
	for _, name := range names {
		// An identity's seed is the same kind of key a host signs with
		// (an nkey user seed), made and kept the same way.
		_, created, err := hostkey.Ensure(CredsFile(dir, name))
		if err != nil {
			return nil, err
		}
		if created {
			made = append(made, name)
		}
	}
	ids, err := scanSeeds(dir)
	if err != nil {
		return nil, err
	}
	data, err := json.MarshalIndent(ids, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, identitiesFile), append(data, '\n'), 0o644); err != nil {
		return nil, err
	}
	return made, nil
}

// scanSeeds reads the identity of every seed in dir, sorted by name.
func scanSeeds(dir string) ([]bus.Identity, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*"+credsExt))
	if err != nil {
		return nil, err
	}
	slices.Sort(paths)
	ids := make([]bus.Identity, 0, len(paths))
	for _, path := range paths {
		id, _, err := readCreds(path)
		if err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, nil
}

// readCreds reads the identity a seed file holds, and its key.
func readCreds(path string) (bus.Identity, *hostkey.Key, error) {
	id, err := identityOf(path)
	if err != nil {
		return id, nil, err
	}
	key, err := loadSeed(path)
	if err != nil {
		return id, nil, err
	}
	id.Key = key.Public()
	return id, key, nil
}

// identityOf is the role and host a seed file's name says.
func identityOf(path string) (bus.Identity, error) {
	name := strings.TrimSuffix(filepath.Base(path), credsExt)
	if host, ok := strings.CutPrefix(name, string(bus.RoleAgent)+"-"); ok {
		return bus.Identity{Role: bus.RoleAgent, Host: host}, nil
	}
	if client, ok := strings.CutPrefix(name, string(bus.RoleClient)+"-"); ok {
		return bus.Identity{Role: bus.RoleClient, Client: client}, nil
	}
	for _, r := range bus.Roles {
		if r != bus.RoleAgent && name == string(r) {
			return bus.Identity{Role: r}, nil
		}
	}
	return bus.Identity{}, fmt.Errorf("credentials %s: the name says no role (want admin, plane, client, auditor, agent-HOST or client-NAME%s)", path, credsExt)
}

// LoadIdentities reads identities.json of dir: who the server lets in.
func LoadIdentities(dir string) ([]bus.Identity, error) {
	data, err := os.ReadFile(filepath.Join(dir, identitiesFile))
	if err != nil {
		return nil, err
	}
	var ids []bus.Identity
	if err := json.Unmarshal(data, &ids); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, identitiesFile), err)
	}
	for _, id := range ids {
		if err := id.Validate(); err != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Join(dir, identitiesFile), err)
		}
	}
	return ids, nil
}

// loadSeed reads a seed file, refusing one that others than its owner may
// read. No error says what the seed is.
func loadSeed(path string) (*hostkey.Key, error) {
	data, err := secretfile.Read(path, "credentials")
	if err != nil {
		return nil, err
	}
	defer clear(data)
	key, err := hostkey.FromSeed(data)
	if err != nil {
		return nil, fmt.Errorf("credentials %s: not an nkey user seed", path)
	}
	return key, nil
}

// CredsOptions are the connect options of the identity in the seed file
// at path: its nkey, and its own inbox prefix, which its permissions
// require.
func CredsOptions(path string) ([]nats.Option, error) {
	id, key, err := readCreds(path)
	if err != nil {
		return nil, err
	}
	return []nats.Option{nats.Nkey(id.Key, key.SignNonce), nats.CustomInboxPrefix(bus.InboxPrefix(id.Name()))}, nil
}

// SecureEmbedded makes the credentials of an embedded server in dataDir
// (for the given hosts' agents too) and its TLS certificates if they are
// missing, and sets cfg to start the server with auth and TLS on and to
// connect as the control plane, with the admin identity setting up the
// streams; in a cluster, routes take TLS both ways too. It returns the
// credentials directory.
func SecureEmbedded(cfg *NATSConfig, dataDir string, hosts []string, log *slog.Logger) (string, error) {
	dir := CredsDir(dataDir)
	made, err := InitCreds(dir, hosts, nil)
	if err != nil {
		return "", fmt.Errorf("credentials in %s: %w", dir, err)
	}
	if len(made) > 0 {
		log.Info("made credentials", "dir", dir, "identities", made)
	}
	if cfg.Identities, err = LoadIdentities(dir); err != nil {
		return "", err
	}
	if made, err := InitTLS(dir, nil); err != nil {
		return "", fmt.Errorf("TLS in %s: %w", dir, err)
	} else if made {
		log.Info("made a CA and the server's certificate: clients trust the CA", "ca", CAFile(dir))
	}
	if cfg.TLS, err = ServerTLS(dir); err != nil {
		return "", err
	}
	if cfg.ClusterListen != "" {
		if cfg.RouteTLS, err = RouteTLS(dir); err != nil {
			return "", err
		}
	}
	cfg.Creds, cfg.AdminCreds = CredsFile(dir, string(bus.RolePlane)), CredsFile(dir, string(bus.RoleAdmin))
	cfg.CA = CAFile(dir)
	return dir, nil
}

// WarnInsecure says, loudly, that the bus takes anyone.
func WarnInsecure(log *slog.Logger) {
	log.Warn("INSECURE: NATS authentication and TLS are off (--insecure): anyone who reaches the port can publish decisions, impersonate hosts and read every goal; for a throwaway setup only")
}

// AccessIn is how the identity name gets in with the credentials of dir.
func AccessIn(dir, name string) Access {
	a := Access{Creds: CredsFile(dir, name)}
	if _, err := os.Stat(CAFile(dir)); err == nil {
		a.CA = CAFile(dir)
	}
	return a
}

// identitiesEvery is how often WatchIdentities looks at identities.json.
const identitiesEvery = time.Second

// WatchIdentities gives srv the identities of dir's identities.json each
// time it changes, until ctx ends: `loom init --host NAME` lets a new
// host's agent in without a restart. A file that does not load is logged
// and the identities in force stay.
func WatchIdentities(ctx context.Context, dir string, srv *bus.Server, log *slog.Logger) error {
	path := filepath.Join(dir, identitiesFile)
	read := func() []byte { data, _ := os.ReadFile(path); return data }
	last := read()
	tick := time.NewTicker(identitiesEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		data := read()
		if bytes.Equal(data, last) {
			continue
		}
		last = data
		ids, err := LoadIdentities(dir)
		if err == nil {
			err = srv.SetIdentities(ids)
		}
		if err != nil {
			log.Error("identities changed but were not taken; the ones in force stay", "file", path, "err", err)
			continue
		}
		log.Info("identities reloaded", "file", path, "identities", len(ids))
	}
}
