package projections

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/cockroachdb/pebble/v2"

	"github.com/loomctl/loom/events"
)

// Rows are msgpack arrays: structs encode their fields by position, not
// by name. That makes rows half the size and their encoding much cheaper
// (the runner rewrites every row a batch touches), but a row can be
// decoded only with the field order it was written with. So the store
// records a fingerprint of the layout of every type it encodes, and when
// Open finds another one (events changed a state type), it drops this
// version's keys and the runner rebuilds them from the stream.

// keyLayout holds the layout fingerprint of the rows under version.
var keyLayout = []byte(version + "layout")

// foldRevision names what the runner writes from a given history, beside
// the types it encodes: a change to it (a table a new fold fills) has rows
// written before it dropped and rebuilt, as a change of layout does.
// Revision 2 keeps the heads of observation subjects and checks signed
// observations against them.
const foldRevision = "2"

// rowLayout fingerprints the Go types that rows encode, and foldRevision.
func rowLayout() string {
	var b strings.Builder
	b.WriteString("fold " + foldRevision + "\n")
	for _, t := range []reflect.Type{
		reflect.TypeFor[rowValue[events.HostState]](), reflect.TypeFor[events.Allocation](),
		reflect.TypeFor[events.HostOrphanFound](), reflect.TypeFor[rowValue[events.ImageState]](),
		reflect.TypeFor[rowValue[events.VMState]](),
		reflect.TypeFor[rowValue[events.LeaseState]](), reflect.TypeFor[events.LeaseGrant](),
		reflect.TypeFor[events.Appended](), reflect.TypeFor[Flagged](),
	} {
		describeType(&b, t, 0)
		b.WriteByte('\n')
	}
	sum := sha256.Sum256([]byte(b.String()))
	return hex.EncodeToString(sum[:8])
}

// describeType writes t's shape: its kind and, for composites, the shapes
// of what it holds, with each struct field's name and msgpack tag.
func describeType(b *strings.Builder, t reflect.Type, depth int) {
	if depth > 8 {
		b.WriteString("…")
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		b.WriteString("{")
		for i := range t.NumField() {
			f := t.Field(i)
			fmt.Fprintf(b, "%s %q ", f.Name, f.Tag.Get("msgpack"))
			describeType(b, f.Type, depth+1)
			b.WriteString(";")
		}
		b.WriteString("}")
	case reflect.Pointer:
		b.WriteString("*")
		describeType(b, t.Elem(), depth+1)
	case reflect.Slice:
		b.WriteString("[]")
		describeType(b, t.Elem(), depth+1)
	case reflect.Map:
		b.WriteString("map[")
		describeType(b, t.Key(), depth+1)
		b.WriteString("]")
		describeType(b, t.Elem(), depth+1)
	default:
		b.WriteString(t.Kind().String())
	}
}

// checkLayout makes sure the rows under version were written with this
// build's layout. If they were not (or nobody recorded it), it drops them
// all, so the runner rebuilds from sequence 1.
func checkLayout(db *pebble.DB) (rebuilt bool, err error) {
	layout := rowLayout()
	value, closer, err := db.Get(keyLayout)
	switch {
	case err == nil:
		same := string(value) == layout
		_ = closer.Close()
		if same {
			return false, nil
		}
	case !errors.Is(err, pebble.ErrNotFound):
		return false, fmt.Errorf("read row layout: %w", err)
	}
	b := db.NewBatch()
	defer func() { _ = b.Close() }()
	if err := b.DeleteRange([]byte(version), prefixEnd([]byte(version)), nil); err != nil {
		return false, err
	}
	if err := b.Set(keyLayout, []byte(layout), nil); err != nil {
		return false, err
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return false, fmt.Errorf("record row layout: %w", err)
	}
	return true, nil
}
