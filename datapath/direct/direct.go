// Package direct is weft's "direct" link mode: plain routing between peers that share an
// L2 underlay subnet, no encapsulation. For every block of every remote peer it installs
//
//	<block> via <peer underlay IP> dev <underlay dev> proto 87
//
// and nothing else: the remote host forwards the packet from its underlay interface to its
// bridge like any router. It is the fastest mode and only works when both ends are on the
// same L2 segment (SameL2 tells the router when that holds).
//
// All functions act on the network namespace of the calling OS thread, like package
// datapath: run them on a locked thread (ns.NetNS.Do) to act on another namespace.
package direct

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath"
)

// Config configures the direct driver.
type Config struct {
	// Underlay is this host's underlay address. Required.
	Underlay netip.Addr
	// UnderlayDev is the interface holding Underlay; found from Underlay when empty.
	UnderlayDev string
	// Logger receives one line per change; nil discards.
	Logger *slog.Logger
	// Metrics counts bad peers; nil counts nothing.
	Metrics *datapath.Metrics
}

// Driver is the direct link mode; it implements datapath.Driver. Methods must be called
// from one goroutine at a time (the router's datapath loop), on a thread in the host's
// network namespace.
type Driver struct {
	cfg Config
	log *slog.Logger
}

var _ datapath.Driver = (*Driver)(nil)

// New checks cfg and returns a driver; it touches nothing in the kernel.
func New(cfg Config) (*Driver, error) {
	if !cfg.Underlay.IsValid() {
		return nil, errors.New("direct: underlay address is required")
	}
	cfg.Underlay = cfg.Underlay.Unmap()
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Driver{cfg: cfg, log: log.With("driver", datapath.ModeDirect)}, nil
}

// Mode is "direct".
func (d *Driver) Mode() string { return datapath.ModeDirect }

// Up resolves the underlay interface (and remembers its name); direct mode creates no
// device. It fails with datapath.ErrNoUnderlay when no interface holds the underlay address.
func (d *Driver) Up(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	_, err := d.underlayLink()
	return err
}

// underlayLink returns the underlay interface: by name when configured, else the one
// holding the underlay address (whose name is then kept for Close).
func (d *Driver) underlayLink() (netlink.Link, error) {
	if d.cfg.UnderlayDev == "" {
		_, dev, err := datapath.UnderlayPrefix(d.cfg.Underlay)
		if err != nil {
			return nil, err
		}
		d.cfg.UnderlayDev = dev
	}
	link, err := netlink.LinkByName(d.cfg.UnderlayDev)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", datapath.ErrNoUnderlay, d.cfg.UnderlayDev, err)
	}
	return link, nil
}

// Set converges the routes on the underlay interface to exactly one route per block of
// peers: missing routes are added, wrong ones replaced, weft routes of blocks no longer in
// the set removed. A peer that cannot be served (no underlay address, another family than
// ours, a block another peer has) is left out by the rule on datapath.Driver; the others
// are still converged. A gateway not on our L2 subnet is reported by the kernel.
func (d *Driver) Set(peers []datapath.RemotePeer) error {
	link, err := d.underlayLink()
	if err != nil {
		return fmt.Errorf("%w: %v", datapath.ErrNotUp, err)
	}
	var errs []error
	var want []netlink.Route
	var claims datapath.BlockClaims
	for _, p := range peers {
		if !p.Underlay.IsValid() || p.Underlay.Unmap().Is4() != d.cfg.Underlay.Is4() {
			errs = append(errs, d.reject(p.Name, "underlay %v unusable from %v", p.Underlay, d.cfg.Underlay))
			continue
		}
		gw := p.Underlay.Unmap()
		for _, b := range p.Blocks {
			b, why := claims.Claim(p.Name, b, gw)
			if why != "" {
				errs = append(errs, d.reject(p.Name, "%s", why))
				continue
			}
			want = append(want, netlink.Route{
				LinkIndex: link.Attrs().Index,
				Dst:       datapath.PrefixToIPNet(b),
				Gw:        gw.AsSlice(),
			})
		}
	}
	if err := datapath.SyncRoutes(nil, unix.RT_TABLE_MAIN, link.Attrs().Index, want, d.log); err != nil {
		errs = append(errs, fmt.Errorf("direct: %w", err))
	}
	return errors.Join(errs...)
}

// reject leaves one peer out (the rule on datapath.Driver).
func (d *Driver) reject(peer, format string, args ...any) error {
	return datapath.RejectPeer(d.log, d.cfg.Metrics, datapath.ModeDirect, peer, format, args...)
}

// Close removes every weft route on the underlay interface. Safe to call twice, and
// before Up.
func (d *Driver) Close() error {
	link, err := d.underlayLink()
	if err != nil {
		return nil // no underlay interface, so no routes through it
	}
	return datapath.SyncRoutes(nil, unix.RT_TABLE_MAIN, link.Attrs().Index, nil, d.log)
}
