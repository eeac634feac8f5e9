package router

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/dns"
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
	for _, n := range p.alloc.Networks() {
		cfg.Listen = append(cfg.Listen, net.JoinHostPort(n.Gateway().String(), strconv.Itoa(p.cfg.DNSPort)))
		cfg.Networks = append(cfg.Networks, n.Subnet)
	}
	srv, err := dns.NewServer(cfg, records, dns.Deps{Logger: p.log.With("component", "dns"), Registry: p.reg})
	if err != nil {
		return fmt.Errorf("dns: %w", err)
	}
	if err := srv.Start(); err != nil {
		return fmt.Errorf("dns: listen on %v: %w", cfg.Listen, err)
	}
	p.dnsServer = srv
	*stops = append(*stops, func() { srv.Close() })
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.dnsRep.Run(runCtx, p.cfg.DNSDownGrace, 10*time.Minute)
	}()
	*stops = append(*stops, func() { cancel(); <-done })
	return nil
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

// dnsInfo is the resolver configuration handed to containers of network gw.
func (p *Peer) dnsInfo(gw netip.Addr) *cni.DNSInfo {
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
