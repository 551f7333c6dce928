package audit

import (
	"crypto/sha256"
	"strings"
	"sync"

	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/hostkey"
)

// Checking ahead. Most of what the Verifier spends on a message depends on
// that message alone: its leaf, the hash of its bytes and, for a signed
// observation, the ed25519 verification, which costs more than the rest
// together. Ahead works those out on several goroutines and hands the
// messages to the Verifier in order. The Verifier takes a signature's
// answer only when the key the headers name is the host's registered key
// and the place they name is the subject's previous message as it read
// the history; otherwise it verifies itself. So the verdict is the
// Verifier's own, whatever the headers claim
// (TestAhead_SameReportAsTheVerifierAlone).

// precheck is what was worked out of a message ahead of the Verifier.
type precheck struct {
	done       bool
	leaf, hash Hash
	// claim is an observation's signature, verified at the place its
	// headers name.
	claim hostkey.Claim
}

// aheadBatch is how many messages travel between the stages at once.
const aheadBatch = 512

// Ahead feeds a Verifier, checking messages ahead of it on several
// goroutines. Add every message in stream order, then call Finish, which
// returns the Verifier's report; Add and Finish are for one goroutine.
type Ahead struct {
	v       *Verifier
	workers int
	// size is how many messages a batch holds.
	size  int
	batch []Message
	// checking carries batches to the checkers, adding from them to the
	// Verifier, free back to Add.
	checking, adding, free chan []Message
	done                   chan struct{}
}

// NewAhead returns an Ahead that feeds v, checking on workers goroutines
// (at least one).
func NewAhead(v *Verifier, workers int) *Ahead { return newAhead(v, workers, aheadBatch) }

// newAhead is NewAhead with batches of size messages.
func newAhead(v *Verifier, workers, size int) *Ahead {
	a := &Ahead{v: v, workers: max(workers, 1), size: max(size, 1),
		checking: make(chan []Message, 2), adding: make(chan []Message, 2), free: make(chan []Message, 4), done: make(chan struct{})}
	a.batch = make([]Message, 0, a.size)
	go a.check()
	go a.add()
	return a
}

// Add reads the next message of the history. It keeps a copy of the
// message, not of the bytes and headers it points to.
func (a *Ahead) Add(m *Message) {
	a.batch = append(a.batch, *m)
	a.batch[len(a.batch)-1].pre = precheck{}
	if len(a.batch) < a.size {
		return
	}
	a.checking <- a.batch
	select {
	case a.batch = <-a.free:
	default:
		a.batch = make([]Message, 0, a.size)
	}
}

// Finish hands over what is left, waits until the Verifier has read all,
// and returns its report.
func (a *Ahead) Finish() *Report {
	if len(a.batch) > 0 {
		a.checking <- a.batch
		a.batch = nil
	}
	close(a.checking)
	<-a.done
	return a.v.Finish()
}

// check works out each batch on the workers and passes it on.
func (a *Ahead) check() {
	defer close(a.adding)
	checkers := make([]*checker, a.workers)
	for i := range checkers {
		checkers[i] = &checker{x: NewHasher(), sigs: hostkey.NewVerifier()}
	}
	for batch := range a.checking {
		per := (len(batch) + a.workers - 1) / a.workers
		var wg sync.WaitGroup
		for i, c := range checkers {
			lo, hi := min(i*per, len(batch)), min((i+1)*per, len(batch))
			wg.Go(func() {
				for j := lo; j < hi; j++ {
					c.check(&batch[j])
				}
			})
		}
		wg.Wait()
		a.adding <- batch
	}
}

// add gives the Verifier each message, in order.
func (a *Ahead) add() {
	defer close(a.done)
	for batch := range a.adding {
		for i := range batch {
			a.v.Add(&batch[i])
			batch[i] = Message{} // let go of its bytes
		}
		select {
		case a.free <- batch[:0]:
		default:
		}
	}
}

// checker works out one message at a time; it is for one goroutine.
type checker struct {
	x    *Hasher
	sigs *hostkey.Verifier
}

func (c *checker) check(m *Message) {
	p := &m.pre
	p.leaf = c.x.Leaf(m)
	p.hash = sha256.Sum256(m.Data)
	if strings.HasPrefix(m.Subject, observationPrefix) {
		p.claim = bus.ReadClaim(c.sigs, m.Header, m.Subject, p.hash[:])
	}
	p.done = true
}
