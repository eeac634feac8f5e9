// Package netpoltest holds the traffic checks the policy tests share (nftpol's kernel
// tests, the router's, the chaos tests): an echo server inside a network namespace, a dial
// from inside one, and a line sent and echoed back. Namespaces are named by path, which
// every lab the tests use has (nslab.NS.Path, a CNI netns path).
package netpoltest

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// ListenEcho opens a TCP server on port inside the namespace at nsPath that echoes what it
// reads; it stops with the test.
func ListenEcho(t testing.TB, nsPath string, port int) {
	t.Helper()
	var ln net.Listener
	if err := ns.WithNetNSPath(nsPath, func(ns.NetNS) (err error) {
		ln, err = net.Listen("tcp4", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		t.Fatalf("listen on %d in %s: %v", port, nsPath, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed by the cleanup
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
}

// Dial connects from inside the namespace at nsPath (the socket is made there, so the
// packets leave through its interfaces and meet its policy).
func Dial(nsPath string, to netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) (err error) {
		c, err = net.DialTimeout("tcp4", to.String(), timeout)
		return err
	})
	return c, err
}

// EchoLine sends msg on c and reads it back from an echo server, within timeout.
func EchoLine(c net.Conn, msg string, timeout time.Duration) error {
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echoed %q, sent %q", buf, msg)
	}
	return nil
}
