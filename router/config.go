// Package router is the weft peer: it wires mesh, ipam, datapath, dns and the path choice
// together under one root context with an ordered start and stop, and serves the control API
// (the CNI verbs and the operator commands) on a unix socket plus metrics and status over
// loopback HTTP.
package router

import (
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/weftnet/weft/datapath/sriov"
	"github.com/weftnet/weft/ipam"
)

// Defaults, as documented in the README.
const (
	DefaultSocket   = "/run/weft/weft.sock"
	DefaultDataDir  = "/var/lib/weft"
	DefaultHTTPAddr = "127.0.0.1:6782"
	DefaultNetwork  = "default"
	DefaultBridge   = "weft"
	// DefaultMTU fits every link mode on a 1500-byte underlay: VXLAN takes 50 bytes and
	// WireGuard 80, so their devices are 1450 and 1420.
	DefaultMTU        = 1420
	DefaultMeshPort   = 6783
	DefaultRaftPort   = 6785
	DefaultRaftVoters = 3
	// DefaultRaftNonvoters spares follow the log, ready to replace a dead voter; every other
	// peer is a Raft client.
	DefaultRaftNonvoters = 2
	DefaultVoterGrace    = time.Minute
	// DefaultAttachWait is how long an ADD that needs a new block waits for a Raft leader
	// while the peer is still forming or joining its cluster.
	DefaultAttachWait = 15 * time.Second
	// maxAttachWait keeps --attach-wait below the plugin's own 60s bound on one call.
	maxAttachWait = 50 * time.Second
	// defaultSettle is how long membership must stay unchanged before a peer without Raft
	// state may bootstrap, so that peers starting together agree on who does.
	defaultSettle      = 3 * time.Second
	defaultBlockBits   = ipam.DefaultBlockBits
	defaultStopTimeout = 10 * time.Second
)

// ClusterKeySize is the length of the cluster key.
const ClusterKeySize = 32

// DefaultRange is the default network's address range.
var DefaultRange = netip.MustParsePrefix("10.40.0.0/16")

// ErrInvalidConfig wraps every configuration error.
var ErrInvalidConfig = errors.New("invalid configuration")

// Config configures a Peer.
type Config struct {
	Name     string
	DataDir  string
	Socket   string
	HTTPAddr string // empty disables the HTTP listener
	// Pprof serves Go's profiler at /debug/pprof/ on HTTPAddr, for operators measuring the
	// peer's own cost; off by default since profiles reveal internals.
	Pprof        bool
	IPAllocRange netip.Prefix
	BlockBits    int
	MTU          int
	Version      string
	Logger       *slog.Logger

	// Seeds are the peers to join ("host[:port]"); empty for the first peer.
	Seeds []string
	// AdvertiseAddr is this host's underlay address; zero means the address of the
	// default-route interface.
	AdvertiseAddr netip.Addr
	MeshPort      int
	RaftPort      int
	// ClusterKey (32 bytes, from `weft keygen` or a stretched passphrase) encrypts and
	// authenticates gossip, Raft and leader forwarding (TLS 1.3), and probes, each with a
	// subkey of its own derived by HKDF (mesh.GossipKey, ipam.DeriveKey, probeKey); with
	// Encrypt "auto" it also asks for WireGuard links. Required unless Insecure.
	ClusterKey []byte
	// Insecure runs without a cluster key: anyone who reaches this host's ports can join
	// the mesh and change its state. An explicit choice, warned about at every start.
	Insecure bool
	// RaftVoters is how many of the first peers vote.
	RaftVoters int
	// RaftNonvoters is how many more peers follow the Raft log without voting; the others are
	// clients that forward writes and learn the block table by gossip.
	RaftNonvoters int
	// VoterGrace is how long a voter may be dead before a healthy non-voter replaces it.
	VoterGrace time.Duration
	// ReclaimAfter, when set, returns the blocks of peers dead that long to the pool.
	ReclaimAfter time.Duration
	// AttachWait is how long an ADD that needs a new block waits for a Raft leader while
	// this peer is still forming or joining its cluster, before it fails with CNI 11; 0
	// fails at once.
	AttachWait time.Duration
	// SettleTime overrides defaultSettle (tests).
	SettleTime time.Duration

	// Encrypt is the link encryption policy: "never", "auto" (encrypt unless Insecure) or
	// "always"; links to peers both ends trust stay plaintext either way.
	Encrypt string
	// TrustedSubnets are underlay ranges whose peers may get plaintext links.
	TrustedSubnets []netip.Prefix
	// WireGuardPort is the WireGuard UDP port, the same on every peer.
	WireGuardPort int

	// ProbePort is where peers measure each other (UDP), the same on every peer.
	ProbePort int
	// LinkProbePort is where peers measure the link in use (VXLAN, WireGuard or direct)
	// rather than the underlay: UDP from and to this port is routed through the tunnel to
	// each peer (datapath.EnsureProbeRule). The same on every peer; 0 turns link probes off
	// and paths are chosen on underlay probes alone.
	LinkProbePort int
	// ProbeInterval is the time between two probes to one peer (jittered).
	ProbeInterval time.Duration
	// ProbeTargets is how many peers this peer measures directly by choice (the nearest by
	// network coordinates and a few random ones; peers it relays through are measured on top).
	// Every other peer's figures are estimated from coordinates, so probe traffic per peer
	// does not grow with the mesh.
	ProbeTargets int
	// ProbeTimeout is how long a probe may go unanswered before it counts as lost; 0 means
	// twice ProbeInterval, at most 1s. Three lost in a row mark a link down.
	ProbeTimeout time.Duration
	// SLA is this peer's class, e.g. "gold: rtt<=5ms,loss<=0.1%"; empty means any working
	// link will do.
	SLA string

	// NoDirect turns off plain routing to peers on the same L2 segment (VXLAN instead).
	NoDirect bool

	// DNSDomain is the domain of container names (fully qualified).
	DNSDomain string
	// DNSPort is where the DNS server listens on each network's gateway address.
	DNSPort int
	// DNSTTL is the TTL of weft answers.
	DNSTTL time.Duration
	// DNSUpstreams are the resolvers for other names; empty means /etc/resolv.conf's.
	DNSUpstreams []string
	// DNSDownGrace is how long a dead peer's names stay in answers.
	DNSDownGrace time.Duration

	// SysfsRoot is where the peer reads the VFs of SR-IOV networks' PFs (issue #14): "/sys",
	// or a fixture's tree in tests and the lab.
	SysfsRoot string
	// SRIOVDeviceInfoDir is where DPDK attachments' device-info files go.
	SRIOVDeviceInfoDir string
	// SRIOVPFConfig chooses what programs VF settings on the PF: SRIOVPFNetlink (the kernel)
	// or SRIOVPFRecord, a stand-in that only logs and remembers them, for hosts whose "VFs"
	// are not real (the lab's macvlan stand-ins have no PF to program).
	SRIOVPFConfig string
	// SRIOVRescan is how often the VFs of SR-IOV networks' PFs are rediscovered (besides on
	// every change of the network table); 0 means DefaultSRIOVRescan.
	SRIOVRescan time.Duration
	// LossCrossCheckWindow is the sliding interval of the tunnel loss cross-check (TX here
	// against RX there); a ratio is given once the readings span half of it. 0 means
	// DefaultLossCrossCheckWindow. Short windows are for labs: they react faster but count
	// fewer packets, so the ratio is noisier.
	LossCrossCheckWindow time.Duration
	// SRIOVPF overrides SRIOVPFConfig with a given configurator (tests).
	SRIOVPF sriov.PFConfig
	// PerfMaxRate caps `weft perf` tests from and to this peer, bits/s; 0 means
	// DefaultPerfMaxRate (router/perf.go).
	PerfMaxRate int64

	// ValidatePolicy checks policy files (issue #15); nil: netpol.Parse (New sets it), the
	// validator whose specs the peer's enforcement reads (router/netpol.go).
	ValidatePolicy ipam.PolicyValidator
	// OnPolicies, when set, gets the cluster's whole policy table each time it changes, from
	// the membership loop (router/policies.go syncPolicies); it must not block for long.
	OnPolicies func([]ipam.PolicyObject)
}

// SR-IOV PF configurators (--sriov-pf-config).
const (
	SRIOVPFNetlink = "netlink"
	SRIOVPFRecord  = "record"
)

// DefaultSRIOVRescan is how often the peer rediscovers its SR-IOV VFs.
const DefaultSRIOVRescan = 30 * time.Second

// DefaultLossCrossCheckWindow is the loss cross-check's sliding interval.
const DefaultLossCrossCheckWindow = 2 * time.Minute

// minLossCrossCheckWindow: peers re-send a changed segments record at most every 10 s
// (segmentMinPublish), so half a window must hold at least two of them.
const minLossCrossCheckWindow = 20 * time.Second

// DefaultConfig returns the documented defaults; Name must still be set.
func DefaultConfig() Config {
	return Config{
		DataDir:       DefaultDataDir,
		Socket:        DefaultSocket,
		HTTPAddr:      DefaultHTTPAddr,
		IPAllocRange:  DefaultRange,
		BlockBits:     defaultBlockBits,
		MTU:           DefaultMTU,
		Version:       "dev",
		MeshPort:      DefaultMeshPort,
		RaftPort:      DefaultRaftPort,
		RaftVoters:    DefaultRaftVoters,
		RaftNonvoters: DefaultRaftNonvoters,
		VoterGrace:    DefaultVoterGrace,
		AttachWait:    DefaultAttachWait,
		SettleTime:    defaultSettle,
		Encrypt:       "auto",
		WireGuardPort: 6786,
		ProbePort:     6787,
		LinkProbePort: 6788,
		ProbeInterval: time.Second,
		ProbeTargets:  16,
		DNSDomain:     "weft.local.",
		DNSPort:       53,
		DNSTTL:        30 * time.Second,
		DNSDownGrace:  30 * time.Second,

		SysfsRoot:          sriov.DefaultSysfsRoot,
		SRIOVDeviceInfoDir: sriov.DefaultDeviceInfoDir,
		SRIOVPFConfig:      SRIOVPFNetlink,
		SRIOVRescan:        DefaultSRIOVRescan,

		LossCrossCheckWindow: DefaultLossCrossCheckWindow,
	}
}

// Validate names the first setting that is wrong.
func (c Config) Validate() error {
	switch {
	case c.Name == "":
		return fmt.Errorf("%w: --name is empty", ErrInvalidConfig)
	case !filepath.IsAbs(c.DataDir):
		return fmt.Errorf("%w: --data-dir %q must be an absolute path", ErrInvalidConfig, c.DataDir)
	case !filepath.IsAbs(c.Socket):
		return fmt.Errorf("%w: --socket %q must be an absolute path", ErrInvalidConfig, c.Socket)
	case len(c.Socket) > 107:
		return fmt.Errorf("%w: --socket path is %d bytes, unix sockets allow 107", ErrInvalidConfig, len(c.Socket))
	case c.MTU < 576 || c.MTU > 65535:
		return fmt.Errorf("%w: --mtu %d must be between 576 and 65535", ErrInvalidConfig, c.MTU)
	case c.MeshPort < 0 || c.MeshPort > 65535:
		return fmt.Errorf("%w: --mesh-port %d is not a port", ErrInvalidConfig, c.MeshPort)
	case c.RaftPort < 0 || c.RaftPort > 65535:
		return fmt.Errorf("%w: --raft-port %d is not a port", ErrInvalidConfig, c.RaftPort)
	case c.RaftVoters < 1:
		return fmt.Errorf("%w: --raft-voters %d must be at least 1", ErrInvalidConfig, c.RaftVoters)
	case c.RaftNonvoters < 0 || c.RaftNonvoters > 16:
		return fmt.Errorf("%w: --raft-nonvoters %d must be between 0 and 16", ErrInvalidConfig, c.RaftNonvoters)
	case c.VoterGrace <= 0:
		return fmt.Errorf("%w: --raft-voter-grace %s must be positive", ErrInvalidConfig, c.VoterGrace)
	case c.Encrypt != "never" && c.Encrypt != "auto" && c.Encrypt != "always":
		return fmt.Errorf("%w: --encrypt %q must be never, auto or always", ErrInvalidConfig, c.Encrypt)
	case c.Encrypt == "always" && c.Insecure:
		return fmt.Errorf("%w: --encrypt=always needs a cluster key, not --insecure: WireGuard keys must travel in authenticated gossip", ErrInvalidConfig)
	case c.WireGuardPort <= 0 || c.WireGuardPort > 65535:
		return fmt.Errorf("%w: --wireguard-port %d is not a port", ErrInvalidConfig, c.WireGuardPort)
	case c.ProbePort < 0 || c.ProbePort > 65535:
		return fmt.Errorf("%w: --probe-port %d is not a port", ErrInvalidConfig, c.ProbePort)
	case c.LinkProbePort < 0 || c.LinkProbePort > 65535:
		return fmt.Errorf("%w: --link-probe-port %d is not a port", ErrInvalidConfig, c.LinkProbePort)
	case c.LinkProbePort != 0 && c.LinkProbePort == c.ProbePort:
		return fmt.Errorf("%w: --link-probe-port %d must differ from --probe-port", ErrInvalidConfig, c.LinkProbePort)
	case c.ProbeTimeout != 0 && c.ProbeTimeout < 10*time.Millisecond:
		return fmt.Errorf("%w: --probe-timeout %s: at least 10ms (0: twice --probe-interval, at most 1s)", ErrInvalidConfig, c.ProbeTimeout)
	case c.ProbeTargets < 1 || c.ProbeTargets > 1024:
		return fmt.Errorf("%w: --probe-targets %d out of range 1..1024", ErrInvalidConfig, c.ProbeTargets)
	case c.ProbeInterval < 50*time.Millisecond:
		return fmt.Errorf("%w: --probe-interval %s: at most 20 probes a second per peer", ErrInvalidConfig, c.ProbeInterval)
	case c.DNSPort < 0 || c.DNSPort > 65535:
		return fmt.Errorf("%w: --dns-port %d is not a port", ErrInvalidConfig, c.DNSPort)
	case c.DNSTTL <= 0:
		return fmt.Errorf("%w: --dns-ttl %s must be positive", ErrInvalidConfig, c.DNSTTL)
	case c.DNSDownGrace <= 0:
		return fmt.Errorf("%w: --dns-down-grace %s must be positive", ErrInvalidConfig, c.DNSDownGrace)
	case c.AttachWait < 0 || c.AttachWait > maxAttachWait:
		return fmt.Errorf("%w: --attach-wait %s must be between 0 and %s (the CNI plugin gives one call 60s)", ErrInvalidConfig, c.AttachWait, maxAttachWait)
	case c.ReclaimAfter < 0:
		return fmt.Errorf("%w: --reclaim-after %s must not be negative", ErrInvalidConfig, c.ReclaimAfter)
	case c.SysfsRoot != "" && !filepath.IsAbs(c.SysfsRoot):
		return fmt.Errorf("%w: --sysfs-root %q must be an absolute path", ErrInvalidConfig, c.SysfsRoot)
	case c.SRIOVDeviceInfoDir != "" && !filepath.IsAbs(c.SRIOVDeviceInfoDir):
		return fmt.Errorf("%w: --sriov-device-info-dir %q must be an absolute path", ErrInvalidConfig, c.SRIOVDeviceInfoDir)
	case c.SRIOVPFConfig != "" && c.SRIOVPFConfig != SRIOVPFNetlink && c.SRIOVPFConfig != SRIOVPFRecord:
		return fmt.Errorf("%w: --sriov-pf-config %q must be %s or %s", ErrInvalidConfig, c.SRIOVPFConfig, SRIOVPFNetlink, SRIOVPFRecord)
	case c.SRIOVRescan < 0:
		return fmt.Errorf("%w: --sriov-rescan %s must not be negative", ErrInvalidConfig, c.SRIOVRescan)
	case c.LossCrossCheckWindow != 0 && c.LossCrossCheckWindow < minLossCrossCheckWindow:
		return fmt.Errorf("%w: --loss-crosscheck-window %s must be at least %s (0: %s)", ErrInvalidConfig, c.LossCrossCheckWindow, minLossCrossCheckWindow, DefaultLossCrossCheckWindow)
	case c.AdvertiseAddr.IsValid() && (c.AdvertiseAddr.IsUnspecified()):
		return fmt.Errorf("%w: --advertise-addr %s must be a specific address", ErrInvalidConfig, c.AdvertiseAddr)
	case c.Insecure && len(c.ClusterKey) != 0:
		return fmt.Errorf("%w: --insecure with a cluster key (--key-file or --password-file): choose one", ErrInvalidConfig)
	case !c.Insecure && len(c.ClusterKey) == 0:
		return fmt.Errorf("%w: no cluster key: make one with `weft keygen -o /etc/weft/cluster.key`, copy it to every host "+
			"and start with `weft peer --key-file /etc/weft/cluster.key` (or --insecure, which lets anyone who reaches "+
			"this host's ports join)", ErrInvalidConfig)
	case len(c.ClusterKey) != 0 && len(c.ClusterKey) != ClusterKeySize:
		return fmt.Errorf("%w: cluster key is %d bytes, want %d (make one with weft keygen)", ErrInvalidConfig, len(c.ClusterKey), ClusterKeySize)
	}
	if err := c.defaultNetwork().Validate(); err != nil {
		return fmt.Errorf("%w: --ipalloc-range: %v", ErrInvalidConfig, err)
	}
	return nil
}

// probeTimeout is ProbeTimeout with its default filled in.
func (c Config) probeTimeout() time.Duration {
	if c.ProbeTimeout != 0 {
		return c.ProbeTimeout
	}
	return min(2*c.ProbeInterval, time.Second)
}

// encrypts says whether this peer wants its links encrypted (to peers it does not trust):
// "auto" encrypts whenever the cluster has a key.
func (c Config) encrypts() bool {
	return c.Encrypt == "always" || c.Encrypt == "auto" && len(c.ClusterKey) > 0
}

func (c Config) defaultNetwork() ipam.Network {
	return ipam.Network{Name: DefaultNetwork, Subnet: c.IPAllocRange, BlockBits: c.BlockBits}
}

// bridgeName is the bridge of a network on every host: "weft" for the default network,
// "weft-<name>" for the others. A Linux interface name has at most 15 bytes, so a name longer
// than 10 becomes "weft-" + its first 5 bytes + "-" + 4 hex digits of its FNV-1a hash: cutting
// it alone would give "controlplane1" and "controlplane2" one bridge. Pure; the same on
// every host.
func bridgeName(network string) string {
	if network == DefaultNetwork {
		return DefaultBridge
	}
	const room = 15 - len("weft-")
	if len(network) <= room {
		return "weft-" + network
	}
	h := fnv.New32a()
	h.Write([]byte(network))
	return fmt.Sprintf("weft-%s-%04x", network[:room-5], h.Sum32()&0xffff)
}
