package mesh

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/weftnet/weft/datapath/nslab"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// TestMain fails the run when mesh or memberlist goroutines outlive the
// tests (every test closes its meshes), in the spirit of goleak.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if leaked := waitNoGoroutines(10 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "leaked goroutines after Close:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// waitNoGoroutines polls until no goroutine runs code of this package's
// Mesh or of memberlist, and returns the stacks of the survivors otherwise.
func waitNoGoroutines(timeout time.Duration) string {
	deadline := time.Now().Add(timeout)
	for {
		leaked := meshGoroutines()
		if leaked == "" || time.Now().After(deadline) {
			return leaked
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func meshGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "hashicorp/memberlist.") || strings.Contains(g, "weft/mesh.(*Mesh)") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}

// logBuffer collects a mesh's log lines for assertions. Tests never log
// through t.Log from mesh goroutines: memberlist's goroutines may still log
// just after Close returns, and t.Log after a test ends panics.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *logBuffer) contains(s string) bool { return strings.Contains(l.String(), s) }

// testConfig is a config for loopback with fast timings.
func testConfig(t *testing.T, name string) (Config, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	cfg := DefaultConfig()
	cfg.Name = name
	cfg.BindAddr = netip.MustParseAddr("127.0.0.1")
	cfg.BindPort = 0
	cfg.GossipInterval = 20 * time.Millisecond
	cfg.ProbeInterval = 100 * time.Millisecond
	cfg.ProbeTimeout = 50 * time.Millisecond
	cfg.PushPullInterval = 500 * time.Millisecond
	cfg.JoinBackoffMin = 20 * time.Millisecond
	cfg.JoinBackoffMax = 200 * time.Millisecond
	cfg.RejoinInterval = time.Second
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", name)
	cfg.Registerer = prometheus.NewRegistry()
	cfg.Identity = testIdentity(name)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs of %s:\n%s", name, logs.String())
		}
	})
	return cfg, logs
}

// startMesh creates and starts a mesh that the test closes at its end.
func startMesh(t *testing.T, cfg Config) *Mesh {
	t.Helper()
	m, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%s): %v", cfg.Name, err)
	}
	if err := m.Start(context.Background()); err != nil {
		t.Fatalf("Start(%s): %v", cfg.Name, err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// addr is the mesh's gossip address as a seed string.
func addr(m *Mesh) string { return m.Local().Addr.String() }

// waitFor polls cond until it returns "" (success) or the deadline passes, then fails with
// cond's last complaint. The loop is weft's one poll loop, nslab.Poll.
func waitFor(t *testing.T, timeout time.Duration, cond func() string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	err := nslab.Poll(ctx, 10*time.Millisecond, func() error {
		if msg := cond(); msg != "" {
			return errors.New(msg)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("timed out after %v: %v", timeout, err)
	}
}

// peerState returns name's state as seen by m ("" if unknown).
func peerState(m *Mesh, name string) string {
	p, ok := m.Peer(name)
	if !ok {
		return ""
	}
	return p.State.String()
}

// allSee waits until every mesh sees every name in the given state.
func allSee(t *testing.T, timeout time.Duration, meshes []*Mesh, state State, names ...string) {
	t.Helper()
	waitFor(t, timeout, func() string {
		for _, m := range meshes {
			for _, n := range names {
				if got := peerState(m, n); got != state.String() {
					return fmt.Sprintf("%s sees %s as %q, want %q", m.cfg.Name, n, got, state)
				}
			}
		}
		return ""
	})
}

// eventLog records a subscription's events for later assertions.
type eventLog struct {
	mu     sync.Mutex
	events []Event
	done   chan struct{}
}

func subscribe(t *testing.T, m *Mesh) *eventLog {
	ch, cancel := m.Subscribe()
	l := &eventLog{done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for ev := range ch {
			l.mu.Lock()
			l.events = append(l.events, ev)
			l.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-l.done
	})
	return l
}

// types returns the event types seen for one peer, in order.
func (l *eventLog) types(peer string) []EventType {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []EventType
	for _, ev := range l.events {
		if ev.Peer.Name == peer {
			out = append(out, ev.Type)
		}
	}
	return out
}

// freePort returns a port that was free for tcp and udp on 127.0.0.1.
func freePort(t *testing.T) int {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
		l.Close()
		if err == nil {
			u.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

// metricValue reads a counter's or gauge's current value.
func metricValue(m prometheus.Metric) float64 {
	var pb dto.Metric
	if err := m.Write(&pb); err != nil {
		panic(err)
	}
	switch {
	case pb.Counter != nil:
		return pb.Counter.GetValue()
	case pb.Gauge != nil:
		return pb.Gauge.GetValue()
	}
	panic("not a counter or gauge")
}

// meshWithQueues is a mesh alone with the link-state channel and one other ("dns")
// registered, its link-state retransmit multiplier set: for the queue tests.
func meshWithQueues(t *testing.T, name string, lsMult int) *Mesh {
	t.Helper()
	cfg, _ := testConfig(t, name)
	cfg.LinkStateRetransmitMult = lsMult
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	nop := rawMeta("")
	for _, ch := range []string{LinkStateChannelName, "dns"} {
		if err := m.RegisterChannel(ch, nop); err != nil {
			t.Fatal(err)
		}
	}
	return m
}
