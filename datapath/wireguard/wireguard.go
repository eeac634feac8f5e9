// Package wireguard is weft's encrypted link driver: one WireGuard interface per host,
// one WireGuard peer per remote weft peer, and one route per remote address block through
// the interface.
//
// Kernel WireGuard is used where the module exists; otherwise the driver embeds the
// userspace implementation (golang.zx2c4.com/wireguard) on a TUN device inside this process
// and serves its UAPI socket in /var/run/wireguard/<ifname>.sock, so `wg show` and wgctrl
// work the same either way. Both are configured only through wgctrl.
//
// # Network namespaces
//
// The driver belongs to the network namespace of the thread that calls Up: the interface,
// its routes and its UDP socket live there. A weft peer runs entirely inside its host's
// namespace, so that is simply "the process's namespace". Tests run several hosts in one
// process, each host's Up inside ns.Do; for that case, see netns.go for what wireguard-go
// does on its own goroutines and how the driver keeps it in the right namespace.
//
// # MTU
//
// With Config.MTU 0 the interface MTU is the underlay interface's MTU minus 80: WireGuard
// adds 32 bytes (16 header + 16 authentication tag) inside UDP (8) inside IP, which is 20
// bytes over IPv4 and 40 over IPv6. 80 is the IPv6 figure, so the same MTU is safe whichever
// family the underlay uses. Packets as large as the MTU are encapsulated without
// fragmentation; containers' MTU must not exceed it.
package wireguard

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/weftnet/weft/datapath"
)

// Defaults and fixed values.
const (
	// DefaultPort is weft's WireGuard UDP port.
	DefaultPort = 6786
	// Overhead is what WireGuard adds to a packet over an IPv6 underlay (see the package doc).
	Overhead = 80
	// PersistentKeepalive keeps NAT and conntrack state alive and lets a peer that rotated
	// its key or restarted re-handshake without waiting for traffic.
	PersistentKeepalive = 25 * time.Second

	// socketDirectory is where wireguard-go's ipc package puts UAPI sockets (ipc.sockPath,
	// unexported there). It is not per network namespace, hence unique interface names.
	socketDirectory = "/var/run/wireguard"
	defaultMTU      = 1500 - Overhead
)

// Sentinel errors.
var (
	ErrInvalidConfig = errors.New("invalid wireguard config")
	ErrKeyFile       = errors.New("bad wireguard private key file")
	ErrClosed        = errors.New("wireguard driver is closed")
	ErrLinkExists    = errors.New("link exists and is not ours")
)

// Config configures a Driver.
type Config struct {
	// Name is the interface name. Empty derives "weftwg" + 6 hex digits of
	// sha256(PeerName): userspace UAPI sockets are named after the interface and shared by
	// every namespace on the machine, so several peers on one machine (a lab) need
	// distinct names.
	Name string
	// PeerName is this peer's name; it only derives Name.
	PeerName string
	// KeyFile is the private key's path under the peer's data dir, in wg(8)'s base64
	// format. It is created (mode 0600) with a fresh key when missing. The key is never
	// logged.
	KeyFile string
	// Port is the UDP listen port; 0 means DefaultPort.
	Port int
	// MTU of the interface; 0 means the underlay interface's MTU minus Overhead (1420 when
	// the underlay interface cannot be found).
	MTU int
	// Underlay is this host's underlay address; its interface gives the MTU.
	Underlay netip.Addr
	// Logger receives the driver's and wireguard-go's logs; nil discards them.
	Logger *slog.Logger
	// ForceUserspace skips kernel WireGuard (tests).
	ForceUserspace bool
	// LinkProbes also allows every peer's underlay address (a host prefix) in its AllowedIPs
	// and routes it through the device in datapath.ProbeTable only — not in the main table,
	// where the underlay address must keep reaching the peer's endpoint — so that link
	// probes travel through the tunnel (see datapath.EnsureProbeRule).
	LinkProbes bool
	// Metrics counts bad peers; nil counts nothing.
	Metrics *datapath.Metrics
}

var ifNameRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)

// Driver is the wireguard link driver; it implements datapath.Driver. Like every driver,
// its methods are called from one goroutine at a time; the only state shared with other
// goroutines is the userspace UAPI server's (see uapiServer).
type Driver struct {
	cfg  Config
	name string
	port uint16
	log  *slog.Logger
	key  wgtypes.Key // private key, as persisted in cfg.KeyFile

	// Set by Up, released by Close.
	hostNS ns.NetNS        // namespace the driver lives in
	nl     *netlink.Handle // netlink handle bound to hostNS, usable from any thread
	wg     *wgctrl.Client  // created in hostNS (the kernel client is a netns-bound socket)
	kernel bool            // kernel WireGuard rather than userspace
	user   *userspace      // userspace device, nil in kernel mode
	closed bool
}

var _ datapath.Driver = (*Driver)(nil)

// New validates cfg, loads (or creates) the private key and returns a driver that is not
// up yet. It touches no network state.
func New(cfg Config) (*Driver, error) {
	if cfg.Name == "" {
		if cfg.PeerName == "" {
			return nil, fmt.Errorf("%w: need Name or PeerName", ErrInvalidConfig)
		}
		cfg.Name = DeriveName(cfg.PeerName)
	}
	// The name ends up in a filesystem path (the UAPI socket): no separators, no "..".
	if !ifNameRE.MatchString(cfg.Name) || cfg.Name == "." || cfg.Name == ".." {
		return nil, fmt.Errorf("%w: interface name %q (1-15 of A-Z a-z 0-9 _ . -)", ErrInvalidConfig, cfg.Name)
	}
	if cfg.KeyFile == "" {
		return nil, fmt.Errorf("%w: KeyFile is empty", ErrInvalidConfig)
	}
	if cfg.Port == 0 {
		cfg.Port = DefaultPort
	}
	if cfg.Port < 1 || cfg.Port > 65535 {
		return nil, fmt.Errorf("%w: port %d", ErrInvalidConfig, cfg.Port)
	}
	if cfg.MTU != 0 && (cfg.MTU < 576 || cfg.MTU > 65535) {
		return nil, fmt.Errorf("%w: MTU %d (0 or 576-65535)", ErrInvalidConfig, cfg.MTU)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("driver", datapath.ModeWireGuard, "dev", cfg.Name)
	key, err := loadOrCreateKey(cfg.KeyFile, log)
	if err != nil {
		return nil, err
	}
	return &Driver{cfg: cfg, name: cfg.Name, port: uint16(cfg.Port), log: log, key: key}, nil
}

// DeriveName is the interface name New uses when Config.Name is empty.
func DeriveName(peerName string) string {
	sum := sha256.Sum256([]byte(peerName))
	return "weftwg" + hex.EncodeToString(sum[:3])
}

// Mode is datapath.ModeWireGuard.
func (d *Driver) Mode() string { return datapath.ModeWireGuard }

// Name is the interface name.
func (d *Driver) Name() string { return d.name }

// PublicKey is this peer's current public key, to gossip.
func (d *Driver) PublicKey() [32]byte { return d.key.PublicKey() }

// Port is the UDP listen port, to gossip.
func (d *Driver) Port() uint16 { return d.port }

// Kernel says whether Up found kernel WireGuard (false before Up).
func (d *Driver) Kernel() bool { return d.kernel }

// Up creates the interface in the calling thread's network namespace (see the package doc),
// sets its private key and listen port through wgctrl, its MTU, and brings it up without an
// address. Called again it re-applies the same settings and keeps the device and its peers.
func (d *Driver) Up(ctx context.Context) error {
	if d.closed {
		return ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if d.wg == nil {
		if err := d.create(); err != nil {
			d.release()
			return err
		}
	}
	// Set only what differs: wireguard-go reopens its sockets on every listen_port write.
	dev, err := d.wg.Device(d.name)
	if err != nil {
		return fmt.Errorf("read %s: %w", d.name, err)
	}
	var cfg wgtypes.Config
	if dev.PrivateKey != d.key {
		cfg.PrivateKey = &d.key
	}
	if dev.ListenPort != int(d.port) {
		cfg.ListenPort = ptr(int(d.port))
	}
	if cfg.PrivateKey != nil || cfg.ListenPort != nil {
		if err := d.wg.ConfigureDevice(d.name, cfg); err != nil {
			return fmt.Errorf("configure %s: %w", d.name, err)
		}
	}
	link, err := d.nl.LinkByName(d.name)
	if err != nil {
		return fmt.Errorf("look up %s: %w", d.name, err)
	}
	if mtu := d.mtu(); link.Attrs().MTU != mtu {
		if err := d.nl.LinkSetMTU(link, mtu); err != nil {
			return fmt.Errorf("set MTU %d on %s: %w", mtu, d.name, err)
		}
	}
	if err := d.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring up %s: %w", d.name, err)
	}
	if d.user != nil {
		// The TUN going up also brings the device up, but asynchronously; doing it here
		// reports a port that is already taken as Up's error. Up twice is a no-op.
		if err := d.user.dev.Up(); err != nil {
			return fmt.Errorf("start %s on port %d: %w", d.name, d.port, err)
		}
	}
	return nil
}

// create makes the namespace handles, the device and the wgctrl client.
func (d *Driver) create() error {
	hostNS, err := ns.GetCurrentNS()
	if err != nil {
		return fmt.Errorf("open current netns: %w", err)
	}
	d.hostNS = hostNS
	if d.nl, err = netlink.NewHandleAt(netns.NsHandle(hostNS.Fd())); err != nil {
		return fmt.Errorf("netlink handle: %w", err)
	}
	mtu := d.mtu()
	return hostNS.Do(func(ns.NetNS) error {
		if !d.cfg.ForceUserspace {
			ok, err := d.ensureKernelLink(mtu)
			if err != nil {
				return err
			}
			d.kernel = ok
		}
		if !d.kernel {
			if link, err := d.nl.LinkByName(d.name); err == nil {
				return fmt.Errorf("%w: %s is a %s (another process's device?)", ErrLinkExists, d.name, link.Type())
			}
			user, err := startUserspace(d.name, mtu, hostNS, d.log)
			if err != nil {
				return err
			}
			d.user = user
		}
		wg, err := wgctrl.New()
		if err != nil {
			return fmt.Errorf("wgctrl: %w", err)
		}
		d.wg = wg
		return nil
	})
}

// ensureKernelLink keeps or creates a kernel WireGuard link. It reports false, nil when the
// kernel has no WireGuard.
func (d *Driver) ensureKernelLink(mtu int) (bool, error) {
	link, err := d.nl.LinkByName(d.name)
	if err == nil {
		if link.Type() == "wireguard" {
			d.log.Info("keeping existing kernel WireGuard device")
			return true, nil
		}
		return false, fmt.Errorf("%w: %s is a %s, want wireguard", ErrLinkExists, d.name, link.Type())
	}
	wg := &netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: d.name, MTU: mtu}}
	err = d.nl.LinkAdd(wg)
	switch {
	case err == nil:
		d.log.Info("using kernel WireGuard")
		return true, nil
	case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENODEV):
		d.log.Info("kernel WireGuard unavailable, using userspace wireguard-go", "err", err)
		return false, nil
	default:
		return false, fmt.Errorf("create kernel WireGuard %s: %w", d.name, err)
	}
}

// mtu is the configured MTU, or the underlay interface's minus Overhead.
func (d *Driver) mtu() int {
	if d.cfg.MTU != 0 {
		return d.cfg.MTU
	}
	if d.cfg.Underlay.IsValid() {
		addrs, err := d.nl.AddrList(nil, netlink.FAMILY_ALL)
		if err == nil {
			for _, a := range addrs {
				if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == d.cfg.Underlay.Unmap() {
					if link, err := d.nl.LinkByIndex(a.LinkIndex); err == nil {
						return link.Attrs().MTU - Overhead
					}
				}
			}
		}
	}
	d.log.Warn("underlay interface not found, assuming MTU 1500", "underlay", d.cfg.Underlay)
	return defaultMTU
}

// Set converges the device's peers and the routes to peers: one WireGuard peer per remote
// peer (endpoint Underlay:WireGuardPort, allowed IPs exactly its Blocks, keepalive 25 s)
// and one route per block through the device. Peers that did not change are not touched,
// so their sessions survive; peers not in the set are removed with their routes.
//
// A bad peer (zero or own key, duplicate key, no underlay address, a block another peer of
// the set has) is left out by the rule on datapath.Driver; the others still converge.
func (d *Driver) Set(peers []datapath.RemotePeer) error {
	if d.closed {
		return ErrClosed
	}
	if d.wg == nil {
		return fmt.Errorf("wireguard: %w", datapath.ErrNotUp)
	}
	want, blocks, probes, bad := d.desired(peers)

	dev, err := d.wg.Device(d.name)
	if err != nil {
		return fmt.Errorf("read %s: %w", d.name, err)
	}
	var changes []wgtypes.PeerConfig
	have := make(map[wgtypes.Key]bool, len(dev.Peers))
	for _, p := range dev.Peers {
		have[p.PublicKey] = true
		w, ok := want[p.PublicKey]
		if !ok {
			changes = append(changes, wgtypes.PeerConfig{PublicKey: p.PublicKey, Remove: true})
			d.log.Info("removing peer", "key", p.PublicKey.String())
			continue
		}
		if !samePeer(p, w) {
			changes = append(changes, w)
			d.log.Info("updating peer", "key", p.PublicKey.String(), "endpoint", w.Endpoint, "allowed", w.AllowedIPs)
		}
	}
	for k, w := range want {
		if !have[k] {
			changes = append(changes, w)
			d.log.Info("adding peer", "key", k.String(), "endpoint", w.Endpoint, "allowed", w.AllowedIPs)
		}
	}
	if len(changes) > 0 {
		if err := d.wg.ConfigureDevice(d.name, wgtypes.Config{Peers: changes}); err != nil {
			return errors.Join(bad, fmt.Errorf("configure peers of %s: %w", d.name, err))
		}
	}
	return errors.Join(bad, d.syncRoutes(blocks, probes))
}

// reject leaves one peer out (the rule on datapath.Driver).
func (d *Driver) reject(peer, format string, args ...any) error {
	return datapath.RejectPeer(d.log, d.cfg.Metrics, datapath.ModeWireGuard, peer, format, args...)
}

// desired turns the remote peers into wgctrl peer configs (keyed by public key), the set
// of blocks to route, and (with LinkProbes) the underlay addresses to route in the
// link-probe table; bad is the joined error of the peers left out. O(peers + blocks).
func (d *Driver) desired(peers []datapath.RemotePeer) (want map[wgtypes.Key]wgtypes.PeerConfig, blocks map[netip.Prefix]bool, probes []netip.Addr, bad error) {
	own := wgtypes.Key(d.key.PublicKey())
	want = make(map[wgtypes.Key]wgtypes.PeerConfig, len(peers))
	blocks = make(map[netip.Prefix]bool)
	var errs []error
	var claims datapath.BlockClaims
	for _, p := range peers {
		key := wgtypes.Key(p.WireGuardKey)
		switch {
		case key == wgtypes.Key{}:
			errs = append(errs, d.reject(p.Name, "no WireGuard key"))
			continue
		case key == own:
			errs = append(errs, d.reject(p.Name, "this host's own WireGuard key"))
			continue
		case !p.Underlay.IsValid():
			errs = append(errs, d.reject(p.Name, "no underlay address"))
			continue
		}
		if _, dup := want[key]; dup {
			errs = append(errs, d.reject(p.Name, "WireGuard key %s is another peer's too", key))
			continue
		}
		port := p.WireGuardPort
		if port == 0 {
			port = DefaultPort
		}
		pc := wgtypes.PeerConfig{
			PublicKey:                   key,
			Endpoint:                    net.UDPAddrFromAddrPort(netip.AddrPortFrom(p.Underlay.Unmap(), port)),
			PersistentKeepaliveInterval: ptr(PersistentKeepalive),
			ReplaceAllowedIPs:           true,
			AllowedIPs:                  []net.IPNet{},
		}
		for _, b := range p.Blocks {
			b, why := claims.Claim(p.Name, b, netip.Addr{})
			if why != "" {
				errs = append(errs, d.reject(p.Name, "%s", why))
				continue
			}
			blocks[b] = true
			pc.AllowedIPs = append(pc.AllowedIPs, *datapath.PrefixToIPNet(b))
		}
		if u := p.Underlay.Unmap(); d.cfg.LinkProbes && !p.NoProbe && !blocks[netip.PrefixFrom(u, u.BitLen())] {
			pc.AllowedIPs = append(pc.AllowedIPs, *datapath.PrefixToIPNet(netip.PrefixFrom(u, u.BitLen())))
			probes = append(probes, u)
		}
		want[key] = pc
	}
	return want, blocks, probes, errors.Join(errs...)
}

// samePeer says whether the device's peer already matches the desired config.
func samePeer(have wgtypes.Peer, want wgtypes.PeerConfig) bool {
	if have.Endpoint == nil || unmapAP(have.Endpoint.AddrPort()) != unmapAP(want.Endpoint.AddrPort()) {
		return false
	}
	if have.PersistentKeepaliveInterval != *want.PersistentKeepaliveInterval {
		return false
	}
	return slices.Equal(prefixSet(have.AllowedIPs), prefixSet(want.AllowedIPs))
}

func unmapAP(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func prefixSet(nets []net.IPNet) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(nets))
	for _, n := range nets {
		if p, ok := datapath.IPNetToPrefix(&n); ok {
			out = append(out, p.Masked())
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out)
}

// syncRoutes makes the main table's weft routes through the device exactly blocks (a
// device route each), and the link-probe table's exactly probes. Replace, not add, takes
// over a route for a block through another link (the peer's previous link mode).
func (d *Driver) syncRoutes(blocks map[netip.Prefix]bool, probes []netip.Addr) error {
	link, err := d.nl.LinkByName(d.name)
	if err != nil {
		return fmt.Errorf("look up %s: %w", d.name, err)
	}
	idx := link.Attrs().Index
	routes := make([]netlink.Route, 0, len(blocks))
	for b := range blocks {
		r := netlink.Route{LinkIndex: idx, Dst: datapath.PrefixToIPNet(b)}
		if b.Addr().Is4() {
			r.Scope = netlink.SCOPE_LINK
		}
		routes = append(routes, r)
	}
	var errs []error
	if err := datapath.SyncRoutes(d.nl, unix.RT_TABLE_MAIN, idx, routes, d.log); err != nil {
		errs = append(errs, fmt.Errorf("routes: %w", err))
	}
	probeRoutes := make([]netlink.Route, 0, len(probes))
	for _, a := range probes {
		probeRoutes = append(probeRoutes, datapath.ProbeRoute(idx, a, false))
	}
	if err := datapath.SyncRoutes(d.nl, datapath.ProbeTable, idx, probeRoutes, d.log); err != nil {
		errs = append(errs, fmt.Errorf("link-probe routes: %w", err))
	}
	return errors.Join(errs...)
}

// RotateKey makes a new private key, persists it (atomically, mode 0600) and, when the
// driver is up, applies it. It returns the new public key for the router to gossip; remote
// peers that Set the new key re-handshake, and flows through the tunnel carry on.
func (d *Driver) RotateKey() ([32]byte, error) {
	if d.closed {
		return [32]byte{}, ErrClosed
	}
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return [32]byte{}, fmt.Errorf("generate private key: %w", err)
	}
	if err := writeKey(d.cfg.KeyFile, key); err != nil {
		return [32]byte{}, err
	}
	// The file holds the new key now; so does the driver, so that a failed apply is
	// retried by the next Up rather than forgotten.
	d.key = key
	if d.wg != nil {
		if err := d.wg.ConfigureDevice(d.name, wgtypes.Config{PrivateKey: &key}); err != nil {
			return [32]byte{}, fmt.Errorf("apply new private key to %s: %w", d.name, err)
		}
	}
	d.log.Info("rotated private key", "public_key", key.PublicKey().String())
	return key.PublicKey(), nil
}

// Close removes the driver's routes and device: the kernel link, or the userspace device
// with its TUN and UAPI socket. It waits for the driver's goroutines and is safe twice.
func (d *Driver) Close() error {
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	if d.nl != nil {
		if link, err := d.nl.LinkByName(d.name); err == nil {
			if err := datapath.SyncRoutes(d.nl, unix.RT_TABLE_MAIN, link.Attrs().Index, nil, d.log); err != nil {
				errs = append(errs, err)
			}
			if d.kernel {
				if err := d.nl.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
					errs = append(errs, fmt.Errorf("delete %s: %w", d.name, err))
				}
			}
		}
	}
	errs = append(errs, d.release())
	return errors.Join(errs...)
}

// release frees what create made, in reverse order.
func (d *Driver) release() error {
	var errs []error
	if d.user != nil {
		errs = append(errs, d.user.close())
		d.user = nil
	}
	if d.wg != nil {
		errs = append(errs, d.wg.Close())
		d.wg = nil
	}
	if d.nl != nil {
		d.nl.Close()
		d.nl = nil
	}
	if d.hostNS != nil {
		errs = append(errs, d.hostNS.Close())
		d.hostNS = nil
	}
	return errors.Join(errs...)
}

// loadOrCreateKey reads the private key from path, creating the file with a new key when it
// does not exist. A key file readable by others is tightened to 0600.
func loadOrCreateKey(path string, log *slog.Logger) (wgtypes.Key, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		key, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			return wgtypes.Key{}, fmt.Errorf("generate private key: %w", err)
		}
		if err := writeKey(path, key); err != nil {
			return wgtypes.Key{}, err
		}
		log.Info("created private key", "file", path, "public_key", key.PublicKey().String())
		return key, nil
	}
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("%w: %s: %v", ErrKeyFile, path, err)
	}
	// Never wrap the parse error or echo the content: it is the secret.
	key, err := wgtypes.ParseKey(strings.TrimSpace(string(b)))
	if err != nil || key == (wgtypes.Key{}) {
		return wgtypes.Key{}, fmt.Errorf("%w: %s does not hold a base64 WireGuard private key", ErrKeyFile, path)
	}
	if st, err := os.Stat(path); err == nil && st.Mode().Perm()&0o077 != 0 {
		log.Warn("private key file was readable by others; setting mode 0600", "file", path, "mode", st.Mode().Perm())
		if err := os.Chmod(path, 0o600); err != nil {
			return wgtypes.Key{}, fmt.Errorf("%w: chmod %s: %v", ErrKeyFile, path, err)
		}
	}
	return key, nil
}

// writeKey persists key to path atomically: a 0600 temporary file in the same directory,
// synced, then renamed over path.
func writeKey(path string, key wgtypes.Key) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("%w: create %s: %v", ErrKeyFile, dir, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*") // mode 0600
	if err != nil {
		return fmt.Errorf("%w: %v", ErrKeyFile, err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		return fmt.Errorf("%w: chmod %s: %v", ErrKeyFile, f.Name(), err)
	}
	if _, err := f.WriteString(key.String() + "\n"); err != nil {
		return fmt.Errorf("%w: write %s: %v", ErrKeyFile, f.Name(), err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("%w: sync %s: %v", ErrKeyFile, f.Name(), err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("%w: close %s: %v", ErrKeyFile, f.Name(), err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("%w: rename to %s: %v", ErrKeyFile, path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// userspace is an embedded wireguard-go device and the server of its UAPI socket.
type userspace struct {
	dev  *device.Device
	uapi net.Listener
	sock string
	done chan struct{} // closed when the accept loop has returned

	mu    sync.Mutex            // guards conns
	conns map[net.Conn]struct{} // UAPI connections being served
	wg    sync.WaitGroup        // UAPI connection handlers
}

// startUserspace creates the TUN and the device and serves the UAPI socket. It must run on
// a thread inside hostNS: the TUN is created in the namespace of the thread that opens it.
func startUserspace(name string, mtu int, hostNS ns.NetNS, log *slog.Logger) (*userspace, error) {
	tunDev, bind, err := newTUNAndBind(name, mtu, hostNS)
	if err != nil {
		return nil, err
	}
	dev := device.NewDevice(tunDev, bind, &device.Logger{
		Verbosef: func(format string, args ...any) {
			log.Debug(fmt.Sprintf(format, args...), "component", "wireguard-go")
		},
		Errorf: func(format string, args ...any) {
			log.Warn(fmt.Sprintf(format, args...), "component", "wireguard-go")
		},
	})
	file, err := ipc.UAPIOpen(name)
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("open UAPI socket for %s: %w", name, err)
	}
	l, err := ipc.UAPIListen(name, file)
	file.Close() // the listener holds its own descriptor
	if err != nil {
		dev.Close()
		os.Remove(socketPath(name))
		return nil, fmt.Errorf("listen on UAPI socket for %s: %w", name, err)
	}
	u := &userspace{dev: dev, uapi: l, sock: socketPath(name), done: make(chan struct{}), conns: map[net.Conn]struct{}{}}
	go u.serve()
	return u, nil
}

func (u *userspace) serve() {
	defer close(u.done)
	for {
		c, err := u.uapi.Accept()
		if err != nil {
			return
		}
		u.mu.Lock()
		u.conns[c] = struct{}{}
		u.wg.Add(1)
		u.mu.Unlock()
		go func() {
			defer u.wg.Done()
			u.dev.IpcHandle(c) // closes c
			u.mu.Lock()
			delete(u.conns, c)
			u.mu.Unlock()
		}()
	}
}

// close stops the UAPI server (closing connections still open), the device (TUN and UDP
// sockets) and removes the socket file.
func (u *userspace) close() error {
	err := u.uapi.Close()
	<-u.done
	u.mu.Lock()
	for c := range u.conns {
		c.Close()
	}
	u.mu.Unlock()
	u.wg.Wait()
	u.dev.Close()
	if rmErr := os.Remove(u.sock); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
		err = errors.Join(err, rmErr)
	}
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func socketPath(name string) string { return filepath.Join(socketDirectory, name+".sock") }

func ptr[T any](v T) *T { return &v }
