package projections

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus/bustest"
	"github.com/loomctl/loom/events/hostkey"
)

var seedFlag = flag.Uint64("seed", 0, "run the rebuild tests with this seed only")

// testFleet is small enough that names, hosts and incarnations collide
// often, with every anomaly mixed in.
var testFleet = historyConfig{hosts: 4, images: 2, liveVMs: 40, anomalies: true, keys: keysMixed}

// seeds are the seeds a rebuild test runs: a few fixed ones and one new
// one per run, or only -seed.
func seeds(fixed ...uint64) []uint64 {
	if *seedFlag != 0 {
		return []uint64{*seedFlag}
	}
	return append(fixed, uint64(time.Now().UnixNano()))
}

// TestRebuild_MatchesIncremental applies a random history incrementally,
// through NATS, with the store closed and reopened at random points with
// random batch sizes and caches (process restarts), then rebuilds it from
// sequence 1 in a fresh directory: both must hold exactly the same keys and
// values. It then corrupts one row in a copy, to show that the comparison
// would catch a difference.
func TestRebuild_MatchesIncremental(t *testing.T) {
	for _, seed := range seeds(1, 2, 3) {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			t.Logf("seed %d (rerun with -seed %d)", seed, seed)
			testRebuildMatchesIncremental(t, seed)
		})
	}
}

func testRebuildMatchesIncremental(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	b := bustest.Start(t)
	ctx := context.Background()
	h := newHistory(testFleet, seed, 1)
	total := 1500 + rng.IntN(1500)

	incremental := t.TempDir()
	published, restarts := uint64(0), 0
	for published < uint64(total) {
		opts := randomOptions(rng)
		s, err := Open(incremental, opts)
		if err != nil {
			t.Fatalf("seed %d: open: %v", seed, err)
		}
		r := run(t, s, b.JS)
		chunk := min(1+rng.IntN(500), total-int(published))
		last, err := publishHistory(ctx, b.JS, h, chunk)
		if err != nil {
			t.Fatalf("seed %d: publish: %v", seed, err)
		}
		published = last
		// Stop somewhere between what was applied before and now: a
		// restart in the middle of catching up.
		catchUp(t, s, s.Applied()+uint64(rng.IntN(int(published-s.Applied())+1)))
		r.halt()
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		restarts++
	}
	want := openStore(t, incremental, Options{})
	run(t, want, b.JS)
	catchUp(t, want, published)

	rebuilt := openStore(t, t.TempDir(), Options{})
	run(t, rebuilt, b.JS)
	catchUp(t, rebuilt, published)

	incrementalRows, rebuiltRows := dump(t, want), dump(t, rebuilt)
	if d := diff(incrementalRows, rebuiltRows); len(d) > 0 {
		t.Fatalf("seed %d: rebuild differs from incremental application (%d messages, %d restarts):\n%v",
			seed, published, restarts, d)
	}
	assertCovers(t, seed, want)
	t.Logf("seed %d: %d messages, %d restarts, %d keys equal", seed, published, restarts, len(rebuiltRows))

	// The comparison must be able to fail: corrupt one VM row in a copy.
	copyDir := filepath.Join(t.TempDir(), "copy")
	if err := want.db.Checkpoint(copyDir, pebble.WithFlushedWAL()); err != nil {
		t.Fatal(err)
	}
	copied := openStore(t, copyDir, Options{})
	if d := diff(incrementalRows, dump(t, copied)); len(d) > 0 {
		t.Fatalf("a copy differs before it is corrupted: %v", d)
	}
	vms, err := copied.VMs(ctx, VMFilter{IncludeGone: true})
	if err != nil || len(vms) == 0 {
		t.Fatalf("vms of the copy: %v, %v", len(vms), err)
	}
	corrupted := vms[0]
	corrupted.Incarnation++
	value, err := events.Marshal(&corrupted)
	if err != nil {
		t.Fatal(err)
	}
	if err := copied.db.Set(nameKey(prefixVM, corrupted.Name), value, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if d := diff(incrementalRows, dump(t, copied)); len(d) != 1 {
		t.Fatalf("one corrupted row gave differences %v, want exactly one", d)
	}
}

// assertCovers checks that a history exercised what it should: otherwise
// an equivalence over empty tables would prove nothing.
func assertCovers(t *testing.T, seed uint64, s *Store) {
	t.Helper()
	ctx := context.Background()
	vms, err := s.VMs(ctx, VMFilter{IncludeGone: true})
	if err != nil {
		t.Fatal(err)
	}
	flagged, err := s.FlaggedEvents(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hosts, err := s.Hosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	phases := map[events.Phase]int{}
	for _, vm := range vms {
		phases[vm.Phase]++
	}
	codes := map[events.Code]int{}
	for _, f := range flagged {
		codes[f.Code]++
	}
	for _, c := range []events.Code{events.CodeUnsignedObservation, events.CodeForgedObservation, events.CodeReplayedObservation} {
		if codes[c] == 0 {
			t.Fatalf("seed %d: history too thin: no %s flagged (flagged: %v)", seed, c.Name(), codes)
		}
	}
	allocations, lostOrRejoined := 0, 0
	keyed := map[string]bool{}
	for _, h := range hosts {
		allocations += len(h.State.Allocations)
		if h.State.Lost || h.State.Epoch > 0 {
			lostOrRejoined++
		}
		keyed[h.State.Name] = h.State.Key != ""
	}
	observedOnKeyed := 0
	for _, vm := range vms {
		if keyed[vm.Host] && vm.Observed.Seq != 0 {
			observedOnKeyed++
		}
	}
	if observedOnKeyed == 0 {
		t.Fatalf("seed %d: no VM on a host with a key has a signed observation applied", seed)
	}
	t.Logf("seed %d: flagged by code %v; %d VMs on hosts with keys observed", seed, codes, observedOnKeyed)
	if len(flagged) == 0 || phases[events.PhasePlaced] == 0 || phases[events.PhaseGone] == 0 || allocations == 0 || lostOrRejoined == 0 {
		t.Fatalf("seed %d: history too thin: %d flagged, phases %v, %d allocations, %d hosts lost or rejoined",
			seed, len(flagged), phases, allocations, lostOrRejoined)
	}
}

// randomOptions are the options of one simulated process: batch sizes,
// batch waits and row caches vary from one restart to the next.
func randomOptions(rng *rand.Rand) Options {
	return Options{
		MaxBatch:     1 + rng.IntN(300),
		MaxBatchWait: time.Duration(rng.IntN(3000)) * time.Microsecond,
		CachedRows:   []int{-1, 2, 30, 0}[rng.IntN(4)],
	}
}

// TestRebuild_BatchingsAgree applies random histories without NATS, once
// in batches of 1000 and once in random batches, with redeliveries of
// already applied messages mixed in, duplicates and reordering inside a
// batch, and the store reopened between batches: the keys and values must
// be the same.
func TestRebuild_BatchingsAgree(t *testing.T) {
	fixed := []uint64{11, 12, 13, 14, 15, 16, 17, 18}
	for _, seed := range seeds(fixed...) {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 9))
			deliveries := historyDeliveries(newHistory(testFleet, seed, 1), 2000+rng.IntN(2000))

			want := openStore(t, t.TempDir(), Options{})
			for i := 0; i < len(deliveries); i += 1000 {
				if err := want.applyDeliveries(deliveries[i:min(i+1000, len(deliveries))]); err != nil {
					t.Fatal(err)
				}
			}

			dir := t.TempDir()
			got := openStore(t, dir, randomOptions(rng))
			for next := 0; next < len(deliveries); {
				n := 1 + rng.IntN(200)
				batch := append([]delivery(nil), deliveries[next:min(next+n, len(deliveries))]...)
				next += len(batch)
				batch = redeliver(rng, batch, deliveries)
				if err := got.applyDeliveries(batch); err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
				if rng.IntN(10) == 0 {
					if err := got.Close(); err != nil {
						t.Fatal(err)
					}
					got = openStore(t, dir, randomOptions(rng))
				}
			}
			if got.Applied() != want.Applied() {
				t.Fatalf("seed %d: applied %d, want %d", seed, got.Applied(), want.Applied())
			}
			if d := diff(dump(t, want), dump(t, got)); len(d) > 0 {
				t.Fatalf("seed %d: random batches differ from batches of 1000:\n%v", seed, d)
			}
		})
	}
}

// redeliver mixes into batch copies of messages delivered before (late
// redeliveries, nats-server #6114): each lands after a message that follows
// it in the stream, as an ordered consumer never delivers a message before
// one that precedes it. all are the history's deliveries, from sequence 1.
func redeliver(rng *rand.Rand, batch, all []delivery) []delivery {
	for range rng.IntN(4) {
		at := 1 + rng.IntN(len(batch))
		before := batch[at-1].rec.Seq // the late copy is of a message at or before it
		late := all[rng.IntN(int(before))]
		batch = append(batch[:at], append([]delivery{late}, batch[at:]...)...)
	}
	return batch
}

// historyDeliveries decodes the first n messages of h as the runner would
// receive them.
func historyDeliveries(h *history, n int) []delivery {
	deliveries := make([]delivery, 0, n)
	keys := hostkey.NewVerifier()
	for range n {
		m := h.next()
		deliveries = append(deliveries, decodeDelivery(m.seq, m.subject, time.Unix(0, 0), m.data, m.header, 1, keys))
	}
	return deliveries
}

// TestDiff reports missing, extra and changed keys, and nothing for
// equal dumps.
func TestDiff(t *testing.T) {
	a := []keyValue{{[]byte("a"), []byte("1")}, {[]byte("b"), []byte("2")}, {[]byte("c"), []byte("3")}}
	tests := []struct {
		name string
		b    []keyValue
		want int
	}{
		{"equal", []keyValue{{[]byte("a"), []byte("1")}, {[]byte("b"), []byte("2")}, {[]byte("c"), []byte("3")}}, 0},
		{"changed value", []keyValue{{[]byte("a"), []byte("1")}, {[]byte("b"), []byte("X")}, {[]byte("c"), []byte("3")}}, 1},
		{"missing key", []keyValue{{[]byte("a"), []byte("1")}, {[]byte("c"), []byte("3")}}, 1},
		{"extra key", []keyValue{{[]byte("a"), []byte("1")}, {[]byte("b"), []byte("2")}, {[]byte("bb"), nil}, {[]byte("c"), []byte("3")}}, 1},
		{"empty", nil, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := diff(a, tc.b); len(got) != tc.want {
				t.Fatalf("diff = %v, want %d differences", got, tc.want)
			}
		})
	}
}
