package ipam

// PeerTransport is the TCP transport between peers that Raft
// (hashicorp/raft's NetworkTransport, through the raft.StreamLayer methods)
// and the leader-forwarding RPC (an http.Server on RPCListener, an
// http.Client dialing with DialRPC) share on one port, 6785 by default.
//
// # Protocol (version 2)
//
// With a key (DeriveKey of the cluster key), every connection is TLS 1.3
// with mutual authentication, and the dialer's first application byte is
// the connection kind: 'R' raft, 'H' rpc (HTTP). Every member derives the
// same ed25519 CA key from the cluster key (HKDF label "weft transport ca
// v1") and issues itself a short-lived leaf certificate (leafLifetime,
// renewed at half life) whose subject is the peer's name; both ends
// require a chain to that CA, so only holders of the cluster key get
// through.
//
// # Identity
//
// The chain alone proves the cluster key, not a name: any holder can issue
// a certificate under any name. So the leaf's key is the peer's ed25519
// identity (TransportConfig.Identity, the key whose public half the mesh
// pins for the peer's name), and with TransportConfig.Keys set both ends
// also require that the other's leaf key is the key pinned for the leaf's
// subject name. A mismatch is refused (reason "identity"); so is a name
// the mesh does not know (yet). Then ConnPeerName and RequestPeerName name
// a peer that proved it holds that name's identity key.
//
// Refusing unknown names rather than letting them through unproven: a
// peer becomes a Raft member only after the mesh has seen it (Reconcile
// adds members from the mesh's list, whose metadata carries the key), so
// an unknown name is never a member's in steady state. It happens at
// start-up, while this peer's own mesh has not joined yet (the transport
// starts before the mesh): Raft and forwarding retry on their own, and the
// window closes when the mesh's first push/pull brings every key, a second
// or two. Letting unknown names through instead would let any key holder
// pick a name the mesh has not pinned and be taken for it.
//
// Without a key (--insecure) there is no TLS: the dialer sends the kind
// byte and the connection is plain TCP from then on. A keyed listener
// refuses a plain kind byte and a keyless listener refuses a TLS
// ClientHello (first byte 0x16), so a key set on only one side fails
// loudly rather than silently running unauthenticated.
//
// Why TLS 1.3 rather than Noise: Raft's StreamLayer and net/http both want
// a net.Conn, and crypto/tls is one: record framing, deadlines, close
// notification and key schedule are the Go team's, fuzzed and audited,
// with no new dependency. flynn/noise gives a handshake and cipher states
// only; the framing around them (what version 1 hand-made here) would
// remain ours. The cost is certificates, which derive from the cluster key
// in a few lines below.
//
// A stranger who reaches the port gets a server certificate signed by the
// cluster CA, which lets it test guesses of a passphrase offline; that is
// why a passphrase is stretched with argon2id before it becomes a cluster
// key, and why `weft keygen` (32 random bytes) is the recommended key.
//
// # Limits
//
// Every inbound connection must finish its handshake and send its kind
// within handshakeTimeout (2 s). At most MaxHandshakes connections are in
// that phase at once, and at most MaxHandshakesPerSource from one source
// address, so a flood of silent connections from one address cannot lock
// members out. Past a limit, new connections are closed at once. Every
// refusal is logged with the remote address and the reason and counted in
// weft_transport_refused_total{reason}.

import (
	"cmp"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/mesh/identity"
)

// ErrAuthFailed is the error (wrapped) of every connection that fails
// the transport's handshake: wrong key, garbage, a timeout, a refusal.
var ErrAuthFailed = errors.New("peer transport authentication failed")

const (
	// Connection kinds, the first byte the dialer sends (inside TLS when keyed).
	transportKindRaft byte = 'R'
	transportKindRPC  byte = 'H'
	// tlsHandshakeRecord is the first byte of every TLS ClientHello.
	tlsHandshakeRecord byte = 0x16
	// The first bytes of version 1 (the hand-made handshake), recognised
	// only to say what is wrong.
	transportV1Sealed byte = 0x01
	transportV1Plain  byte = 0x81

	transportKeySize = 32

	// transportServerName is the name every leaf certificate carries and
	// every dialer checks; peer names are in the subject instead, since a
	// dialer knows an address, not always a name.
	transportServerName = "peer.weft.invalid"
	// leafLifetime bounds a leaf certificate; it is renewed at half life.
	// leafBackdate lets peers whose clocks differ by up to that much agree.
	leafLifetime = 24 * time.Hour
	leafBackdate = time.Hour

	defaultHandshakeTimeout = 2 * time.Second
	// transportQueueLen bounds each accept queue (raft and rpc).
	transportQueueLen = 32
	// DefaultMaxHandshakes bounds the inbound connections in their
	// handshake at once; DefaultMaxHandshakesPerSource bounds those from
	// one source address. A member needs one or two at a time.
	DefaultMaxHandshakes          = 256
	DefaultMaxHandshakesPerSource = 8
)

// Refusal reasons, the label of weft_transport_refused_total.
const (
	refusedLimitTotal  = "limit_total"  // too many handshakes in progress
	refusedLimitSource = "limit_source" // too many handshakes from this address
	refusedTimeout     = "timeout"      // no complete handshake within handshakeTimeout
	refusedAuth        = "auth"         // certificate not from this cluster's key (either side)
	refusedMode        = "mode"         // a key on one side only
	refusedProtocol    = "protocol"     // not this protocol: garbage, an old version, a bad kind
	refusedQueueFull   = "queue_full"   // nobody accepted in time
	refusedIdentity    = "identity"     // the leaf key is not the key pinned for its name (or the name is unknown)
)

// errIdentity marks a certificate whose key is not the identity pinned for
// its subject name, or whose name has no pinned key.
var errIdentity = errors.New("certificate is not the identity of its name")

// TransportConfig configures a PeerTransport.
type TransportConfig struct {
	BindAddr  string       // e.g. "192.0.2.10:6785" or "127.0.0.1:0" in tests
	Advertise *net.TCPAddr // address others dial; nil = the listener's address
	// Key is DeriveKey(cluster key), 32 bytes; nil or empty = insecure
	// (plain TCP, still with the kind byte).
	Key []byte
	// Name is this peer's name, the subject of its certificate; empty
	// means "weft-peer".
	Name       string
	Logger     *slog.Logger          // nil = discard
	Registerer prometheus.Registerer // nil = metrics not exported
	// MaxHandshakes and MaxHandshakesPerSource bound the inbound
	// connections in their handshake, in total and per source address;
	// zero means the defaults.
	MaxHandshakes          int
	MaxHandshakesPerSource int
	// Identity is this peer's identity key (identity.Identity.Signer), an
	// ed25519 key: it is the key of the leaf certificate, so peers can check
	// it against the key the mesh pinned for Name. nil = a fresh key in
	// memory, which proves nothing about the name.
	Identity crypto.Signer
	// Keys, when set, looks up the key pinned for a peer name (the router
	// passes Mesh.PublicKey): every connection, inbound and outbound, whose
	// peer certificate's key is not the key pinned for its subject name is
	// refused. nil = names are not checked (tests, --insecure).
	Keys identity.KeyLookup

	// handshakeTimeout bounds every handshake; zero means
	// defaultHandshakeTimeout. Tests change it.
	handshakeTimeout time.Duration
}

// DeriveKey turns the 32-byte cluster key into the transport's secret,
// the seed of the cluster's ed25519 CA key: HKDF-SHA256 with no salt and
// info "weft transport ca v1". The label separates it from the gossip and
// probe keys derived from the same cluster key; none reveals another. An
// empty cluster key gives nil: insecure.
func DeriveKey(clusterKey []byte) []byte {
	if len(clusterKey) == 0 {
		return nil
	}
	key, err := hkdf.Key(sha256.New, clusterKey, nil, "weft transport ca v1", transportKeySize)
	if err != nil {
		// hkdf.Key fails only for lengths beyond 255*32 bytes.
		panic("ipam: hkdf: " + err.Error())
	}
	return key
}

// PeerTransport listens on one TCP port, runs the handshake of every
// inbound connection in its own goroutine and routes authenticated
// connections by kind to the raft queue (Accept) or the rpc queue
// (RPCListener). It implements raft.StreamLayer. All methods are safe for
// concurrent use. Connections it has returned belong to the caller: Close
// doesn't close them.
type PeerTransport struct {
	ln               net.Listener
	advertise        *net.TCPAddr
	creds            *transportCreds // nil = insecure
	log              *slog.Logger
	handshakeTimeout time.Duration
	maxTotal         int
	maxPerSource     int
	refused          *prometheus.CounterVec

	raftConns chan net.Conn // authenticated raft streams waiting for Accept
	rpc       *rpcListener

	shutdown  chan struct{} // closed by Close
	closeOnce sync.Once
	closeErr  error
	wg        sync.WaitGroup // the accept loop and every inbound handshake

	mu           sync.Mutex              // guards the three below
	pending      map[net.Conn]netip.Addr // inbound conns in their handshake → source; Close closes them
	perSrc       map[netip.Addr]int      // handshakes in progress per source address
	lastLimitLog time.Time               // last warning about a limit
}

var _ raft.StreamLayer = (*PeerTransport)(nil)

// NewPeerTransport listens on cfg.BindAddr and starts accepting.
func NewPeerTransport(cfg TransportConfig) (*PeerTransport, error) {
	if n := len(cfg.Key); n != 0 && n != transportKeySize {
		return nil, fmt.Errorf("peer transport: key is %d bytes, want %d (use DeriveKey)", n, transportKeySize)
	}
	if cfg.MaxHandshakes < 0 || cfg.MaxHandshakesPerSource < 0 {
		return nil, fmt.Errorf("peer transport: handshake limits %d and %d must not be negative", cfg.MaxHandshakes, cfg.MaxHandshakesPerSource)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := &PeerTransport{
		log:              log,
		handshakeTimeout: cmp.Or(cfg.handshakeTimeout, defaultHandshakeTimeout),
		maxTotal:         cmp.Or(cfg.MaxHandshakes, DefaultMaxHandshakes),
		maxPerSource:     cmp.Or(cfg.MaxHandshakesPerSource, DefaultMaxHandshakesPerSource),
		raftConns:        make(chan net.Conn, transportQueueLen),
		shutdown:         make(chan struct{}),
		pending:          make(map[net.Conn]netip.Addr),
		perSrc:           make(map[netip.Addr]int),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_transport_refused_total",
			Help: "Peer-transport connections refused, by reason (limit_total, limit_source, timeout, auth, mode, protocol, queue_full, identity); identity counts outbound ones too.",
		}, []string{"reason"}),
	}
	for _, r := range []string{refusedLimitTotal, refusedLimitSource, refusedTimeout, refusedAuth, refusedMode, refusedProtocol, refusedQueueFull, refusedIdentity} {
		t.refused.WithLabelValues(r)
	}
	if len(cfg.Key) != 0 {
		name := cfg.Name
		if name == "" {
			name = "weft-peer"
		}
		creds, err := newTransportCreds(cfg.Key, name, cfg.Identity)
		if err != nil {
			return nil, err
		}
		creds.keys = cfg.Keys
		t.creds = creds
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(t.refused); err != nil {
			return nil, fmt.Errorf("peer transport: register metrics: %w", err)
		}
	}
	ln, err := net.Listen("tcp", cfg.BindAddr)
	if err != nil {
		return nil, fmt.Errorf("peer transport: listen on %q: %w", cfg.BindAddr, err)
	}
	adv := cfg.Advertise
	if adv == nil {
		adv, _ = ln.Addr().(*net.TCPAddr)
	}
	if adv == nil || adv.IP == nil || adv.IP.IsUnspecified() || adv.Port == 0 {
		ln.Close()
		return nil, fmt.Errorf("peer transport: advertise address %v is not dialable by other peers; set Advertise", adv)
	}
	t.ln, t.advertise = ln, adv
	t.rpc = &rpcListener{t: t, conns: make(chan net.Conn, transportQueueLen), done: make(chan struct{})}
	t.wg.Add(1)
	go t.acceptLoop()
	return t, nil
}

// Accept returns the next authenticated raft stream. After Close it
// returns net.ErrClosed.
func (t *PeerTransport) Accept() (net.Conn, error) {
	select {
	case <-t.shutdown:
		return nil, net.ErrClosed
	default:
	}
	select {
	case c := <-t.raftConns:
		return c, nil
	case <-t.shutdown:
		return nil, net.ErrClosed
	}
}

// Close stops the listener, aborts the handshakes in progress, waits for
// every goroutine of the transport and closes the connections still
// queued for Accept or the RPC listener. It is safe to call more than
// once; later calls return the first call's result.
func (t *PeerTransport) Close() error {
	t.closeOnce.Do(func() {
		close(t.shutdown)
		t.closeErr = t.ln.Close()
		t.mu.Lock()
		for c := range t.pending {
			c.Close()
		}
		t.mu.Unlock()
		t.wg.Wait()
		// No goroutine sends any more: close what nobody accepted.
		drainConns(t.raftConns)
		drainConns(t.rpc.conns)
	})
	return t.closeErr
}

// Addr is the advertised address, the one other peers dial.
func (t *PeerTransport) Addr() net.Addr { return t.advertise }

// Dial opens a raft stream to address; timeout (if positive) bounds the
// TCP connect and the handshake together.
func (t *PeerTransport) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	ctx := context.Background()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	return t.dial(ctx, string(address), transportKindRaft)
}

// RPCListener is the listener of the rpc side: it returns authenticated
// rpc connections. Closing it stops only the rpc side (later rpc
// connections are dropped); the transport's Close stops it too.
func (t *PeerTransport) RPCListener() net.Listener { return t.rpc }

// DialRPC opens an rpc connection to address ("host:port"), for use as an
// http.Transport's DialContext. ctx bounds the connect and the handshake.
func (t *PeerTransport) DialRPC(ctx context.Context, address string) (net.Conn, error) {
	return t.dial(ctx, address, transportKindRPC)
}

// ConnPeerName is the name in the certificate of the peer at the other end
// of a connection this transport returned; false for an insecure one. With
// TransportConfig.Keys set the peer proved it holds that name's pinned
// identity key; without, only the cluster key.
func ConnPeerName(c net.Conn) (string, bool) {
	tc, ok := c.(*tls.Conn)
	if !ok {
		return "", false
	}
	st := tc.ConnectionState()
	return peerNameOf(&st)
}

// RequestPeerName is the name of the peer that sent an rpc request served
// on RPCListener; false for an insecure one. Proven as ConnPeerName's.
func RequestPeerName(r *http.Request) (string, bool) { return peerNameOf(r.TLS) }

func peerNameOf(st *tls.ConnectionState) (string, bool) {
	if st == nil || len(st.PeerCertificates) == 0 {
		return "", false
	}
	return st.PeerCertificates[0].Subject.CommonName, true
}

func (t *PeerTransport) dial(ctx context.Context, address string, kind byte) (net.Conn, error) {
	select {
	case <-t.shutdown:
		return nil, fmt.Errorf("peer transport: dial %s: %w", address, net.ErrClosed)
	default:
	}
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", address)
	if err != nil {
		return nil, fmt.Errorf("peer transport: dial %s: %w", address, err)
	}
	deadline := time.Now().Add(t.handshakeTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	raw.SetDeadline(deadline)
	// Cancelling ctx aborts a handshake in progress.
	stop := context.AfterFunc(ctx, func() { raw.SetDeadline(time.Unix(1, 0)) })
	conn, err := t.handshakeOutbound(raw, kind)
	if !stop() && err == nil {
		// ctx ended and may have broken the conn's deadline: give up.
		err = ctx.Err()
	}
	if err != nil {
		raw.Close()
		if ctx.Err() != nil {
			err = errors.Join(ctx.Err(), err)
		} else if errors.Is(err, errIdentity) {
			t.refused.WithLabelValues(refusedIdentity).Inc()
			t.log.Warn("ipam: transport refused the server's identity", "remote", address, "reason", refusedIdentity, "err", err)
		} else if errors.Is(err, ErrAuthFailed) {
			t.log.Warn("ipam: transport handshake failed", "remote", address, "err", err)
		}
		return nil, fmt.Errorf("peer transport: dial %s: %w", address, err)
	}
	raw.SetDeadline(time.Time{})
	return conn, nil
}

// handshakeOutbound runs the dialer's side on raw, whose deadline the
// caller has set.
func (t *PeerTransport) handshakeOutbound(raw net.Conn, kind byte) (net.Conn, error) {
	if t.creds == nil {
		if _, err := raw.Write([]byte{kind}); err != nil {
			return nil, handshakeErr("sending kind", err)
		}
		return raw, nil
	}
	tc := tls.Client(raw, t.creds.clientConfig())
	if err := tc.Handshake(); err != nil {
		return nil, handshakeErr("tls handshake", err)
	}
	if _, err := tc.Write([]byte{kind}); err != nil {
		return nil, handshakeErr("sending kind", err)
	}
	return tc, nil
}

// refusal is an inbound handshake failure with its metric label.
type refusal struct {
	reason string
	err    error
}

func (r *refusal) Error() string { return r.err.Error() }
func (r *refusal) Unwrap() error { return r.err }

func refuse(reason string, err error) error { return &refusal{reason: reason, err: err} }

// handshakeInbound runs the listener's side on raw, whose deadline the
// caller has set, and returns the connection and its kind. Errors wrap
// ErrAuthFailed and carry a refusal reason.
func (t *PeerTransport) handshakeInbound(raw net.Conn) (net.Conn, byte, error) {
	var first [1]byte
	if _, err := io.ReadFull(raw, first[:]); err != nil {
		return nil, 0, classifyInbound("reading the first byte", err)
	}
	b := first[0]
	if t.creds == nil {
		switch b {
		case transportKindRaft, transportKindRPC:
			return raw, b, nil
		case tlsHandshakeRecord:
			return nil, 0, refuse(refusedMode, fmt.Errorf("%w: the dialer speaks TLS (it has a cluster key) but this peer runs --insecure", ErrAuthFailed))
		}
		return nil, 0, refuse(refusedProtocol, fmt.Errorf("%w: %s", ErrAuthFailed, describeFirstByte(b)))
	}
	switch b {
	case tlsHandshakeRecord:
	case transportKindRaft, transportKindRPC:
		return nil, 0, refuse(refusedMode, fmt.Errorf("%w: the dialer runs --insecure (no TLS) but this peer has a cluster key", ErrAuthFailed))
	default:
		return nil, 0, refuse(refusedProtocol, fmt.Errorf("%w: %s", ErrAuthFailed, describeFirstByte(b)))
	}
	tc := tls.Server(&prefixConn{Conn: raw, prefix: first[:]}, t.creds.serverConfig())
	if err := tc.Handshake(); err != nil {
		err = classifyInbound("tls handshake", err)
		if r := (*refusal)(nil); errors.As(err, &r) && r.reason == refusedProtocol {
			// A TLS client that fails the handshake did not prove the key
			// (no certificate, a wrong one, or a broken TLS stack).
			r.reason = refusedAuth
		}
		return nil, 0, err
	}
	var kind [1]byte
	if _, err := io.ReadFull(tc, kind[:]); err != nil {
		return nil, 0, classifyInbound("reading kind", err)
	}
	if kind[0] != transportKindRaft && kind[0] != transportKindRPC {
		return nil, 0, refuse(refusedProtocol, fmt.Errorf("%w: unknown connection kind 0x%02x", ErrAuthFailed, kind[0]))
	}
	return tc, kind[0], nil
}

func describeFirstByte(b byte) string {
	switch b {
	case transportV1Sealed, transportV1Plain:
		return fmt.Sprintf("first byte 0x%02x: a weft peer of an older version (the hand-made transport before TLS); upgrade every peer", b)
	}
	return fmt.Sprintf("first byte 0x%02x: not a weft peer", b)
}

// classifyInbound wraps an inbound handshake error with its reason.
func classifyInbound(step string, err error) error {
	err = handshakeErr(step, err)
	var ne net.Error
	switch {
	case errors.Is(err, errIdentity):
		return refuse(refusedIdentity, err)
	case errors.As(err, &ne) && ne.Timeout():
		return refuse(refusedTimeout, err)
	case isCertError(err):
		return refuse(refusedAuth, err)
	}
	return refuse(refusedProtocol, err)
}

// isCertError says whether err is a certificate this side refused or an
// alert by which the other side refused ours.
func isCertError(err error) bool {
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var ci x509.CertificateInvalidError
	var op *net.OpError
	return errors.As(err, &cv) || errors.As(err, &ua) || errors.As(err, &ci) ||
		errors.As(err, &op) && op.Op == "remote error"
}

// handshakeErr wraps an error of a handshake step in ErrAuthFailed with a
// hint at the likely cause.
func handshakeErr(step string, err error) error {
	if errors.Is(err, ErrAuthFailed) {
		return err
	}
	var ci x509.CertificateInvalidError
	switch {
	case errors.Is(err, errIdentity):
		return fmt.Errorf("%w: %s: %w", ErrAuthFailed, step, err)
	case errors.As(err, &ci) && ci.Reason == x509.Expired:
		return fmt.Errorf("%w: %s: certificate expired or not yet valid (clocks more than %s apart?): %w", ErrAuthFailed, step, leafBackdate, err)
	case isCertError(err):
		return fmt.Errorf("%w: %s: the certificate is not from this cluster's key (wrong cluster key?): %w", ErrAuthFailed, step, err)
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET):
		return fmt.Errorf("%w: %s: the remote closed the connection (wrong cluster key, or a key on one side only?): %w", ErrAuthFailed, step, err)
	}
	return fmt.Errorf("%w: %s: %w", ErrAuthFailed, step, err)
}

// prefixConn gives back the bytes already read before reading on.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// acceptLoop accepts TCP connections and starts a handshake goroutine for
// each until the listener closes.
func (t *PeerTransport) acceptLoop() {
	defer t.wg.Done()
	for {
		raw, err := t.ln.Accept()
		if err != nil {
			select {
			case <-t.shutdown:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off briefly.
			t.log.Warn("ipam: transport accept failed", "err", err)
			delay := time.NewTimer(50 * time.Millisecond)
			select {
			case <-t.shutdown:
				delay.Stop()
				return
			case <-delay.C:
			}
			continue
		}
		if !t.track(raw) {
			raw.Close()
			continue
		}
		t.wg.Add(1)
		go t.serveConn(raw)
	}
}

// sourceOf is the remote IP of a connection (unmapped), zero if unknown.
func sourceOf(c net.Conn) netip.Addr {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		ap := a.AddrPort()
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

// track records raw as in its handshake, so that Close can abort it. It
// refuses after Close and past the total and per-source limits. O(1).
func (t *PeerTransport) track(raw net.Conn) bool {
	src := sourceOf(raw)
	t.mu.Lock()
	defer t.mu.Unlock()
	select {
	case <-t.shutdown:
		return false
	default:
	}
	switch {
	case len(t.pending) >= t.maxTotal:
		t.refusedLocked(refusedLimitTotal, raw, fmt.Errorf("%w: too many handshakes in progress (limit %d)", ErrAuthFailed, t.maxTotal))
		return false
	case t.perSrc[src] >= t.maxPerSource:
		t.refusedLocked(refusedLimitSource, raw, fmt.Errorf("%w: too many handshakes in progress from %s (limit %d)", ErrAuthFailed, src, t.maxPerSource))
		return false
	}
	t.pending[raw] = src
	t.perSrc[src]++
	return true
}

// refusedLocked counts and logs a refusal at the limits. A flood would
// flood the log too, so at most one warning a second says so (the others
// go to debug); the counter has every one. t.mu is held.
func (t *PeerTransport) refusedLocked(reason string, raw net.Conn, err error) {
	t.refused.WithLabelValues(reason).Inc()
	level := slog.LevelDebug
	if now := time.Now(); now.Sub(t.lastLimitLog) >= time.Second {
		level, t.lastLimitLog = slog.LevelWarn, now
	}
	t.log.Log(context.Background(), level, "ipam: transport rejected connection", "remote", raw.RemoteAddr().String(), "reason", reason, "err", err)
}

func (t *PeerTransport) untrack(raw net.Conn) {
	t.mu.Lock()
	if src, ok := t.pending[raw]; ok {
		delete(t.pending, raw)
		if t.perSrc[src]--; t.perSrc[src] <= 0 {
			delete(t.perSrc, src)
		}
	}
	t.mu.Unlock()
}

// serveConn runs the handshake of one inbound connection and queues it.
func (t *PeerTransport) serveConn(raw net.Conn) {
	defer t.wg.Done()
	remote := raw.RemoteAddr().String()
	raw.SetDeadline(time.Now().Add(t.handshakeTimeout))
	conn, kind, err := t.handshakeInbound(raw)
	t.untrack(raw)
	if err != nil {
		raw.Close()
		select {
		case <-t.shutdown:
			t.log.Debug("ipam: transport handshake aborted by close", "remote", remote, "err", err)
		default:
			reason := refusedProtocol
			var r *refusal
			if errors.As(err, &r) {
				reason = r.reason
			}
			t.refused.WithLabelValues(reason).Inc()
			t.log.Warn("ipam: transport rejected connection", "remote", remote, "reason", reason, "err", err)
		}
		return
	}
	raw.SetDeadline(time.Time{})

	queue, closed := t.raftConns, (<-chan struct{})(nil)
	if kind == transportKindRPC {
		queue, closed = t.rpc.conns, t.rpc.done
	}
	select {
	case <-closed:
		conn.Close()
		t.log.Debug("ipam: transport dropped rpc connection: rpc listener closed", "remote", remote)
		return
	default:
	}
	// The queue is full only when nobody accepts; give the consumer one
	// handshake timeout to catch up, then drop the connection.
	wait := time.NewTimer(t.handshakeTimeout)
	defer wait.Stop()
	select {
	case queue <- conn:
	case <-t.shutdown:
		conn.Close()
	case <-closed:
		conn.Close()
		t.log.Debug("ipam: transport dropped rpc connection: rpc listener closed", "remote", remote)
	case <-wait.C:
		conn.Close()
		t.refused.WithLabelValues(refusedQueueFull).Inc()
		t.log.Warn("ipam: transport dropped connection: accept queue full", "remote", remote, "kind", string(kind))
	}
}

// rpcListener is the net.Listener of the rpc side of a PeerTransport.
type rpcListener struct {
	t     *PeerTransport
	conns chan net.Conn // authenticated rpc conns waiting for Accept
	done  chan struct{} // closed by Close
	once  sync.Once
}

func (l *rpcListener) Accept() (net.Conn, error) {
	select {
	case <-l.done:
		return nil, net.ErrClosed
	case <-l.t.shutdown:
		return nil, net.ErrClosed
	default:
	}
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	case <-l.t.shutdown:
		return nil, net.ErrClosed
	}
}

// Close stops the rpc side only and closes the rpc conns nobody accepted;
// it is safe to call more than once.
func (l *rpcListener) Close() error {
	l.once.Do(func() {
		close(l.done)
		drainConns(l.conns)
	})
	return nil
}

// drainConns closes the conns waiting in an accept queue. It doesn't
// block, as the transport's and the rpc listener's Close may drain the
// same queue at once.
func drainConns(ch chan net.Conn) {
	for {
		select {
		case c := <-ch:
			c.Close()
		default:
			return
		}
	}
}

func (l *rpcListener) Addr() net.Addr { return l.t.advertise }

// transportCreds are the TLS credentials of one peer: the cluster CA that
// every member derives from the cluster key, and this peer's leaf
// certificate, issued by itself under that CA.
type transportCreds struct {
	pool    *x509.CertPool
	ca      *x509.Certificate
	caKey   ed25519.PrivateKey
	leafKey crypto.Signer // the peer's identity key (or a fresh one)
	name    string
	now     func() time.Time
	// keys, when set, checks every peer certificate's key against the key
	// pinned for its name (see checkIdentity).
	keys identity.KeyLookup

	mu     sync.Mutex       // guards leaf and issued
	leaf   *tls.Certificate // the current leaf
	issued time.Time
}

// newTransportCreds derives the CA from seed (DeriveKey's output). The CA
// certificate is the same bytes on every member: fixed serial, validity
// and subject, and ed25519 signatures are deterministic.
// leafKey is the peer's ed25519 identity key; nil makes a fresh one.
func newTransportCreds(seed []byte, name string, leafKey crypto.Signer) (*transportCreds, error) {
	caKey := ed25519.NewKeyFromSeed(seed)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "weft cluster transport CA"},
		NotBefore:             time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:              time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, caKey.Public(), caKey)
	if err != nil {
		return nil, fmt.Errorf("peer transport: make the cluster CA: %w", err)
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("peer transport: parse the cluster CA: %w", err)
	}
	if leafKey == nil {
		_, fresh, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("peer transport: leaf key: %w", err)
		}
		leafKey = fresh
	}
	// TLS 1.3 signs a transcript framed by its own 64-space prefix and
	// context string, so the identity's signatures here never read as the
	// domain-framed ones it makes for gossip (identity.framed).
	if _, ok := leafKey.Public().(ed25519.PublicKey); !ok {
		return nil, fmt.Errorf("peer transport: identity key is %T, want an ed25519 key", leafKey.Public())
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &transportCreds{pool: pool, ca: ca, caKey: caKey, leafKey: leafKey, name: name, now: time.Now}, nil
}

// certificate returns the leaf, issuing a new one when none exists or the
// current one is past half its life.
func (c *transportCreds) certificate() (*tls.Certificate, error) {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.leaf != nil && now.Sub(c.issued) < leafLifetime/2 && !now.Before(c.issued) {
		return c.leaf, nil
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("peer transport: leaf serial: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: c.name},
		DNSNames:     []string{transportServerName},
		NotBefore:    now.Add(-leafBackdate),
		NotAfter:     now.Add(leafLifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.ca, c.leafKey.Public(), c.caKey)
	if err != nil {
		return nil, fmt.Errorf("peer transport: issue the leaf certificate: %w", err)
	}
	c.leaf = &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: c.leafKey}
	c.issued = now
	return c.leaf, nil
}

// checkIdentity is the tls.Config's VerifyConnection, run after the chain
// to the cluster CA verified: without keys it accepts (the chain is all
// there is); with keys, the peer's leaf key must be the key pinned for the
// leaf's subject name. O(1).
func (c *transportCreds) checkIdentity(cs tls.ConnectionState) error {
	if c.keys == nil {
		return nil
	}
	if len(cs.PeerCertificates) == 0 {
		return fmt.Errorf("%w: no peer certificate", errIdentity)
	}
	return verifyIdentity(cs.PeerCertificates[0], c.keys)
}

// verifyIdentity checks that cert's key is the key keys pins for cert's
// subject name. Pure.
func verifyIdentity(cert *x509.Certificate, keys identity.KeyLookup) error {
	name := cert.Subject.CommonName
	got, ok := cert.PublicKey.(ed25519.PublicKey)
	if !ok {
		return fmt.Errorf("%w: %q presents a %T key, not ed25519", errIdentity, name, cert.PublicKey)
	}
	want, ok := keys(name)
	if !ok {
		return fmt.Errorf("%w: no key is pinned for %q (not in the mesh yet?)", errIdentity, name)
	}
	if !got.Equal(want) {
		return fmt.Errorf("%w: %q presents a key other than the one pinned for it", errIdentity, name)
	}
	return nil
}

func (c *transportCreds) serverConfig() *tls.Config {
	return &tls.Config{
		VerifyConnection: c.checkIdentity,
		MinVersion:       tls.VersionTLS13,
		GetCertificate:   func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return c.certificate() },
		ClientAuth:       tls.RequireAndVerifyClientCert,
		ClientCAs:        c.pool,
		// No resumption: every connection proves the key afresh.
		SessionTicketsDisabled: true,
		Time:                   c.now,
	}
}

func (c *transportCreds) clientConfig() *tls.Config {
	return &tls.Config{
		VerifyConnection:     c.checkIdentity,
		MinVersion:           tls.VersionTLS13,
		RootCAs:              c.pool,
		ServerName:           transportServerName,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return c.certificate() },
		Time:                 c.now,
	}
}
