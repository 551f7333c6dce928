//go:build integration

package libvirt

import (
	"context"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// SnapshotCount returns how many snapshots libvirt keeps metadata for on
// the named domain, for tests that check it keeps none.
func (c *Client) SnapshotCount(ctx context.Context, domain string) (int, error) {
	dom, err := c.lookup(ctx, domain)
	if err != nil {
		return 0, err
	}
	n, err := call(ctx, c, func() (int32, error) { return c.rpc.DomainSnapshotNum(dom, 0) })
	return int(n), err
}

// SaveImageDisk returns the file vda names in the domain XML inside a
// memory file, for tests that check which layer it names.
func (c *Client) SaveImageDisk(ctx context.Context, memory string) (string, error) {
	imageXML, err := call(ctx, c, func() (string, error) {
		return c.rpc.DomainSaveImageGetXMLDesc(memory, uint32(golibvirt.DomainSaveImageXMLSecure))
	})
	if err != nil {
		return "", err
	}
	return diskFile(imageXML, snapshotDisk)
}
