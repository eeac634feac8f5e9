package main

// The two WireGuard cases, weft's driver and a standalone wireguard-go tunnel, each run as
// one child process per host.
//
// Why children: wireguard-go opens sockets and asks the TUN's MTU from goroutines of its
// own, on whatever thread they land (see datapath/wireguard/netns.go). In a process whose
// threads sit in several namespaces, weft's driver pins those calls to the host namespace
// with wrappers (nsBind, nsTUN); a standalone tunnel has no such wrappers. Running each
// end as `ip netns exec <host> <this binary> -wg-child …` puts the whole process in the
// host namespace, so both cases run as they would on a real host: weft's driver finds
// every thread in its namespace and uses wireguard-go's plain bind and TUN, exactly like
// the standalone tunnel. Both children are this very binary, so they link the same
// wireguard-go (the version in go.mod, printed in the header).
//
// Protocol, one JSON childMsg per line. child → bench on stdout: a hello after the device
// is up (public key, port, interface); bench → child on stdin: the other host (key, port,
// underlay address, block); child → bench: an ack with the interface's MTU or an error.
// The child then serves until its stdin ends (the bench closes it, or dies) or it gets
// SIGINT/SIGTERM, and removes what it made. Pdeathsig (SIGKILL) is a second line: it
// fires when the thread that started the child exits, so the child is started from a
// goroutine locked to its thread for as long as the child lives (any other thread may be
// scrapped meanwhile: ns.Do leaves its threads locked, and Go ends such a thread with its
// goroutine, which killed the children midway through the bench); the thread then dies
// only with the bench. The bench kills by pid any child that has not exited 5 s after its
// stdin was closed.

import (
	"bufio"
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/nslab"
	"github.com/weftnet/weft/datapath/wireguard"
)

// Child modes (the value of -wg-child).
const (
	modeWeft       = "weft"
	modeStandalone = "standalone"

	standaloneDev = "wgsa0"
	childTimeout  = 30 * time.Second // for a child's hello and ack
)

// childMsg is one line of the protocol (see above); unused fields stay empty.
type childMsg struct {
	PublicKey []byte         `json:"public_key,omitempty"`
	Port      uint16         `json:"port,omitempty"`
	Underlay  netip.Addr     `json:"underlay,omitzero"`
	Blocks    []netip.Prefix `json:"blocks,omitempty"`
	Dev       string         `json:"dev,omitempty"`
	MTU       int            `json:"mtu,omitempty"`
	Error     string         `json:"error,omitempty"`
}

// childConfig is what a child is told on its command line.
type childConfig struct {
	mode     string
	name     string     // weft: the peer name (derives the interface); standalone: unused
	underlay netip.Addr // weft: the host's underlay address (gives the MTU)
	port     int
	mtu      int    // standalone: the TUN's MTU
	keyFile  string // weft: the private key file
	verbose  bool
}

// tunnel is one end, as a child drives it. Its methods are called from one goroutine.
type tunnel interface {
	hello() childMsg
	setPeer(p childMsg) error
	Close() error
}

// runChild is the child's main: bring the tunnel up, say hello, take the peer, ack, serve
// until stdin ends or a signal comes.
func runChild(cfg childConfig) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	out := json.NewEncoder(os.Stdout)
	var (
		t   tunnel
		err error
	)
	switch cfg.mode {
	case modeWeft:
		t, err = newWeftTunnel(ctx, cfg)
	case modeStandalone:
		t, err = newStandaloneTunnel(cfg)
	default:
		err = fmt.Errorf("unknown -wg-child mode %q", cfg.mode)
	}
	if err != nil {
		out.Encode(childMsg{Error: err.Error()})
		return err
	}
	defer t.Close()
	if err := out.Encode(t.hello()); err != nil {
		return err
	}
	lines := make(chan []byte)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			lines <- append([]byte(nil), sc.Bytes()...)
		}
	}()
	for configured := false; ; {
		select {
		case <-ctx.Done():
			return nil
		case line, ok := <-lines:
			if !ok {
				return nil // the bench closed stdin, or died
			}
			if configured {
				continue
			}
			configured = true
			var p childMsg
			ack := childMsg{}
			if err := json.Unmarshal(line, &p); err != nil {
				ack.Error = fmt.Sprintf("bad peer message: %v", err)
			} else if err := t.setPeer(p); err != nil {
				ack.Error = err.Error()
			} else {
				ack.Dev = t.hello().Dev
				if ifi, err := net.InterfaceByName(ack.Dev); err != nil {
					ack.Error = err.Error()
				} else {
					ack.MTU = ifi.MTU
				}
			}
			if err := out.Encode(ack); err != nil {
				return err
			}
		}
	}
}

// weftTunnel is weft's driver, used as the daemon uses it: New, Up, Set.
type weftTunnel struct{ d *wireguard.Driver }

func newWeftTunnel(ctx context.Context, cfg childConfig) (*weftTunnel, error) {
	d, err := wireguard.New(wireguard.Config{
		PeerName: cfg.name,
		KeyFile:  cfg.keyFile,
		Port:     cfg.port,
		Underlay: cfg.underlay,
		Logger:   logger(cfg.verbose, cfg.name),
		// Userspace like the standalone tunnel, even where the kernel has WireGuard.
		ForceUserspace: true,
	})
	if err != nil {
		return nil, err
	}
	if err := d.Up(ctx); err != nil {
		d.Close()
		return nil, err
	}
	return &weftTunnel{d: d}, nil
}

func (w *weftTunnel) hello() childMsg {
	k := w.d.PublicKey()
	return childMsg{PublicKey: k[:], Port: w.d.Port(), Dev: w.d.Name()}
}

func (w *weftTunnel) setPeer(p childMsg) error {
	if len(p.PublicKey) != 32 {
		return fmt.Errorf("peer key of %d bytes", len(p.PublicKey))
	}
	return w.d.Set([]datapath.RemotePeer{{
		Name:          "peer",
		Underlay:      p.Underlay,
		WireGuardKey:  [32]byte(p.PublicKey),
		WireGuardPort: p.Port,
		Blocks:        p.Blocks,
	}})
}

func (w *weftTunnel) Close() error { return w.d.Close() }

// standaloneTunnel is wireguard-go used directly, the way its README's embedding example
// does: TUN, NewDevice, IpcSet, Up; the link and route by netlink. No weft code.
type standaloneTunnel struct {
	dev  *device.Device
	link netlink.Link
	pub  []byte
	port uint16
}

func newStandaloneTunnel(cfg childConfig) (*standaloneTunnel, error) {
	td, err := tun.CreateTUN(standaloneDev, cfg.mtu)
	if err != nil {
		return nil, fmt.Errorf("create TUN %s: %w", standaloneDev, err)
	}
	// Verbose logs discarded, errors to stderr (wireguard-go's own default logger writes
	// to stdout, which carries the protocol).
	dev := device.NewDevice(td, conn.NewDefaultBind(), &device.Logger{
		Verbosef: device.DiscardLogf,
		Errorf: func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "standalone wireguard-go: "+format+"\n", args...)
		},
	})
	s := &standaloneTunnel{dev: dev, port: uint16(cfg.port)}
	key, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		s.Close()
		return nil, err
	}
	s.pub = key.PublicKey().Bytes()
	if err := dev.IpcSet(fmt.Sprintf("private_key=%x\nlisten_port=%d\n", key.Bytes(), cfg.port)); err != nil {
		s.Close()
		return nil, fmt.Errorf("configure %s: %w", standaloneDev, err)
	}
	if s.link, err = netlink.LinkByName(standaloneDev); err != nil {
		s.Close()
		return nil, err
	}
	if err := netlink.LinkSetUp(s.link); err != nil {
		s.Close()
		return nil, fmt.Errorf("bring up %s: %w", standaloneDev, err)
	}
	if err := dev.Up(); err != nil {
		s.Close()
		return nil, fmt.Errorf("start %s: %w", standaloneDev, err)
	}
	return s, nil
}

func (s *standaloneTunnel) hello() childMsg {
	return childMsg{PublicKey: s.pub, Port: s.port, Dev: standaloneDev}
}

func (s *standaloneTunnel) setPeer(p childMsg) error {
	if len(p.PublicKey) != 32 {
		return fmt.Errorf("peer key of %d bytes", len(p.PublicKey))
	}
	// The same peer settings as weft's driver: endpoint, keepalive 25 s, allowed = blocks.
	var b strings.Builder
	fmt.Fprintf(&b, "public_key=%x\nendpoint=%s\npersistent_keepalive_interval=%d\nreplace_allowed_ips=true\n",
		p.PublicKey, netip.AddrPortFrom(p.Underlay, p.Port), int(wireguard.PersistentKeepalive.Seconds()))
	for _, bl := range p.Blocks {
		fmt.Fprintf(&b, "allowed_ip=%s\n", bl)
	}
	if err := s.dev.IpcSet(b.String()); err != nil {
		return fmt.Errorf("configure peer of %s: %w", standaloneDev, err)
	}
	for _, bl := range p.Blocks {
		r := &netlink.Route{LinkIndex: s.link.Attrs().Index, Dst: datapath.PrefixToIPNet(bl), Scope: netlink.SCOPE_LINK}
		if err := netlink.RouteAdd(r); err != nil {
			return fmt.Errorf("route %s dev %s: %w", bl, standaloneDev, err)
		}
	}
	return nil
}

// Close closes the device and with it the TUN, which takes the link and its routes.
func (s *standaloneTunnel) Close() error {
	s.dev.Close()
	return nil
}

// wgChild is the bench's handle on one child.
type wgChild struct {
	host   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	msgs   chan childMsg // closed when the child's stdout ends
	exited chan struct{} // closed when the child has been waited for
	dev    string        // interface, once known
}

// startChild runs `ip netns exec <host> exe args…` (ip(8) execs exe in place, same pid).
func startChild(h *nslab.Host, exe string, args ...string) (*wgChild, error) {
	cmd := h.Command(context.Background(), exe, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	c := &wgChild{host: h.Name, cmd: cmd, stdin: stdin, msgs: make(chan childMsg, 4), exited: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		// Pdeathsig: this thread must outlive the child (see the top of this file).
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var m childMsg
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				fmt.Fprintf(os.Stderr, "bench: child in %s: %s\n", h.Name, sc.Bytes())
				continue
			}
			c.msgs <- m
		}
		close(c.msgs)
		cmd.Wait() // after every read from stdout, as os/exec requires
		close(c.exited)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start child in %s: %w", h.Name, err)
	}
	return c, nil
}

func (c *wgChild) recv() (childMsg, error) {
	select {
	case m, ok := <-c.msgs:
		if !ok {
			<-c.exited
			return childMsg{}, fmt.Errorf("child in %s exited: %v", c.host, c.cmd.ProcessState)
		}
		if m.Error != "" {
			return m, fmt.Errorf("child in %s: %s", c.host, m.Error)
		}
		return m, nil
	case <-time.After(childTimeout):
		return childMsg{}, fmt.Errorf("child in %s: no answer within %s", c.host, childTimeout)
	}
}

func (c *wgChild) send(m childMsg) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	_, err = c.stdin.Write(append(b, '\n'))
	return err
}

// stop closes the child's stdin, which makes it remove its device and exit, and kills it
// (by pid) if it has not exited within 5 s. Safe twice.
func (c *wgChild) stop() {
	c.stdin.Close()
	select {
	case <-c.exited:
	case <-time.After(5 * time.Second):
		c.cmd.Process.Kill()
		<-c.exited
	}
}

// wgCases sets up the two WireGuard cases and owns their children.
type wgCases struct {
	exe      string // this binary
	keyDir   string // weft's key files
	children []*wgChild
	mtu      map[string]int // interface MTU by mode, to check they are the same
}

func newWGCases(keyDir string) (*wgCases, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find this binary to re-run as a child: %w", err)
	}
	return &wgCases{exe: exe, keyDir: keyDir, mtu: map[string]int{}}, nil
}

// setup returns the case's setup: a child per host, then each given the other as peer.
// Both modes get the same port and topology; the standalone TUN gets the MTU weft's
// driver derives from the underlay (checked by sameMTU).
func (w *wgCases) setup(mode string) func(context.Context, *nslab.Lab, bool) error {
	return func(ctx context.Context, l *nslab.Lab, verbose bool) error {
		kids := make([]*wgChild, len(l.Hosts))
		hellos := make([]childMsg, len(l.Hosts))
		for i, h := range l.Hosts {
			args := []string{"-wg-child", mode, "-wg-name", h.Name,
				"-wg-underlay", h.Underlay.Addr().String(),
				"-wg-port", strconv.Itoa(wireguard.DefaultPort),
				"-wg-mtu", strconv.Itoa(underlayMTU - wireguard.Overhead),
				"-wg-key", filepath.Join(w.keyDir, h.Name+".key")}
			if verbose {
				args = append(args, "-v")
			}
			c, err := startChild(h, w.exe, args...)
			if err != nil {
				return err
			}
			w.children = append(w.children, c)
			kids[i] = c
			if hellos[i], err = c.recv(); err != nil {
				return err
			}
			c.dev = hellos[i].Dev
		}
		for i := range l.Hosts {
			o := l.Hosts[1-i]
			peer := childMsg{PublicKey: hellos[1-i].PublicKey, Port: hellos[1-i].Port,
				Underlay: o.Underlay.Addr(), Blocks: []netip.Prefix{o.Block}}
			if err := kids[i].send(peer); err != nil {
				return fmt.Errorf("child in %s: %w", kids[i].host, err)
			}
			ack, err := kids[i].recv()
			if err != nil {
				return err
			}
			if m, ok := w.mtu[mode]; ok && m != ack.MTU {
				return fmt.Errorf("%s: MTU %d on one host, %d on the other", mode, m, ack.MTU)
			}
			w.mtu[mode] = ack.MTU
		}
		return ctx.Err()
	}
}

// sameMTU checks that both cases' tunnels got the same MTU, so they carry the same packets.
func (w *wgCases) sameMTU() error {
	if a, b := w.mtu[modeWeft], w.mtu[modeStandalone]; a != b {
		return fmt.Errorf("tunnel MTU differs: weft %d, standalone %d", a, b)
	}
	return nil
}

// stop stops every child, then removes a UAPI socket a killed weft child left behind.
func (w *wgCases) stop() {
	for _, c := range w.children {
		c.stop()
		if c.dev != "" && c.dev != standaloneDev {
			sock := filepath.Join("/var/run/wireguard", c.dev+".sock")
			if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
				fmt.Fprintln(os.Stderr, "bench: cleanup:", err)
			}
		}
	}
	w.children = nil
}
