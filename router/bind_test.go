package router

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
)

// TestControlPortsBindTheAdvertiseAddress: gossip (tcp and udp), Raft and peer RPC, and
// both probe ports listen on the advertise address only (#12), so containers and other
// networks of the host cannot reach them. The peer advertises 127.0.0.1; had it bound the
// wildcard address, the same ports on 127.0.0.2 would be taken.
func TestControlPortsBindTheAdvertiseAddress(t *testing.T) {
	p := startPeer(t, t.TempDir())
	other := netip.MustParseAddr("127.0.0.2")
	meshPort := p.mesh.Local().Addr.Port()
	raftPort := uint16(p.transport.Addr().(*net.TCPAddr).Port)
	ports := []struct {
		what, network string
		port          uint16
	}{
		{"gossip", "tcp", meshPort},
		{"gossip", "udp", meshPort},
		{"raft", "tcp", raftPort},
		{"probe", "udp", uint16(p.cfg.ProbePort)},
		{"link probe", "udp", uint16(p.cfg.LinkProbePort)},
	}
	for _, pp := range ports {
		// The port is in use on the advertise address...
		on := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), pp.port).String()
		if l, err := listen(pp.network, on); err == nil {
			l.Close()
			t.Errorf("%s %s: nothing listens on %s", pp.what, pp.network, on)
		}
		// ...and free on another address of the host.
		off := netip.AddrPortFrom(other, pp.port).String()
		l, err := listen(pp.network, off)
		if err != nil {
			t.Errorf("%s %s port %d is taken on %s too (bound to every address?): %v", pp.what, pp.network, pp.port, other, err)
			continue
		}
		l.Close()
	}
}

// listen opens a tcp listener or a udp socket; only its Close is used.
func listen(network, addr string) (interface{ Close() error }, error) {
	if network == "udp" {
		return net.ListenPacket("udp", addr)
	}
	return net.Listen("tcp", addr)
}

// TestInsecureWarnsAtEveryStart: --insecure is logged as a warning first thing, even when
// the start then fails.
func TestInsecureWarnsAtEveryStart(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Name, cfg.Insecure = "p", true
	cfg.DataDir = "/dev/null/weft" // cannot be made: Run fails right after the warning
	var buf lockedBuffer
	cfg.Logger = slog.New(slog.NewTextHandler(&buf, nil))
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Run(context.Background()); err == nil {
		t.Fatal("Run with a data dir under /dev/null succeeded")
	}
	if out := buf.String(); !strings.Contains(out, "level=WARN") || !strings.Contains(out, "running --insecure") ||
		!strings.Contains(out, "anyone who reaches") {
		t.Fatalf("no --insecure warning in the log:\n%s", out)
	}
}

type lockedBuffer struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
