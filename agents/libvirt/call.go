package libvirt

import (
	"context"
	"fmt"
)

// call runs one go-libvirt RPC so that the caller gets control back when ctx
// ends, the RPC timeout passes or the Client closes, even though the RPC
// itself cannot be cancelled. An abandoned RPC finishes in the background
// (when libvirtd answers or the socket closes); Close waits for it.
func call[T any](ctx context.Context, c *Client, rpc func() (T, error)) (T, error) {
	var zero T
	if err := c.usable(ctx); err != nil {
		return zero, err
	}
	rpcCtx, cancel := context.WithTimeout(ctx, c.cfg.RPCTimeout)
	defer cancel()

	type result struct {
		value T
		err   error
	}
	done := make(chan result, 1) // buffered: an abandoned RPC must not block
	started := c.goTracked(func() {
		value, err := rpc()
		done <- result{value, err}
	})
	if !started {
		return zero, ErrClosed
	}

	select {
	case r := <-done:
		return r.value, translate(r.err, c.isGone())
	case <-rpcCtx.Done():
		if err := ctx.Err(); err != nil {
			return zero, err
		}
		return zero, fmt.Errorf("rpc timed out after %s: %w", c.cfg.RPCTimeout, rpcCtx.Err())
	case <-c.lifetime.Done():
		return zero, ErrClosed
	}
}

// call0 is call for RPCs that return only an error.
func call0(ctx context.Context, c *Client, rpc func() error) error {
	_, err := call(ctx, c, func() (struct{}, error) { return struct{}{}, rpc() })
	return err
}

// usable returns why no RPC should be started, or nil.
func (c *Client) usable(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if c.lifetime.Err() != nil {
		return ErrClosed
	}
	if c.isGone() {
		return ErrDisconnected
	}
	return nil
}

// isGone reports whether the connection to libvirtd has dropped.
func (c *Client) isGone() bool {
	select {
	case <-c.gone:
		return true
	default:
		return false
	}
}
