package bus_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

// Subjects shaped like a lease's: the resource's exclusive state on one
// subject, each shared holder on a subject of its own beneath it.
const (
	resourceAll = "loom.evt.lease.r1.>"
	exclusive   = "loom.evt.lease.r1.x"
)

func holder(name string) string { return "loom.evt.lease.r1.s." + name }

// Shared writers check only the exclusive subject, so they never exclude
// each other; an exclusive writer checks the wildcard, so any grant that
// came after its read, shared or exclusive, refuses it; and a shared writer
// that read before an exclusive grant is refused too.
func TestAppendExpecting_OtherSubject(t *testing.T) {
	b := bustest.Start(t)
	ctx := context.Background()

	// An exclusive writer reads the whole resource while it is empty...
	before := lastSeq(t, b, resourceAll)
	// ...then two shared grants land, both read before either was written.
	sharedRead := lastSeq(t, b, exclusive)
	for _, h := range []string{"a", "b"} {
		env, data := seal(t, "r1-"+h, 0, nil)
		if _, err := bus.AppendExpecting(ctx, b.JS, holder(h), &env, data, bus.Expect{Subject: exclusive, Seq: sharedRead}, ""); err != nil {
			t.Fatalf("shared grant %s: %v", h, err)
		}
	}
	// The exclusive writer's read is stale: refused.
	env, data := seal(t, "r1-x", 0, nil)
	if _, err := bus.AppendExpecting(ctx, b.JS, exclusive, &env, data, bus.Expect{Subject: resourceAll, Seq: before}, ""); !errors.Is(err, bus.ErrWrongLastSeq) {
		t.Fatalf("exclusive on a stale read of %s: err = %v, want ErrWrongLastSeq", resourceAll, err)
	}
	// Reading again, it lands; a shared writer that read before it does not.
	if _, err := bus.AppendExpecting(ctx, b.JS, exclusive, &env, data, bus.Expect{Subject: resourceAll, Seq: lastSeq(t, b, resourceAll)}, ""); err != nil {
		t.Fatalf("exclusive on a fresh read: %v", err)
	}
	env, data = seal(t, "r1-c", 0, nil)
	if _, err := bus.AppendExpecting(ctx, b.JS, holder("c"), &env, data, bus.Expect{Subject: exclusive, Seq: sharedRead}, ""); !errors.Is(err, bus.ErrWrongLastSeq) {
		t.Fatalf("shared on a read from before the exclusive grant: err = %v, want ErrWrongLastSeq", err)
	}
}

// Under concurrency: 16 shared writers that read at once all land (they do
// not serialize). Then, round after round on fresh resources, 15 shared
// writers and one exclusive writer read at once and race: a round where
// the exclusive grant and a shared grant both land is the violation leases
// must never see. With the exclusive writer checking the wildcard, no
// round has one; checking only its own subject, as a plain Append does,
// some round does: the wildcard check is what keeps them apart.
func TestAppendExpecting_Concurrent(t *testing.T) {
	b := bustest.Start(t)
	shared, _ := raceRound(t, b, "all-shared", 16, "")
	if shared != 16 {
		t.Fatalf("%d of 16 shared grants landed, want all", shared)
	}
	const rounds = 30
	violations := func(wildcard bool) int {
		n := 0
		for r := range rounds {
			resource := fmt.Sprintf("w%t-%d", wildcard, r)
			check := ""
			if wildcard {
				check = "loom.evt.lease." + resource + ".>"
			}
			shared, exclusiveLanded := raceRound(t, b, resource, 15, check)
			if exclusiveLanded && shared > 0 {
				n++
			}
		}
		return n
	}
	if v := violations(true); v != 0 {
		t.Fatalf("with the wildcard check, %d of %d rounds granted exclusive and shared together", v, rounds)
	}
	if v := violations(false); v == 0 {
		t.Fatalf("checking only its own subject, no round of %d let exclusive and shared in together: the control proves nothing", rounds)
	}
}

// raceRound has shared writers on resource's holder subjects and, unless
// shared is 16, one exclusive writer on its exclusive subject, all reading
// the resource before any writes, race to append. check is the exclusive
// writer's Expect subject (empty: its own). It returns how many shared
// grants landed and whether the exclusive one did.
func raceRound(t *testing.T, b *bustest.Bus, resource string, shared int, check string) (int, bool) {
	t.Helper()
	base := "loom.evt.lease." + resource
	excl := base + ".x"
	readAll := lastSeq(t, b, base+".>")
	readExcl := lastSeq(t, b, excl)
	exclusiveRead := readAll
	if check == "" {
		exclusiveRead = readExcl
	}
	targets := make([]target, 0, shared+1)
	for i := range shared {
		targets = append(targets, target{fmt.Sprintf("%s.s.h%d", base, i), bus.Expect{Subject: excl, Seq: readExcl}})
	}
	if shared < 16 {
		targets = append(targets, target{excl, bus.Expect{Subject: check, Seq: exclusiveRead}})
	}
	landed := race(t, b, targets)
	n := 0
	for i := range shared {
		if landed[i] {
			n++
		}
	}
	return n, shared < 16 && landed[shared]
}

type target struct {
	subject string
	expect  bus.Expect
}

// race runs the appends at once and says which landed.
func race(t *testing.T, b *bustest.Bus, targets []target) []bool {
	t.Helper()
	var (
		wg     sync.WaitGroup
		landed = make([]bool, len(targets))
		start  = make(chan struct{})
	)
	for i, tg := range targets {
		env, data := seal(t, fmt.Sprint("w", i), 0, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			_, err := bus.AppendExpecting(context.Background(), b.JS, tg.subject, &env, data, tg.expect, "")
			switch {
			case err == nil:
				landed[i] = true
			case !errors.Is(err, bus.ErrWrongLastSeq):
				t.Errorf("append to %s: %v", tg.subject, err)
			}
		}()
	}
	close(start)
	wg.Wait()
	return landed
}

// lastSeq is the last sequence on subject (a filter allowed), 0 if none.
func lastSeq(t *testing.T, b *bustest.Bus, subject string) uint64 {
	t.Helper()
	m, err := bus.LastOnSubject(context.Background(), b.Conn, events.StreamEvents, subject)
	if errors.Is(err, bus.ErrNoMessage) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return m.Seq
}
