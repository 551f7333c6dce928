package overlay

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

const listAddrs = "nsenter -t 7 -n ip -j -d addr show"

// bridgeOnly is a bridge as Ensure leaves it: the kernel's MAC and its
// link-local address.
const bridgeOnly = `[{"ifname":"loombr42","address":"9e:d2:6d:53:2a:e9","linkinfo":{"info_kind":"bridge"},
	"addr_info":[{"family":"inet6","local":"fe80::9cd2:6dff:fe53:2ae9","prefixlen":64,"scope":"link"}]}]`

func TestSetPort_Commands(t *testing.T) {
	// testdata/ip-addr-show.json: the port 10.77.0.3/24 and fd77::3/64 with
	// MAC 02:4c:00:00:00:03 on loombr42, and a stray 10.77.0.9/24.
	fixture := readTestdata(t, "ip-addr-show.json")
	const portMAC = "02:4c:00:00:00:03"
	tests := []struct {
		name  string
		addrs string
		addr  string
		mac   string
		want  []string
	}{
		{
			name: "from nothing", addrs: bridgeOnly, addr: "10.77.0.3/24", mac: portMAC,
			want: []string{"ip link set loombr42 address 02:4c:00:00:00:03", "ip addr replace 10.77.0.3/24 dev loombr42"},
		},
		{
			name: "in place", addr: "10.77.0.3/24", mac: portMAC,
			addrs: strings.NewReplacer("9e:d2:6d:53:2a:e9", portMAC,
				`"addr_info":[`, `"addr_info":[{"family":"inet","local":"10.77.0.3","prefixlen":24},`).Replace(bridgeOnly),
		},
		{
			// The address is added again: had it been the stray's
			// secondary, it would have gone with it.
			name: "in place but a stray; the IPv6 port stays", addrs: fixture, addr: "10.77.0.3/24", mac: portMAC,
			want: []string{"ip addr del 10.77.0.9/24 dev loombr42", "ip addr replace 10.77.0.3/24 dev loombr42"},
		},
		{
			name: "a new address and MAC", addrs: fixture, addr: "10.77.0.4/24", mac: "02:4C:00:00:00:04",
			want: []string{
				"ip link set loombr42 address 02:4c:00:00:00:04",
				"ip addr del 10.77.0.9/24 dev loombr42",
				"ip addr del 10.77.0.3/24 dev loombr42",
				"ip addr replace 10.77.0.4/24 dev loombr42",
			},
		},
		{
			name: "another prefix length", addrs: fixture, addr: "10.77.0.3/16", mac: portMAC,
			want: []string{
				"ip addr del 10.77.0.9/24 dev loombr42",
				"ip addr del 10.77.0.3/24 dev loombr42",
				"ip addr replace 10.77.0.3/16 dev loombr42",
			},
		},
		{
			name: "IPv6; the IPv4 addresses stay", addrs: fixture, addr: "fd77::4/64", mac: portMAC,
			want: []string{"ip addr del fd77::3/64 dev loombr42", "ip addr replace fd77::4/64 dev loombr42"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeRunner{outputs: map[string]string{listAddrs: tc.addrs}}
			mac, err := net.ParseMAC(tc.mac)
			if err != nil {
				t.Fatal(err)
			}
			if err := setPort(context.Background(), f.run, testConfig, netip.MustParsePrefix(tc.addr), mac); err != nil {
				t.Fatalf("setPort: %v", err)
			}
			var got []string
			for _, line := range f.mutations() {
				got = append(got, strings.TrimPrefix(line, "nsenter -t 7 -n "))
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("ran:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

func TestSetPort_Errors(t *testing.T) {
	mac, _ := net.ParseMAC("02:4c:00:00:00:03")
	addr := netip.MustParsePrefix("10.77.0.3/24")
	invalid := []struct {
		name string
		addr netip.Prefix
		mac  string
	}{
		{name: "no address", mac: "02:4c:00:00:00:03"},
		{name: "multicast", addr: netip.MustParsePrefix("224.0.0.1/4"), mac: "02:4c:00:00:00:03"},
		{name: "link-local", addr: netip.MustParsePrefix("fe80::3/64"), mac: "02:4c:00:00:00:03"},
		{name: "4in6", addr: netip.MustParsePrefix("::ffff:10.77.0.3/120"), mac: "02:4c:00:00:00:03"},
		{name: "multicast MAC", addr: addr, mac: "01:00:5e:00:00:01"},
		{name: "zero MAC", addr: addr, mac: "00:00:00:00:00:00"},
		{name: "EUI-64", addr: addr, mac: "02:4c:00:00:00:00:00:03"},
	}
	for _, tc := range invalid {
		t.Run(tc.name, func(t *testing.T) {
			hw, _ := net.ParseMAC(tc.mac)
			f := &fakeRunner{}
			if err := setPort(context.Background(), f.run, testConfig, tc.addr, hw); !errors.Is(err, ErrInvalidPort) || len(f.ran) != 0 {
				t.Fatalf("setPort = %v after running %q, want ErrInvalidPort and nothing run", err, f.ran)
			}
		})
	}
	t.Run("invalid config", func(t *testing.T) {
		f := &fakeRunner{}
		if err := setPort(context.Background(), f.run, Config{}, addr, mac); !errors.Is(err, ErrInvalidConfig) || len(f.ran) != 0 {
			t.Fatalf("setPort = %v after running %q, want ErrInvalidConfig and nothing run", err, f.ran)
		}
	})
	t.Run("no bridge", func(t *testing.T) {
		f := &fakeRunner{outputs: map[string]string{listAddrs: `[{"ifname":"lo","addr_info":[]}]`}}
		err := setPort(context.Background(), f.run, testConfig, addr, mac)
		if err == nil || !strings.Contains(err.Error(), "bridge loombr42 does not exist") || len(f.mutations()) != 0 {
			t.Fatalf("setPort = %v after running %q, want the missing bridge and nothing changed", err, f.ran)
		}
	})
	t.Run("foreign bridge", func(t *testing.T) {
		f := &fakeRunner{outputs: map[string]string{listAddrs: `[{"ifname":"loombr42","linkinfo":{"info_kind":"veth"},"addr_info":[]}]`}}
		err := setPort(context.Background(), f.run, testConfig, addr, mac)
		if !errors.Is(err, ErrForeignDevice) || len(f.mutations()) != 0 {
			t.Fatalf("setPort = %v after running %q, want ErrForeignDevice and nothing changed", err, f.ran)
		}
	})
	t.Run("command fails", func(t *testing.T) {
		add := "nsenter -t 7 -n ip addr replace 10.77.0.3/24 dev loombr42"
		f := &fakeRunner{outputs: map[string]string{listAddrs: bridgeOnly}, fails: map[string]string{add: "RTNETLINK answers: Permission denied"}}
		err := setPort(context.Background(), f.run, testConfig, addr, mac)
		var cmdErr *CommandError
		if !errors.As(err, &cmdErr) || err.Error() != "set overlay 42 port: "+add+": exit status 2: RTNETLINK answers: Permission denied" {
			t.Fatalf("setPort = %v, want a CommandError of %q", err, add)
		}
	})
	t.Run("listing unreadable", func(t *testing.T) {
		f := &fakeRunner{outputs: map[string]string{listAddrs: "Object \"addr\" is unknown"}}
		if err := setPort(context.Background(), f.run, testConfig, addr, mac); err == nil || !strings.Contains(err.Error(), "parse ip -j -d addr show") {
			t.Fatalf("setPort = %v, want a parse error", err)
		}
	})
}

func TestClearPort_Commands(t *testing.T) {
	tests := []struct {
		name    string
		addrs   string
		want    []string
		wantErr error
	}{
		{
			// Last first: deleting 10.77.0.3 first would take 10.77.0.9,
			// its secondary, with it.
			name: "a port of both families and a stray", addrs: readTestdata(t, "ip-addr-show.json"),
			want: []string{
				"ip addr del fd77::3/64 dev loombr42",
				"ip addr del 10.77.0.9/24 dev loombr42",
				"ip addr del 10.77.0.3/24 dev loombr42",
			},
		},
		{name: "no port", addrs: bridgeOnly},
		{name: "no bridge", addrs: `[{"ifname":"lo","addr_info":[]}]`},
		{name: "foreign bridge", addrs: `[{"ifname":"loombr42","linkinfo":{"info_kind":"veth"},"addr_info":[]}]`, wantErr: ErrForeignDevice},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeRunner{outputs: map[string]string{listAddrs: tc.addrs}}
			if err := clearPort(context.Background(), f.run, testConfig); !errors.Is(err, tc.wantErr) {
				t.Fatalf("clearPort = %v, want %v", err, tc.wantErr)
			}
			var got []string
			for _, line := range f.mutations() {
				got = append(got, strings.TrimPrefix(line, "nsenter -t 7 -n "))
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("ran:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

// The parts of real `ip -j -d addr show` output SetPort reads.
func TestParseAddrLinks(t *testing.T) {
	links, err := parseAddrLinks([]byte(readTestdata(t, "ip-addr-show.json")))
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(links, func(l addrLink) bool { return l.Name == "loombr42" })
	if i < 0 || len(links) != 5 {
		t.Fatalf("%d links, loombr42 at %d; want 5 with loombr42", len(links), i)
	}
	br := links[i]
	want := []netip.Prefix{netip.MustParsePrefix("10.77.0.3/24"), netip.MustParsePrefix("10.77.0.9/24"), netip.MustParsePrefix("fd77::3/64")}
	if br.MAC != "02:4c:00:00:00:03" || br.Info.Kind != "bridge" || !slices.Equal(br.ours(), want) {
		t.Fatalf("loombr42 = %+v, ours %v; want MAC 02:4c:00:00:00:03, a bridge, ours %v", br, br.ours(), want)
	}
}
