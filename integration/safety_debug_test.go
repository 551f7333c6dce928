//go:build integration

package integration

import (
	"fmt"
	"os"
	"slices"
	"sort"
	"time"

	"github.com/anishathalye/porcupine"
)

// debugHistory finds the shortest failing prefix of a failing partition and
// writes the operations around it to path.
func (h *history) debug(path string) {
	h.mu.Lock()
	ops := slices.Clone(h.ops)
	h.mu.Unlock()
	by := map[string][]porcupine.Operation{}
	for _, op := range ops {
		r := op.Input.(leaseOp).Resource
		by[r] = append(by[r], op)
	}
	f, _ := os.Create(path)
	defer f.Close()
	for r, part := range by {
		sort.Slice(part, func(i, j int) bool { return part[i].Call < part[j].Call })
		if porcupine.CheckOperationsTimeout(leaseModel, part, time.Minute) == porcupine.Ok {
			continue
		}
		lo, hi := 1, len(part)
		for lo < hi {
			mid := (lo + hi) / 2
			if porcupine.CheckOperationsTimeout(leaseModel, part[:mid], time.Minute) == porcupine.Illegal {
				hi = mid
			} else {
				lo = mid + 1
			}
		}
		fmt.Fprintf(f, "resource %s fails at op %d of %d\n", r, lo, len(part))
		for _, op := range part[max(0, lo-40):lo] {
			in := op.Input.(leaseOp)
			ret := "inf"
			if op.Return != 1<<63-1 {
				ret = fmt.Sprint(time.Duration(op.Return))
			}
			fmt.Fprintf(f, "  c%d %s..%s %s %s %s -> %v\n", op.ClientId, time.Duration(op.Call), ret, in.Verb, in.Mode, in.Holder, op.Output)
		}
	}
}
