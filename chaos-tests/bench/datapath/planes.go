package main

// The network-planes cases (#13): throughput on a second network side by side with
// `default`, through real `weft peer` processes rather than the drivers as libraries.
//
// A chaos lab (package chaos-tests/lab) of two hosts runs a peer each (cluster key from the
// lab, --encrypt never as the lab sets it, --mtu equal to the bench's container MTU); host
// 0 creates `media` (10.50.0.0/16, the peers' own MTU), and one container per host is
// attached by libcni and the real plugin to default as eth0 and to media as net1, one
// conflist per network, as a runtime under Multus does. The two cases are the same two
// containers, measured once to the other's default address and once to its media address:
// same namespaces, same servers, same peers, only the plane differs. They join the
// bench's rounds like every other case, so their paired ratio media/default cancels the
// machine's drift, and the table puts them beside the hand-made kernel references.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/datapath/nslab"
)

// The second network and its interface in the containers.
const (
	planesNetwork = "media"
	planesIfName  = "net1"
)

var (
	planesDefaultRange = netip.MustParsePrefix("10.40.0.0/16") // the lab's --ipalloc-range
	planesSubnet       = netip.MustParsePrefix("10.50.0.0/16")
)

// planesConfig is what the planes cases need from the command line.
type planesConfig struct {
	binDir  string        // holds weft and weft-cni
	prefix  string        // the chaos lab's prefix (1–8 of [a-z0-9], see lab.Config)
	timeout time.Duration // longest wait for any one step (mesh, leader, network listed, ping)
	verbose bool          // log the lab's steps
}

// planes is the running chaos lab of the planes cases.
type planes struct {
	lab     *lab.Lab
	handles []ns.NetNS // opened on the lab's containers for the bench's subjects
	// addrs are the server container's addresses, by network.
	addrs map[string]netip.Addr
}

// newPlanes builds the lab and returns the two cases, default then media, client on host 0
// and server on host 1. On error the lab is closed and the error carries the peers' log
// tails. The caller closes p.
func newPlanes(ctx context.Context, cfg planesConfig) (p *planes, subjects []*subject, err error) {
	level := slog.LevelWarn
	if cfg.verbose {
		level = slog.LevelInfo
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	p = &planes{addrs: map[string]netip.Addr{}}
	p.lab, err = lab.New(ctx, lab.Config{Prefix: cfg.prefix, Hosts: 2, BinDir: cfg.binDir, Logger: logger,
		IPAllocRange: planesDefaultRange, NoStart: true,
		PeerArgs: func(i int) []string {
			args := []string{"--raft-voters", "2", "--mtu", strconv.Itoa(mtu)}
			if i > 0 {
				args = append(args, "--peers", p.lab.Host(0).Addr.Addr().String())
			}
			return args
		}})
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if err != nil {
			for _, h := range p.lab.Hosts() {
				fmt.Fprintf(os.Stderr, "--- %s peer log (tail) ---\n%s\n", h.Name, h.LogTail(30))
			}
			p.Close()
		}
	}()
	step := func(what string, cond func() error) error {
		sctx, cancel := context.WithTimeout(ctx, cfg.timeout)
		defer cancel()
		if err := lab.Poll(sctx, 200*time.Millisecond, cond); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	}
	hosts := p.lab.Hosts()
	if err := p.lab.StartAll(ctx); err != nil {
		return nil, nil, err
	}
	if err := step("waiting for the mesh", func() error { return planesReady(ctx, hosts) }); err != nil {
		return nil, nil, err
	}
	if out, err := hosts[0].CLI(ctx, "network", "create", planesNetwork, "--subnet", planesSubnet.String()); err != nil {
		return nil, nil, fmt.Errorf("network create %s: %w: %s", planesNetwork, err, out)
	}
	if err := step("waiting for every host to list "+planesNetwork, func() error { return listed(ctx, hosts, planesNetwork) }); err != nil {
		return nil, nil, err
	}

	planes := []struct {
		ifname  string
		opts    lab.CNIOptions
		network string
		rng     netip.Prefix
	}{
		{"eth0", lab.CNIOptions{}, "default", planesDefaultRange},
		{planesIfName, lab.CNIOptions{Name: "weft-" + planesNetwork, Network: planesNetwork}, planesNetwork, planesSubnet},
	}
	ctrs := make([]*nslab.NS, len(hosts))
	for i, h := range hosts {
		ctr, err := h.NewContainer()
		if err != nil {
			return nil, nil, err
		}
		for _, pl := range planes {
			cni, err := h.CNI(pl.opts)
			if err != nil {
				return nil, nil, err
			}
			res, err := cni.Add(ctx, ctr.RuntimeConf(pl.ifname))
			if err != nil {
				return nil, nil, fmt.Errorf("attach %s %s to %s: %w", ctr.Name, pl.ifname, pl.network, err)
			}
			addr, err := lab.ResultAddress(res)
			if err != nil {
				return nil, nil, fmt.Errorf("attach %s %s to %s: %w", ctr.Name, pl.ifname, pl.network, err)
			}
			if !pl.rng.Contains(addr.Addr()) {
				return nil, nil, fmt.Errorf("attach %s %s to %s: address %s outside %s", ctr.Name, pl.ifname, pl.network, addr, pl.rng)
			}
			if i == 1 {
				p.addrs[pl.network] = addr.Addr()
			}
		}
		// Both planes must carry the same packets as each other and as the other cases,
		// or the comparison measures the MTU.
		if err := sameMTUs(ctr.NSPath, mtu, "eth0", planesIfName); err != nil {
			return nil, nil, fmt.Errorf("%s: %w", ctr.Name, err)
		}
		nsh, err := ns.GetNS(ctr.NSPath)
		if err != nil {
			return nil, nil, fmt.Errorf("open %s: %w", ctr.NSPath, err)
		}
		p.handles = append(p.handles, nsh)
		ctrs[i] = &nslab.NS{Name: ctr.Name, NetNS: nsh}
	}
	for _, pl := range planes {
		subjects = append(subjects, &subject{name: "weft peers " + pl.network, client: ctrs[0], server: ctrs[1], serverAddr: p.addrs[pl.network]})
	}
	return p, subjects, nil
}

// Close closes the container handles and the lab (peers stopped, namespaces deleted).
// Safe on a partly built p.
func (p *planes) Close() error {
	for _, h := range p.handles {
		h.Close()
	}
	p.handles = nil
	if p.lab == nil {
		return nil
	}
	return p.lab.Close()
}

// describe is the header line of the planes cases, with host 0's connection to host 1 as
// its peer reports it (call it once traffic flows, when the connection carries the blocks).
func (p *planes) describe(ctx context.Context) string {
	hosts := p.lab.Hosts()
	return fmt.Sprintf("weft peers: 2 real peers, one container on each attached to default (eth0, server %s) and %s %s (%s, server %s); host 0 → host 1: %s",
		p.addrs["default"], planesNetwork, planesSubnet, planesIfName, p.addrs[planesNetwork], connections(ctx, hosts[0], hosts[1].Name))
}

// planesReady says whether every host sees both peers alive and knows the Raft leader
// (before that, an ADD that needs a block waits or fails with "try again"). Two CLI calls
// per host, each answering with O(hosts) peers.
func planesReady(ctx context.Context, hosts []*lab.Host) error {
	for _, h := range hosts {
		var peers []struct {
			State string `json:"state"`
		}
		if err := cliJSON(ctx, h, &peers, "status", "peers"); err != nil {
			return err
		}
		alive := 0
		for _, pr := range peers {
			if pr.State == "alive" {
				alive++
			}
		}
		if alive != len(hosts) {
			return fmt.Errorf("%s sees %d of %d alive", h.Name, alive, len(hosts))
		}
		var st struct {
			Leader string `json:"leader"`
		}
		if err := cliJSON(ctx, h, &st, "status", "ipam"); err != nil {
			return err
		}
		if st.Leader == "" {
			return fmt.Errorf("%s knows no raft leader yet", h.Name)
		}
	}
	return nil
}

// listed says whether every host lists network: one CLI call per host.
func listed(ctx context.Context, hosts []*lab.Host, network string) error {
	for _, h := range hosts {
		var nets []struct {
			Name string `json:"name"`
		}
		if err := cliJSON(ctx, h, &nets, "network", "ls"); err != nil {
			return err
		}
		if !slices.ContainsFunc(nets, func(n struct {
			Name string `json:"name"`
		}) bool {
			return n.Name == network
		}) {
			return fmt.Errorf("%s does not list %s yet", h.Name, network)
		}
	}
	return nil
}

// connections describes h's connections to peer: mode and blocks of each entry (one per
// peer, or one per network and peer where the peer reports them so). Best effort: it only
// labels the table, so an error is shown in its place.
func connections(ctx context.Context, h *lab.Host, peer string) string {
	var conns []struct {
		Peer    string   `json:"peer"`
		Network string   `json:"network"`
		Mode    string   `json:"mode"`
		State   string   `json:"state"`
		Blocks  []string `json:"blocks"`
	}
	if err := cliJSON(ctx, h, &conns, "status", "connections"); err != nil {
		return "(" + err.Error() + ")"
	}
	var out []string
	for _, c := range conns {
		if c.Peer != peer {
			continue
		}
		s := fmt.Sprintf("%s %s [%s]", c.Mode, c.State, strings.Join(c.Blocks, " "))
		if c.Network != "" {
			s = c.Network + ": " + s
		}
		out = append(out, s)
	}
	if len(out) == 0 {
		return "(no connection listed)"
	}
	return strings.Join(out, "; ")
}

// sameMTUs checks that every named link in the namespace at path has MTU want.
func sameMTUs(path string, want int, names ...string) error {
	nh, err := nslab.HandleAt(path)
	if err != nil {
		return err
	}
	defer nh.Close()
	for _, n := range names {
		l, err := nh.LinkByName(n)
		if err != nil {
			return fmt.Errorf("find %s: %w", n, err)
		}
		if got := l.Attrs().MTU; got != want {
			return fmt.Errorf("%s has MTU %d, want %d like every other case", n, got, want)
		}
	}
	return nil
}

func cliJSON(ctx context.Context, h *lab.Host, v any, args ...string) error {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := h.CLI(cctx, append(args, "--json")...)
	if err != nil {
		return err // names the command and carries its stderr
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("decode weft %s --json on %s: %w", strings.Join(args, " "), h.Name, err)
	}
	return nil
}

// errNoBinaries is returned when -bin lacks the binaries the planes cases run.
var errNoBinaries = errors.New("the weft peers cases need the weft and weft-cni binaries (make build; or -planes=false)")

// checkBinaries fails with errNoBinaries unless dir holds weft and weft-cni, before any
// namespace is made.
func checkBinaries(dir string) error {
	for _, b := range []string{"weft", "weft-cni"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return fmt.Errorf("%w: %v", errNoBinaries, err)
		}
	}
	return nil
}
