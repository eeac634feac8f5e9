package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// The application traffic: a UDP echo server in C's container and a prober in A's that
// sends a numbered datagram every interval and records every echo it gets back.
//
// Both sockets are created inside their container namespace on a locked OS thread
// (ns.WithNetNSPath); a socket stays in the namespace it was made in, so afterwards it is
// used from ordinary goroutines without any thread switching.

// listenUDPIn opens a UDP socket on port (0: any) inside the namespace at nsPath.
func listenUDPIn(nsPath string, port int) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var err error
		c, err = net.ListenUDP("udp4", &net.UDPAddr{Port: port})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("udp socket in %s: %w", nsPath, err)
	}
	return c, nil
}

// echoServer sends every datagram back to its sender until Close.
type echoServer struct {
	conn *net.UDPConn
	done chan struct{}
}

func newEchoServer(nsPath string, port int) (*echoServer, error) {
	c, err := listenUDPIn(nsPath, port)
	if err != nil {
		return nil, err
	}
	e := &echoServer{conn: c, done: make(chan struct{})}
	go e.serve()
	return e, nil
}

func (e *echoServer) serve() {
	defer close(e.done)
	buf := make([]byte, 64)
	for {
		n, from, err := e.conn.ReadFromUDPAddrPort(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			continue
		}
		_, _ = e.conn.WriteToUDPAddrPort(buf[:n], from) // a lost echo is what we measure
	}
}

// Close stops the server and waits for its goroutine. Safe to call twice.
func (e *echoServer) Close() {
	e.conn.Close()
	<-e.done
}

// reply is one echo the prober got back.
type reply struct {
	seq        uint64
	sent, recv time.Time // monotonic readings of this process
}

// prober sends datagram seq (8 bytes) and its send time (8 bytes, nanoseconds since base)
// to dst every interval, and records the echoes. The times travel in the datagram, so the
// receiver needs no table of what was sent.
type prober struct {
	conn     *net.UDPConn
	dst      netip.AddrPort
	interval time.Duration
	base     time.Time
	stop     chan struct{}
	wg       sync.WaitGroup

	mu       sync.Mutex // guards the fields below
	replies  []reply    // since the last forget
	sent     uint64
	sendErrs uint64 // writes the kernel refused (no route and the like); not fatal
	closed   bool
}

func newProber(nsPath string, dst netip.AddrPort, interval time.Duration) (*prober, error) {
	c, err := listenUDPIn(nsPath, 0)
	if err != nil {
		return nil, err
	}
	p := &prober{conn: c, dst: dst, interval: interval, base: time.Now(), stop: make(chan struct{})}
	p.wg.Add(2)
	go p.sendLoop()
	go p.recvLoop()
	return p, nil
}

func (p *prober) sendLoop() {
	defer p.wg.Done()
	t := time.NewTicker(p.interval)
	defer t.Stop()
	var buf [16]byte
	for seq := uint64(1); ; seq++ {
		binary.BigEndian.PutUint64(buf[0:8], seq)
		binary.BigEndian.PutUint64(buf[8:16], uint64(time.Since(p.base)))
		_, err := p.conn.WriteToUDPAddrPort(buf[:], p.dst)
		p.mu.Lock()
		p.sent++
		if err != nil {
			p.sendErrs++
		}
		p.mu.Unlock()
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
	}
}

func (p *prober) recvLoop() {
	defer p.wg.Done()
	buf := make([]byte, 64)
	for {
		n, _, err := p.conn.ReadFromUDPAddrPort(buf)
		now := time.Now()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil || n != 16 {
			continue // ICMP errors surface here on some kernels; ignore them
		}
		r := reply{
			seq:  binary.BigEndian.Uint64(buf[0:8]),
			sent: p.base.Add(time.Duration(binary.BigEndian.Uint64(buf[8:16]))),
			recv: now,
		}
		p.mu.Lock()
		p.replies = append(p.replies, r)
		p.mu.Unlock()
	}
}

// firstSentAfter returns the earliest-received echo of a datagram sent at or after t.
func (p *prober) firstSentAfter(t time.Time) (reply, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var best reply
	found := false
	for _, r := range p.replies {
		if !r.sent.Before(t) && (!found || r.recv.Before(best.recv)) {
			best, found = r, true
		}
	}
	return best, found
}

// lastBefore returns the last echo received before t.
func (p *prober) lastBefore(t time.Time) (reply, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var best reply
	found := false
	for _, r := range p.replies {
		if r.recv.Before(t) && (!found || r.recv.After(best.recv)) {
			best, found = r, true
		}
	}
	return best, found
}

// forget drops the recorded echoes (between trials, to keep the scans short).
func (p *prober) forget() {
	p.mu.Lock()
	p.replies = nil
	p.mu.Unlock()
}

// counts returns how many datagrams were sent and how many writes failed.
func (p *prober) counts() (sent, sendErrs uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sent, p.sendErrs
}

// Close stops both loops and waits for them. Safe to call twice.
func (p *prober) Close() {
	p.mu.Lock()
	closed := p.closed
	p.closed = true
	p.mu.Unlock()
	if closed {
		return
	}
	close(p.stop)
	p.conn.Close()
	p.wg.Wait()
}
