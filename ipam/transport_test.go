package ipam

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/weftnet/weft/datapath/nslab"
	"github.com/weftnet/weft/mesh/identity"
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

func transportTestKey(s string) []byte { return DeriveKey([]byte("test cluster key " + s)) }

func newTestTransport(t *testing.T, key []byte, hsTimeout time.Duration) (*PeerTransport, *logRecorder) {
	t.Helper()
	return newTestTransportCfg(t, TransportConfig{Key: key, handshakeTimeout: hsTimeout})
}

// newTestTransportCfg starts a transport on 127.0.0.1 (unless cfg says
// where) that logs into the returned recorder.
func newTestTransportCfg(t *testing.T, cfg TransportConfig) (*PeerTransport, *logRecorder) {
	t.Helper()
	h := &logRecorder{}
	if cfg.BindAddr == "" {
		cfg.BindAddr = "127.0.0.1:0"
	}
	cfg.Logger = slog.New(h)
	pt, err := NewPeerTransport(cfg)
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
		{"tls raft", transportTestKey("a"), transportKindRaft},
		{"tls rpc", transportTestKey("a"), transportKindRPC},
		{"insecure raft", nil, transportKindRaft},
		{"insecure rpc", nil, transportKindRPC},
	} {
		t.Run(tc.name, func(t *testing.T) {
			server, sh := newTestTransportCfg(t, TransportConfig{Key: tc.key, Name: "server"})
			client, ch := newTestTransportCfg(t, TransportConfig{Key: tc.key, Name: "client"})
			c, s := dialPair(t, client, server, tc.kind)
			if tc, ok := c.(*tls.Conn); ok && tc.ConnectionState().Version != tls.VersionTLS13 {
				t.Errorf("TLS version %x, want 1.3", tc.ConnectionState().Version)
			}
			// Each end knows who is calling: the name in the other's certificate.
			for conn, want := range map[net.Conn]string{s: "client", c: "server"} {
				got, ok := ConnPeerName(conn)
				if ok != (tc.key != nil) || (ok && got != want) {
					t.Errorf("ConnPeerName = %q, %v; want %q with a key, nothing without", got, ok, want)
				}
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
	// A read timeout is not fatal: the conn keeps working (Raft relies on it).
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
}

// refusedCount is the transport's refusal counter for one reason.
func refusedCount(pt *PeerTransport, reason string) float64 {
	return testutil.ToFloat64(pt.refused.WithLabelValues(reason))
}

func TestTransportWrongKey(t *testing.T) {
	server, sh := newTestTransport(t, transportTestKey("right"), 0)
	client, ch := newTestTransport(t, transportTestKey("wrong"), 0)

	_, err := client.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second)
	if !errors.Is(err, ErrAuthFailed) || !strings.Contains(err.Error(), "wrong cluster key?") {
		t.Fatalf("raft dial with the wrong key: %v, want ErrAuthFailed saying wrong cluster key", err)
	}
	_, err = client.DialRPC(context.Background(), server.Addr().String())
	if !errors.Is(err, ErrAuthFailed) {
		t.Fatalf("rpc dial with the wrong key: %v, want ErrAuthFailed", err)
	}
	for _, r := range sh.waitRejections(t, 2) {
		if !errors.Is(r.err, ErrAuthFailed) || !strings.Contains(r.err.Error(), "wrong cluster key?") {
			t.Errorf("listener's reason: %v", r.err)
		}
		if !strings.HasPrefix(r.remote, "127.0.0.1:") {
			t.Errorf("warning names remote %q", r.remote)
		}
	}
	if n := refusedCount(server, refusedAuth); n != 2 {
		t.Errorf("weft_transport_refused_total{reason=auth} = %v, want 2", n)
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

// TestTransportKeyOnOneSide checks that a peer with a cluster key and an
// insecure peer never talk, whichever dials.
func TestTransportKeyOnOneSide(t *testing.T) {
	t.Run("tls dialer", func(t *testing.T) {
		server, sh := newTestTransport(t, nil, 0)
		client, _ := newTestTransport(t, transportTestKey("x"), 0)
		_, err := client.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second)
		if !errors.Is(err, ErrAuthFailed) {
			t.Fatalf("dial: %v, want ErrAuthFailed", err)
		}
		if r := sh.waitRejections(t, 1); !errors.Is(r[0].err, ErrAuthFailed) || !strings.Contains(r[0].err.Error(), "runs --insecure") {
			t.Errorf("listener's reason: %v", r[0].err)
		}
		if n := refusedCount(server, refusedMode); n != 1 {
			t.Errorf("refused{mode} = %v, want 1", n)
		}
	})
	t.Run("insecure dialer", func(t *testing.T) {
		server, sh := newTestTransport(t, transportTestKey("x"), 0)
		client, _ := newTestTransport(t, nil, 0)
		// Insecure mode has no answer from the listener, so the dial
		// succeeds and the conn is closed at once.
		c, err := client.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if r := sh.waitRejections(t, 1); !errors.Is(r[0].err, ErrAuthFailed) || !strings.Contains(r[0].err.Error(), "dialer runs --insecure") {
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

func isNetTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// rawDial opens a TCP connection from local (nil: any) to addr and sends send.
func rawDial(t *testing.T, local *net.TCPAddr, addr net.Addr, send []byte) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if local != nil {
		d.LocalAddr = local
	}
	c, err := d.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if len(send) > 0 {
		if _, err := c.Write(send); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// TestTransportBadClients checks that garbage, an old peer, a TLS client
// without the key and a silent client neither block a good client nor hold
// a goroutine past the handshake timeout, and that each is refused with a
// reason.
func TestTransportBadClients(t *testing.T) {
	key := transportTestKey("bad clients")
	// A TLS client without a certificate: ClientHello and nothing more.
	strangerHello := func(t *testing.T, addr net.Addr) net.Conn {
		raw := rawDial(t, nil, addr, nil)
		tc := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
		tc.SetDeadline(time.Now().Add(10 * time.Second))
		go tc.Handshake() // fails when the server refuses; the conn is closed in cleanup
		return raw
	}

	t.Run("do not block a good client", func(t *testing.T) {
		// A long timeout: the good client can only succeed by not
		// waiting for the bad ones.
		server, _ := newTestTransport(t, key, time.Minute)
		rawDial(t, nil, server.Addr(), nil)                        // silent
		rawDial(t, nil, server.Addr(), []byte{tlsHandshakeRecord}) // a TLS record byte, then nothing
		rawDial(t, nil, server.Addr(), []byte{0x16, 3, 1, 0, 200}) // a record header, no body
		rawDial(t, nil, server.Addr(), []byte("GET / HTTP/1.1"))   // something else entirely
		pollUntil(t, 10*time.Second, func() bool {
			server.mu.Lock()
			defer server.mu.Unlock()
			return len(server.pending) == 3 // all but the garbage, refused at once
		}, "three handshakes in progress")
		client, _ := newTestTransport(t, key, 0)
		c, s := dialPair(t, client, server, transportKindRaft)
		exchangeBoth(t, c, s)
	})

	t.Run("refused with reasons", func(t *testing.T) {
		server, sh := newTestTransport(t, key, 300*time.Millisecond)
		// The audit's proof of concept (#12): an HTTP request to the rpc side
		// without any credential, as an insecure dialer would send it.
		poc := append([]byte{transportKindRPC}, "POST /v1/raft/apply HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"...)
		conns := []net.Conn{
			rawDial(t, nil, server.Addr(), []byte{0xEE, 1, 2, 3, 4, 5}),
			rawDial(t, nil, server.Addr(), []byte{transportV1Plain, 'H'}),
			rawDial(t, nil, server.Addr(), nil),
			strangerHello(t, server.Addr()),
			rawDial(t, nil, server.Addr(), poc),
		}
		rejs := sh.waitRejections(t, len(conns))
		var reasons []string
		for _, r := range rejs {
			if !errors.Is(r.err, ErrAuthFailed) {
				t.Errorf("reason %v does not wrap ErrAuthFailed", r.err)
			}
			reasons = append(reasons, r.err.Error())
		}
		all := strings.Join(reasons, "\n")
		for _, want := range []string{"first byte 0xee: not a weft peer", "older version", "i/o timeout", "certificate", "dialer runs --insecure"} {
			if !strings.Contains(all, want) {
				t.Errorf("no rejection mentions %q:\n%s", want, all)
			}
		}
		for reason, want := range map[string]float64{refusedProtocol: 2, refusedTimeout: 1, refusedAuth: 1, refusedMode: 1} {
			if n := refusedCount(server, reason); n != want {
				t.Errorf("refused{%s} = %v, want %v", reason, n, want)
			}
		}
		// The server closed each of them, answering nothing.
		for _, c := range conns {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if got, err := io.ReadAll(c); isNetTimeout(err) {
				t.Errorf("server did not close %s", c.LocalAddr())
			} else if c == conns[len(conns)-1] && len(got) != 0 {
				t.Errorf("the unauthenticated request got an answer: %q", got)
			}
		}
		if len(server.raftConns) != 0 || len(server.rpc.conns) != 0 {
			t.Fatal("a bad client reached an accept queue")
		}
	})
}

// TestTransportSilentFlood: 256 silent connections from one address (the
// attack of #12, which used to lock every member out for 5 s at a time)
// fill only that address's share of handshakes; a member from another
// address connects at once, and the refusals are counted by reason.
func TestTransportSilentFlood(t *testing.T) {
	key := transportTestKey("flood")
	// A long handshake timeout, so the flood holds its slots for the
	// whole test: the member can only get through past it.
	server, sh := newTestTransportCfg(t, TransportConfig{Key: key, handshakeTimeout: time.Minute, MaxHandshakes: 64})
	attacker := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}
	for range 256 {
		rawDial(t, attacker, server.Addr(), nil)
	}
	pollUntil(t, 10*time.Second, func() bool {
		return refusedCount(server, refusedLimitSource) == 256-DefaultMaxHandshakesPerSource
	}, "the flood beyond the per-source limit refused")
	server.mu.Lock()
	held := len(server.pending)
	server.mu.Unlock()
	if held != DefaultMaxHandshakesPerSource {
		t.Fatalf("%d handshakes in progress, want the per-source limit %d", held, DefaultMaxHandshakesPerSource)
	}
	if r := sh.rejections(); len(r) == 0 || len(r) > 2 {
		t.Errorf("%d warnings for the flood, want 1 or 2 (one a second; the counter has the rest)", len(r))
	}

	member, _ := newTestTransport(t, key, 0)
	start := time.Now()
	c, s := dialPair(t, member, server, transportKindRaft)
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("the member waited %v behind the flood", d)
	} else {
		t.Logf("the member connected in %v beside %d silent connections", d, held)
	}
	exchangeBoth(t, c, s)

	// The total limit holds too: many sources, each under its own limit.
	for i := range 8 {
		src := &net.TCPAddr{IP: net.IPv4(127, 0, 1, byte(i+1))}
		for range DefaultMaxHandshakesPerSource {
			rawDial(t, src, server.Addr(), nil)
		}
	}
	pollUntil(t, 10*time.Second, func() bool { return refusedCount(server, refusedLimitTotal) == 8 },
		"the connections beyond the total limit refused")
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

// TestTransportTamper checks that a byte flipped on the wire after the
// handshake fails the reader (TLS record authentication) instead of
// delivering altered data.
func TestTransportTamper(t *testing.T) {
	key := transportTestKey("tamper")
	server, _ := newTestTransport(t, key, 0)
	client, _ := newTestTransport(t, key, 0)
	// The handshake is a few kB; 64 kB in, the flip hits application data.
	proxy := flipProxy(t, server.Addr().String(), 64<<10, -1)
	c, err := client.Dial(raft.ServerAddress(proxy), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s := acceptWithin(t, server.Accept, 10*time.Second)
	msg := bytes.Repeat([]byte("claim block 10.40.0.64/26 for peer b\n"), 4000)
	go c.Write(msg)
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(s)
	if err == nil || isNetTimeout(err) {
		t.Fatalf("read of a tampered stream: %d bytes, %v; want a TLS error", len(got), err)
	}
	if !bytes.HasPrefix(msg, got) {
		t.Fatal("altered data was delivered")
	}
}

func TestTransportHTTPOverRPC(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	key := transportTestKey("http")
	server, _ := newTestTransport(t, key, 0)
	client, _ := newTestTransportCfg(t, TransportConfig{Key: key, Name: "caller"})

	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/echo", func(w http.ResponseWriter, r *http.Request) {
		if name, ok := RequestPeerName(r); !ok || name != "caller" {
			http.Error(w, fmt.Sprintf("caller %q, %v", name, ok), http.StatusForbidden)
			return
		}
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
	a, b := DeriveKey([]byte("k")), DeriveKey([]byte("k"))
	if len(a) != transportKeySize || !bytes.Equal(a, b) {
		t.Fatalf("DeriveKey is not a deterministic 32-byte key: %x %x", a, b)
	}
	if bytes.Equal(a, DeriveKey([]byte("k2"))) {
		t.Fatal("different cluster keys give the same key")
	}
	if DeriveKey(nil) != nil || DeriveKey([]byte{}) != nil {
		t.Fatal("an empty cluster key should give no key")
	}
	if _, err := NewPeerTransport(TransportConfig{BindAddr: "127.0.0.1:0", Key: []byte("short")}); err == nil {
		t.Fatal("a 5-byte key was accepted")
	}
	if _, err := NewPeerTransport(TransportConfig{BindAddr: "0.0.0.0:0"}); err == nil {
		t.Fatal("an unspecified advertise address was accepted")
	}
	if _, err := NewPeerTransport(TransportConfig{BindAddr: "127.0.0.1:0", MaxHandshakesPerSource: -1}); err == nil {
		t.Fatal("a negative limit was accepted")
	}
	// Every member derives the same CA certificate, byte for byte.
	c1, err := newTransportCreds(a, "one", nil)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := newTransportCreds(b, "two", nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(c1.ca.Raw, c2.ca.Raw) {
		t.Error("two members derived different CA certificates from one key")
	}
	// The refusal counter goes on the registry passed in.
	reg := prometheus.NewRegistry()
	pt, _ := newTestTransportCfg(t, TransportConfig{Key: a, Registerer: reg})
	pt.refused.WithLabelValues(refusedAuth).Inc()
	if n, err := testutil.GatherAndCount(reg, "weft_transport_refused_total"); err != nil || n != 8 {
		t.Errorf("weft_transport_refused_total: %d series, %v; want one per reason (8)", n, err)
	}
}

// TestTransportLeafRenewal: a leaf is reused until half its life, then
// reissued, and a peer whose clock is far ahead is refused with a reason
// that names the clocks.
func TestTransportLeafRenewal(t *testing.T) {
	key := transportTestKey("renew")
	creds, err := newTransportCreds(key, "p", nil)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	creds.now = func() time.Time { return now }
	first, err := creds.certificate()
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(leafLifetime/2 - time.Minute)
	if again, _ := creds.certificate(); again != first {
		t.Error("the leaf was reissued before half its life")
	}
	now = now.Add(2 * time.Minute)
	renewed, _ := creds.certificate()
	if renewed == first {
		t.Fatal("the leaf was not reissued past half its life")
	}
	leaf, err := x509.ParseCertificate(renewed.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: creds.pool, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("renewed leaf does not verify: %v", err)
	}

	server, sh := newTestTransport(t, key, 0)
	ahead, _ := newTestTransport(t, key, 0)
	ahead.creds.now = func() time.Time { return time.Now().Add(3 * time.Hour) }
	if _, err := ahead.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second); err == nil {
		// TLS 1.3: the client's handshake may end before the server has
		// checked the client's certificate; the refusal is on the server.
		t.Log("dial returned before the server's verdict")
	}
	r := sh.waitRejections(t, 1)
	if !strings.Contains(r[0].err.Error(), "clocks more than") {
		t.Errorf("refusal of a peer 3h ahead: %v, want a hint at the clocks", r[0].err)
	}
}

// FuzzTransportHandshake feeds arbitrary bytes to the server side of the
// handshake, keyed and insecure: it must neither panic nor hang, and it
// must accept nothing but a plain kind byte in insecure mode (nobody
// without the key can produce a certificate).
func FuzzTransportHandshake(f *testing.F) {
	f.Add([]byte{transportKindRaft, 'x'})
	f.Add([]byte{transportKindRPC})
	f.Add([]byte{tlsHandshakeRecord, 3, 1, 0, 5, 1, 0, 0, 1, 0})
	f.Add([]byte{transportV1Sealed, 0, 0})
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	// A real ClientHello without a certificate, recorded from crypto/tls.
	f.Add(recordClientHello(f))
	keyed := &PeerTransport{log: slog.New(slog.DiscardHandler)}
	creds, err := newTransportCreds(transportTestKey("fuzz"), "fuzz", nil)
	if err != nil {
		f.Fatal(err)
	}
	keyed.creds = creds
	insecure := &PeerTransport{log: slog.New(slog.DiscardHandler)}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, pt := range []*PeerTransport{keyed, insecure} {
			conn, kind, err := pt.handshakeInbound(&replayConn{r: bytes.NewReader(data)})
			switch {
			case err != nil && !errors.Is(err, ErrAuthFailed):
				t.Fatalf("error %v does not wrap ErrAuthFailed", err)
			case err == nil && pt.creds != nil:
				t.Fatalf("keyed server accepted %x", data)
			case err == nil && (conn == nil || kind != data[0] || (kind != transportKindRaft && kind != transportKindRPC)):
				t.Fatalf("insecure server accepted %x as kind %x", data, kind)
			}
		}
	})
}

// replayConn is a net.Conn whose reads return a fixed input, then io.EOF,
// and whose writes vanish: the far end of a handshake, without a socket.
type replayConn struct {
	net.Conn // nil: only the methods below are called
	r        *bytes.Reader
}

func (c *replayConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *replayConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *replayConn) Close() error                     { return nil }
func (c *replayConn) SetDeadline(time.Time) error      { return nil }
func (c *replayConn) SetReadDeadline(time.Time) error  { return nil }
func (c *replayConn) SetWriteDeadline(time.Time) error { return nil }
func (c *replayConn) RemoteAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 1} }
func (c *replayConn) LocalAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 6785}
}

// recordClientHello returns the first flight of a TLS 1.3 client.
func recordClientHello(tb testing.TB) []byte {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go tls.Client(a, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}).Handshake()
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4096)
	n, err := b.Read(buf)
	if err != nil {
		tb.Fatal(err)
	}
	return buf[:n]
}

// BenchmarkTransportDial is one connection set up: TCP connect, TLS 1.3 handshake with
// certificates both ways (or the kind byte alone, insecure), accept.
func BenchmarkTransportDial(b *testing.B) {
	for _, bc := range []struct {
		name string
		key  []byte
	}{{"tls", transportTestKey("bench")}, {"insecure", nil}} {
		b.Run(bc.name, func(b *testing.B) {
			server, err := NewPeerTransport(TransportConfig{BindAddr: "127.0.0.1:0", Key: bc.key})
			if err != nil {
				b.Fatal(err)
			}
			defer server.Close()
			client, err := NewPeerTransport(TransportConfig{BindAddr: "127.0.0.1:0", Key: bc.key})
			if err != nil {
				b.Fatal(err)
			}
			defer client.Close()
			for b.Loop() {
				c, err := client.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second)
				if err != nil {
					b.Fatal(err)
				}
				s, err := server.Accept()
				if err != nil {
					b.Fatal(err)
				}
				c.Close()
				s.Close()
			}
		})
	}
}

// pinTable is a KeyLookup over a fixed map, as Mesh.PublicKey is over the mesh's pins.
type pinTable map[string]ed25519.PublicKey

func (p pinTable) lookup(name string) (ed25519.PublicKey, bool) {
	k, ok := p[name]
	return k, ok
}

// TestTransportIdentity checks that with Keys set a connection goes through only when each
// end's certificate key is the key pinned for its name, and is refused (counted as
// "identity") otherwise: a key holder with another identity, or a name nobody pinned.
func TestTransportIdentity(t *testing.T) {
	key := transportTestKey("identity")
	serverID, clientID, rogueID := identity.Generate(), identity.Generate(), identity.Generate()
	pins := pinTable{"server": serverID.Public(), "client": clientID.Public()}
	server, sh := newTestTransportCfg(t, TransportConfig{Key: key, Name: "server", Identity: serverID.Signer(), Keys: pins.lookup})

	t.Run("pinned keys", func(t *testing.T) {
		client, _ := newTestTransportCfg(t, TransportConfig{Key: key, Name: "client", Identity: clientID.Signer(), Keys: pins.lookup})
		for _, kind := range []byte{transportKindRaft, transportKindRPC} {
			c, s := dialPair(t, client, server, kind)
			for conn, want := range map[net.Conn]string{s: "client", c: "server"} {
				if got, ok := ConnPeerName(conn); !ok || got != want {
					t.Errorf("ConnPeerName = %q, %v; want %q", got, ok, want)
				}
			}
			exchangeBoth(t, c, s)
		}
	})

	// Each case dials the server with a client whose certificate the server must refuse.
	for _, tc := range []struct {
		name string
		cfg  TransportConfig
	}{
		// Holds the cluster key, claims "client", signs with its own identity.
		{"stolen name", TransportConfig{Key: key, Name: "client", Identity: rogueID.Signer()}},
		// Holds the cluster key, names itself something the mesh never pinned.
		{"unknown name", TransportConfig{Key: key, Name: "stranger", Identity: rogueID.Signer()}},
		// No identity at all: a fresh key, which no pin can match.
		{"fresh key", TransportConfig{Key: key, Name: "client"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := refusedCount(server, refusedIdentity)
			rejected := len(sh.rejections())
			client, _ := newTestTransportCfg(t, tc.cfg)
			c, err := client.Dial(raft.ServerAddress(server.Addr().String()), 5*time.Second)
			if err == nil {
				// TLS 1.3: the client's handshake ends before the server checks its
				// certificate; the refusal shows as the connection closing.
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, err = c.Read(make([]byte, 1))
				c.Close()
				if err == nil || isNetTimeout(err) {
					t.Fatalf("a %s connection stayed open: %v", tc.name, err)
				}
			}
			pollUntil(t, 5*time.Second, func() bool { return refusedCount(server, refusedIdentity) == before+1 },
				"weft_transport_refused_total{reason=identity} to count the refusal")
			r := sh.waitRejections(t, rejected+1)
			if last := r[len(r)-1]; !errors.Is(last.err, errIdentity) {
				t.Errorf("logged reason %v, want the identity error", last.err)
			}
			if len(server.raftConns) != 0 {
				t.Fatal("a refused connection reached the accept queue")
			}
		})
	}

	// The dialer checks the server too: a server under a pinned name with another key.
	t.Run("server with another key", func(t *testing.T) {
		rogue, _ := newTestTransportCfg(t, TransportConfig{Key: key, Name: "server", Identity: rogueID.Signer()})
		client, _ := newTestTransportCfg(t, TransportConfig{Key: key, Name: "client", Identity: clientID.Signer(), Keys: pins.lookup})
		_, err := client.DialRPC(context.Background(), rogue.Addr().String())
		if !errors.Is(err, errIdentity) || !errors.Is(err, ErrAuthFailed) {
			t.Fatalf("dial to a server with a key not pinned for its name: %v, want the identity error", err)
		}
		if n := refusedCount(client, refusedIdentity); n != 1 {
			t.Errorf("dialer's weft_transport_refused_total{reason=identity} = %v, want 1", n)
		}
	})
}

func TestTransportIdentityKeyType(t *testing.T) {
	_, err := NewPeerTransport(TransportConfig{BindAddr: "127.0.0.1:0", Key: transportTestKey("x"), Identity: notEd25519{}})
	if err == nil {
		t.Fatal("a transport took a non-ed25519 identity key")
	}
}

// notEd25519 is a crypto.Signer whose key is of another kind.
type notEd25519 struct{}

func (notEd25519) Public() crypto.PublicKey { return "rsa?" }
func (notEd25519) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, errors.New("no")
}
