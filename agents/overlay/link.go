package overlay

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
)

// Ensure makes the bridge and the VXLAN device exist as cfg says, the
// device on the bridge, both up. A VXLAN device that differs from cfg (VNI,
// endpoint, port, underlay, flags) is replaced, and its entries go with
// it: call SetPeers after Ensure. Doing nothing when all is in place, it
// is idempotent.
func Ensure(ctx context.Context, cfg Config) error {
	return ensure(ctx, execRun, cfg)
}

func ensure(ctx context.Context, run runner, cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	if err := (host{cfg: cfg, run: run}).ensure(ctx); err != nil {
		return fmt.Errorf("ensure overlay %d: %w", cfg.VNI, err)
	}
	return nil
}

// Remove deletes the VXLAN device and the bridge, with their entries; the
// taps of VMs still on the bridge are detached. Removing what is not there
// succeeds.
func Remove(ctx context.Context, cfg Config) error {
	return remove(ctx, execRun, cfg)
}

func remove(ctx context.Context, run runner, cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	if err := (host{cfg: cfg, run: run}).remove(ctx); err != nil {
		return fmt.Errorf("remove overlay %d: %w", cfg.VNI, err)
	}
	return nil
}

func (h host) ensure(ctx context.Context) error {
	bridge, device := h.cfg.Bridge, h.cfg.DeviceName()
	links, err := h.links(ctx)
	if err != nil {
		return err
	}
	br, ok := links[bridge]
	if !ok {
		if _, err := h.ip(ctx, "link", "add", bridge, "type", "bridge"); err != nil {
			return err
		}
		br = link{Name: bridge}
	} else if br.Info.Kind != "bridge" {
		return fmt.Errorf("bridge %s: %w: %q", bridge, ErrForeignDevice, br.Info.Kind)
	}

	vx, ok := links[device]
	if ok && vx.Info.Kind != "vxlan" {
		return fmt.Errorf("vxlan device %s: %w: %q", device, ErrForeignDevice, vx.Info.Kind)
	}
	if ok && !h.matches(vx) {
		if _, err := h.ip(ctx, "link", "del", device); err != nil {
			return err
		}
		ok = false
	}
	if !ok {
		args := []string{"link", "add", device, "type", "vxlan", "id", strconv.FormatUint(uint64(h.cfg.VNI), 10),
			"local", h.cfg.Local.String()}
		if h.cfg.Underlay != "" {
			args = append(args, "dev", h.cfg.Underlay)
		}
		args = append(args, "dstport", strconv.Itoa(int(h.cfg.Port)), "nolearning", "proxy")
		if _, err := h.ip(ctx, args...); err != nil {
			return err
		}
		vx = link{Name: device}
	}

	if vx.Master != bridge {
		if _, err := h.ip(ctx, "link", "set", device, "master", bridge); err != nil {
			return err
		}
	}
	for _, l := range []link{vx, br} {
		if !l.up() {
			if _, err := h.ip(ctx, "link", "set", l.Name, "up"); err != nil {
				return err
			}
		}
	}
	return nil
}

// matches reports whether the VXLAN device vx is the one h's config asks for.
func (h host) matches(vx link) bool {
	data := vx.Info.Data
	local := data.Local
	if local == "" {
		local = data.Local6
	}
	addr, err := netip.ParseAddr(local)
	return err == nil && addr == h.cfg.Local &&
		data.ID == h.cfg.VNI && data.Port == h.cfg.Port && data.Link == h.cfg.Underlay &&
		!data.Learning && data.Proxy
}

func (h host) remove(ctx context.Context) error {
	links, err := h.links(ctx)
	if err != nil {
		return err
	}
	for _, want := range []struct{ name, kind string }{{h.cfg.DeviceName(), "vxlan"}, {h.cfg.Bridge, "bridge"}} {
		l, ok := links[want.name]
		if !ok {
			continue
		}
		if l.Info.Kind != want.kind {
			return fmt.Errorf("%s: %w: %q, not %s", want.name, ErrForeignDevice, l.Info.Kind, want.kind)
		}
		if _, err := h.ip(ctx, "link", "del", want.name); err != nil {
			return err
		}
	}
	return nil
}

// link is what Ensure reads of a device in `ip -j -d link show`.
type link struct {
	Name   string   `json:"ifname"`
	Flags  []string `json:"flags"`
	Master string   `json:"master"`
	Info   struct {
		Kind string `json:"info_kind"`
		Data struct {
			ID       uint32 `json:"id"`
			Local    string `json:"local"`
			Local6   string `json:"local6"`
			Link     string `json:"link"`
			Port     uint16 `json:"port"`
			Learning bool   `json:"learning"`
			Proxy    bool   `json:"proxy"`
		} `json:"info_data"`
	} `json:"linkinfo"`
}

// up reports whether the device is administratively up.
func (l link) up() bool { return slices.Contains(l.Flags, "UP") }

// links lists the devices of the host by name.
func (h host) links(ctx context.Context) (map[string]link, error) {
	out, err := h.ip(ctx, "-j", "-d", "link", "show")
	if err != nil {
		return nil, err
	}
	return parseLinks(out)
}

func parseLinks(out []byte) (map[string]link, error) {
	var list []link
	if err := json.Unmarshal(out, &list); err != nil {
		return nil, fmt.Errorf("parse ip -j -d link show: %w", err)
	}
	links := make(map[string]link, len(list))
	for _, l := range list {
		links[l.Name] = l
	}
	return links, nil
}
