package handlers

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus/bustest"
)

// benchClients is the concurrency of BenchmarkCreate, for both halves.
const benchClients = 16

// BenchmarkCreate measures vm.create commands/s sent by 16 clients over TCP
// loopback to a replica connected in-process to an embedded file-backed
// server, and the baseline at the same concurrency over TCP: raw JetStream
// publishes with expected-last-subject-sequence, one per operation, on a
// server of its own. It reports both rates and their ratio (the goal is
// 0.5 or more); ns/op is the create's.
func BenchmarkCreate(b *testing.B) {
	raw := benchRawPublish(b, b.N)
	creates := benchCreates(b, b.N)
	b.ReportMetric(creates, "creates/s")
	b.ReportMetric(raw, "raw/s")
	b.ReportMetric(creates/raw, "ratio")
	b.ReportMetric(float64(time.Second)/creates, "ns/op")
}

// benchRawPublish is the baseline: each client publishes to its own 1,000
// subjects, each publish carrying the subject's last sequence.
func benchRawPublish(b *testing.B, n int) float64 {
	bb := bustest.Start(b)
	payload := make([]byte, 300)
	return runBenchClients(b, bb.URL, n, func(nc *nats.Conn, client int) func(i int) error {
		js, err := jetstream.New(nc)
		if err != nil {
			b.Fatal(err)
		}
		last := make([]uint64, 1000)
		return func(i int) error {
			s := i % len(last)
			ack, err := js.Publish(context.Background(), fmt.Sprintf("loom.evt.vm.raw-%d-%d", client, s), payload,
				jetstream.WithExpectLastSequencePerSubject(last[s]))
			if err != nil {
				return err
			}
			last[s] = ack.Sequence
			return nil
		}
	})
}

// benchCreates runs a replica in-process to its server and sends creates
// from clients over TCP.
func benchCreates(b *testing.B, n int) float64 {
	bb := bustest.Start(b)
	nc, err := nats.Connect(bb.URL, nats.InProcessServer(bb.Server))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		b.Fatal(err)
	}
	reader := startMemReader(b, js)
	s, err := New(Config{JS: js, Conn: nc, Reader: reader, Logger: slog.New(slog.DiscardHandler), RequestTimeout: time.Minute})
	if err != nil {
		b.Fatal(err)
	}
	ms, err := micro.AddService(nc, micro.Config{Name: "loom", Version: "0.0.1", QueueGroup: "loom"})
	if err != nil {
		b.Fatal(err)
	}
	if err := s.AddEndpoints(ms); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ms.Stop()
		_ = s.Close(context.Background())
	})
	if err := nc.Flush(); err != nil {
		b.Fatal(err)
	}
	admin := bustest.Connect(b, bb.URL)
	for i := range n/events.MaxCPU + 1 {
		must(b, admin, events.KindHost, events.VerbRegister, &events.RegisterHost{CommandMeta: events.CommandMeta{CommandID: fmt.Sprint("h", i)},
			Name: fmt.Sprint("h", i), CPU: events.MaxCPU, MemoryMiB: events.MaxMemoryMiB})
	}
	registerImage(b, admin, "debian")
	return runBenchClients(b, bb.URL, n, func(nc *nats.Conn, client int) func(i int) error {
		return func(i int) error {
			name := fmt.Sprintf("b%d-%d", client, i)
			msg := nats.NewMsg(events.CommandSubject(events.KindVM, events.VerbCreate))
			msg.Header.Set(events.HeaderActor, fmt.Sprint("bench-", client))
			data, err := events.Marshal(createCmd(name, name, 1, 1))
			if err != nil {
				return err
			}
			msg.Data = data
			resp, err := nc.RequestMsg(msg, time.Minute)
			if err != nil {
				return err
			}
			if resp.Header.Get(micro.ErrorCodeHeader) != "" {
				return fmt.Errorf("create %s: %s", name, resp.Header.Get(micro.ErrorHeader))
			}
			return nil
		}
	})
}

// runBenchClients runs benchClients clients, each on its own TCP
// connection, that do n operations between them, and returns operations/s.
func runBenchClients(b *testing.B, url string, n int, newClient func(nc *nats.Conn, client int) func(i int) error) float64 {
	ops := make([]func(int) error, benchClients)
	for c := range ops {
		ops[c] = newClient(bustest.Connect(b, url), c)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for c := range ops {
		wg.Go(func() {
			for i := 0; ; i++ {
				if next.Add(1) > int64(n) {
					return
				}
				if err := ops[c](i); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	return float64(n) / elapsed.Seconds()
}
