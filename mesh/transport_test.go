package mesh

import (
	"bytes"
	"io"
	"log"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

func newTestTransport(t *testing.T) *packetTransport {
	t.Helper()
	pt, err := newPacketTransport(netip.MustParseAddr("127.0.0.1"), 0, log.New(io.Discard, "", 0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pt.Shutdown() })
	return pt
}

func recvPacket(t *testing.T, pt *packetTransport) *memberlist.Packet {
	t.Helper()
	select {
	case p := <-pt.PacketCh():
		return p
	case <-time.After(5 * time.Second):
		t.Fatal("no packet within 5 s")
		return nil
	}
}

// The listener reuses its read buffer, so each packet handed over must own
// its bytes: memberlist keeps them in its handoff queue after the handler.
func TestPacketTransportCopiesEachDatagram(t *testing.T) {
	a, b := newTestTransport(t), newTestTransport(t)
	dst := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(b.Port())).String()
	first := bytes.Repeat([]byte{'a'}, 300)
	second := []byte("bb")
	if _, err := a.WriteTo(first, dst); err != nil {
		t.Fatal(err)
	}
	p1 := recvPacket(t, b)
	if _, err := a.WriteToAddress(second, memberlist.Address{Addr: dst, Name: "b"}); err != nil {
		t.Fatal(err)
	}
	p2 := recvPacket(t, b)
	if !bytes.Equal(p1.Buf, first) {
		t.Fatalf("first packet changed after the second was read: %q", p1.Buf[:8])
	}
	if !bytes.Equal(p2.Buf, second) {
		t.Fatalf("second packet = %q, want %q", p2.Buf, second)
	}
	if cap(p2.Buf) >= udpReadBufSize {
		t.Fatalf("packet buffer has capacity %d: the read buffer escaped", cap(p2.Buf))
	}
	from, ok := p1.From.(*net.UDPAddr)
	if !ok || from.Port != a.Port() || !from.IP.Equal(net.IPv4(127, 0, 0, 1)) {
		t.Fatalf("From = %v, want 127.0.0.1:%d", p1.From, a.Port())
	}
}

func TestPacketTransportStreamsAndAdvertise(t *testing.T) {
	pt := newTestTransport(t)
	ip, port, err := pt.FinalAdvertiseAddr("10.1.2.3", 7946)
	if err != nil || !ip.Equal(net.IPv4(10, 1, 2, 3)) || len(ip) != 4 || port != 7946 {
		t.Fatalf("FinalAdvertiseAddr = %v %d %v", ip, port, err)
	}
	if _, _, err := pt.FinalAdvertiseAddr("not-an-ip", 1); err == nil {
		t.Fatal("a bad advertise address was accepted")
	}
	if ip, port, err := pt.FinalAdvertiseAddr("", 0); err != nil || port != pt.Port() || !ip.Equal(net.IPv4(127, 0, 0, 1)) {
		t.Fatalf("FinalAdvertiseAddr(\"\") = %v %d %v, want the bound address", ip, port, err)
	}
	c, err := pt.DialTimeout(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(pt.Port())).String(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case s := <-pt.StreamCh():
		s.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("no stream within 5 s")
	}
}

// Shutdown returns even when nobody reads the channels (memberlist.Create
// failed after the transport was built) and a datagram is pending.
func TestPacketTransportShutdownWithPendingPacket(t *testing.T) {
	a, b := newTestTransport(t), newTestTransport(t)
	dst := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(b.Port())).String()
	if _, err := a.WriteTo([]byte("x"), dst); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { b.Shutdown(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown blocked")
	}
}

// Link state goes on its own queue, sent fewer times; a gossip packet takes the
// main queue (membership, block table) first and link state in the bytes left.
func TestLinkStateQueueSeparateAndSecond(t *testing.T) {
	m := meshWithQueues(t, "q", 1)
	ls, other := bytes.Repeat([]byte{'l'}, 100), bytes.Repeat([]byte{'d'}, 100)
	if err := m.Broadcast(LinkStateChannelName, ls); err != nil {
		t.Fatal(err)
	}
	if err := m.Broadcast("dns", other); err != nil {
		t.Fatal(err)
	}
	if m.queue.NumQueued() != 1 || m.lsQueue.NumQueued() != 1 {
		t.Fatalf("queued main %d, link state %d; want 1 and 1", m.queue.NumQueued(), m.lsQueue.NumQueued())
	}
	// Room for one message only: the main queue's.
	got := m.getBroadcasts(2, 130)
	if len(got) != 1 || !bytes.HasSuffix(got[0], other) {
		t.Fatalf("a packet with room for one took %d messages, first %q", len(got), got)
	}
	got = m.getBroadcasts(2, 1400)
	if len(got) != 2 || !bytes.HasSuffix(got[1], ls) {
		t.Fatalf("a full packet took %d messages, want main then link state", len(got))
	}
	// Multiplier 1 with one node: one send, then the link-state entry is gone.
	if n := m.lsQueue.NumQueued(); n != 0 {
		t.Fatalf("link state still queued %d times after its one transmit", n)
	}
	cfg, _ := testConfig(t, "q0")
	cfg.LinkStateRetransmitMult = 0
	if _, err := New(cfg); err == nil {
		t.Fatal("a link-state retransmit multiplier of 0 was accepted")
	}
}
