package overlay

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// testConfig is the host testdata/ip-link-show.json was taken from.
var testConfig = Config{
	Prefix:   []string{"nsenter", "-t", "7", "-n"},
	VNI:      42,
	Local:    netip.MustParseAddr("10.250.1.220"),
	Underlay: "ul0",
}

const listLinks = "nsenter -t 7 -n ip -j -d link show"

func TestEnsure_Commands(t *testing.T) {
	inPlace := readTestdata(t, "ip-link-show.json")
	const downAndDetached = `[{"ifname":"loombr42","flags":["BROADCAST"],"linkinfo":{"info_kind":"bridge"}},
		{"ifname":"loomvx42","flags":["BROADCAST"],"linkinfo":{"info_kind":"vxlan","info_data":
		{"id":42,"local":"10.250.1.220","link":"ul0","port":4789,"learning":false,"proxy":true}}}]`
	create := "nsenter -t 7 -n ip link add loomvx42 type vxlan id 42 local 10.250.1.220 dev ul0 dstport 4789 nolearning proxy"
	attach := []string{
		"nsenter -t 7 -n ip link set loomvx42 master loombr42",
		"nsenter -t 7 -n ip link set loomvx42 up",
	}
	replace := append([]string{"nsenter -t 7 -n ip link del loomvx42"}, strings.Replace(create, "local 10.250.1.220", "local 10.250.1.221", 1))
	tests := []struct {
		name  string
		cfg   func(*Config)
		links string
		want  []string
	}{
		{
			name:  "from nothing",
			links: `[{"ifname":"lo","flags":["LOOPBACK","UP"]}]`,
			want: append([]string{"nsenter -t 7 -n ip link add loombr42 type bridge", create}, append(attach,
				"nsenter -t 7 -n ip link set loombr42 up")...),
		},
		{name: "in place", links: inPlace},
		{
			name:  "down and detached",
			links: downAndDetached,
			want:  append(attach, "nsenter -t 7 -n ip link set loombr42 up"),
		},
		{
			name:  "another local endpoint",
			cfg:   func(c *Config) { c.Local = netip.MustParseAddr("10.250.1.221") },
			links: inPlace,
			want:  append(replace, attach...),
		},
		{
			name:  "another port",
			cfg:   func(c *Config) { c.Port = 8472 },
			links: inPlace,
			want: append([]string{"nsenter -t 7 -n ip link del loomvx42", strings.Replace(create, "4789", "8472", 1)},
				attach...),
		},
		{
			name:  "no underlay device",
			cfg:   func(c *Config) { c.Underlay = "" },
			links: inPlace,
			want: append([]string{"nsenter -t 7 -n ip link del loomvx42", strings.Replace(create, " dev ul0", "", 1)},
				attach...),
		},
		{
			name:  "learning device",
			links: strings.Replace(downAndDetached, `"learning":false`, `"learning":true`, 1),
			want: append([]string{"nsenter -t 7 -n ip link del loomvx42", create},
				append(attach, "nsenter -t 7 -n ip link set loombr42 up")...),
		},
		{
			name: "own bridge name, no prefix",
			cfg:  func(c *Config) { c.Prefix, c.Bridge = nil, "vms" },
			links: `[{"ifname":"vms","flags":["UP"],"linkinfo":{"info_kind":"bridge"}},
				{"ifname":"loomvx42","flags":["UP"],"master":"vms","linkinfo":{"info_kind":"vxlan","info_data":
				{"id":42,"local":"10.250.1.220","link":"ul0","port":4789,"proxy":true}}}]`,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig
			if tc.cfg != nil {
				tc.cfg(&cfg)
			}
			list := listLinks
			if cfg.Prefix == nil {
				list = "ip -j -d link show"
			}
			f := &fakeRunner{outputs: map[string]string{list: tc.links}}
			if err := ensure(context.Background(), f.run, cfg); err != nil {
				t.Fatalf("ensure: %v", err)
			}
			if got := f.mutations(); !slices.Equal(got, tc.want) {
				t.Fatalf("ran:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

func TestEnsure_Errors(t *testing.T) {
	t.Run("foreign bridge", func(t *testing.T) {
		f := &fakeRunner{outputs: map[string]string{listLinks: `[{"ifname":"loombr42","linkinfo":{"info_kind":"veth"}}]`}}
		err := ensure(context.Background(), f.run, testConfig)
		if !errors.Is(err, ErrForeignDevice) || !strings.Contains(err.Error(), `bridge loombr42`) {
			t.Fatalf("ensure = %v, want ErrForeignDevice naming the bridge", err)
		}
		if got := f.mutations(); len(got) != 0 {
			t.Fatalf("changed %q", got)
		}
	})
	t.Run("foreign device", func(t *testing.T) {
		f := &fakeRunner{outputs: map[string]string{listLinks: `[{"ifname":"loombr42","linkinfo":{"info_kind":"bridge"}},
			{"ifname":"loomvx42","linkinfo":{"info_kind":"veth"}}]`}}
		if err := ensure(context.Background(), f.run, testConfig); !errors.Is(err, ErrForeignDevice) {
			t.Fatalf("ensure = %v, want ErrForeignDevice", err)
		}
	})
	t.Run("command fails", func(t *testing.T) {
		add := "nsenter -t 7 -n ip link add loombr42 type bridge"
		f := &fakeRunner{outputs: map[string]string{listLinks: "[]"}, fails: map[string]string{add: "RTNETLINK answers: Operation not permitted"}}
		err := ensure(context.Background(), f.run, testConfig)
		var cmdErr *CommandError
		if !errors.As(err, &cmdErr) || strings.Join(cmdErr.Args, " ") != add {
			t.Fatalf("ensure = %v, want a CommandError of %q", err, add)
		}
		want := "ensure overlay 42: " + add + ": exit status 2: RTNETLINK answers: Operation not permitted"
		if err.Error() != want {
			t.Fatalf("error %q, want %q", err, want)
		}
	})
	t.Run("listing unreadable", func(t *testing.T) {
		f := &fakeRunner{outputs: map[string]string{listLinks: "Object \"link\" is unknown"}}
		if err := ensure(context.Background(), f.run, testConfig); err == nil || !strings.Contains(err.Error(), "parse ip -j -d link show") {
			t.Fatalf("ensure = %v, want a parse error", err)
		}
	})
	t.Run("invalid config", func(t *testing.T) {
		f := &fakeRunner{}
		if err := ensure(context.Background(), f.run, Config{}); !errors.Is(err, ErrInvalidConfig) || len(f.ran) != 0 {
			t.Fatalf("ensure = %v after running %q, want ErrInvalidConfig and nothing run", err, f.ran)
		}
	})
}

func TestRemove_Commands(t *testing.T) {
	tests := []struct {
		name    string
		links   string
		want    []string
		wantErr error
	}{
		{
			name:  "both there",
			links: readTestdata(t, "ip-link-show.json"),
			want:  []string{"nsenter -t 7 -n ip link del loomvx42", "nsenter -t 7 -n ip link del loombr42"},
		},
		{name: "nothing there", links: `[{"ifname":"lo"}]`},
		{
			name:    "foreign bridge",
			links:   `[{"ifname":"loombr42","linkinfo":{"info_kind":"veth"}}]`,
			wantErr: ErrForeignDevice,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeRunner{outputs: map[string]string{listLinks: tc.links}}
			err := remove(context.Background(), f.run, testConfig)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("remove = %v, want %v", err, tc.wantErr)
			}
			if got := f.mutations(); !slices.Equal(got, tc.want) {
				t.Fatalf("ran %q, want %q", got, tc.want)
			}
		})
	}
}

// The parts of real `ip -j -d link show` output Ensure reads.
func TestParseLinks(t *testing.T) {
	links, err := parseLinks([]byte(readTestdata(t, "ip-link-show.json")))
	if err != nil {
		t.Fatal(err)
	}
	vx, br, tap := links["loomvx42"], links["loombr42"], links["tap1"]
	data := vx.Info.Data
	if vx.Info.Kind != "vxlan" || data.ID != 42 || data.Local != "10.250.1.220" || data.Link != "ul0" || data.Port != 4789 ||
		data.Learning || !data.Proxy || vx.Master != "loombr42" || !vx.up() {
		t.Fatalf("loomvx42 = %+v", vx)
	}
	if br.Info.Kind != "bridge" || !br.up() || br.Master != "" {
		t.Fatalf("loombr42 = %+v", br)
	}
	if tap.Info.Kind != "veth" || tap.up() || tap.Master != "loombr42" {
		t.Fatalf("tap1 = %+v", tap)
	}
	if len(links) != 7 {
		t.Fatalf("%d links, want 7", len(links))
	}
}
