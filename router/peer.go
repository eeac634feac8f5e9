package router

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	bolt "go.etcd.io/bbolt"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/shape"
	"github.com/weftnet/weft/dns"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/mesh/identity"
)

// Peer is one weft peer: the daemon that owns this host's part of the mesh.
type Peer struct {
	cfg     Config
	log     *slog.Logger
	reg     *prometheus.Registry
	metrics *metrics
	ready   chan struct{}

	// Set during start, read-only afterwards.
	db        *bolt.DB
	alloc     *ipam.Allocator
	transport *ipam.PeerTransport
	cluster   *ipam.Cluster
	mesh      *mesh.Mesh
	usage     *ipam.UsageTable
	identity  *identity.Identity // signs what this peer owns in gossip: links, coordinates, names, usage
	links     *links
	filters   *filters // nftables: the guard and the isolation between networks (router/isolate.go)
	paths     *paths
	history   *history       // the status page's rings of link and interface samples (router/history.go)
	coords    coordEstimator // RTT estimates for path selection, bound to mesh once it runs
	dnsRep    *dns.Replicator
	dnsServer *dns.Server
	dnsListen *dnsListen // follows networks and gateway addresses (router/dns.go)
	sriov     *sriovPart // the VF pool of SR-IOV networks (router/sriov.go)
	shape     *shaping   // per-container rate limits (router/shape.go)
	started   time.Time
	// sriovSource reports the VF pool's counts, announced in gossip (router/sriovcaps.go).
	sriovSource capacitySource

	// Issue #15: container labels, ours and gossiped (set during start; router/labels.go),
	// and what Config.OnPolicies last saw (its own lock; router/policies.go).
	labels   *labelStore
	polWatch policyWatch
	// Network policy (router/netpol.go): set during start; nil on a peer built in part.
	policy     *policyPart
	policyKick chan struct{} // wakes the policy loop on a table change

	// Issue #16: per-segment measurement and interface counters (router/segments.go).
	segs *segmentsPart

	perf perfState // `weft perf`, its own lock (router/perf.go)

	// keyLocks serialise operations on one attachment (ADD racing DEL of the same container)
	// without serialising different containers.
	keyLocks [64]sync.Mutex
}

// New checks cfg and builds a Peer; nothing is touched until Run.
func New(cfg Config) (*Peer, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.ValidatePolicy == nil {
		cfg.ValidatePolicy = validatePolicy // every real peer accepts netpol policies
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	p := &Peer{
		cfg:     cfg,
		log:     cfg.Logger,
		reg:     reg,
		metrics: newMetrics(reg),
		ready:   make(chan struct{}),
		history: newHistory(),
	}
	p.sriovSource = capacityFrom(p.sriovCapacity) // the VF pool's counts, announced in gossip
	p.shape = newShaping(shape.New(nil), reg, p.log.With("component", "shape"), p.shapedIfs)
	return p, nil
}

// Ready is closed once the control API accepts requests.
func (p *Peer) Ready() <-chan struct{} { return p.ready }

// Run starts every component in order, serves until ctx is cancelled, then stops them in
// reverse order. It returns the first start error, or nil after a clean stop.
func (p *Peer) Run(ctx context.Context) error {
	var stops []func()
	defer func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
		p.log.Info("peer stopped")
	}()

	if p.cfg.Insecure {
		p.log.Warn("running --insecure: no cluster key, so anyone who reaches this host's ports can join the mesh, " +
			"claim and release address blocks and inject state; make a key with `weft keygen` and use --key-file")
	}
	if err := os.MkdirAll(p.cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("create data dir: %w", err)
	}
	db, err := bolt.Open(filepath.Join(p.cfg.DataDir, "weft.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if errors.Is(err, bolt.ErrTimeout) {
		return fmt.Errorf("data dir %s is in use by another weft peer", p.cfg.DataDir)
	}
	if err != nil {
		return fmt.Errorf("open database: %w", err)
	}
	p.db = db
	stops = append(stops, func() { db.Close() })
	// One identity for everything this peer signs; its public key goes out in the mesh
	// metadata, and the mesh pins every other peer's key (see originKey).
	if p.identity, err = identity.LoadOrCreate(p.cfg.DataDir); err != nil {
		return err
	}
	p.usage = ipam.NewUsageTable(ipam.UsageConfig{Logger: p.log.With("component", "ipam"), Registerer: p.reg,
		Signer: p.identity, Keys: p.originKey})

	advertise := p.cfg.AdvertiseAddr
	if !advertise.IsValid() {
		if advertise, err = mesh.DefaultAdvertiseAddr(); err != nil {
			return fmt.Errorf("find the underlay address (set --advertise-addr): %w", err)
		}
	}
	if err := p.startCluster(advertise, &stops); err != nil {
		return err
	}
	p.alloc, err = ipam.NewAllocator(ipam.Config{
		Peer:       p.cfg.Name,
		Networks:   []ipam.Network{p.cfg.defaultNetwork()},
		Logger:     p.log.With("component", "ipam"),
		Registerer: p.reg,
	}, db, p.startLeaderWait(ctx, &stops))
	if err != nil {
		return err
	}
	if err := p.ensureKernel(); err != nil {
		return err
	}
	if err := p.startSRIOV(ctx, &stops); err != nil { // repairs interrupted ADDs before the API serves
		return err
	}
	if err := p.startGuard(advertise); err != nil { // after the bridges exist (router/guard.go)
		return err
	}
	if err := p.startPolicy(); err != nil { // after the isolation, before the API serves ADDs
		return fmt.Errorf("apply network policy: %w", err)
	}
	if err := p.startDNS(ctx, &stops); err != nil {
		return err
	}
	if err := p.startDatapath(ctx, advertise); err != nil {
		return err
	}
	if err := p.startPaths(ctx, advertise, &stops); err != nil {
		return err
	}
	p.dnsServer.SetNearest(p.nearest)
	if err := p.newPeerSegments(advertise); err != nil {
		return err
	}
	stops = append(stops, p.stopDatapath)
	meshCtx, stopMesh := context.WithCancel(ctx)
	p.mesh, err = p.startMesh(meshCtx, advertise)
	if err != nil {
		stopMesh()
		return fmt.Errorf("start mesh: %w", err)
	}
	p.coords.mesh.Store(p.mesh)
	stops = append(stops, func() {
		if err := p.mesh.Leave(2 * time.Second); err != nil {
			p.log.Warn("leaving the mesh", "err", err)
		}
		stopMesh()
		p.mesh.Close()
	})
	loopDone := make(chan struct{})
	go func() {
		defer close(loopDone)
		p.runMembership(meshCtx)
	}()
	stops = append(stops, func() { stopMesh(); <-loopDone })
	dpDone := make(chan struct{})
	go func() {
		defer close(dpDone)
		p.runDatapath(meshCtx)
	}()
	stops = append(stops, func() { stopMesh(); <-dpDone })
	polDone := make(chan struct{})
	go func() {
		defer close(polDone)
		p.runPolicy(meshCtx)
	}()
	stops = append(stops, func() { stopMesh(); <-polDone })
	stops = append(stops, p.startHistory(meshCtx))
	segDone := make(chan struct{})
	go func() {
		defer close(segDone)
		p.segs.run(meshCtx)
	}()
	stops = append(stops, func() { stopMesh(); <-segDone })

	p.sweepPerfEndpoints() // test endpoints of a run stopped mid-test (router/perf.go)
	stops = append(stops, p.stopPerf)
	api, err := p.listenAPI()
	if err != nil {
		return err
	}
	stops = append(stops, p.serve("control API", api, p.apiHandler()))
	if p.cfg.HTTPAddr != "" {
		ln, err := net.Listen("tcp", p.cfg.HTTPAddr)
		if err != nil {
			return fmt.Errorf("listen on --http-addr %s: %w", p.cfg.HTTPAddr, err)
		}
		stops = append(stops, p.serve("http", ln, p.httpHandler()))
	}
	p.started = time.Now()
	close(p.ready)
	p.log.Info("peer started", "name", p.cfg.Name, "socket", p.cfg.Socket, "http", p.cfg.HTTPAddr,
		"range", p.cfg.IPAllocRange, "advertise", advertise, "seeds", p.cfg.Seeds,
		"attachments", len(p.alloc.Attachments()))

	<-ctx.Done()
	p.log.Info("peer stopping")
	return nil
}

// startCluster opens the peer transport, the Raft node and the forwarding server; their
// stops are appended to stops in start order.
func (p *Peer) startCluster(advertise netip.Addr, stops *[]func()) error {
	// With a cluster key, names on the transport and signers of table deltas are checked
	// against the identities the mesh pins: a member holding the key cannot pass for another
	// or feed clients a forged table. --insecure proves nothing, so checks nothing.
	var keys identity.KeyLookup
	if len(p.cfg.ClusterKey) != 0 {
		keys = p.originKey
	}
	tr, err := ipam.NewPeerTransport(ipam.TransportConfig{
		BindAddr:   netip.AddrPortFrom(advertise, uint16(p.cfg.RaftPort)).String(),
		Key:        ipam.DeriveKey(p.cfg.ClusterKey),
		Name:       p.cfg.Name,
		Identity:   p.identity.Signer(),
		Keys:       keys,
		Registerer: p.reg,
		Logger:     p.log.With("component", "transport"),
	})
	if err != nil {
		return fmt.Errorf("listen on --raft-port %d: %w", p.cfg.RaftPort, err)
	}
	p.transport = tr
	*stops = append(*stops, func() { tr.Close() })
	netTrans := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  tr,
		MaxPool: 3,
		Timeout: 10 * time.Second,
		Logger:  hclog.New(&hclog.LoggerOptions{Name: "raft-net", Output: io.Discard}),
	})
	*stops = append(*stops, func() { netTrans.Close() })
	p.cluster, err = ipam.NewCluster(ipam.ClusterConfig{
		Name:           p.cfg.Name,
		Dir:            filepath.Join(p.cfg.DataDir, "raft"),
		Transport:      netTrans,
		Forward:        ipam.HTTPForwarder(tr.DialRPC),
		FetchTable:     ipam.HTTPTableFetcher(tr.DialRPC),
		Signer:         p.identity,
		Keys:           keys,
		Registerer:     p.reg,
		DB:             p.db,
		Voters:         p.cfg.RaftVoters,
		Nonvoters:      p.cfg.RaftNonvoters,
		DeadVoterGrace: p.cfg.VoterGrace,
		ReclaimAfter:   p.cfg.ReclaimAfter,
		ValidatePolicy: p.cfg.ValidatePolicy,
		PeerRPC:        p.peerRPCHandler(), // weft perf between peers (router/perf.go)
		Networks:       []ipam.Network{p.cfg.defaultNetwork()},
		Logger:         p.log.With("component", "raft"),
	})
	if err != nil {
		return err
	}
	*stops = append(*stops, func() {
		if err := p.cluster.Close(); err != nil {
			p.log.Warn("raft shutdown", "err", err)
		}
	})
	*stops = append(*stops, p.cluster.ServeForwarded(tr.RPCListener()))
	return nil
}

// ensureKernel converges the host's kernel state to what the database says: the bridge of
// every network. Attachments' veths outlive the peer, so a restart leaves them alone.
func (p *Peer) ensureKernel() error {
	for _, n := range p.alloc.Networks() {
		if n.Mode == ipam.ModeSRIOV {
			continue // its containers hold VFs: no bridge
		}
		_, err := datapath.EnsureBridge(datapath.BridgeConfig{
			Name: bridgeName(n.Name), Gateway: n.GatewayPrefix(), MTU: p.cfg.MTU,
		})
		if err != nil {
			return fmt.Errorf("network %s: %w", n.Name, err)
		}
	}
	return nil
}

// listenAPI opens the control socket with mode 0600, replacing a stale socket file but never
// one a live peer still answers on.
func (p *Peer) listenAPI() (net.Listener, error) {
	path := p.cfg.Socket
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket dir: %w", err)
	}
	if _, err := os.Stat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another weft peer is listening on %s", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}

// serve runs an HTTP server on ln and returns its stop function, which waits for in-flight
// requests up to a bound.
func (p *Peer) serve(what string, ln net.Listener, h http.Handler) func() {
	srv := newHTTPServer(h, limitsFor(what), slog.NewLogLogger(p.log.Handler(), slog.LevelWarn))
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			p.log.Error("server failed", "server", what, "err", err)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), defaultStopTimeout)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			p.log.Warn("server did not stop cleanly", "server", what, "err", err)
			srv.Close()
		}
		<-done
	}
}

func (p *Peer) lockKey(k ipam.Key) func() {
	var h uint32 = 2166136261
	for _, c := range []byte(k.String()) {
		h = (h ^ uint32(c)) * 16777619
	}
	mu := &p.keyLocks[h%uint32(len(p.keyLocks))]
	mu.Lock()
	return mu.Unlock
}
