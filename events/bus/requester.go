package bus

import (
	"encoding/json"
	"fmt"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// Requester is who the server says sent a request that came into Loom's
// account through the clients' import.
type Requester struct {
	// Account is the requester's account.
	Account string
	// Key is the nkey (public key) the requester authenticated with.
	Key string
}

// RequesterOf reads the Nats-Request-Info header the server stamps on a
// request crossing a service import with share: true. It says false when
// there is none: the request was sent from within the service's own
// account, where nothing attests the sender. A header that does not parse,
// or names no account or key, is an error.
//
// Only a request that crossed the import is attested: within Loom's own
// account a header of that name is whatever its sender wrote, which is
// why only the admin, who may do anything, may send commands there.
func RequesterOf(h nats.Header) (Requester, bool, error) {
	raw := h.Get(server.ClientInfoHdr)
	if raw == "" {
		return Requester{}, false, nil
	}
	var info server.ClientInfo
	if err := json.Unmarshal([]byte(raw), &info); err != nil {
		return Requester{}, false, fmt.Errorf("%s header does not parse: %w", server.ClientInfoHdr, err)
	}
	if info.Account == "" || info.User == "" {
		return Requester{}, false, fmt.Errorf("%s header names no account or user", server.ClientInfoHdr)
	}
	return Requester{Account: info.Account, Key: info.User}, true, nil
}
