package overlay

import (
	"context"
	"errors"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

const (
	listFDB       = "nsenter -t 7 -n bridge -j fdb show dev loomvx42"
	listNeighbors = "nsenter -t 7 -n ip -j neigh show dev loomvx42"
)

func entry(addr, mac, endpoint string) Entry {
	hw, err := net.ParseMAC(mac)
	if err != nil {
		panic(err)
	}
	return Entry{Addr: netip.MustParseAddr(addr), MAC: hw, Endpoint: netip.MustParseAddr(endpoint)}
}

func TestSetPeers_Commands(t *testing.T) {
	const (
		here  = "10.250.1.220" // testConfig.Local
		other = "10.250.1.221"
		third = "10.250.1.222"
	)
	// What testdata/bridge-fdb-show.json and ip-neigh-show.json hold, as
	// SetPeers would have made it (the fixtures hold strays too).
	inPlace := []Entry{
		entry("10.77.0.5", "52:54:00:4d:00:05", other),
		entry("fd77::5", "52:54:00:4d:00:05", other),
	}
	const ourFDB = `[{"mac":"aa:bb:cc:00:00:01","flags":[],"master":"loombr42","state":"permanent"},
		{"mac":"52:54:00:4d:00:05","dst":"10.250.1.221","flags":["self"],"state":"permanent"}]`
	const ourNeighbors = `[{"dst":"10.77.0.5","lladdr":"52:54:00:4d:00:05","state":["PERMANENT"]},
		{"dst":"fd77::5","lladdr":"52:54:00:4d:00:05","state":["PERMANENT"]}]`
	tests := []struct {
		name       string
		fdb, neigh string
		entries    []Entry
		want       []string
	}{
		{
			name:  "from nothing; local entries skipped",
			fdb:   "[]",
			neigh: "[]",
			entries: []Entry{
				entry("10.77.0.5", "52:54:00:4d:00:05", other),
				entry("10.77.0.6", "52:54:00:4d:00:06", third),
				entry("10.77.0.7", "52:54:00:4d:00:07", here),
				entry("::ffff:10.77.0.8", "52:54:00:4d:00:08", "::ffff:"+other), // 4in6 is IPv4
			},
			want: []string{
				"bridge fdb replace 52:54:00:4d:00:05 dev loomvx42 dst 10.250.1.221 self permanent",
				"bridge fdb replace 52:54:00:4d:00:06 dev loomvx42 dst 10.250.1.222 self permanent",
				"bridge fdb replace 52:54:00:4d:00:08 dev loomvx42 dst 10.250.1.221 self permanent",
				"ip neigh replace 10.77.0.5 lladdr 52:54:00:4d:00:05 dev loomvx42 nud permanent",
				"ip neigh replace 10.77.0.6 lladdr 52:54:00:4d:00:06 dev loomvx42 nud permanent",
				"ip neigh replace 10.77.0.8 lladdr 52:54:00:4d:00:08 dev loomvx42 nud permanent",
			},
		},
		{name: "in place", fdb: ourFDB, neigh: ourNeighbors, entries: inPlace},
		{
			name: "moved to a third host", fdb: ourFDB, neigh: ourNeighbors,
			entries: []Entry{entry("10.77.0.5", "52:54:00:4d:00:05", third), entry("fd77::5", "52:54:00:4d:00:05", third)},
			want:    []string{"bridge fdb replace 52:54:00:4d:00:05 dev loomvx42 dst 10.250.1.222 self permanent"},
		},
		{
			name: "moved here", fdb: ourFDB, neigh: ourNeighbors,
			entries: []Entry{entry("10.77.0.5", "52:54:00:4d:00:05", here), entry("fd77::5", "52:54:00:4d:00:05", here)},
			want: []string{
				"ip neigh del 10.77.0.5 dev loomvx42",
				"ip neigh del fd77::5 dev loomvx42",
				"bridge fdb del 52:54:00:4d:00:05 dev loomvx42 self",
			},
		},
		{
			name: "new MAC at the same address", fdb: ourFDB, neigh: ourNeighbors,
			entries: []Entry{entry("10.77.0.5", "52:54:00:4d:00:55", other)},
			want: []string{
				"bridge fdb replace 52:54:00:4d:00:55 dev loomvx42 dst 10.250.1.221 self permanent",
				"ip neigh replace 10.77.0.5 lladdr 52:54:00:4d:00:55 dev loomvx42 nud permanent",
				"ip neigh del fd77::5 dev loomvx42",
				"bridge fdb del 52:54:00:4d:00:05 dev loomvx42 self",
			},
		},
		{
			// The fixtures hold what others may leave: a default
			// destination (flooding), an entry for a second MAC, a
			// reachable and a failed neighbour, and a bridge entry, which
			// is the bridge's, not the device's.
			name: "strays", fdb: readTestdata(t, "bridge-fdb-show.json"), neigh: readTestdata(t, "ip-neigh-show.json"),
			entries: inPlace,
			want: []string{
				"ip neigh del 10.77.0.6 dev loomvx42",
				"ip neigh del 10.77.0.9 dev loomvx42",
				"bridge fdb del 00:00:00:00:00:00 dev loomvx42 self",
				"bridge fdb del 52:54:00:4d:00:06 dev loomvx42 self",
			},
		},
		{
			name: "empty list", fdb: ourFDB, neigh: ourNeighbors,
			want: []string{
				"ip neigh del 10.77.0.5 dev loomvx42",
				"ip neigh del fd77::5 dev loomvx42",
				"bridge fdb del 52:54:00:4d:00:05 dev loomvx42 self",
			},
		},
		{
			name: "neighbour not permanent", fdb: ourFDB, neigh: strings.Replace(ourNeighbors, `"PERMANENT"`, `"STALE"`, 1),
			entries: inPlace,
			want:    []string{"ip neigh replace 10.77.0.5 lladdr 52:54:00:4d:00:05 dev loomvx42 nud permanent"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeRunner{outputs: map[string]string{listFDB: tc.fdb, listNeighbors: tc.neigh}}
			if err := setPeers(context.Background(), f.run, testConfig, tc.entries); err != nil {
				t.Fatalf("setPeers: %v", err)
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

func TestSetPeers_InvalidEntries(t *testing.T) {
	const mac, endpoint = "52:54:00:00:00:01", "10.250.1.221"
	bad := func(e Entry, mutate func(*Entry)) Entry { mutate(&e); return e }
	valid := entry("10.77.0.1", mac, endpoint)
	tests := []struct {
		name    string
		entries []Entry
		wantErr string
	}{
		{name: "no address", entries: []Entry{bad(valid, func(e *Entry) { e.Addr = netip.Addr{} })}, wantErr: "not a unicast address"},
		{name: "multicast address", entries: []Entry{entry("224.0.0.1", mac, endpoint)}, wantErr: "not a unicast address"},
		{name: "zoned address", entries: []Entry{entry("fe80::1%eth0", mac, endpoint)}, wantErr: "not a unicast address"},
		{name: "no MAC", entries: []Entry{bad(valid, func(e *Entry) { e.MAC = nil })}, wantErr: "MAC"},
		{name: "multicast MAC", entries: []Entry{entry("10.77.0.1", "01:00:5e:00:00:01", endpoint)}, wantErr: "MAC"},
		{name: "zero MAC", entries: []Entry{entry("10.77.0.1", "00:00:00:00:00:00", endpoint)}, wantErr: "MAC"},
		{name: "EUI-64", entries: []Entry{entry("10.77.0.1", "52:54:00:00:00:00:00:01", endpoint)}, wantErr: "MAC"},
		{name: "no endpoint", entries: []Entry{bad(valid, func(e *Entry) { e.Endpoint = netip.Addr{} })}, wantErr: "endpoint"},
		{name: "IPv6 endpoint for an IPv4 tunnel", entries: []Entry{entry("10.77.0.1", mac, "fd00::2")}, wantErr: "family"},
		{
			name:    "two MACs for an address",
			entries: []Entry{valid, entry("10.77.0.1", "52:54:00:00:00:02", endpoint)},
			wantErr: "has MACs 52:54:00:00:00:01 and 52:54:00:00:00:02",
		},
		{
			// Even when one of them is local: the mapping is inconsistent.
			name:    "a MAC in two places",
			entries: []Entry{valid, entry("fd77::1", mac, "10.250.1.220")},
			wantErr: "behind endpoints 10.250.1.221 and 10.250.1.220",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeRunner{}
			err := setPeers(context.Background(), f.run, testConfig, tc.entries)
			if !errors.Is(err, ErrInvalidEntry) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("setPeers = %v, want ErrInvalidEntry mentioning %q", err, tc.wantErr)
			}
			if len(f.ran) != 0 {
				t.Fatalf("ran %q for invalid entries", f.ran)
			}
		})
	}
	// The same entry twice is no conflict.
	f := &fakeRunner{outputs: map[string]string{listFDB: "[]", listNeighbors: "[]"}}
	if err := setPeers(context.Background(), f.run, testConfig, []Entry{valid, valid}); err != nil {
		t.Fatalf("setPeers with a repeated entry: %v", err)
	}
}

func TestSetPeers_CommandFails(t *testing.T) {
	f := &fakeRunner{fails: map[string]string{listFDB: `Cannot find device "loomvx42"`}}
	err := setPeers(context.Background(), f.run, testConfig, nil)
	var cmdErr *CommandError
	if !errors.As(err, &cmdErr) || !strings.HasPrefix(err.Error(), "set overlay 42 peers: "+listFDB) ||
		!strings.HasSuffix(err.Error(), `Cannot find device "loomvx42"`) {
		t.Fatalf("setPeers = %v, want the failed listing with its stderr", err)
	}
}

// Real `bridge -j fdb show dev loomvx42` output: the device's own entries
// with a destination, not the bridge's.
func TestParseFDB(t *testing.T) {
	got, err := parseFDB([]byte(readTestdata(t, "bridge-fdb-show.json")))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"00:00:00:00:00:00": {"10.250.1.223"},
		"52:54:00:4d:00:05": {"10.250.1.221"},
		"52:54:00:4d:00:06": {"10.250.1.221"},
	}
	if !maps.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("parseFDB=%q, want %q", got, want)
	}
	// Upper case, IPv6 and a repeated MAC (several destinations).
	got, err = parseFDB([]byte(`[{"mac":"00:00:00:00:00:00","dst":"FD00::2","flags":["self"]},
		{"mac":"00:00:00:00:00:00","dst":"fd00::3","flags":["self"]},{"mac":"52:54:00:AA:00:01","dst":"fd00::2","flags":["self"]}]`))
	if err != nil {
		t.Fatal(err)
	}
	want = map[string][]string{"00:00:00:00:00:00": {"fd00::2", "fd00::3"}, "52:54:00:aa:00:01": {"fd00::2"}}
	if !maps.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("parseFDB=%q, want %q", got, want)
	}
	for _, bad := range []string{`{}`, `[{"mac":"x","dst":"10.0.0.1","flags":["self"]}]`, `[{"mac":"52:54:00:00:00:01","dst":"x","flags":["self"]}]`} {
		if _, err := parseFDB([]byte(bad)); err == nil {
			t.Errorf("parseFDB(%s) succeeded", bad)
		}
	}
}

// Real `ip -j neigh show dev loomvx42` output.
func TestParseNeighbors(t *testing.T) {
	got, err := parseNeighbors([]byte(readTestdata(t, "ip-neigh-show.json")))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]neighbor{
		"10.77.0.5": {mac: "52:54:00:4d:00:05", permanent: true},
		"10.77.0.6": {mac: "52:54:00:4d:00:06"},
		"10.77.0.9": {},
		"fd77::5":   {mac: "52:54:00:4d:00:05", permanent: true},
	}
	if !maps.Equal(got, want) {
		t.Fatalf("parseNeighbors=%+v, want %+v", got, want)
	}
	for _, bad := range []string{`null x`, `[{"dst":"10.0.0.300"}]`, `[{"dst":"10.0.0.1","lladdr":"zz"}]`} {
		if _, err := parseNeighbors([]byte(bad)); err == nil {
			t.Errorf("parseNeighbors(%s) succeeded", bad)
		}
	}
}
