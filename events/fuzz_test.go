package events

import (
	"testing"
	"time"
)

// FuzzDecodeRecord feeds arbitrary bytes to the envelope decoder: it must
// return an error or a valid record, never panic.
func FuzzDecodeRecord(f *testing.F) {
	for _, ev := range samples {
		_, data, err := Seal(ev, KindVM, "x", Origin{Actor: "a", CommandID: "c", Time: time.Unix(1, 0)}, 0, nil)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte{})
	f.Add([]byte{0xde, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		rec, err := DecodeRecord(1, "loom.evt.vm.x", time.Unix(0, 0), data)
		if err == nil {
			if verr := rec.Envelope.Validate(); verr != nil || rec.Event == nil {
				t.Fatalf("accepted an invalid record: %v", verr)
			}
		}
	})
}

// FuzzDecodeCommand feeds arbitrary bodies to the command decoders.
func FuzzDecodeCommand(f *testing.F) {
	f.Add([]byte(`{"command_id":"c","name":"web-1","image":"demo","cpu":1,"mem_mib":256}`))
	f.Add([]byte(`{"name":"x","cpu":-1}`))
	packed, _ := Marshal(CreateVM{CommandMeta: CommandMeta{CommandID: "c"}, Name: "a", Image: "b", CPU: 1, MemoryMiB: 1})
	f.Add(packed)
	f.Fuzz(func(t *testing.T, body []byte) {
		format := SniffFormat(body)
		var create CreateVM
		if DecodeStrict(format, body, &create) == nil && create.Validate() == nil {
			if ValidateName("vm", create.Name) != nil || create.CPU < 1 || create.MemoryMiB < 1 {
				t.Fatalf("validated a bad command: %+v", create)
			}
		}
		var host RegisterHost
		if DecodeStrict(format, body, &host) == nil && host.Validate() == nil && ValidateName("host", host.Name) != nil {
			t.Fatalf("validated a bad host: %+v", host)
		}
		var vm VMCommand
		_ = DecodeStrict(format, body, &vm)
	})
}
