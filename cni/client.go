package cni

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

// ErrPeerUnreachable means nothing answered on the control socket.
var ErrPeerUnreachable = errors.New("weft peer is not reachable")

// Client speaks the control API over the peer's unix socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the peer listening on socket. Each call is bounded by
// timeout (ADD may wait for a block claim, so give it room).
func NewClient(socket string, timeout time.Duration) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr, Timeout: timeout}}
}

// Add asks the peer to attach a container.
func (c *Client) Add(ctx context.Context, req AttachRequest) (*AttachResult, error) {
	var res AttachResult
	return &res, c.call(ctx, PathAdd, req, &res)
}

// Del asks the peer to detach a container.
func (c *Client) Del(ctx context.Context, req AttachRequest) error {
	return c.call(ctx, PathDel, req, nil)
}

// Check asks the peer to verify an attachment.
func (c *Client) Check(ctx context.Context, req AttachRequest) (*AttachResult, error) {
	var res AttachResult
	return &res, c.call(ctx, PathCheck, req, &res)
}

// GC asks the peer to release every attachment not in req.Valid.
func (c *Client) GC(ctx context.Context, req GCRequest) (*GCResult, error) {
	var res GCResult
	return &res, c.call(ctx, PathGC, req, &res)
}

// Status asks whether the peer can serve ADDs.
func (c *Client) Status(ctx context.Context, req StatusRequest) error {
	return c.call(ctx, PathStatus, req, nil)
}

// Get fetches a read-only endpoint (used by the weft CLI) into out.
func (c *Client) Get(ctx context.Context, path string, out any) error {
	return c.do(ctx, http.MethodGet, path, nil, out)
}

// Post sends in to an endpoint of the operator API (used by the weft CLI) and decodes the
// answer into out, if out is not nil.
func (c *Client) Post(ctx context.Context, path string, in, out any) error {
	return c.call(ctx, path, in, out)
}

// Delete sends DELETE to an endpoint of the operator API (used by the weft CLI) and decodes
// the answer into out, if out is not nil.
func (c *Client) Delete(ctx context.Context, path string, out any) error {
	return c.do(ctx, http.MethodDelete, path, nil, out)
}

func (c *Client) call(ctx context.Context, path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	return c.do(ctx, http.MethodPost, path, body, out)
}

// do returns *Error for answers from the peer and wraps ErrPeerUnreachable when there was
// nobody to answer.
func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://weft"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrPeerUnreachable, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return fmt.Errorf("read answer from %s: %w", c.socket, err)
	}
	if resp.StatusCode != http.StatusOK {
		apiErr := &Error{}
		if err := json.Unmarshal(data, apiErr); err != nil || apiErr.Code == 0 {
			return &Error{Code: CodeInternal, Message: fmt.Sprintf("weft peer answered %s", resp.Status), Details: string(data)}
		}
		return apiErr
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return &Error{Code: types.ErrDecodingFailure, Message: "decode the weft peer's answer", Details: err.Error()}
		}
	}
	return nil
}
