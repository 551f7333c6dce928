//go:build integration

package libvirt

import (
	"context"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// DomainXML returns the named domain's live and persistent definitions,
// and whether it is persistent, for tests of what a migration left on the
// target.
func (c *Client) DomainXML(ctx context.Context, domain string) (live, persistent string, isPersistent bool, err error) {
	dom, err := c.lookup(ctx, domain)
	if err != nil {
		return "", "", false, err
	}
	live, err = call(ctx, c, func() (string, error) { return c.rpc.DomainGetXMLDesc(dom, 0) })
	if err != nil {
		return "", "", false, err
	}
	persistent, err = call(ctx, c, func() (string, error) {
		return c.rpc.DomainGetXMLDesc(dom, golibvirt.DomainXMLInactive)
	})
	if err != nil {
		return "", "", false, err
	}
	n, err := call(ctx, c, func() (int32, error) { return c.rpc.DomainIsPersistent(dom) })
	return live, persistent, n == 1, err
}

// DiskFileOf returns the file the disk vda names in domain XML.
func DiskFileOf(domXML string) (string, error) {
	return diskFile(domXML, snapshotDisk)
}
