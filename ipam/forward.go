package ipam

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/hashicorp/raft"
)

// Followers reach the leader over the peer transport's RPC side with one HTTP call:
// POST /v1/raft/apply carrying an encoded command, answered with the encoded result. The
// transport authenticates both ends, so only cluster members can apply commands.

const forwardPath = "/v1/raft/apply"

// tablePath serves a Raft member's block table to clients (see table.go).
const tablePath = "/v1/raft/table"

// maxForwardBytes bounds a forwarded command; real ones are a few hundred bytes.
const maxForwardBytes = 64 << 10

// ServeForwarded answers forwarded commands on ln until the returned stop is called; stop
// waits for the server to finish.
func (c *Cluster) ServeForwarded(ln net.Listener) (stop func()) {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+forwardPath, func(w http.ResponseWriter, r *http.Request) {
		data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxForwardBytes))
		if err != nil {
			http.Error(w, "read command: "+err.Error(), http.StatusBadRequest)
			return
		}
		out, err := c.ApplyForwarded(data)
		switch {
		case errors.Is(err, ErrNotLeader), errors.Is(err, ErrNoQuorum):
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		case err != nil:
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(out)
	})
	mux.HandleFunc("GET "+tablePath, c.serveTable)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: slog.NewLogLogger(c.log.Handler(), slog.LevelWarn)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
	}
}

// HTTPForwarder is the follower side: a ForwardFunc that posts to the leader through dial.
func HTTPForwarder(dial func(ctx context.Context, addr string) (net.Conn, error)) ForwardFunc {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return dial(ctx, addr)
		},
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     30 * time.Second,
	}}
	return func(ctx context.Context, leader raft.ServerAddress, cmd []byte) ([]byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+string(leader)+forwardPath, bytes.NewReader(cmd))
		if err != nil {
			return nil, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, maxForwardBytes))
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("leader %s answered %s: %s", leader, resp.Status, bytes.TrimSpace(body))
		}
		return body, nil
	}
}

// HTTPTableFetcher is the client side of tablePath: a FetchFunc that gets a member's table
// through dial.
func HTTPTableFetcher(dial func(ctx context.Context, addr string) (net.Conn, error)) FetchFunc {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return dial(ctx, addr)
		},
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     30 * time.Second,
	}}
	return func(ctx context.Context, member raft.ServerAddress) ([]byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+string(member)+tablePath, nil)
		if err != nil {
			return nil, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, maxTableBytes+1))
		if err != nil {
			return nil, err
		}
		if len(body) > maxTableBytes {
			return nil, fmt.Errorf("%w: table from %s exceeds %d bytes", ErrBadTable, member, maxTableBytes)
		}
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("member %s answered %s: %s", member, resp.Status, bytes.TrimSpace(body))
		}
		return body, nil
	}
}
