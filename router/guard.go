package router

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/guard"
	"github.com/weftnet/weft/datapath/vxlan"
)

// startGuard closes this peer's own ports to its containers on the bridge of every network
// it knows (datapath/guard), after ensureKernel made the bridges, then isolates the networks
// from each other (startIsolation); syncFilters keeps both in step with the cluster's
// networks from then on. The guard stays when the peer stops: a restarted peer re-applies
// the same rules (a no-op), and its ports are never open to containers in between. A host
// where the guard cannot be applied does not start: the control plane would be open to
// every container.
func (p *Peer) startGuard(advertise netip.Addr) error {
	g, err := guard.New(guard.Deps{Logger: p.log.With("component", "guard"), Registry: p.reg})
	if err != nil {
		return err
	}
	bridges := guardBridges(isolationNetworks(p.knownNetworks()))
	if err := g.Set(p.guardConfig(advertise, bridges)); err != nil {
		return fmt.Errorf("close the control ports to containers: %w", err)
	}
	p.filters = &filters{guard: g, advertise: advertise, bridges: bridges}
	if err := p.startIsolation(); err != nil {
		return fmt.Errorf("isolate the networks from each other: %w", err)
	}
	return nil
}

// guardConfig is the guard's desired state: the bridges of the networks, every port this
// peer listens on for other peers or operators (the same on every peer), and the underlay
// subnet of advertise, where the other peers listen on them. O(networks + ports).
func (p *Peer) guardConfig(advertise netip.Addr, bridges []string) guard.Config {
	cfg := guard.Config{DNSPort: uint16(p.cfg.DNSPort), Bridges: bridges}
	if u, _, err := datapath.UnderlayPrefix(advertise); err == nil {
		cfg.Underlay = append(cfg.Underlay, u.Masked())
	} else {
		p.log.Warn("container guard: underlay subnet unknown; other peers' ports are guarded only where the host's are", "advertise", advertise, "err", err)
	}
	port := func(kind string, proto guard.Proto, n int) {
		if n > 0 && n <= 65535 {
			cfg.Ports = append(cfg.Ports, guard.Port{Kind: kind, Proto: proto, Port: uint16(n)})
		}
	}
	port(guard.KindMesh, guard.TCP, p.cfg.MeshPort)
	port(guard.KindMesh, guard.UDP, p.cfg.MeshPort)
	port(guard.KindRaft, guard.TCP, p.cfg.RaftPort)
	port(guard.KindProbe, guard.UDP, p.cfg.ProbePort)
	port(guard.KindLinkProbe, guard.UDP, p.cfg.LinkProbePort)
	port(guard.KindWireGuard, guard.UDP, p.cfg.WireGuardPort)
	port(guard.KindVXLAN, guard.UDP, vxlan.DefaultPort)
	if _, ps, err := net.SplitHostPort(p.cfg.HTTPAddr); err == nil {
		if n, err := strconv.Atoi(ps); err == nil {
			port(guard.KindHTTP, guard.TCP, n)
		}
	}
	return cfg
}
