package mesh

import (
	"crypto/hkdf"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/mesh/identity"
)

// DefaultPort is the memberlist gossip port (tcp and udp), and the port a
// seed without one is assumed to listen on.
const DefaultPort = 6783

// Config configures a Mesh. Start from DefaultConfig; New calls Validate.
type Config struct {
	// Name identifies this peer in the mesh; it must be unique and stable
	// across restarts (a restarted peer with the same name and address
	// takes its old place). 1–64 characters of [A-Za-z0-9._:-].
	Name string

	// BindAddr is the address the gossip listeners bind to. The zero
	// value binds all IPv4 addresses (0.0.0.0).
	BindAddr netip.Addr
	// BindPort is the gossip port, tcp and udp. 0 picks a free port (tests).
	BindPort int

	// AdvertiseAddr is the address other peers reach this one at. The
	// zero value means BindAddr when that is a specific address, else
	// DefaultAdvertiseAddr().
	AdvertiseAddr netip.Addr
	// AdvertisePort is the port advertised to other peers; 0 means the
	// bound port.
	AdvertisePort int

	// Seeds are the peers to join, "host" or "host:port" (port defaults
	// to DefaultPort; IPv6 literals as "[::1]:6783" or bare "::1").
	// Connect and Forget change the set at run time.
	Seeds []string

	// Password, when not empty, encrypts and authenticates all gossip.
	// The AES-256 key is HKDF-SHA256(password, info "weft gossip v1"),
	// see GossipKey. Peers with a different or no password are refused.
	Password []byte

	// Logger receives the mesh's logs and memberlist's own log lines
	// (mapped onto slog levels). nil discards.
	Logger *slog.Logger
	// Registerer receives the mesh's metrics (see metrics.go). nil means a
	// private registry, i.e. the metrics are not exported.
	Registerer prometheus.Registerer

	// JoinBackoffMin and JoinBackoffMax bound the exponential backoff
	// (with jitter) between join attempts while this peer is alone.
	JoinBackoffMin time.Duration
	JoinBackoffMax time.Duration
	// RejoinInterval is how often a peer that is part of a mesh retries
	// targets that are not (or no longer) members, which heals partitions
	// between seeds. It is also the idle wake-up of the join loop.
	RejoinInterval time.Duration

	// Gossip timings, passed to memberlist. The defaults are memberlist's
	// LAN defaults; tests shorten them.
	GossipInterval   time.Duration
	ProbeInterval    time.Duration
	ProbeTimeout     time.Duration
	PushPullInterval time.Duration
	// GossipNodes is how many random peers each gossip round sends to
	// (memberlist's GossipNodes; its LAN default is 3). A message is sent a
	// fixed number of times in all (the retransmit multipliers), so more
	// nodes a round spread it in fewer rounds for the same packets: a join
	// reaches N peers in about log_GossipNodes(N) rounds.
	GossipNodes int
	// SuspicionMult scales how long a peer stays suspect before it is
	// declared dead: SuspicionMult * log10(N+1) * ProbeInterval at least.
	SuspicionMult int

	// Identity is this peer's ed25519 identity (identity.LoadOrCreate on
	// the data dir). Required: its public key goes into the metadata, and
	// the mesh signs its coordinates with it.
	Identity *identity.Identity
	// PinsPath is the file where the public key first seen for each peer
	// name is pinned (see keypins.go). Empty: pins live in memory only.
	PinsPath string

	// Metadata is the local peer's initial metadata. Name defaults to
	// Config.Name (and must equal it); Underlay defaults to the advertise
	// address. Change it later with Mesh.UpdateMetadata.
	Metadata Metadata

	// AcceptPeer, when set, decides whether a remote peer may be a member, given
	// this peer's metadata and the remote's. It is asked for every alive message
	// and for every node of a push/pull merge (a join); an error refuses the peer
	// (or the whole merge) and is logged. It runs under memberlist's node lock:
	// it must be quick and must not call the Mesh.
	AcceptPeer func(local, remote Metadata) error

	// EventBuffer is the capacity of each Subscribe channel.
	EventBuffer int
	// DeadPeerRetention is how long dead and left peers stay in Peers();
	// 0 keeps them until the process ends.
	DeadPeerRetention time.Duration
	// MaxQueuedBroadcasts bounds the broadcast queue; the oldest messages
	// are dropped past it (weft_mesh_broadcasts_dropped_total).
	MaxQueuedBroadcasts int
	// LinkStateRetransmitMult is how many times, per ⌈log₁₀(N+1)⌉, each peer
	// sends on a link-state message (memberlist's RetransmitMult, which the
	// other channels keep at 4). Link state is most of an idle peer's
	// gossip and is repaired by its digest anti-entropy, so it trades a
	// rare miss for fewer duplicates: with every peer relaying f =
	// mult·⌈log₁₀(N+1)⌉ times, a message misses about N·e^-f peers
	// (N=50: 0.12 at 3, 0.02 at 4) and each peer gets it about f times.
	LinkStateRetransmitMult int
	// MembershipRetransmitMult is memberlist's own RetransmitMult: how many
	// times, per ⌈log₁₀(N+1)⌉, each peer sends on an alive, suspect or dead
	// message. memberlist's 4 sends each message f = 8 times per peer at
	// N=10..99, so a given peer misses it with probability about e^-f
	// (3.4e-4) and a 50-peer start, ~50 messages × 50 peers, left one peer
	// unaware of one joiner in about a third of the simulation runs, until a
	// push/pull repaired it 20–60 s later. 6 (f = 12 at N=10..99) makes that
	// about 1 run in 70. These messages are rare once the mesh is formed
	// (joins, leaves, failures, metadata changes), so the cost is
	// join-time bytes only: O(log N) sends per message per peer.
	MembershipRetransmitMult int
	// Compress turns memberlist's LZW compression of gossip packets and
	// push/pull on. Off in DefaultConfig: decompressing every datagram was a
	// third of an idle peer's allocations (≈1 % of a core at N=50 against
	// 0.4–0.6 % off), while link-state entries, coordinates and signatures
	// barely shrink; push/pull and join traffic roughly double. A late
	// joiner missed in the 50-peer simulation was blamed on it for a while;
	// the cause was memberlist's retransmit count (MembershipRetransmitMult),
	// with compression on and off alike. Peers read compressed messages
	// either way, so mixed settings interoperate.
	Compress bool

	// WrapTransport, when set, wraps the mesh's UDP/TCP transport (a
	// benchmark counts the gossip traffic with it). nil: unwrapped.
	WrapTransport func(memberlist.Transport) memberlist.Transport
	// SnapshotPath is a file where the mesh keeps the members it has seen
	// alive (name and gossip address of the 256 most recently seen), as
	// Serf's snapshot does, so that a restarted peer rejoins them even
	// without seeds (the first host of a cluster has none). Written
	// atomically, at most every few seconds and only when the alive set
	// changed; a corrupt file is logged and ignored. Empty: off.
	SnapshotPath string
	// DeadRetryInterval is the mean time between two rounds in which this
	// peer tries to reach members that died (each wait is jittered ±50%),
	// so that a peer that comes back without seeds is found within seconds.
	DeadRetryInterval time.Duration
	// DeadRetryFor is how long after its death (or leave) a member is still
	// retried; 0 turns retrying off. See DefaultConfig for the default.
	DeadRetryFor time.Duration
}

// maxGossipNodes bounds Config.GossipNodes: each round sends a packet to each.
const maxGossipNodes = 16

// DefaultConfig returns production defaults. Name, Identity, Seeds and
// Password are left for the caller.
func DefaultConfig() Config {
	return Config{
		BindPort:            DefaultPort,
		JoinBackoffMin:      time.Second,
		JoinBackoffMax:      30 * time.Second,
		RejoinInterval:      60 * time.Second,
		GossipInterval:      200 * time.Millisecond,
		GossipNodes:         4,
		ProbeInterval:       time.Second,
		ProbeTimeout:        500 * time.Millisecond,
		PushPullInterval:    30 * time.Second,
		SuspicionMult:       4,
		EventBuffer:         256,
		DeadPeerRetention:   time.Hour,
		MaxQueuedBroadcasts: 4096,
		// See the field: 3 sends 6 copies a message at N=10..99 instead of 8.
		LinkStateRetransmitMult: 3,
		// See the field: memberlist's 4 lost a joiner in a third of 50-peer starts.
		MembershipRetransmitMult: 6,
		DeadRetryInterval:        time.Second,
		// Five minutes covers a restarted process (seconds) and a rebooted
		// host (typically one to three minutes) with margin. A member gone
		// longer is left to come back through its own seeds or snapshot:
		// retrying it costs little (see deadRetryLoop) but never ends
		// otherwise for a peer that was removed for good.
		DeadRetryFor: 5 * time.Minute,
		// Off: see the field.
		Compress: false,
	}
}

// Validate reports the first invalid field, wrapping ErrInvalidConfig.
// It does not check Metadata fields that New fills in (Name, Underlay).
func (c *Config) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidConfig, fmt.Sprintf(format, a...))
	}
	if err := validName(c.Name); err != nil {
		return bad("name: %v", err)
	}
	if c.Identity == nil {
		return bad("no identity: load one with identity.LoadOrCreate(dataDir)")
	}
	if c.BindAddr.IsValid() && c.BindAddr.Zone() != "" {
		return bad("bind address %s: zones are not supported", c.BindAddr)
	}
	if c.BindPort < 0 || c.BindPort > 65535 {
		return bad("bind port %d out of range 0-65535", c.BindPort)
	}
	if c.AdvertiseAddr.IsValid() && (c.AdvertiseAddr.IsUnspecified() || c.AdvertiseAddr.Zone() != "") {
		return bad("advertise address %s must be a specific address without zone", c.AdvertiseAddr)
	}
	if c.AdvertisePort < 0 || c.AdvertisePort > 65535 {
		return bad("advertise port %d out of range 0-65535", c.AdvertisePort)
	}
	for _, s := range c.Seeds {
		if _, err := normalizeTarget(s); err != nil {
			return bad("seed: %v", err)
		}
	}
	if c.JoinBackoffMin <= 0 || c.JoinBackoffMax < c.JoinBackoffMin {
		return bad("join backoff %v..%v: need 0 < min <= max", c.JoinBackoffMin, c.JoinBackoffMax)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"rejoin interval", c.RejoinInterval},
		{"gossip interval", c.GossipInterval},
		{"probe interval", c.ProbeInterval},
		{"probe timeout", c.ProbeTimeout},
		{"push/pull interval", c.PushPullInterval},
	} {
		if d.v <= 0 {
			return bad("%s %v must be positive", d.name, d.v)
		}
	}
	if c.ProbeTimeout >= c.ProbeInterval {
		return bad("probe timeout %v must be shorter than probe interval %v", c.ProbeTimeout, c.ProbeInterval)
	}
	if c.GossipNodes < 1 || c.GossipNodes > maxGossipNodes {
		return bad("gossip nodes %d must be 1..%d", c.GossipNodes, maxGossipNodes)
	}
	if c.SuspicionMult < 1 {
		return bad("suspicion multiplier %d must be at least 1", c.SuspicionMult)
	}
	if c.EventBuffer < 1 {
		return bad("event buffer %d must be at least 1", c.EventBuffer)
	}
	if c.DeadPeerRetention < 0 {
		return bad("dead peer retention %v must not be negative", c.DeadPeerRetention)
	}
	if c.MaxQueuedBroadcasts < 1 {
		return bad("max queued broadcasts %d must be at least 1", c.MaxQueuedBroadcasts)
	}
	if c.LinkStateRetransmitMult < 1 || c.LinkStateRetransmitMult > 10 {
		return bad("link-state retransmit multiplier %d must be 1 to 10", c.LinkStateRetransmitMult)
	}
	if c.MembershipRetransmitMult < 1 || c.MembershipRetransmitMult > 10 {
		return bad("membership retransmit multiplier %d must be 1 to 10", c.MembershipRetransmitMult)
	}
	if c.DeadRetryInterval <= 0 {
		return bad("dead retry interval %v must be positive", c.DeadRetryInterval)
	}
	if c.DeadRetryFor < 0 {
		return bad("dead retry duration %v must not be negative", c.DeadRetryFor)
	}
	if c.SnapshotPath != "" && strings.ContainsRune(c.SnapshotPath, 0) {
		return bad("snapshot path %q contains a NUL byte", c.SnapshotPath)
	}
	if c.Metadata.Name != "" && c.Metadata.Name != c.Name {
		return bad("metadata name %q differs from name %q", c.Metadata.Name, c.Name)
	}
	return nil
}

// GossipKey derives the 32-byte AES-256-GCM memberlist key from the
// cluster key: HKDF-SHA256 with no salt and info "weft gossip v1". Every
// peer derives the same key with nothing exchanged; the info string
// separates it from the other subkeys weft derives from the cluster key
// (the transport CA, probes), so none reveals another. A passphrase is
// stretched into a cluster key (argon2id, in cmd/weft) before it gets here.
func GossipKey(clusterKey []byte) []byte {
	key, err := hkdf.Key(sha256.New, clusterKey, nil, "weft gossip v1", 32)
	if err != nil {
		// hkdf.Key fails only for lengths beyond 255*32 bytes.
		panic("mesh: hkdf: " + err.Error())
	}
	return key
}

// normalizeTarget turns "host", "host:port", "v6addr" or "[v6addr]:port"
// into "host:port" with the default port, so targets compare equal however
// they were written.
func normalizeTarget(s string) (string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return "", fmt.Errorf("empty address")
	}
	// A bare IPv6 literal has colons but no brackets.
	if a, err := netip.ParseAddr(s); err == nil {
		if a.Zone() != "" {
			return "", fmt.Errorf("address %q: zones are not supported", s)
		}
		return netip.AddrPortFrom(a.Unmap(), DefaultPort).String(), nil
	}
	host, port := s, strconv.Itoa(DefaultPort)
	if strings.Contains(s, ":") {
		h, p, err := net.SplitHostPort(s)
		if err != nil {
			return "", fmt.Errorf("address %q: %v", s, err)
		}
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return "", fmt.Errorf("address %q: port must be 1-65535", s)
		}
		host, port = h, strconv.Itoa(n)
	}
	if host == "" {
		return "", fmt.Errorf("address %q: empty host", s)
	}
	if a, err := netip.ParseAddr(host); err == nil {
		if a.Zone() != "" {
			return "", fmt.Errorf("address %q: zones are not supported", s)
		}
		return net.JoinHostPort(a.Unmap().String(), port), nil
	}
	if !validHostname(host) {
		return "", fmt.Errorf("address %q: %q is neither an IP address nor a host name", s, host)
	}
	return net.JoinHostPort(strings.ToLower(host), port), nil
}

func validHostname(h string) bool {
	if len(h) == 0 || len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(strings.TrimSuffix(h, "."), ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// validName checks a peer name: 1–64 bytes of [A-Za-z0-9._:-].
func validName(s string) error {
	if s == "" {
		return fmt.Errorf("empty")
	}
	if len(s) > maxNameLen {
		return fmt.Errorf("%d bytes, at most %d", len(s), maxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-') {
			return fmt.Errorf("%q: byte %d (%q) is not one of [A-Za-z0-9._:-]", s, i, c)
		}
	}
	return nil
}

const maxNameLen = 64
