package libvirt

import (
	"context"
	"errors"
	"fmt"
	"slices"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// Define creates or updates the persistent definition of spec.Name. Redefining
// the same name and UUID updates it; for a running domain the new definition
// applies from the next start, except Metadata, which applies at once.
func (c *Client) Define(ctx context.Context, spec DomainSpec) error {
	if err := c.define(ctx, spec); err != nil {
		return fmt.Errorf("define domain %s: %w", spec.Name, err)
	}
	return nil
}

func (c *Client) define(ctx context.Context, spec DomainSpec) error {
	if err := ValidateName(spec.Name); err != nil {
		return err
	}
	if spec.UUID == ([16]byte{}) {
		// Without a UUID libvirt would invent one and then refuse it as
		// clashing with the existing domain of this name.
		existing, err := c.lookup(ctx, spec.Name)
		switch {
		case err == nil:
			spec.UUID = existing.UUID
		case !errors.Is(err, ErrNotFound):
			return err
		}
	}
	domXML, err := buildDomainXML(c.domainType, spec)
	if err != nil {
		return err
	}
	dom, err := call(ctx, c, func() (golibvirt.Domain, error) {
		return c.rpc.DomainDefineXMLFlags(domXML, golibvirt.DomainDefineValidate)
	})
	if err != nil {
		return err
	}
	return c.syncLiveMetadata(ctx, dom, spec.Metadata)
}

// syncLiveMetadata copies Loom's metadata into a running domain's live
// definition, which DefineXML leaves alone, so reads agree with Define.
func (c *Client) syncLiveMetadata(ctx context.Context, dom golibvirt.Domain, kv map[string]string) error {
	active, err := call(ctx, c, func() (int32, error) { return c.rpc.DomainIsActive(dom) })
	if err != nil || active == 0 {
		return err
	}
	element, err := buildMetadataElement(kv)
	if err != nil {
		return err
	}
	var value golibvirt.OptString // absent value removes the element
	if element != "" {
		value = golibvirt.OptString{element}
	}
	err = call0(ctx, c, func() error {
		return c.rpc.DomainSetMetadata(dom, int32(golibvirt.DomainMetadataElement), value,
			golibvirt.OptString{metadataPrefix}, golibvirt.OptString{MetadataNamespace}, golibvirt.DomainAffectLive)
	})
	if hasCode(err, codeOperationInvalid) {
		return nil // stopped meanwhile: there is no live definition left
	}
	if err != nil {
		return fmt.Errorf("set live metadata: %w", err)
	}
	return nil
}

// Start boots a defined domain. A running domain is left alone.
func (c *Client) Start(ctx context.Context, name string) error {
	return c.transition(ctx, "start domain", name, c.rpc.DomainCreate, StateRunning, StateBlocked)
}

// Shutdown asks the guest to power off (ACPI) and returns without waiting;
// the guest may ignore it. A shut-off domain is left alone.
func (c *Client) Shutdown(ctx context.Context, name string) error {
	return c.transition(ctx, "shutdown domain", name, c.rpc.DomainShutdown, StateShutoff)
}

// Destroy powers a domain off at once, keeping its definition. A shut-off
// domain is left alone.
func (c *Client) Destroy(ctx context.Context, name string) error {
	return c.transition(ctx, "destroy domain", name, c.rpc.DomainDestroy, StateShutoff)
}

// Suspend pauses a running domain's vCPUs. A paused domain is left alone.
func (c *Client) Suspend(ctx context.Context, name string) error {
	return c.transition(ctx, "suspend domain", name, c.rpc.DomainSuspend, StatePaused)
}

// Resume continues a paused domain. A running domain is left alone.
func (c *Client) Resume(ctx context.Context, name string) error {
	return c.transition(ctx, "resume domain", name, c.rpc.DomainResume, StateRunning, StateBlocked)
}

// Undefine removes a domain's persistent definition, with its managed-save
// image and snapshot metadata. A running domain keeps running as a transient
// one. An absent domain is not an error.
func (c *Client) Undefine(ctx context.Context, name string) error {
	dom, err := c.lookup(ctx, name)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err == nil {
		err = call0(ctx, c, func() error {
			return c.rpc.DomainUndefineFlags(dom,
				golibvirt.DomainUndefineManagedSave|golibvirt.DomainUndefineSnapshotsMetadata)
		})
	}
	if errors.Is(err, ErrNotFound) {
		return nil // undefined meanwhile
	}
	if err != nil {
		return fmt.Errorf("undefine domain %s: %w", name, err)
	}
	return nil
}

// transition runs verb on the named domain. When libvirtd refuses it, the
// domain may already be where the verb leads (drivers disagree on how they
// say so), so the state decides: already in one of done means success.
func (c *Client) transition(ctx context.Context, step, name string, verb func(golibvirt.Domain) error, done ...State) error {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return fmt.Errorf("%s %s: %w", step, name, err)
	}
	err = call0(ctx, c, func() error { return verb(dom) })
	var refused *Error
	if errors.As(err, &refused) && !errors.Is(err, ErrNotFound) {
		if state, _, stateErr := c.state(ctx, dom); stateErr == nil && slices.Contains(done, state) {
			return nil
		}
	}
	if err != nil {
		return fmt.Errorf("%s %s: %w", step, name, err)
	}
	return nil
}
