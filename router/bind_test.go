package router

import (
	"net"
	"net/netip"
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
