package mesh

import (
	"errors"
	"fmt"
	"log"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// packetTransport is memberlist's NetTransport with one change: the UDP
// listener reads into one reused 64 KB buffer and hands memberlist a copy of
// only the bytes received. NetTransport allocates a fresh 64 KB buffer per
// datagram (a third of an idle peer's allocations at N=50, where a peer takes
// hundreds of gossip datagrams a second); ours allocates len(datagram),
// typically a few hundred bytes.
//
// Reusing the buffer itself is not safe: memberlist keeps slices of
// Packet.Buf after its packet handler returns (user, alive, suspect and dead
// messages wait in its handoff queue), so every packet gets its own copy.
//
// Costs per datagram: one copy and one allocation of its size, O(1) in N.
type packetTransport struct {
	tcp      *net.TCPListener
	udp      *net.UDPConn
	logger   *log.Logger
	packetCh chan *memberlist.Packet
	streamCh chan net.Conn
	shutdown atomic.Bool
	done     chan struct{} // closed by Shutdown; releases a listener blocked on a send
	wg       sync.WaitGroup
}

var _ memberlist.NodeAwareTransport = (*packetTransport)(nil)

// udpReadBufSize is the largest datagram memberlist sends or accepts (its
// own udpPacketBufSize).
const udpReadBufSize = 65536

// udpRecvBufSize is the socket receive buffer asked for, as NetTransport does
// (2 MB), so bursts of gossip are not dropped by the kernel.
const udpRecvBufSize = 2 * 1024 * 1024

// pickPortTries is how many kernel-picked TCP ports are tried before giving
// up: the same port may already be taken for UDP (memberlist's own
// transport retries likewise).
const pickPortTries = 10

// newPacketTransport binds TCP and UDP on addr:port (port 0: the kernel picks
// the TCP port and UDP takes the same one) and starts both listeners.
func newPacketTransport(addr netip.Addr, port int, logger *log.Logger) (*packetTransport, error) {
	tries := 1
	if port == 0 {
		tries = pickPortTries
	}
	var err error
	for range tries {
		var tcp *net.TCPListener
		var udp *net.UDPConn
		tcp, udp, err = listenPair(addr, port)
		if err == nil {
			return startPacketTransport(tcp, udp, logger), nil
		}
	}
	return nil, err
}

// listenPair binds TCP, then UDP on the same port.
func listenPair(addr netip.Addr, port int) (*net.TCPListener, *net.UDPConn, error) {
	ip := net.IP(addr.AsSlice())
	tcp, err := net.ListenTCP("tcp", &net.TCPAddr{IP: ip, Port: port})
	if err != nil {
		return nil, nil, fmt.Errorf("mesh: tcp listener on %s port %d: %w", addr, port, err)
	}
	if port == 0 {
		port = tcp.Addr().(*net.TCPAddr).Port
	}
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: ip, Port: port})
	if err != nil {
		tcp.Close()
		return nil, nil, fmt.Errorf("mesh: udp listener on %s port %d: %w", addr, port, err)
	}
	return tcp, udp, nil
}

func startPacketTransport(tcp *net.TCPListener, udp *net.UDPConn, logger *log.Logger) *packetTransport {
	// Best effort, halving until the kernel accepts, as NetTransport does.
	for size := udpRecvBufSize; size > 0; size /= 2 {
		if udp.SetReadBuffer(size) == nil {
			break
		}
	}
	t := &packetTransport{
		tcp:      tcp,
		udp:      udp,
		logger:   logger,
		packetCh: make(chan *memberlist.Packet),
		streamCh: make(chan net.Conn),
		done:     make(chan struct{}),
	}
	t.wg.Add(2)
	go t.tcpListen()
	go t.udpListen()
	return t
}

// Port returns the bound port (the one the kernel picked for port 0).
func (t *packetTransport) Port() int { return t.tcp.Addr().(*net.TCPAddr).Port }

// FinalAdvertiseAddr implements memberlist.Transport. The mesh always
// passes an address (Config defaults it); the bound address is the fallback.
func (t *packetTransport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	if ip == "" {
		bound := t.tcp.Addr().(*net.TCPAddr).IP
		if bound.IsUnspecified() {
			return nil, 0, errors.New("mesh: no advertise address and bound to all addresses")
		}
		return bound, t.Port(), nil
	}
	a := net.ParseIP(ip)
	if a == nil {
		return nil, 0, fmt.Errorf("mesh: bad advertise address %q", ip)
	}
	if a4 := a.To4(); a4 != nil {
		a = a4
	}
	return a, port, nil
}

// WriteTo implements memberlist.Transport.
func (t *packetTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

// WriteToAddress implements memberlist.NodeAwareTransport.
func (t *packetTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	ap, err := netip.ParseAddrPort(a.Addr)
	if err != nil { // a host name: resolve as NetTransport does
		ua, rerr := net.ResolveUDPAddr("udp", a.Addr)
		if rerr != nil {
			return time.Time{}, rerr
		}
		_, err = t.udp.WriteTo(b, ua)
		return time.Now(), err
	}
	_, err = t.udp.WriteToUDPAddrPort(b, ap)
	return time.Now(), err
}

// PacketCh implements memberlist.Transport.
func (t *packetTransport) PacketCh() <-chan *memberlist.Packet { return t.packetCh }

// DialTimeout implements memberlist.Transport.
func (t *packetTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

// DialAddressTimeout implements memberlist.NodeAwareTransport.
func (t *packetTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	return d.Dial("tcp", a.Addr)
}

// StreamCh implements memberlist.Transport.
func (t *packetTransport) StreamCh() <-chan net.Conn { return t.streamCh }

// Shutdown implements memberlist.Transport: it closes both sockets and
// waits for the listeners to stop. Nobody may be reading the channels any
// more (memberlist.Create failed), so a listener blocked on a send is
// released by done.
func (t *packetTransport) Shutdown() error {
	if t.shutdown.Swap(true) {
		return nil
	}
	close(t.done)
	t.tcp.Close()
	t.udp.Close()
	t.wg.Wait()
	return nil
}

func (t *packetTransport) tcpListen() {
	defer t.wg.Done()
	const baseDelay, maxDelay = 5 * time.Millisecond, time.Second
	var delay time.Duration
	for {
		c, err := t.tcp.AcceptTCP()
		if err != nil {
			if t.shutdown.Load() {
				return
			}
			// Back off on accept errors (out of descriptors) instead of spinning.
			delay = min(max(2*delay, baseDelay), maxDelay)
			t.logger.Printf("[ERR] memberlist: Error accepting TCP connection: %v", err)
			time.Sleep(delay)
			continue
		}
		delay = 0
		select {
		case t.streamCh <- c:
		case <-t.done:
			c.Close()
			return
		}
	}
}

func (t *packetTransport) udpListen() {
	defer t.wg.Done()
	buf := make([]byte, udpReadBufSize) // reused for every read
	for {
		n, ap, err := t.udp.ReadFromUDPAddrPort(buf)
		ts := time.Now()
		if err != nil {
			if t.shutdown.Load() {
				return
			}
			t.logger.Printf("[ERR] memberlist: Error reading UDP packet: %v", err)
			continue
		}
		if n < 1 {
			t.logger.Printf("[ERR] memberlist: UDP packet too short (%d bytes) from=%s", n, ap)
			continue
		}
		// memberlist keeps the slice (handoff queue): give it its own copy.
		p := &memberlist.Packet{
			Buf:       append([]byte(nil), buf[:n]...),
			From:      net.UDPAddrFromAddrPort(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())),
			Timestamp: ts,
		}
		select {
		case t.packetCh <- p:
		case <-t.done:
			return
		}
	}
}
