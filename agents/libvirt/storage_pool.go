package libvirt

import (
	"context"
	"encoding/xml"
	"fmt"
	"path/filepath"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// codeNoStoragePool is libvirt's "storage pool not found".
const codeNoStoragePool = int(golibvirt.ErrNoStoragePool)

// EnsureDirPool makes the existing directory dir the active directory
// storage pool name, started again whenever libvirtd starts. A migration's
// target libvirtd creates a missing Migration.DestDisk only inside an
// active pool whose directory holds it: a qcow2 of vda's virtual size,
// with no backing file, which the copy then fills.
//
// It also refreshes the pool's list of files: libvirt takes a name it has
// listed for an existing file and creates nothing, so a DestDisk removed
// behind its back without a refresh fails the next migration onto that
// path ("Cannot access storage file"). The target calls EnsureDirPool when
// its agent starts and before each incoming migration, or uses a new
// DestDisk name for each one.
//
// Idempotent. A pool of that name on another directory, or of another
// type, is an error; libvirt refuses a second pool on the same directory.
func (c *Client) EnsureDirPool(ctx context.Context, name, dir string) error {
	if err := c.ensureDirPool(ctx, name, dir); err != nil {
		return fmt.Errorf("ensure storage pool %s: %w", name, err)
	}
	return nil
}

func (c *Client) ensureDirPool(ctx context.Context, name, dir string) error {
	want := dirPoolXML{Type: "dir", Name: name, Path: dir}
	if err := want.validate(); err != nil {
		return err
	}
	pool, err := call(ctx, c, func() (golibvirt.StoragePool, error) { return c.rpc.StoragePoolLookupByName(name) })
	switch {
	case hasCode(err, codeNoStoragePool):
		poolXML, err := want.render()
		if err != nil {
			return err
		}
		pool, err = call(ctx, c, func() (golibvirt.StoragePool, error) {
			return c.rpc.StoragePoolDefineXML(poolXML, 0)
		})
		if err != nil {
			return fmt.Errorf("define: %w", err)
		}
	case err != nil:
		return err
	default:
		if err := c.checkPool(ctx, pool, want); err != nil {
			return err
		}
	}

	err = call0(ctx, c, func() error { return c.rpc.StoragePoolSetAutostart(pool, 1) })
	if err != nil {
		return fmt.Errorf("set autostart: %w", err)
	}
	active, err := call(ctx, c, func() (int32, error) { return c.rpc.StoragePoolIsActive(pool) })
	if err != nil {
		return fmt.Errorf("check active: %w", err)
	}
	if active == 1 {
		if err := call0(ctx, c, func() error { return c.rpc.StoragePoolRefresh(pool, 0) }); err != nil {
			return fmt.Errorf("refresh: %w", err)
		}
		return nil
	}
	// Starting a directory pool lists its files; it fails if dir is missing.
	if err := call0(ctx, c, func() error { return c.rpc.StoragePoolCreate(pool, 0) }); err != nil {
		return fmt.Errorf("start: %w", err)
	}
	return nil
}

// checkPool reports whether an existing pool is the one wanted.
func (c *Client) checkPool(ctx context.Context, pool golibvirt.StoragePool, want dirPoolXML) error {
	poolXML, err := call(ctx, c, func() (string, error) {
		return c.rpc.StoragePoolGetXMLDesc(pool, golibvirt.StorageXMLInactive)
	})
	if err != nil {
		return fmt.Errorf("read pool xml: %w", err)
	}
	var got dirPoolXML
	if err := xml.Unmarshal([]byte(poolXML), &got); err != nil {
		return fmt.Errorf("parse pool xml: %w", err)
	}
	if got.Type != want.Type || filepath.Clean(got.Path) != filepath.Clean(want.Path) {
		return fmt.Errorf("pool exists as type %q on %q, want %q on %q", got.Type, got.Path, want.Type, want.Path)
	}
	return nil
}

// dirPoolXML is a directory <pool>: what EnsureDirPool defines and checks.
type dirPoolXML struct {
	XMLName xml.Name `xml:"pool"`
	Type    string   `xml:"type,attr"`
	Name    string   `xml:"name"`
	Path    string   `xml:"target>path"`
}

// validate reports what makes p unusable, before any RPC.
func (p dirPoolXML) validate() error {
	if err := ValidateName(p.Name); err != nil {
		return fmt.Errorf("%w: name: %w", ErrInvalidPool, err)
	}
	if !filepath.IsAbs(p.Path) {
		return fmt.Errorf("%w: directory %q is not an absolute path", ErrInvalidPool, p.Path)
	}
	return checkText(ErrInvalidPool, "directory", p.Path)
}

// render returns p as pool XML for StoragePoolDefineXML.
func (p dirPoolXML) render() (string, error) {
	out, err := xml.Marshal(p)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrInvalidPool, err)
	}
	return string(out), nil
}
