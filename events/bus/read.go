package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrNoMessage means the subject holds no message.
var ErrNoMessage = errors.New("no message on subject")

// Message is one stored message, read back.
type Message struct {
	Seq     uint64
	Subject string
	Header  nats.Header
	Data    []byte
	Time    time.Time
}

// LastOnSubject reads the last message of subject from stream through the
// stream leader ($JS.API.STREAM.MSG.GET), not a direct get that any replica
// may answer with stale data. Use it where a stale answer would be unsafe.
// subject may be a wildcard filter: the answer is then the last message on
// any subject it matches, which is what an Expect on that filter checks.
func LastOnSubject(ctx context.Context, nc *nats.Conn, stream, subject string) (Message, error) {
	return leaderGet(ctx, nc, stream, map[string]any{"last_by_subj": subject}, "get last of "+subject)
}

// NextOnSubject reads, through the stream leader, the first message on
// subject (or a wildcard filter) at or after sequence from; ErrNoMessage
// when there is none.
func NextOnSubject(ctx context.Context, nc *nats.Conn, stream, subject string, from uint64) (Message, error) {
	return leaderGet(ctx, nc, stream, map[string]any{"seq": from, "next_by_subj": subject},
		fmt.Sprintf("get next of %s from %d", subject, from))
}

// leaderGet asks the stream leader for one message.
func leaderGet(ctx context.Context, nc *nats.Conn, stream string, request map[string]any, what string) (Message, error) {
	req, err := json.Marshal(request)
	if err != nil {
		return Message{}, err
	}
	reply, err := nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+stream, req)
	if err != nil {
		return Message{}, fmt.Errorf("%s: %w", what, err)
	}
	var resp struct {
		Error   *jetstream.APIError `json:"error"`
		Message *struct {
			Subject  string    `json:"subject"`
			Sequence uint64    `json:"seq"`
			Header   []byte    `json:"hdrs"`
			Data     []byte    `json:"data"`
			Time     time.Time `json:"time"`
		} `json:"message"`
	}
	if err := json.Unmarshal(reply.Data, &resp); err != nil {
		return Message{}, fmt.Errorf("%s: decode reply: %w", what, err)
	}
	if resp.Error != nil {
		if resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound {
			return Message{}, ErrNoMessage
		}
		return Message{}, fmt.Errorf("%s: %w", what, resp.Error)
	}
	if resp.Message == nil {
		return Message{}, fmt.Errorf("%s: empty reply", what)
	}
	m := Message{Seq: resp.Message.Sequence, Subject: resp.Message.Subject, Data: resp.Message.Data, Time: resp.Message.Time}
	if len(resp.Message.Header) > 0 {
		if m.Header, err = nats.DecodeHeadersMsg(resp.Message.Header); err != nil {
			return Message{}, fmt.Errorf("%s: headers: %w", what, err)
		}
	}
	return m, nil
}

// LastSeq is the stream's last sequence, as its leader reports it.
func LastSeq(ctx context.Context, js jetstream.JetStream, stream string) (uint64, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", stream, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		return 0, fmt.Errorf("stream %s info: %w", stream, err)
	}
	return info.State.LastSeq, nil
}
