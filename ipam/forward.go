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
	"net/http/httptrace"
	"time"

	"github.com/hashicorp/raft"
)

// Followers reach the leader over the peer transport's RPC side with one HTTP call:
// POST /v1/raft/apply carrying an encoded command, answered with the encoded result. The
// transport authenticates both ends, so only cluster members can apply commands.

const forwardPath = "/v1/raft/apply"

// tablePath serves a Raft member's block table to clients (see table.go).
const tablePath = "/v1/raft/table"

// PeerRPCPrefix is where ClusterConfig.PeerRPC is served.
const PeerRPCPrefix = "/v1/peer/"

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
	if c.cfg.PeerRPC != nil {
		mux.Handle(PeerRPCPrefix, c.cfg.PeerRPC)
	}
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
	client := peerClient(dial, 2)
	return func(ctx context.Context, leader raft.ServerAddress, cmd []byte) ([]byte, error) {
		body, status, err := roundTrip(ctx, client, http.MethodPost, "http://"+string(leader)+forwardPath, cmd, maxForwardBytes)
		if err != nil {
			return nil, err
		}
		if status != http.StatusOK {
			return nil, fmt.Errorf("leader %s answered %d: %s", leader, status, bytes.TrimSpace(body))
		}
		return body, nil
	}
}

// HTTPTableFetcher is the client side of tablePath: a FetchFunc that gets a member's table
// through dial, and names the server by the connection's certificate (ConnPeerName: proven
// when the transport checks identities).
func HTTPTableFetcher(dial func(ctx context.Context, addr string) (net.Conn, error)) FetchFunc {
	client := peerClient(dial, 1)
	return func(ctx context.Context, member raft.ServerAddress) ([]byte, string, error) {
		var server string
		ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(ci httptrace.GotConnInfo) {
			server, _ = ConnPeerName(ci.Conn)
		}})
		body, status, err := roundTrip(ctx, client, http.MethodGet, "http://"+string(member)+tablePath, nil, maxTableBytes+1)
		if err != nil {
			return nil, "", err
		}
		if len(body) > maxTableBytes {
			return nil, "", fmt.Errorf("%w: table from %s exceeds %d bytes", ErrBadTable, member, maxTableBytes)
		}
		if status != http.StatusOK {
			return nil, "", fmt.Errorf("member %s answered %d: %s", member, status, bytes.TrimSpace(body))
		}
		return body, server, nil
	}
}

// peerClient is an HTTP client whose connections are the authenticated peer transport's.
func peerClient(dial func(ctx context.Context, addr string) (net.Conn, error), idlePerHost int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return dial(ctx, addr)
		},
		MaxIdleConnsPerHost: idlePerHost,
		IdleConnTimeout:     30 * time.Second,
	}}
}

// roundTrip makes one request and reads at most limit bytes of the answer.
func roundTrip(ctx context.Context, client *http.Client, method, url string, body []byte, limit int64) ([]byte, int, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return nil, 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(io.LimitReader(resp.Body, limit))
	if err != nil {
		return nil, 0, err
	}
	return out, resp.StatusCode, nil
}
