package plane

import (
	"sync"
	"time"

	"github.com/loomctl/loom/handlers"
)

// namesReload bounds how often a key no identity names makes the names
// be read again.
const namesReload = time.Second

// identityNames names public keys after the identities of dir's
// identities.json. A key it does not know makes it read the file again,
// at most every namesReload: `loom init --client NAME` adds identities to
// a running server.
type identityNames struct {
	dir string

	mu    sync.Mutex // guards names and read
	names map[string]string
	read  time.Time
}

// Name is the name of the identity whose public key is key.
func (n *identityNames) Name(key string) (string, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if name, ok := n.names[key]; ok {
		return name, true
	}
	if time.Since(n.read) < namesReload {
		return "", false
	}
	n.read = time.Now()
	ids, err := LoadIdentities(n.dir)
	if err != nil {
		// The key stands for itself: the server attested it all the same.
		return "", false
	}
	n.names = make(map[string]string, len(ids))
	for _, id := range ids {
		n.names[id.Key] = id.Name()
	}
	name, ok := n.names[key]
	return name, ok
}

// AttestedActors are the actors of a bus with authentication on: who the
// server says sent each command, named after the identities of credsDir
// (when empty, keys stand for themselves).
func AttestedActors(credsDir string) handlers.Actors {
	if credsDir == "" {
		return handlers.AttestedActors{}
	}
	names := &identityNames{dir: credsDir}
	return handlers.AttestedActors{Name: names.Name}
}
