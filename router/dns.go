package router

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/dns"
	"github.com/weftnet/weft/ipam"
)

// Service DNS: every peer answers on each network's gateway address for every container of
// the mesh. Records of this peer's containers are published as gossip deltas (channel
// "dns"); the full state rides push/pull on join.

const dnsChannel = "dns"

// startDNS builds the record store, re-registers this peer's attachments (before any remote
// state is merged, so an old tombstone of ours cannot win), and starts the server.
func (p *Peer) startDNS(ctx context.Context, stops *[]func()) error {
	records, err := dns.NewSignedRecords(dns.RecordsConfig{Self: p.cfg.Name, Signer: p.identity, Keys: p.originKey})
	if err != nil {
		return err
	}
	p.dnsRep, err = dns.NewReplicator(dns.ReplicatorConfig{
		Records: records,
		Broadcast: func(msg []byte) error {
			if p.mesh == nil {
				return nil // not started yet: push/pull carries the state
			}
			return p.mesh.Broadcast(dnsChannel, msg)
		},
		Logger:   p.log.With("component", "dns"),
		Registry: p.reg,
	})
	if err != nil {
		return err
	}
	for _, a := range p.alloc.Attachments() {
		p.registerName(a.Name, a.Address, a.Services)
	}
	cfg := dns.DefaultConfig()
	cfg.Domain = p.cfg.DNSDomain
	cfg.TTL = p.cfg.DNSTTL
	cfg.Upstreams = p.cfg.DNSUpstreams
	nets := p.dnsNetworkList()
	cfg.Networks = dnsRanges(nets)
	local, err := hostAddrs()
	if err != nil {
		return fmt.Errorf("dns: %w", err)
	}
	for _, ap := range dnsListenAddrs(nets, local, p.cfg.DNSPort) {
		cfg.Listen = append(cfg.Listen, ap.String())
	}
	srv, err := dns.NewServer(cfg, records, dns.Deps{Logger: p.log.With("component", "dns"), Registry: p.reg})
	if err != nil {
		return fmt.Errorf("dns: %w", err)
	}
	if err := srv.Start(); err != nil {
		return fmt.Errorf("dns: listen on %v: %w", cfg.Listen, err)
	}
	p.dnsServer = srv
	p.dnsListen = newDNSListen(p.dnsNetworkList)
	*stops = append(*stops, func() { srv.Close() })
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{}, 2)
	go func() {
		defer func() { done <- struct{}{} }()
		p.dnsRep.Run(runCtx, p.cfg.DNSDownGrace, 10*time.Minute)
	}()
	go func() {
		defer func() { done <- struct{}{} }()
		p.runDNSListen(runCtx)
	}()
	*stops = append(*stops, func() { cancel(); <-done; <-done })
	return nil
}

// The DNS server answers on the gateway address of every network whose bridge is on this
// host, and knows every network the cluster defines (NAME.NETWORK names, the asker's network
// first). Both change at run time: a network is created or removed (the router sees the
// table change: dnsNetworksChanged), its bridge and gateway address appear with its first
// attachment here or go away (the kernel reports it: runDNSListen; and the attachment itself
// makes sure, before its result names the gateway as nameserver: dnsInfo).

// dnsListen serialises syncDNS and carries the wake-ups of runDNSListen.
type dnsListen struct {
	mu       sync.Mutex            // held by syncDNS
	kick     chan struct{}         // dnsNetworksChanged → runDNSListen; buffered 1, never blocks
	networks func() []ipam.Network // the networks this peer knows: dnsNetworkList
}

func newDNSListen(networks func() []ipam.Network) *dnsListen {
	return &dnsListen{kick: make(chan struct{}, 1), networks: networks}
}

// dnsNetworksChanged tells the DNS side that the cluster's networks changed. Never blocks.
func (p *Peer) dnsNetworksChanged() {
	if p.dnsListen == nil {
		return
	}
	select {
	case p.dnsListen.kick <- struct{}{}:
	default:
	}
}

// runDNSListen runs syncDNS after every address change on this host (netlink) and every
// network change (dnsNetworksChanged), until ctx ends. Address changes are rare (a bridge
// created or removed; container addresses live in their namespaces), and each sync costs
// O(networks + host addresses).
func (p *Peer) runDNSListen(ctx context.Context) {
	updates := make(chan netlink.AddrUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	if err := netlink.AddrSubscribeWithOptions(updates, done, netlink.AddrSubscribeOptions{
		ErrorCallback: func(err error) { p.log.Warn("dns: address events", "err", err) },
	}); err != nil {
		// Still correct on network changes and attachments (dnsInfo); only a bridge
		// address added or removed by hand goes unseen.
		p.log.Warn("dns: cannot follow the host's addresses; listening follows network changes and attachments only", "err", err)
		updates = nil
	}
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-updates:
			if !ok {
				p.log.Warn("dns: address events stopped; listening follows network changes and attachments only")
				updates = nil
				continue
			}
			// Drain a burst (a bridge coming up reports several addresses) into one sync;
			// only IPv4 matters (every new veth reports an IPv6 link-local address).
			v4 := u.LinkAddress.IP.To4() != nil
			for len(updates) > 0 {
				if u := <-updates; u.LinkAddress.IP.To4() != nil {
					v4 = true
				}
			}
			if !v4 {
				continue
			}
		case <-p.dnsListen.kick:
		}
		p.syncDNS()
	}
}

// syncDNS hands the DNS server the networks this peer knows and the gateway addresses to
// serve: those of its networks present on this host. Serialised; safe before startDNS (it
// does nothing). O(networks + host addresses).
func (p *Peer) syncDNS() {
	if p.dnsServer == nil || p.dnsListen == nil {
		return
	}
	p.dnsListen.mu.Lock()
	defer p.dnsListen.mu.Unlock()
	nets := p.dnsListen.networks()
	_ = p.dnsServer.SetNetworks(dnsRanges(nets)) // a refusal is logged and counted by dns
	local, err := hostAddrs()
	if err != nil {
		p.log.Warn("dns: cannot list the host's addresses; listen addresses unchanged", "err", err)
		return
	}
	_ = p.dnsServer.SetListen(dnsListenAddrs(nets, local, p.cfg.DNSPort)) // failures logged and counted by dns
}

// dnsNetworkList is every network this peer knows: the cluster's definitions, and this
// peer's default network, which it serves before the Raft table is known. O(networks).
func (p *Peer) dnsNetworkList() []ipam.Network {
	return mergeNetworks(p.cluster.Networks(), p.cfg.defaultNetwork())
}

// mergeNetworks is cluster plus local where cluster has no network of that name (the
// cluster's definition wins). Pure.
func mergeNetworks(cluster []ipam.Network, local ...ipam.Network) []ipam.Network {
	out := slices.Clone(cluster)
	for _, l := range local {
		if !slices.ContainsFunc(out, func(n ipam.Network) bool { return n.Name == l.Name }) {
			out = append(out, l)
		}
	}
	return out
}

// dnsRanges is nets as the dns package takes them. Pure; O(networks).
func dnsRanges(nets []ipam.Network) []dns.NetworkRange {
	out := make([]dns.NetworkRange, 0, len(nets))
	for _, n := range nets {
		out = append(out, dns.NetworkRange{Name: n.Name, Prefix: n.Subnet})
	}
	return out
}

// dnsListenAddrs are the addresses DNS serves: the gateway of every network in nets that is
// an address of this host (local), at port, sorted. A network without a bridge here has no
// gateway address here and is not served. Pure; O(networks).
func dnsListenAddrs(nets []ipam.Network, local map[netip.Addr]bool, port int) []netip.AddrPort {
	var out []netip.AddrPort
	for _, n := range nets {
		if n.Mode == ipam.ModeSRIOV {
			continue // no gateway on the host; its names resolve through the other networks
		}
		if gw := n.Gateway(); local[gw] {
			out = append(out, netip.AddrPortFrom(gw, uint16(port)))
		}
	}
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return out
}

// hostAddrs are the IPv4 addresses of this host's interfaces (weft networks are IPv4).
func hostAddrs() (map[netip.Addr]bool, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list the host's addresses: %w", err)
	}
	out := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			out[ip.Unmap()] = true
		}
	}
	return out, nil
}

// originKey is the public key a peer announced in gossip (pinned by the mesh); unknown until
// the mesh runs, so entries that arrive earlier are refused and come back through push/pull.
func (p *Peer) originKey(origin string) (ed25519.PublicKey, bool) {
	m := p.coords.mesh.Load()
	if m == nil {
		return nil, false
	}
	return m.PublicKey(origin)
}

// registerName publishes name → addr (and its services). A name DNS cannot carry (a long
// container ID) is logged and skipped, and so is a bad service: neither must fail the
// attachment. The name and its good services go out as one delta.
func (p *Peer) registerName(name string, addr netip.Addr, services []string) {
	var srvs []dns.SRV
	for _, s := range services {
		srv, err := checkService(name, s)
		if err != nil {
			p.log.Warn("service not published in DNS", "name", name, "service", s, "err", err)
			continue
		}
		srvs = append(srvs, srv)
	}
	if err := p.dnsRep.AddName(name, []netip.Addr{addr}, srvs); err != nil {
		p.log.Warn("container name not published in DNS", "name", name, "err", err)
	}
}

// checkService parses SERVICE/PROTO/PORT and checks it is an SRV entry DNS can carry for
// name, so that nothing is published when any part of a request is wrong.
func checkService(name, s string) (dns.SRV, error) {
	svc, proto, port, err := parseService(s)
	if err != nil {
		return dns.SRV{}, err
	}
	srv := dns.SRV{Service: svc, Proto: proto, Port: port}
	if err := dns.CheckSRV(name, srv); err != nil {
		return dns.SRV{}, fmt.Errorf("service %q: %w", s, err)
	}
	return srv, nil
}

// parseService reads SERVICE/PROTO/PORT, e.g. http/tcp/80.
func parseService(s string) (service, proto string, port uint16, err error) {
	parts := strings.Split(s, "/")
	if len(parts) != 3 {
		return "", "", 0, fmt.Errorf("service %q: want SERVICE/PROTO/PORT, e.g. http/tcp/80", s)
	}
	n, err := strconv.ParseUint(parts[2], 10, 16)
	if err != nil || n == 0 {
		return "", "", 0, fmt.Errorf("service %q: port %q is not 1-65535", s, parts[2])
	}
	if parts[1] != "tcp" && parts[1] != "udp" {
		return "", "", 0, fmt.Errorf("service %q: protocol %q is not tcp or udp", s, parts[1])
	}
	return parts[0], parts[1], uint16(n), nil
}

// dnsInfo is the resolver configuration handed to containers of network gw. It first makes
// sure DNS answers on gw: an ADD calls it right after the attachment, which may have created
// the network's bridge and gateway address moments ago, and the container may ask at once,
// before the kernel's address event reaches runDNSListen.
func (p *Peer) dnsInfo(gw netip.Addr) *cni.DNSInfo {
	p.syncDNS()
	domain := strings.TrimSuffix(p.cfg.DNSDomain, ".")
	return &cni.DNSInfo{Nameservers: []string{gw.String()}, Domain: domain, Search: []string{domain}}
}

// DNSRequest adds or removes names that do not come from CNI (`weft dns add/remove`).
type DNSRequest struct {
	Name     string   `json:"name"`
	Addrs    []string `json:"addrs"`
	Services []string `json:"services,omitempty"`
}

// DNSAnswer is what `weft dns lookup` prints.
type DNSAnswer struct {
	Name  string      `json:"name"`
	Addrs []DNSTarget `json:"addrs"`
}

// DNSTarget is one address of a name and the peer that published it.
type DNSTarget struct {
	Addr string `json:"addr"`
	Peer string `json:"peer"`
}

func parseAddrs(in []string) ([]netip.Addr, error) {
	out := make([]netip.Addr, 0, len(in))
	for _, s := range in {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "address %q: %v", s, err)
		}
		out = append(out, a)
	}
	return out, nil
}

func (p *Peer) dnsAdd(req DNSRequest) error {
	addrs, err := parseAddrs(req.Addrs)
	if err != nil {
		return err
	}
	if len(addrs) == 0 {
		return newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "dns add %q: no address", req.Name)
	}
	// Everything is checked before anything is published: a bad service must not leave
	// the name published behind a 400.
	srvs := make([]dns.SRV, 0, len(req.Services))
	for _, s := range req.Services {
		srv, err := checkService(req.Name, s)
		if err != nil {
			return newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "dns add: %v", err)
		}
		srvs = append(srvs, srv)
	}
	if err := p.dnsRep.AddName(req.Name, addrs, srvs); err != nil {
		status := http.StatusBadRequest
		if errors.Is(err, dns.ErrTooManyRecords) {
			status = http.StatusInsufficientStorage
		}
		return newAPIError(status, types.ErrInvalidNetworkConfig, "dns add: %v", err)
	}
	return nil
}

func (p *Peer) dnsRemove(req DNSRequest) error {
	if _, err := dns.NormalizeName(req.Name); err != nil {
		return newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "dns remove: %v", err)
	}
	addrs, err := parseAddrs(req.Addrs)
	if err != nil {
		return err
	}
	p.dnsRep.RemoveContainer(req.Name, addrs)
	return nil
}

func (p *Peer) dnsLookup(name string) (*DNSAnswer, error) {
	n, err := dns.NormalizeName(name)
	if err != nil {
		return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "dns lookup: %v", err)
	}
	targets, _ := p.dnsRep.Records().LookupName(n)
	ans := &DNSAnswer{Name: n, Addrs: []DNSTarget{}}
	for _, t := range targets {
		ans.Addrs = append(ans.Addrs, DNSTarget{Addr: t.Addr.String(), Peer: t.Peer})
	}
	return ans, nil
}
