package ipam

// PeerTransport is the TCP transport between peers that Raft
// (hashicorp/raft's NetworkTransport, through the raft.StreamLayer methods)
// and the leader-forwarding RPC (an http.Server on RPCListener, an
// http.Client dialing with DialRPC) share on one port, 6785 by default.
//
// # Protocol (version 1)
//
// With a key (derived from the cluster password by DeriveKey), every
// connection starts with this handshake, each step under a deadline
// (handshakeTimeout, 5 s) so a silent or slow client can't hold a goroutine:
//
//	dialer   -> listener: hello 0x01 (1 byte: version 1, sealed) || nD (32 random bytes)
//	listener -> dialer:   nL (32 random bytes)
//	dialer   -> listener: proofD (32 bytes)
//	listener -> dialer:   proofL (32 bytes)
//	dialer   -> listener: sealed frame holding the kind byte: 'R' raft, 'H' rpc (HTTP)
//
// With T = hello || nD || nL as the HKDF-SHA256 salt and the key as the
// secret, four independent 32-byte values come out of four info labels:
// proofD ("weft transport v1 dialer proof"), proofL ("... listener
// proof"), the dialer-to-listener key and the listener-to-dialer key. Each
// side compares the other's proof in constant time and drops the
// connection, with an error wrapping ErrAuthFailed, when it doesn't match.
//
// The dialer proves first, not the listener. Any proof is material for an
// offline password-guessing attack; with the dialer first, only somebody
// a peer dials (a man in the middle) obtains one, while a stranger who can
// merely reach port 6785 gets nothing but a random nonce. The cost is one
// extra half round trip per connection, which Raft's connection pool and
// HTTP keep-alive amortise.
//
// After the handshake every byte in each direction travels in frames:
//
//	length (4 bytes, big endian, = len(ciphertext)) || AES-256-GCM ciphertext+tag
//
// The plaintext of a frame is 1..64 KiB (empty frames are legal but never
// sent); the header is the GCM additional data; the GCM nonce is 4 zero
// bytes followed by a 64-bit big-endian frame counter, starting at 0 in
// each direction. Fresh nonces on both ends give every connection fresh
// keys, and the counter makes every frame's position part of its
// authentication, so frames can't be forged, altered, dropped, reordered or
// replayed within or across connections without the reader failing with
// ErrAuthFailed. (Cutting the TCP connection after a whole frame reads as a
// clean io.EOF, as on any TCP stream; Raft's and HTTP's own framing notice
// a message cut short.) A length beyond the bound fails before the body is
// read.
//
// Without a key (no password) there is no handshake and no crypto: the
// dialer sends hello 0x81 (version 1, plain) and the kind byte, and the
// connection is plain TCP from then on. A keyed peer refuses a plain hello
// and a keyless peer refuses a sealed one, so a password set on only one
// side fails loudly rather than silently running unauthenticated.
//
// Every failure (wrong password, garbage, a truncated or timed-out
// handshake, an oversized or tampered frame) fails that connection only;
// the listener logs a warning naming the remote address and the reason.

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/raft"
)

// ErrAuthFailed is the error (wrapped) of every connection that fails
// the transport's handshake or whose frames fail to decode or authenticate.
var ErrAuthFailed = errors.New("peer transport authentication failed")

const (
	// transportHelloSealed and transportHelloPlain are the first byte of
	// every connection: the low 7 bits are the protocol version, the high
	// bit says there is no handshake or encryption.
	transportHelloSealed byte = 0x01
	transportHelloPlain  byte = 0x81

	// Connection kinds, the first (sealed) byte after the handshake.
	transportKindRaft byte = 'R'
	transportKindRPC  byte = 'H'

	transportNonceSize = 32
	transportProofSize = 32
	transportKeySize   = 32

	// frameMaxPayload bounds the plaintext of one frame; the reader refuses
	// longer length headers before reading the body.
	frameMaxPayload = 64 << 10
	frameHeaderSize = 4
	frameTagSize    = 16 // AES-GCM tag
	frameMaxWire    = frameHeaderSize + frameMaxPayload + frameTagSize

	defaultHandshakeTimeout = 5 * time.Second
	// transportQueueLen bounds each accept queue (raft and rpc).
	transportQueueLen = 32
	// transportMaxHandshakes bounds the inbound connections in their
	// handshake at once; past it new connections are closed at once, so a
	// flood of silent clients costs at most this many goroutines for at
	// most handshakeTimeout each.
	transportMaxHandshakes = 256
)

// TransportConfig configures a PeerTransport.
type TransportConfig struct {
	BindAddr  string       // e.g. "0.0.0.0:6785" or "127.0.0.1:0" in tests
	Advertise *net.TCPAddr // address others dial; nil = the listener's address
	// Key is the 32-byte key derived from the password by DeriveKey;
	// nil or empty = no authentication (plain TCP, still with the hello
	// and kind bytes).
	Key    []byte
	Logger *slog.Logger // nil = discard

	// handshakeTimeout bounds every handshake; zero means
	// defaultHandshakeTimeout. Tests shorten it.
	handshakeTimeout time.Duration
}

// DeriveKey turns the cluster password into the transport key:
// HKDF-SHA256 with no salt and info "weft raft transport v1", 32 bytes.
// It is the construction of mesh.GossipKey with a different label, so the
// memberlist key and this key are independent even though both come from
// the same password; neither reveals the other. An empty password gives
// nil, which means no authentication.
//
// The key is only as strong as the password: an attacker holding a
// handshake proof can test guesses offline, so the password should be
// long and random (for example 32 bytes from /dev/urandom, base64).
func DeriveKey(password []byte) []byte {
	if len(password) == 0 {
		return nil
	}
	key, err := hkdf.Key(sha256.New, password, nil, "weft raft transport v1", transportKeySize)
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
	key              []byte // nil = plain mode
	log              *slog.Logger
	handshakeTimeout time.Duration

	raftConns chan net.Conn // authenticated raft streams waiting for Accept
	rpc       *rpcListener

	shutdown  chan struct{} // closed by Close
	closeOnce sync.Once
	closeErr  error
	wg        sync.WaitGroup // the accept loop and every inbound handshake

	mu      sync.Mutex            // guards pending
	pending map[net.Conn]struct{} // inbound conns in their handshake; Close closes them
}

var _ raft.StreamLayer = (*PeerTransport)(nil)

// NewPeerTransport listens on cfg.BindAddr and starts accepting.
func NewPeerTransport(cfg TransportConfig) (*PeerTransport, error) {
	if n := len(cfg.Key); n != 0 && n != transportKeySize {
		return nil, fmt.Errorf("peer transport: key is %d bytes, want %d (use DeriveKey)", n, transportKeySize)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	hs := cfg.handshakeTimeout
	if hs <= 0 {
		hs = defaultHandshakeTimeout
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
	t := &PeerTransport{
		ln:               ln,
		advertise:        adv,
		log:              log,
		handshakeTimeout: hs,
		raftConns:        make(chan net.Conn, transportQueueLen),
		shutdown:         make(chan struct{}),
		pending:          make(map[net.Conn]struct{}),
	}
	if len(cfg.Key) != 0 {
		t.key = append([]byte(nil), cfg.Key...)
	}
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
		} else if errors.Is(err, ErrAuthFailed) {
			t.log.Warn("ipam: transport handshake failed", "remote", address, "err", err)
		}
		return nil, fmt.Errorf("peer transport: dial %s: %w", address, err)
	}
	raw.SetDeadline(time.Time{})
	return conn, nil
}

// handshakeOutbound runs the dialer's side of the handshake on raw, whose
// deadline the caller has set.
func (t *PeerTransport) handshakeOutbound(raw net.Conn, kind byte) (net.Conn, error) {
	if t.key == nil {
		if _, err := raw.Write([]byte{transportHelloPlain, kind}); err != nil {
			return nil, handshakeErr("sending hello", err)
		}
		return raw, nil
	}
	var hello [1 + transportNonceSize]byte
	hello[0] = transportHelloSealed
	rand.Read(hello[1:])
	if _, err := raw.Write(hello[:]); err != nil {
		return nil, handshakeErr("sending hello", err)
	}
	var nL [transportNonceSize]byte
	if _, err := io.ReadFull(raw, nL[:]); err != nil {
		return nil, handshakeErr("reading the listener's nonce", err)
	}
	s := deriveSession(t.key, hello[0], hello[1:], nL[:])
	if _, err := raw.Write(s.proofD); err != nil {
		return nil, handshakeErr("sending proof", err)
	}
	var proofL [transportProofSize]byte
	if _, err := io.ReadFull(raw, proofL[:]); err != nil {
		return nil, handshakeErr("reading the listener's proof", err)
	}
	if !hmac.Equal(proofL[:], s.proofL) {
		return nil, fmt.Errorf("%w: the listener's proof does not match (wrong password?)", ErrAuthFailed)
	}
	conn, err := newSealedConn(raw, s.l2d, s.d2l)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Write([]byte{kind}); err != nil {
		return nil, handshakeErr("sending kind", err)
	}
	return conn, nil
}

// handshakeInbound runs the listener's side of the handshake on raw,
// whose deadline the caller has set, and returns the connection and its
// kind.
func (t *PeerTransport) handshakeInbound(raw net.Conn) (net.Conn, byte, error) {
	var hello [1]byte
	if _, err := io.ReadFull(raw, hello[:]); err != nil {
		return nil, 0, handshakeErr("reading hello", err)
	}
	var conn net.Conn
	switch {
	case hello[0] == transportHelloPlain && t.key == nil:
		conn = raw
	case hello[0] == transportHelloSealed && t.key != nil:
		var nD, nL [transportNonceSize]byte
		if _, err := io.ReadFull(raw, nD[:]); err != nil {
			return nil, 0, handshakeErr("reading the dialer's nonce", err)
		}
		rand.Read(nL[:])
		if _, err := raw.Write(nL[:]); err != nil {
			return nil, 0, handshakeErr("sending nonce", err)
		}
		s := deriveSession(t.key, hello[0], nD[:], nL[:])
		var proofD [transportProofSize]byte
		if _, err := io.ReadFull(raw, proofD[:]); err != nil {
			return nil, 0, handshakeErr("reading the dialer's proof", err)
		}
		if !hmac.Equal(proofD[:], s.proofD) {
			return nil, 0, fmt.Errorf("%w: the dialer's proof does not match (wrong password?)", ErrAuthFailed)
		}
		if _, err := raw.Write(s.proofL); err != nil {
			return nil, 0, handshakeErr("sending proof", err)
		}
		sc, err := newSealedConn(raw, s.d2l, s.l2d)
		if err != nil {
			return nil, 0, err
		}
		conn = sc
	case hello[0] == transportHelloPlain:
		return nil, 0, fmt.Errorf("%w: the dialer has no password but this peer has one (password set on one side only?)", ErrAuthFailed)
	case hello[0] == transportHelloSealed:
		return nil, 0, fmt.Errorf("%w: the dialer has a password but this peer has none (password set on one side only?)", ErrAuthFailed)
	default:
		return nil, 0, fmt.Errorf("%w: unknown hello byte 0x%02x (not a weft peer, or an incompatible version)", ErrAuthFailed, hello[0])
	}
	var kind [1]byte
	if _, err := io.ReadFull(conn, kind[:]); err != nil {
		return nil, 0, handshakeErr("reading kind", err)
	}
	if kind[0] != transportKindRaft && kind[0] != transportKindRPC {
		return nil, 0, fmt.Errorf("%w: unknown connection kind 0x%02x", ErrAuthFailed, kind[0])
	}
	return conn, kind[0], nil
}

// handshakeErr wraps an I/O error of a handshake step. A remote that
// closes mid-handshake is most often a peer that refused our password.
func handshakeErr(step string, err error) error {
	if errors.Is(err, ErrAuthFailed) {
		return err
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
		return fmt.Errorf("%w: %s: the remote closed the connection (wrong password, or a password set on one side only?): %w", ErrAuthFailed, step, err)
	}
	return fmt.Errorf("%w: %s: %w", ErrAuthFailed, step, err)
}

// transportSession holds what both ends derive from the key and the
// handshake transcript.
type transportSession struct {
	proofD, proofL []byte // the dialer's and the listener's proof of the key
	d2l, l2d       []byte // AES-256 keys per direction
}

func deriveSession(key []byte, hello byte, nD, nL []byte) transportSession {
	salt := make([]byte, 0, 1+2*transportNonceSize)
	salt = append(salt, hello)
	salt = append(salt, nD...)
	salt = append(salt, nL...)
	derive := func(label string) []byte {
		out, err := hkdf.Key(sha256.New, key, salt, "weft transport v1 "+label, 32)
		if err != nil {
			panic("ipam: hkdf: " + err.Error()) // only for lengths beyond 255*32
		}
		return out
	}
	return transportSession{
		proofD: derive("dialer proof"),
		proofL: derive("listener proof"),
		d2l:    derive("dialer to listener"),
		l2d:    derive("listener to dialer"),
	}
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

// track records raw as in its handshake, so that Close can abort it. It
// refuses after Close and past transportMaxHandshakes.
func (t *PeerTransport) track(raw net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	select {
	case <-t.shutdown:
		return false
	default:
	}
	if len(t.pending) >= transportMaxHandshakes {
		t.log.Warn("ipam: transport refused connection: too many handshakes in progress",
			"remote", raw.RemoteAddr().String(), "limit", transportMaxHandshakes)
		return false
	}
	t.pending[raw] = struct{}{}
	return true
}

func (t *PeerTransport) untrack(raw net.Conn) {
	t.mu.Lock()
	delete(t.pending, raw)
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
			t.log.Warn("ipam: transport rejected connection", "remote", remote, "err", err)
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

// sealedConn is a net.Conn whose bytes travel in AES-256-GCM frames over
// the TCP conn it embeds. LocalAddr, RemoteAddr, the deadlines and Close
// (safe more than once) are the TCP conn's. One Read and one Write may run
// at the same time, as raft and net/http do; Close interrupts both.
type sealedConn struct {
	net.Conn

	rmu sync.Mutex // guards r
	r   *sealReader
	wmu sync.Mutex // guards w
	w   *sealWriter
}

func newSealedConn(raw net.Conn, readKey, writeKey []byte) (*sealedConn, error) {
	r, err := newSealReader(raw, readKey)
	if err != nil {
		return nil, err
	}
	w, err := newSealWriter(raw, writeKey)
	if err != nil {
		return nil, err
	}
	return &sealedConn{Conn: raw, r: r, w: w}, nil
}

func (c *sealedConn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	return c.r.Read(p)
}

func (c *sealedConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.w.Write(p)
}

func newFrameAEAD(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("peer transport: %w", err)
	}
	return cipher.NewGCM(block)
}

// frameNonce is the GCM nonce of frame number seq.
func frameNonce(seq uint64) []byte {
	var n [12]byte
	binary.BigEndian.PutUint64(n[4:], seq)
	return n[:]
}

// sealReader decrypts the frames read from src. It is not safe for
// concurrent use. A read deadline that expires mid-frame loses nothing:
// the bytes received so far stay in buf and the next Read continues.
// Every other error is permanent.
type sealReader struct {
	src        io.Reader
	aead       cipher.AEAD
	seq        uint64 // number of the next frame
	buf        []byte // frameMaxWire bytes; buf[start:end] is received, not yet decoded
	start, end int
	plain      []byte // decrypted, not yet returned; aliases buf
	err        error  // sticky
}

func newSealReader(src io.Reader, key []byte) (*sealReader, error) {
	aead, err := newFrameAEAD(key)
	if err != nil {
		return nil, err
	}
	return &sealReader{src: src, aead: aead, buf: make([]byte, frameMaxWire)}, nil
}

func (r *sealReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for len(r.plain) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		if err := r.nextFrame(); err != nil {
			if !isNetTimeout(err) {
				r.err = err
			}
			return 0, err
		}
	}
	n := copy(p, r.plain)
	r.plain = r.plain[n:]
	return n, nil
}

// nextFrame reads, checks and decrypts one frame into r.plain.
func (r *sealReader) nextFrame() error {
	if err := r.fill(frameHeaderSize); err != nil {
		return err
	}
	hdr := r.buf[r.start : r.start+frameHeaderSize]
	n := binary.BigEndian.Uint32(hdr)
	if n < frameTagSize || n > frameMaxPayload+frameTagSize {
		return fmt.Errorf("%w: frame %d has length %d, outside [%d, %d]", ErrAuthFailed, r.seq, n, frameTagSize, frameMaxPayload+frameTagSize)
	}
	total := frameHeaderSize + int(n)
	if err := r.fill(total); err != nil {
		return err
	}
	hdr = r.buf[r.start : r.start+frameHeaderSize]
	body := r.buf[r.start+frameHeaderSize : r.start+total]
	plain, err := r.aead.Open(body[:0], frameNonce(r.seq), body, hdr)
	if err != nil {
		return fmt.Errorf("%w: frame %d fails authentication (tampered, replayed, reordered or wrong key)", ErrAuthFailed, r.seq)
	}
	if r.seq == math.MaxUint64 {
		return fmt.Errorf("%w: frame counter exhausted", ErrAuthFailed)
	}
	r.seq++
	r.start += total
	r.plain = plain
	return nil
}

// fill reads until buf[start:end] holds at least n (≤ frameMaxWire) bytes.
// Only called when r.plain is empty, as it may move buf's content.
func (r *sealReader) fill(n int) error {
	for r.end-r.start < n {
		if len(r.buf)-r.start < n {
			r.end = copy(r.buf, r.buf[r.start:r.end])
			r.start = 0
		}
		m, err := r.src.Read(r.buf[r.end:])
		r.end += m
		if err != nil {
			if r.end-r.start >= n {
				return nil // enough; the error comes back on the next read
			}
			if errors.Is(err, io.EOF) {
				if r.end > r.start {
					return fmt.Errorf("%w: connection closed in the middle of frame %d", io.ErrUnexpectedEOF, r.seq)
				}
				return io.EOF
			}
			return err
		}
	}
	return nil
}

func isNetTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// sealWriter encrypts writes into frames of at most frameMaxPayload bytes
// and writes each to dst. It is not safe for concurrent use. Any error is
// permanent, a write deadline included: a frame may have been cut, and a
// frame must never be sealed twice under the same nonce.
type sealWriter struct {
	dst  io.Writer
	aead cipher.AEAD
	seq  uint64 // number of the next frame
	buf  []byte // frameMaxWire bytes, the frame being written
	err  error  // sticky
}

func newSealWriter(dst io.Writer, key []byte) (*sealWriter, error) {
	aead, err := newFrameAEAD(key)
	if err != nil {
		return nil, err
	}
	return &sealWriter{dst: dst, aead: aead, buf: make([]byte, frameMaxWire)}, nil
}

// Write sends p in as many frames as it takes and returns how many bytes
// of p were sent in complete frames.
func (w *sealWriter) Write(p []byte) (int, error) {
	sent := 0
	for len(p) > 0 {
		if w.err != nil {
			return sent, w.err
		}
		chunk := p[:min(len(p), frameMaxPayload)]
		if w.seq == math.MaxUint64 {
			w.err = errors.New("peer transport: frame counter exhausted")
			return sent, w.err
		}
		var hdr [frameHeaderSize]byte
		binary.BigEndian.PutUint32(hdr[:], uint32(len(chunk)+frameTagSize))
		frame := append(w.buf[:0], hdr[:]...)
		frame = w.aead.Seal(frame, frameNonce(w.seq), chunk, hdr[:])
		w.seq++
		if _, err := w.dst.Write(frame); err != nil {
			w.err = err
			return sent, err
		}
		sent += len(chunk)
		p = p[len(chunk):]
	}
	if w.err != nil {
		return 0, w.err
	}
	return sent, nil
}
