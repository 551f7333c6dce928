package projections

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

// replayQueries are the queries a replay must answer as the live read
// models did.
var replayQueries = []struct {
	kind events.Kind
	verb string
	q    events.Query
}{
	{events.KindVM, events.VerbList, events.Query{IncludeGone: true}},
	{events.KindHost, events.VerbList, events.Query{}},
	{events.KindImage, events.VerbList, events.Query{}},
	{events.KindLease, events.VerbList, events.Query{}},
	{events.KindHost, events.VerbGet, events.Query{Name: "host-0"}},
	{events.KindLease, events.VerbGet, events.Query{Name: "image/image-0"}},
}

// answerAll answers replayQueries from s.
func answerAll(t testing.TB, s *Store) []*events.QueryReply {
	t.Helper()
	var out []*events.QueryReply
	for _, rq := range replayQueries {
		q := rq.q
		out = append(out, s.Answer(context.Background(), rq.kind, rq.verb, &q))
	}
	return out
}

// undecodableUpTo lists the sequences up to upTo of the stream that do not
// decode, read one by one through the leader.
func undecodableUpTo(t testing.TB, b *bustest.Bus, upTo uint64) []uint64 {
	t.Helper()
	var seqs []uint64
	for seq := uint64(1); seq <= upTo; seq++ {
		m, err := bus.MessageAt(context.Background(), b.Conn, events.StreamEvents, seq)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := events.DecodeRecord(m.Seq, m.Subject, m.Time, m.Data); err != nil {
			seqs = append(seqs, seq)
		}
	}
	return seqs
}

func flaggedSeqs(flagged []Flagged) []uint64 {
	seqs := make([]uint64, 0, len(flagged))
	for _, f := range flagged {
		seqs = append(seqs, f.Seq)
	}
	return seqs
}

// TestReplayTo_MatchesLiveAtThePoint follows a random history live, notes
// the live store's keys, values and answers at a point, appends more, then
// replays to that point: into a fresh store, and into one replayed to an
// earlier point first and reopened. Both must hold exactly what the live
// store held and answer the same, and report what they skipped.
func TestReplayTo_MatchesLiveAtThePoint(t *testing.T) {
	for _, seed := range seeds(11, 12) {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			t.Logf("seed %d (rerun with -seed %d)", seed, seed)
			testReplayMatchesLive(t, seed)
		})
	}
}

func testReplayMatchesLive(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 5))
	b := bustest.Start(t)
	ctx := context.Background()
	h := newHistory(testFleet, seed, 1)
	live := openStore(t, t.TempDir(), randomOptions(rng))
	run(t, live, b.JS)
	point, err := publishHistory(ctx, b.JS, h, 600+rng.IntN(600))
	if err != nil {
		t.Fatal(err)
	}
	catchUp(t, live, point)
	wantRows, wantAnswers := dump(t, live), answerAll(t, live)
	wantFlagged, err := live.FlaggedEvents(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wantSkipped := undecodableUpTo(t, b, point)
	if len(wantSkipped) == 0 {
		t.Fatalf("seed %d: no message up to %d fails to decode: the test would not see one skipped", seed, point)
	}
	last, err := publishHistory(ctx, b.JS, h, 300)
	if err != nil {
		t.Fatal(err)
	}
	catchUp(t, live, last)
	if d := diff(wantRows, dump(t, live)); len(d) == 0 {
		t.Fatalf("seed %d: the history after the point changed nothing: the test would not see a replay past it", seed)
	}

	check := func(name string, s *Store, result ReplayResult, from uint64) {
		t.Helper()
		if d := diff(wantRows, dump(t, s)); len(d) > 0 {
			t.Fatalf("seed %d, %s: the replay differs from the live store at %d: %v", seed, name, point, d)
		}
		if got := answerAll(t, s); !reflect.DeepEqual(got, wantAnswers) {
			t.Fatalf("seed %d, %s: answers differ from the live ones at %d", seed, name, point)
		}
		if result.Applied != point || result.From != from || s.Applied() != point {
			t.Fatalf("seed %d, %s: result %d..%d, store at %d; want %d..%d", seed, name, result.From, result.Applied, s.Applied(), from, point)
		}
		if got := flaggedSeqs(result.Skipped); !slices.Equal(got, wantSkipped) {
			t.Fatalf("seed %d, %s: skipped %v, want %v", seed, name, got, wantSkipped)
		}
		if !reflect.DeepEqual(result.Flagged, wantFlagged) {
			t.Fatalf("seed %d, %s: flagged %v, want the live store's %v", seed, name, flaggedSeqs(result.Flagged), flaggedSeqs(wantFlagged))
		}
	}

	fresh := openStore(t, t.TempDir(), randomOptions(rng))
	result, err := fresh.ReplayTo(ctx, b.JS, point, ReplayOptions{SkipCorrupt: true})
	if err != nil {
		t.Fatalf("seed %d: replay: %v", seed, err)
	}
	check("fresh", fresh, result, 1)

	// Resumed: an earlier point first, the store closed and reopened, then
	// on to the point.
	dir := t.TempDir()
	earlier := uint64(1 + rng.IntN(int(point)-1))
	first, err := Open(dir, randomOptions(rng))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := first.ReplayTo(ctx, b.JS, earlier, ReplayOptions{SkipCorrupt: true}); err != nil {
		t.Fatalf("seed %d: replay to %d: %v", seed, earlier, err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	resumed := openStore(t, dir, randomOptions(rng))
	result, err = resumed.ReplayTo(ctx, b.JS, point, ReplayOptions{SkipCorrupt: true})
	if err != nil {
		t.Fatalf("seed %d: replay from %d: %v", seed, earlier, err)
	}
	check(fmt.Sprintf("resumed after %d", earlier), resumed, result, earlier+1)

	// Again to the same point: nothing to do, the same report.
	result, err = resumed.ReplayTo(ctx, b.JS, point, ReplayOptions{SkipCorrupt: true})
	if err != nil {
		t.Fatal(err)
	}
	check("again", resumed, result, 0)
}

// TestReplayTo_StopsBeforeUndecodable replays without SkipCorrupt: it stops
// before a corrupt message with its sequence and subject, having applied
// everything before it and nothing after; and a store that a replay with
// SkipCorrupt took past it is refused in the same words.
func TestReplayTo_StopsBeforeUndecodable(t *testing.T) {
	b := bustest.Start(t)
	p := newPublisher(t, b)
	ctx := context.Background()
	vm := events.EventSubject(events.KindVM, "web")
	p.event(events.EventSubject(events.KindHost, "h1"), events.HostRegistered{CPU: 2, MemoryMiB: 1024}, "c1")
	before := p.event(vm, events.VMCreated{UID: "u1", Image: "demo", CPU: 1, MemoryMiB: 512, Desired: events.DesiredRunning}, "c2")
	corrupt := p.raw(vm, []byte{0xde, 0xad, 0xbe, 0xef})
	after := p.event(vm, events.VMDeleted{UID: "u1", Reason: events.AbsentDeleted}, "c3")

	s := openStore(t, t.TempDir(), Options{})
	result, err := s.ReplayTo(ctx, b.JS, after, ReplayOptions{})
	var f *events.Fault
	if !errors.As(err, &f) || f.Code != events.CodeCorruptEvent || !strings.Contains(f.Message, fmt.Sprintf("sequence %d on %s", corrupt, vm)) {
		t.Fatalf("replay over a corrupt message: %v, want corrupt_event naming sequence %d on %s", err, corrupt, vm)
	}
	if s.Applied() != before || result.Applied != before {
		t.Fatalf("stopped at %d (result %d), want %d: everything before the corrupt message, nothing after", s.Applied(), result.Applied, before)
	}
	state, _, err := s.VM(ctx, "web")
	if err != nil || state.Phase != events.PhasePending {
		t.Fatalf("vm after the stop: %+v, %v; want it created, not deleted", state, err)
	}
	// Up to the message before it, no complaint.
	if _, err := s.ReplayTo(ctx, b.JS, before, ReplayOptions{}); err != nil {
		t.Fatalf("replay to %d: %v", before, err)
	}

	result, err = s.ReplayTo(ctx, b.JS, after, ReplayOptions{SkipCorrupt: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := flaggedSeqs(result.Skipped); !slices.Equal(got, []uint64{corrupt}) || !slices.Equal(flaggedSeqs(result.Flagged), []uint64{corrupt}) {
		t.Fatalf("skipped %v, flagged %v; want %d in both", got, flaggedSeqs(result.Flagged), corrupt)
	}
	if state, _, _ := s.VM(ctx, "web"); state.Phase != events.PhaseGone {
		t.Fatalf("vm past the corrupt message: %+v, want gone", state)
	}
	// The same store, strict again: the same error as a fresh replay.
	later := p.event(events.EventSubject(events.KindHost, "h2"), events.HostRegistered{CPU: 2, MemoryMiB: 1024}, "c4")
	_, err = s.ReplayTo(ctx, b.JS, later, ReplayOptions{})
	if !errors.As(err, &f) || f.Code != events.CodeCorruptEvent || !strings.Contains(f.Message, fmt.Sprintf("sequence %d on %s", corrupt, vm)) {
		t.Fatalf("strict replay of a store that skipped %d: %v, want the same corrupt_event", corrupt, err)
	}
	if s.Applied() != after {
		t.Fatalf("the refused replay moved the store to %d", s.Applied())
	}
}

// TestReplayTo_Refuses checks the points a replay cannot reach.
func TestReplayTo_Refuses(t *testing.T) {
	b := bustest.Start(t)
	p := newPublisher(t, b)
	ctx := context.Background()
	var last uint64
	for i := range 3 {
		last = p.event(events.EventSubject(events.KindHost, fmt.Sprintf("h%d", i)), events.HostRegistered{CPU: 2, MemoryMiB: 1024}, fmt.Sprintf("c%d", i))
	}
	s := openStore(t, t.TempDir(), Options{})
	wantCode := func(name string, err error, code events.Code, text string) {
		t.Helper()
		var f *events.Fault
		if !errors.As(err, &f) || f.Code != code || !strings.Contains(f.Message, text) {
			t.Fatalf("%s: %v, want %s saying %q", name, err, code.Name(), text)
		}
	}
	_, err := s.ReplayTo(ctx, b.JS, 0, ReplayOptions{})
	wantCode("sequence 0", err, events.CodeInvalidArgument, "history starts at 1")
	_, err = s.ReplayTo(ctx, b.JS, last+1, ReplayOptions{})
	wantCode("beyond the end", err, events.CodeInvalidArgument, fmt.Sprintf("ends at sequence %d, before %d", last, last+1))
	if _, err := s.ReplayTo(ctx, b.JS, last, ReplayOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err = s.ReplayTo(ctx, b.JS, last-1, ReplayOptions{})
	wantCode("behind the store", err, events.CodeInvalidArgument, fmt.Sprintf("reflect sequence %d already, past %d", last, last-1))

	live := openStore(t, t.TempDir(), Options{})
	r := run(t, live, b.JS)
	catchUp(t, live, last)
	if _, err := live.ReplayTo(ctx, b.JS, last, ReplayOptions{}); !errors.Is(err, ErrRunning) {
		t.Fatalf("replay beside Run: %v, want ErrRunning", err)
	}
	r.halt()
}

// TestReplayTo_MissingSequences replays a stream whose messages were
// removed (LOOM_EVENTS denies it; this stream does not): at its head, in
// the middle and at its tail, each a history_gap naming what is missing.
func TestReplayTo_MissingSequences(t *testing.T) {
	ctx := context.Background()
	js := bustest.StartBare(t, t.TempDir()).JS
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: events.StreamEvents, Subjects: []string{"loom.evt.>", "loom.obs.>"}})
	if err != nil {
		t.Fatal(err)
	}
	p := &publisher{t: t, js: js, prev: map[string][]byte{}, last: map[string]uint64{}}
	for i := range 8 {
		p.event(events.EventSubject(events.KindHost, fmt.Sprintf("h%d", i)), events.HostRegistered{CPU: 2, MemoryMiB: 1024}, fmt.Sprintf("c%d", i))
	}
	gap := func(name string, upTo uint64, text string, applied uint64) {
		t.Helper()
		s := openStore(t, t.TempDir(), Options{})
		_, err := s.ReplayTo(ctx, js, upTo, ReplayOptions{})
		var f *events.Fault
		if !errors.As(err, &f) || f.Code != events.CodeHistoryGap || !strings.Contains(f.Message, text) {
			t.Fatalf("%s: %v, want history_gap saying %q", name, err, text)
		}
		if s.Applied() != applied {
			t.Fatalf("%s: store at %d, want %d", name, s.Applied(), applied)
		}
	}
	remove := func(seq uint64) {
		t.Helper()
		if err := stream.DeleteMsg(ctx, seq); err != nil {
			t.Fatal(err)
		}
	}
	remove(7)
	remove(8)
	gap("tail", 8, "holds nothing after sequence 6: sequences 7 to 8 are not in it", 6)
	remove(4)
	gap("middle", 6, "sequence 4 is not in LOOM_EVENTS: it goes from 3 to 5", 3)
	whole := openStore(t, t.TempDir(), Options{})
	if _, err := whole.ReplayTo(ctx, js, 3, ReplayOptions{}); err != nil {
		t.Fatalf("replay up to the gap: %v", err)
	}
	remove(1)
	gap("head", 2, "starts at sequence 2: sequences 1 to 1 are not in it", 0)
}
