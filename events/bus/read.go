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
	req, err := json.Marshal(map[string]string{"last_by_subj": subject})
	if err != nil {
		return Message{}, err
	}
	reply, err := nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+stream, req)
	if err != nil {
		return Message{}, fmt.Errorf("get last of %s: %w", subject, err)
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
		return Message{}, fmt.Errorf("get last of %s: decode reply: %w", subject, err)
	}
	if resp.Error != nil {
		if resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound {
			return Message{}, ErrNoMessage
		}
		return Message{}, fmt.Errorf("get last of %s: %w", subject, resp.Error)
	}
	if resp.Message == nil {
		return Message{}, fmt.Errorf("get last of %s: empty reply", subject)
	}
	m := Message{Seq: resp.Message.Sequence, Subject: resp.Message.Subject, Data: resp.Message.Data, Time: resp.Message.Time}
	if len(resp.Message.Header) > 0 {
		if m.Header, err = nats.DecodeHeadersMsg(resp.Message.Header); err != nil {
			return Message{}, fmt.Errorf("get last of %s: headers: %w", subject, err)
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
