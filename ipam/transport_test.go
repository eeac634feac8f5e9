package ipam

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/weftnet/weft/datapath/nslab"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"go.uber.org/goleak"
)

// logRecorder is a slog.Handler that keeps every record, for tests to
// inspect what a transport logged.
type logRecorder struct {
	mu      sync.Mutex // guards records
	records []slog.Record
}

func (h *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (h *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *logRecorder) WithGroup(string) slog.Handler            { return h }
func (h *logRecorder) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.records = append(h.records, r.Clone())
	h.mu.Unlock()
	return nil
}

// rejectLog is one "rejected connection" warning.
type rejectLog struct {
	remote string
	err    error
}

func (h *logRecorder) rejections() []rejectLog {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []rejectLog
	for _, r := range h.records {
		if r.Level != slog.LevelWarn || !strings.Contains(r.Message, "rejected connection") {
			continue
		}
		var rej rejectLog
		r.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "remote":
				rej.remote = a.Value.String()
			case "err":
				rej.err, _ = a.Value.Any().(error)
			}
			return true
		})
		out = append(out, rej)
	}
	return out
}

// waitRejections polls until the handler holds n rejections and returns them.
func (h *logRecorder) waitRejections(t *testing.T, n int) []rejectLog {
	t.Helper()
	var got []rejectLog
	pollUntil(t, 10*time.Second, func() bool { got = h.rejections(); return len(got) >= n },
		fmt.Sprintf("%d rejected-connection warnings", n))
	return got
}

// pollUntil polls cond until it holds or timeout passes, with weft's one poll loop.
func pollUntil(t *testing.T, timeout time.Duration, cond func() bool, what string) {
	t.Helper()
	nslab.EventuallyEvery(t, timeout, 5*time.Millisecond, what, holds(cond))
}

// holds turns a yes/no condition into the error-returning one nslab's poll takes.
func holds(cond func() bool) func() error {
	return func() error {
		if !cond() {
			return errors.New("not yet")
		}
		return nil
	}
}

func transportTestKey(s string) []byte { return DeriveKey([]byte("test password " + s)) }

func newTestTransport(t *testing.T, key []byte, hsTimeout time.Duration) (*PeerTransport, *logRecorder) {
	t.Helper()
	h := &logRecorder{}
	pt, err := NewPeerTransport(TransportConfig{
		BindAddr:         "127.0.0.1:0",
		Key:              key,
		Logger:           slog.New(h),
		handshakeTimeout: hsTimeout,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pt.Close() })
	return pt, h
}

// acceptWithin runs accept and fails the test if it doesn't return a
// connection within d.
func acceptWithin(t *testing.T, accept func() (net.Conn, error), d time.Duration) net.Conn {
	t.Helper()
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := accept()
		ch <- result{c, err}
	}()
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("accept: %v", r.err)
		}
		t.Cleanup(func() { r.c.Close() })
		return r.c
	case <-timer.C:
		t.Fatalf("nothing accepted within %v", d)
		return nil
	}
}

// dialPair dials from client to server with the given kind and returns both
// ends of the connection.
func dialPair(t *testing.T, client, server *PeerTransport, kind byte) (c, s net.Conn) {
	t.Helper()
	var err error
	accept := server.Accept
	if kind == transportKindRPC {
		c, err = client.DialRPC(context.Background(), server.Addr().String())
		accept = server.RPCListener().Accept
	} else {
		c, err = client.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second)
	}
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, acceptWithin(t, accept, 10*time.Second)
}

// writesForSeed returns a 1 MiB write followed by many small ones.
func writesForSeed(seed uint64) (writes [][]byte, all []byte) {
	rng := rand.New(rand.NewPCG(seed, 1))
	big := make([]byte, 1<<20)
	for i := range big {
		big[i] = byte(rng.Uint32())
	}
	writes = append(writes, big)
	for range 2000 {
		w := make([]byte, 1+rng.IntN(300))
		for i := range w {
			w[i] = byte(rng.Uint32())
		}
		writes = append(writes, w)
	}
	return writes, bytes.Join(writes, nil)
}

// exchangeBoth sends writesForSeed data from a to b and from b to a at the same
// time (a reader and a writer per conn run concurrently) and checks it
// arrives intact.
func exchangeBoth(t *testing.T, a, b net.Conn) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for _, c := range []net.Conn{a, b} {
		if err := c.SetDeadline(deadline); err != nil {
			t.Fatal(err)
		}
	}
	errc := make(chan error, 4)
	direction := func(src, dst net.Conn, seed uint64) {
		writes, want := writesForSeed(seed)
		go func() {
			for _, w := range writes {
				if _, err := src.Write(w); err != nil {
					errc <- fmt.Errorf("write: %w", err)
					return
				}
			}
			errc <- nil
		}()
		go func() {
			got := make([]byte, len(want))
			if _, err := io.ReadFull(dst, got); err != nil {
				errc <- fmt.Errorf("read: %w", err)
				return
			}
			if !bytes.Equal(got, want) {
				errc <- errors.New("data arrived altered")
				return
			}
			errc <- nil
		}()
	}
	direction(a, b, 1)
	direction(b, a, 2)
	for range 4 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []net.Conn{a, b} {
		c.SetDeadline(time.Time{})
	}
}

func TestTransportRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		key  []byte
		kind byte
	}{
		{"sealed raft", transportTestKey("a"), transportKindRaft},
		{"sealed rpc", transportTestKey("a"), transportKindRPC},
		{"plain raft", nil, transportKindRaft},
		{"plain rpc", nil, transportKindRPC},
	} {
		t.Run(tc.name, func(t *testing.T) {
			server, sh := newTestTransport(t, tc.key, 0)
			client, ch := newTestTransport(t, tc.key, 0)
			c, s := dialPair(t, client, server, tc.kind)
			if _, sealed := c.(*sealedConn); sealed != (tc.key != nil) {
				t.Errorf("client conn is %T with key %v", c, tc.key != nil)
			}
			if got, want := c.RemoteAddr().String(), server.Addr().String(); got != want {
				t.Errorf("RemoteAddr = %s, want %s", got, want)
			}
			exchangeBoth(t, c, s)
			// A clean close reads as io.EOF on the other side.
			c.Close()
			if _, err := s.Read(make([]byte, 1)); err != io.EOF {
				t.Errorf("read after the peer closed: %v, want io.EOF", err)
			}
			c.Close() // a second Close is harmless
			if r := append(sh.rejections(), ch.rejections()...); len(r) != 0 {
				t.Errorf("unexpected rejections: %v", r)
			}
		})
	}
}

// TestTransportRoutesByKind checks that raft and rpc conns reach only
// their own queue.
func TestTransportRoutesByKind(t *testing.T) {
	key := transportTestKey("kinds")
	server, _ := newTestTransport(t, key, 0)
	client, _ := newTestTransport(t, key, 0)

	rpcConn, err := client.DialRPC(context.Background(), server.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer rpcConn.Close()
	raftConn, err := client.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer raftConn.Close()
	for c, msg := range map[net.Conn]string{rpcConn: "rpc!", raftConn: "raft"} {
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		accept func() (net.Conn, error)
		want   string
	}{
		{server.Accept, "raft"},
		{server.RPCListener().Accept, "rpc!"},
	} {
		s, want := acceptWithin(t, tc.accept, 10*time.Second), tc.want
		got := make([]byte, 4)
		if _, err := io.ReadFull(s, got); err != nil {
			t.Fatal(err)
		}
		if string(got) != want {
			t.Errorf("accepted %q, want %q", got, want)
		}
	}
}

func TestTransportDeadlines(t *testing.T) {
	key := transportTestKey("deadline")
	server, _ := newTestTransport(t, key, 0)
	client, _ := newTestTransport(t, key, 0)
	c, s := dialPair(t, client, server, transportKindRaft)

	if err := s.SetReadDeadline(time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Read(make([]byte, 8)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v, want os.ErrDeadlineExceeded", err)
	}
	// A read timeout is not fatal: the conn keeps working.
	s.SetReadDeadline(time.Time{})
	if err := c.SetWriteDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("still here")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 10)
	if _, err := io.ReadFull(s, got); err != nil || string(got) != "still here" {
		t.Fatalf("read %q, %v", got, err)
	}
	// Small reads drain a frame piece by piece.
	if _, err := c.Write([]byte("abcdef")); err != nil {
		t.Fatal(err)
	}
	var out []byte
	for len(out) < 6 {
		b := make([]byte, 1)
		if _, err := s.Read(b); err != nil {
			t.Fatal(err)
		}
		out = append(out, b...)
	}
	if string(out) != "abcdef" {
		t.Fatalf("read %q byte by byte", out)
	}
}

func TestTransportWrongKey(t *testing.T) {
	server, sh := newTestTransport(t, transportTestKey("right"), 0)
	client, ch := newTestTransport(t, transportTestKey("wrong"), 0)

	_, err := client.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second)
	if !errors.Is(err, ErrAuthFailed) {
		t.Fatalf("raft dial with the wrong key: %v, want ErrAuthFailed", err)
	}
	_, err = client.DialRPC(context.Background(), server.Addr().String())
	if !errors.Is(err, ErrAuthFailed) {
		t.Fatalf("rpc dial with the wrong key: %v, want ErrAuthFailed", err)
	}
	for _, r := range sh.waitRejections(t, 2) {
		if !errors.Is(r.err, ErrAuthFailed) || !strings.Contains(r.err.Error(), "wrong password?") {
			t.Errorf("listener's reason: %v", r.err)
		}
		if !strings.HasPrefix(r.remote, "127.0.0.1:") {
			t.Errorf("warning names remote %q", r.remote)
		}
	}
	if len(server.raftConns) != 0 || len(server.rpc.conns) != 0 {
		t.Fatal("a rejected connection reached an accept queue")
	}
	// The dialer logged the failure too.
	ch.mu.Lock()
	n := len(ch.records)
	ch.mu.Unlock()
	if n == 0 {
		t.Error("the dialer logged nothing")
	}

	// A good client still gets through, and is the first thing accepted.
	good, _ := newTestTransport(t, transportTestKey("right"), 0)
	c, s := dialPair(t, good, server, transportKindRaft)
	if _, err := c.Write([]byte("good")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(s, got); err != nil || string(got) != "good" {
		t.Fatalf("read %q, %v", got, err)
	}
}

// TestTransportPasswordOnOneSide checks that a peer with a password and a
// peer without one never talk, whichever dials.
func TestTransportPasswordOnOneSide(t *testing.T) {
	t.Run("sealed dialer", func(t *testing.T) {
		server, sh := newTestTransport(t, nil, 0)
		client, _ := newTestTransport(t, transportTestKey("x"), 0)
		_, err := client.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second)
		if !errors.Is(err, ErrAuthFailed) {
			t.Fatalf("dial: %v, want ErrAuthFailed", err)
		}
		if r := sh.waitRejections(t, 1); !errors.Is(r[0].err, ErrAuthFailed) {
			t.Errorf("listener's reason: %v", r[0].err)
		}
	})
	t.Run("plain dialer", func(t *testing.T) {
		server, sh := newTestTransport(t, transportTestKey("x"), 0)
		client, _ := newTestTransport(t, nil, 0)
		// Plain mode has no answer from the listener, so the dial
		// succeeds and the conn is closed at once.
		c, err := client.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if r := sh.waitRejections(t, 1); !errors.Is(r[0].err, ErrAuthFailed) {
			t.Errorf("listener's reason: %v", r[0].err)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || isNetTimeout(err) {
			t.Errorf("read on a refused conn: %v, want EOF or reset", err)
		}
		if len(server.raftConns) != 0 {
			t.Error("refused conn reached Accept")
		}
	})
}

// TestTransportBadClients checks that garbage, a truncated handshake and
// a silent client neither block a good client nor hold a goroutine past
// the handshake timeout.
func TestTransportBadClients(t *testing.T) {
	key := transportTestKey("bad clients")
	rawDial := func(t *testing.T, addr net.Addr, send []byte) net.Conn {
		c, err := net.Dial("tcp", addr.String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := c.Write(send); err != nil {
			t.Fatal(err)
		}
		return c
	}
	hello := append([]byte{transportHelloSealed}, make([]byte, transportNonceSize)...)

	t.Run("do not block a good client", func(t *testing.T) {
		// A long timeout: the good client can only succeed by not
		// waiting for the bad ones.
		server, _ := newTestTransport(t, key, time.Minute)
		rawDial(t, server.Addr(), nil)           // silent
		rawDial(t, server.Addr(), hello[:10])    // truncated
		rawDial(t, server.Addr(), hello[:1])     // hello byte only
		rawDial(t, server.Addr(), hello)         // hello and nonce, no proof
		rawDial(t, server.Addr(), []byte("GET")) // something else entirely
		pollUntil(t, 10*time.Second, func() bool {
			server.mu.Lock()
			defer server.mu.Unlock()
			return len(server.pending) == 4 // all but the garbage, rejected at once
		}, "four handshakes in progress")
		client, _ := newTestTransport(t, key, 0)
		c, s := dialPair(t, client, server, transportKindRaft)
		exchangeBoth(t, c, s)
	})

	t.Run("rejected with reasons", func(t *testing.T) {
		server, sh := newTestTransport(t, key, 200*time.Millisecond)
		garbage := rawDial(t, server.Addr(), []byte{0xEE, 1, 2, 3, 4, 5})
		silent := rawDial(t, server.Addr(), nil)
		truncated := rawDial(t, server.Addr(), hello[:20])

		// A client that sends a hello, reads the nonce and answers with
		// a made-up proof.
		forger := rawDial(t, server.Addr(), hello)
		forger.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(forger, make([]byte, transportNonceSize)); err != nil {
			t.Fatal(err)
		}
		if _, err := forger.Write(bytes.Repeat([]byte{0x5a}, transportProofSize)); err != nil {
			t.Fatal(err)
		}

		rejs := sh.waitRejections(t, 4)
		var reasons []string
		for _, r := range rejs {
			if !errors.Is(r.err, ErrAuthFailed) {
				t.Errorf("reason %v does not wrap ErrAuthFailed", r.err)
			}
			reasons = append(reasons, r.err.Error())
		}
		all := strings.Join(reasons, "\n")
		for _, want := range []string{"unknown hello byte 0xee", "proof does not match", "i/o timeout"} {
			if !strings.Contains(all, want) {
				t.Errorf("no rejectLog mentions %q:\n%s", want, all)
			}
		}
		// The server closed each of them.
		for _, c := range []net.Conn{garbage, silent, truncated, forger} {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadAll(c); isNetTimeout(err) {
				t.Errorf("server did not close %s", c.LocalAddr())
			}
		}
		if len(server.raftConns) != 0 || len(server.rpc.conns) != 0 {
			t.Fatal("a bad client reached an accept queue")
		}
	})
}

// flipProxy forwards TCP connections to target, inverting one byte: the
// one at offset c2s of the client-to-server stream and at offset s2c of
// the other direction (negative: none). It returns its address.
func flipProxy(t *testing.T, target string, c2s, s2c int64) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex // guards conns and closed
		conns  []net.Conn
		closed bool
	)
	pipe := func(dst, src net.Conn, at int64) {
		defer wg.Done()
		defer dst.(*net.TCPConn).CloseWrite()
		buf := make([]byte, 32<<10)
		var off int64
		for {
			n, err := src.Read(buf)
			if n > 0 {
				if at >= off && at < off+int64(n) {
					buf[at-off] ^= 0x40
				}
				off += int64(n)
				if _, err := dst.Write(buf[:n]); err != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			if closed {
				c.Close()
				s.Close()
				mu.Unlock()
				continue
			}
			conns = append(conns, c, s)
			wg.Add(2)
			mu.Unlock()
			go pipe(s, c, c2s)
			go pipe(c, s, s2c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

func TestTransportTamper(t *testing.T) {
	key := transportTestKey("tamper")
	// Byte offsets on the wire (see the protocol comment).
	const (
		dialerHandshake   = 1 + transportNonceSize + transportProofSize // 65
		kindFrame         = frameHeaderSize + 1 + frameTagSize          // 21
		listenerHandshake = transportNonceSize + transportProofSize     // 64
	)
	msg := []byte("claim block 10.40.0.64/26 for peer b")

	t.Run("dialer to listener", func(t *testing.T) {
		server, _ := newTestTransport(t, key, 0)
		client, _ := newTestTransport(t, key, 0)
		proxy := flipProxy(t, server.Addr().String(), dialerHandshake+kindFrame+frameHeaderSize+5, -1)
		c, err := client.Dial(raft.ServerAddress(proxy), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s := acceptWithin(t, server.Accept, 10*time.Second)
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		s.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := s.Read(make([]byte, 100)); !errors.Is(err, ErrAuthFailed) {
			t.Fatalf("read of a tampered frame: %d bytes, %v; want ErrAuthFailed", n, err)
		}
		// The error sticks.
		if _, err := s.Read(make([]byte, 100)); !errors.Is(err, ErrAuthFailed) {
			t.Fatalf("second read: %v", err)
		}
	})

	t.Run("listener to dialer", func(t *testing.T) {
		server, _ := newTestTransport(t, key, 0)
		client, _ := newTestTransport(t, key, 0)
		proxy := flipProxy(t, server.Addr().String(), -1, listenerHandshake+frameHeaderSize+2)
		c, err := client.DialRPC(context.Background(), proxy)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s := acceptWithin(t, server.RPCListener().Accept, 10*time.Second)
		if _, err := s.Write(msg); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 100)); !errors.Is(err, ErrAuthFailed) {
			t.Fatalf("read of a tampered frame: %d bytes, %v; want ErrAuthFailed", n, err)
		}
	})

	t.Run("handshake", func(t *testing.T) {
		server, sh := newTestTransport(t, key, 0)
		client, _ := newTestTransport(t, key, 0)
		// A flipped nonce bit: both ends derive different proofs.
		proxy := flipProxy(t, server.Addr().String(), 7, -1)
		if _, err := client.Dial(raft.ServerAddress(proxy), 5*time.Second); !errors.Is(err, ErrAuthFailed) {
			t.Fatalf("dial through a tampering proxy: %v, want ErrAuthFailed", err)
		}
		if r := sh.waitRejections(t, 1); !errors.Is(r[0].err, ErrAuthFailed) {
			t.Errorf("listener's reason: %v", r[0].err)
		}
	})
}

func TestTransportHTTPOverRPC(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	key := transportTestKey("http")
	server, _ := newTestTransport(t, key, 0)
	client, _ := newTestTransport(t, key, 0)

	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/echo", func(w http.ResponseWriter, r *http.Request) {
		// HTTP/1 handlers must read the whole body before writing.
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Write(body)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(server.RPCListener()) }()

	hc := &http.Client{
		Timeout: 20 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				return client.DialRPC(ctx, addr)
			},
		},
	}
	url := "http://" + server.Addr().String() + "/v1/echo"
	for i, size := range []int{0, 1, 5000, 300 << 10} {
		body := bytes.Repeat([]byte{byte('a' + i)}, size)
		resp, err := hc.Post(url, "application/octet-stream", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(got, body) {
			t.Fatalf("request %d: status %d, %d bytes, %v", i, resp.StatusCode, len(got), err)
		}
	}
	// Raft streams are not served by the HTTP server.
	if len(server.raftConns) != 0 {
		t.Error("an rpc conn reached the raft queue")
	}

	hc.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		t.Fatalf("Serve returned %v", err)
	}
	server.Close()
	client.Close()
}

func TestTransportClose(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	key := transportTestKey("close")
	server, _ := newTestTransport(t, key, 0) // default 5 s handshake timeout
	client, _ := newTestTransport(t, key, 0)

	// An accepted conn, a conn left in the queue, a silent client in its
	// handshake, and Accept blocked in both queues.
	c1, s1 := dialPair(t, client, server, transportKindRaft)
	queued, err := client.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer queued.Close()
	pollUntil(t, 10*time.Second, func() bool { return len(server.raftConns) == 1 }, "a queued conn")
	silent, err := net.Dial("tcp", server.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	pollUntil(t, 10*time.Second, func() bool {
		server.mu.Lock()
		defer server.mu.Unlock()
		return len(server.pending) == 1
	}, "a handshake in progress")

	// The RPC listener closes on its own: rpc conns are then dropped,
	// raft keeps working.
	if err := server.RPCListener().Close(); err != nil {
		t.Fatal(err)
	}
	server.RPCListener().Close()
	if _, err := server.RPCListener().Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("rpc Accept after its Close: %v", err)
	}
	rc, err := client.DialRPC(context.Background(), server.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	rc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := rc.Read(make([]byte, 1)); err == nil || isNetTimeout(err) {
		t.Fatalf("read on an rpc conn dropped by a closed rpc listener: %v", err)
	}
	rc.Close()

	// Accept blocked in another goroutine (on the client, whose queue
	// is empty) returns when its transport closes.
	accepted := make(chan error, 1)
	go func() {
		_, err := client.Accept()
		accepted <- err
	}()

	start := time.Now()
	if err := server.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Close took %v: it waited for the silent client's handshake", d)
	}
	// Close closed the conn nobody accepted and aborted the handshake.
	for _, c := range []net.Conn{queued, silent} {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || isNetTimeout(err) {
			t.Errorf("read on a conn Close should have closed: %v", err)
		}
	}
	if err := server.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := server.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v", err)
	}
	if _, err := server.Dial(raft.ServerAddress(client.Addr().String()), time.Second); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Dial after Close: %v", err)
	}
	if _, err := client.Dial(raft.ServerAddress(server.Addr().String()), time.Second); err == nil {
		t.Fatal("dial to a closed transport succeeded")
	}
	// Conns already handed out stay open.
	if _, err := c1.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(s1, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	for _, c := range []net.Conn{c1, s1} {
		c.Close()
		c.Close()
	}
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-accepted; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept blocked during Close returned %v", err)
	}
	client.Close()
}

// recordingFSM records the commands it applies.
type recordingFSM struct {
	mu  sync.Mutex // guards log
	log []string
}

func (f *recordingFSM) Apply(l *raft.Log) any {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log = append(f.log, string(l.Data))
	return len(f.log)
}

func (f *recordingFSM) applied() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.log...)
}

func (f *recordingFSM) Snapshot() (raft.FSMSnapshot, error) { return nil, errors.New("not supported") }
func (f *recordingFSM) Restore(io.ReadCloser) error         { return errors.New("not supported") }

func TestTransportRaftCluster(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	key := transportTestKey("raft")
	type node struct {
		pt   *PeerTransport
		logs *logRecorder
		nt   *raft.NetworkTransport
		fsm  *recordingFSM
		r    *raft.Raft
	}
	nodes := make([]*node, 3)
	var servers []raft.Server
	for i := range nodes {
		pt, logs := newTestTransport(t, key, 0)
		nt := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
			Stream:  pt,
			MaxPool: 3,
			Timeout: 2 * time.Second,
			Logger:  hclog.NewNullLogger(),
		})
		nodes[i] = &node{pt: pt, logs: logs, nt: nt, fsm: &recordingFSM{}}
		servers = append(servers, raft.Server{ID: raft.ServerID(fmt.Sprintf("n%d", i)), Address: nt.LocalAddr()})
	}
	for i, n := range nodes {
		conf := raft.DefaultConfig()
		conf.LocalID = servers[i].ID
		conf.HeartbeatTimeout = 300 * time.Millisecond
		conf.ElectionTimeout = 300 * time.Millisecond
		conf.LeaderLeaseTimeout = 150 * time.Millisecond
		conf.CommitTimeout = 10 * time.Millisecond
		conf.Logger = hclog.NewNullLogger()
		store := raft.NewInmemStore()
		snaps := raft.NewInmemSnapshotStore()
		if err := raft.BootstrapCluster(conf, store, store, snaps, n.nt, raft.Configuration{Servers: servers}); err != nil {
			t.Fatal(err)
		}
		r, err := raft.NewRaft(conf, n.fsm, store, store, snaps, n.nt)
		if err != nil {
			t.Fatal(err)
		}
		n.r = r
	}
	defer func() {
		for _, n := range nodes {
			if err := n.r.Shutdown().Error(); err != nil {
				t.Error(err)
			}
		}
		// Raft's Shutdown closes the transports but not the pooled
		// outbound conns; closing them ends the peers' conn handlers.
		for _, n := range nodes {
			n.nt.CloseStreams()
			n.pt.Close()
		}
	}()

	var leader *raft.Raft
	pollUntil(t, 20*time.Second, func() bool {
		for _, n := range nodes {
			if n.r.State() == raft.Leader {
				leader = n.r
				return true
			}
		}
		return false
	}, "a raft leader")
	if err := leader.Apply([]byte("claim 10.40.0.0/26"), 10*time.Second).Error(); err != nil {
		t.Fatalf("apply: %v", err)
	}
	pollUntil(t, 20*time.Second, func() bool {
		for _, n := range nodes {
			if got := n.fsm.applied(); len(got) != 1 || got[0] != "claim 10.40.0.0/26" {
				return false
			}
		}
		return true
	}, "the command applied on every node")
	for i, n := range nodes {
		if r := n.logs.rejections(); len(r) != 0 {
			t.Errorf("node %d rejected connections: %v", i, r)
		}
	}
}

func TestTransportDeriveKey(t *testing.T) {
	a, b := DeriveKey([]byte("pw")), DeriveKey([]byte("pw"))
	if len(a) != transportKeySize || !bytes.Equal(a, b) {
		t.Fatalf("DeriveKey is not a deterministic 32-byte key: %x %x", a, b)
	}
	if bytes.Equal(a, DeriveKey([]byte("pw2"))) {
		t.Fatal("different passwords give the same key")
	}
	if DeriveKey(nil) != nil || DeriveKey([]byte{}) != nil {
		t.Fatal("empty password should give no key")
	}
	if _, err := NewPeerTransport(TransportConfig{BindAddr: "127.0.0.1:0", Key: []byte("short")}); err == nil {
		t.Fatal("a 5-byte key was accepted")
	}
	if _, err := NewPeerTransport(TransportConfig{BindAddr: "0.0.0.0:0"}); err == nil {
		t.Fatal("an unspecified advertise address was accepted")
	}
}

// sealFrames returns msgs sealed as consecutive frames under key.
func sealFrames(t testing.TB, key []byte, msgs ...[]byte) []byte {
	var buf bytes.Buffer
	w, err := newSealWriter(&buf, key)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		if _, err := w.Write(m); err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

var frameTestKey = bytes.Repeat([]byte{7}, transportKeySize)

func readSealed(t testing.TB, src io.Reader) ([]byte, error) {
	r, err := newSealReader(src, frameTestKey)
	if err != nil {
		t.Fatal(err)
	}
	return io.ReadAll(r)
}

func TestFrameReader(t *testing.T) {
	one := sealFrames(t, frameTestKey, []byte("first"))
	two := sealFrames(t, frameTestKey, []byte("first"), []byte("second"))
	second := two[len(one):]

	for _, tc := range []struct {
		name    string
		in      []byte
		want    string
		wantErr error
	}{
		{"empty", nil, "", nil},
		{"two frames", two, "firstsecond", nil},
		{"replayed frame", append(append([]byte(nil), one...), one...), "first", ErrAuthFailed},
		{"reordered frames", append(append([]byte(nil), second...), one...), "", ErrAuthFailed},
		{"truncated header", two[:len(one)+2], "first", io.ErrUnexpectedEOF},
		{"truncated body", two[:len(two)-1], "first", io.ErrUnexpectedEOF},
		{"oversized", []byte{0, 0x10, 0, 0, 1, 2, 3}, "", ErrAuthFailed},
		{"shorter than a tag", []byte{0, 0, 0, 3, 1, 2, 3}, "", ErrAuthFailed},
		{"other key", sealFrames(t, bytes.Repeat([]byte{8}, 32), []byte("x")), "", ErrAuthFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readSealed(t, bytes.NewReader(tc.in))
			if string(got) != tc.want || !errors.Is(err, tc.wantErr) && (err != nil || tc.wantErr != nil) {
				t.Fatalf("got %q, %v; want %q, %v", got, err, tc.want, tc.wantErr)
			}
		})
	}

	t.Run("large write splits into bounded frames", func(t *testing.T) {
		big := make([]byte, 3*frameMaxPayload+5)
		for i := range big {
			big[i] = byte(i)
		}
		wire := sealFrames(t, frameTestKey, big)
		if want := len(big) + 4*(frameHeaderSize+frameTagSize); len(wire) != want {
			t.Fatalf("%d bytes on the wire, want %d (4 frames)", len(wire), want)
		}
		got, err := readSealed(t, iotest.HalfReader(bytes.NewReader(wire)))
		if err != nil || !bytes.Equal(got, big) {
			t.Fatalf("read %d bytes, %v", len(got), err)
		}
	})

	t.Run("timeout mid-frame loses nothing", func(t *testing.T) {
		wire := sealFrames(t, frameTestKey, []byte("hello"), []byte("world"))
		src := &stutterReader{data: wire, stops: map[int]bool{2: true, 9: true, len(wire) - 3: true}}
		r, err := newSealReader(src, frameTestKey)
		if err != nil {
			t.Fatal(err)
		}
		var got []byte
		timeouts := 0
		for {
			buf := make([]byte, 3)
			n, err := r.Read(buf)
			got = append(got, buf[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil {
				if !isNetTimeout(err) {
					t.Fatal(err)
				}
				timeouts++
			}
		}
		if string(got) != "helloworld" || timeouts != 3 {
			t.Fatalf("read %q with %d timeouts", got, timeouts)
		}
	})
}

// stutterReader returns data one byte per Read and a timeout error
// (once) when it reaches each offset in stops.
type stutterReader struct {
	data  []byte
	off   int
	stops map[int]bool
}

type fakeTimeout struct{}

func (fakeTimeout) Error() string   { return "i/o timeout" }
func (fakeTimeout) Timeout() bool   { return true }
func (fakeTimeout) Temporary() bool { return true }

func (s *stutterReader) Read(p []byte) (int, error) {
	if s.stops[s.off] {
		delete(s.stops, s.off)
		return 0, fakeTimeout{}
	}
	if s.off == len(s.data) {
		return 0, io.EOF
	}
	p[0] = s.data[s.off]
	s.off++
	return 1, nil
}

func FuzzFrameReader(f *testing.F) {
	sealed := sealFrames(f, frameTestKey, []byte("hello"), []byte("world"))
	f.Add(sealed)
	// (Multi-frame writes are covered by TestFrameReader: a 64 KiB seed
	// makes the fuzzer's minimisation crawl.)
	f.Add(sealFrames(f, frameTestKey, []byte("a"), nil, []byte("bc")))
	f.Add([]byte{})
	f.Add([]byte{0, 0, 0})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add(append([]byte{0, 0, 0, frameTagSize}, make([]byte, frameTagSize)...))
	tampered := append([]byte(nil), sealed...)
	tampered[6] ^= 1
	f.Add(tampered)
	f.Add(sealed[:len(sealed)-2])

	f.Fuzz(func(t *testing.T, data []byte) {
		// Arbitrary input never panics, yields no more than it holds
		// and fails only with a clear error.
		got, err := readSealed(t, bytes.NewReader(data))
		if err != nil && !errors.Is(err, ErrAuthFailed) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("unexpected error %v", err)
		}
		if len(got) > len(data) {
			t.Fatalf("%d bytes of plaintext out of %d bytes of input", len(got), len(data))
		}
		// Any input, sealed and read back through short reads, comes
		// back unchanged.
		back, err := readSealed(t, iotest.HalfReader(bytes.NewReader(sealFrames(t, frameTestKey, data))))
		if err != nil || !bytes.Equal(back, data) {
			t.Fatalf("round trip: %d of %d bytes, %v", len(back), len(data), err)
		}
	})
}
