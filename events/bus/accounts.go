package bus

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/nats-io/nats-server/v2/server"
)

// The embedded server's accounts. Loom's own parties (admin, control
// plane, agents, auditors) live in LoomAccount, which holds the streams.
// Clients live in ClientsAccount, which sees nothing of LoomAccount but
// the command and query services it imports, with share: true: the server
// then stamps every request that crosses over with who sent it
// (Nats-Request-Info), and nobody can forge that header on the way, since
// the server writes it over whatever the client put there. That is how the
// control plane knows who asked (Requester), not from the client's word.
const (
	LoomAccount    = "LOOM"
	ClientsAccount = "LOOM_CLIENTS"
)

// accountsConfig is the accounts part of the server's configuration, in
// the server's own syntax: the one way to give an account JetStream.
var accountsConfig = fmt.Sprintf(`accounts {
  %[1]s: {
    jetstream: enabled
    exports: [
      {service: "loom.cmd.>", accounts: [%[2]s]}
      {service: "loom.q.>", accounts: [%[2]s]}
    ]
  }
  %[2]s: {
    imports: [
      {service: {account: %[1]s, subject: "loom.cmd.>"}, share: true}
      {service: {account: %[1]s, subject: "loom.q.>"}, share: true}
    ]
  }
}`, LoomAccount, ClientsAccount)

// configureAccounts gives opts Loom's two accounts.
func configureAccounts(opts *server.Options) (map[string]*server.Account, error) {
	if err := opts.ProcessConfigString(accountsConfig); err != nil {
		return nil, fmt.Errorf("accounts: %w", err)
	}
	accounts := make(map[string]*server.Account, len(opts.Accounts))
	for _, a := range opts.Accounts {
		accounts[a.Name] = a
	}
	return accounts, nil
}

// accountOf is the account an identity of role belongs to.
func accountOf(role Role) string {
	if role == RoleClient {
		return ClientsAccount
	}
	return LoomAccount
}

// legacyAccount is where a server without accounts keeps its streams:
// data directories of Loom before accounts have theirs there.
const legacyAccount = "$G"

// adoptLegacyStreams moves the streams of a data directory that predates
// the accounts into LoomAccount, so they are not left behind unseen. It
// does nothing when LoomAccount has streams already or there is nothing
// to move. The server is not running: nothing holds the files.
func adoptLegacyStreams(storeDir string) error {
	js := filepath.Join(storeDir, server.JetStreamStoreDir)
	legacy, loom := filepath.Join(js, legacyAccount), filepath.Join(js, LoomAccount)
	if _, err := os.Stat(loom); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if _, err := os.Stat(legacy); errors.Is(err, fs.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	if err := os.Rename(legacy, loom); err != nil {
		return fmt.Errorf("move the streams of %s into account %s: %w", legacy, LoomAccount, err)
	}
	return nil
}

// openDoor admits every connection into LoomAccount with no limits: the
// server of --insecure. A client that brings credentials is let in too,
// as no one in particular.
type openDoor struct {
	// loom is the live account, known once the server is made.
	loom *server.Account
}

func (d *openDoor) Check(c server.ClientAuthentication) bool {
	if d.loom == nil {
		return false
	}
	c.RegisterUser(&server.User{Username: "anonymous", Account: d.loom})
	return true
}
