package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-msgpack/v2/codec"

	"github.com/weftnet/weft/chaos-tests/lab"
)

const (
	serfPort    = 7946
	serfRPCAddr = "127.0.0.1:7373" // inside each host's namespace
)

// serfCluster runs a Debian `serf agent` on every host of a lab started with NoStart,
// seeded like weft (host 0 alone, every other with hosts 0..2). It reads membership over
// serf's msgpack RPC from a socket opened inside the host's namespace, so no process is
// started per poll.
type serfCluster struct {
	bin   string
	lab   *lab.Lab
	mu    sync.Mutex // guards procs
	procs map[int]*lab.Proc
}

func newSerfCluster(bin string, l *lab.Lab) *serfCluster {
	return &serfCluster{bin: bin, lab: l, procs: map[int]*lab.Proc{}}
}

func (s *serfCluster) launch(h *lab.Host) error {
	// The lab's cluster key (32 bytes, base64) is a valid serf keyring key: serf encrypts
	// its gossip with AES-256-GCM as weft's memberlist does, so the two pay the same.
	key, err := s.lab.ClusterKey()
	if err != nil {
		return fmt.Errorf("serf key: %w", err)
	}
	args := []string{s.bin, "agent",
		"-node", h.Name,
		"-bind", netip.AddrPortFrom(h.Addr.Addr(), serfPort).String(),
		"-rpc-addr", serfRPCAddr,
		"-encrypt", key,
	}
	for _, a := range seeds(s.lab, h.Index) {
		args = append(args, "-join", netip.AddrPortFrom(a, serfPort).String())
	}
	logf, err := os.OpenFile(filepath.Join(h.Dir, "serf.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	p, err := h.Spawn(logf, args...)
	if err != nil {
		return fmt.Errorf("start serf on %s: %w", h.Name, err)
	}
	s.mu.Lock()
	s.procs[h.Index] = p
	s.mu.Unlock()
	return nil
}

func (s *serfCluster) logTail(h *lab.Host, n int) string {
	b, err := os.ReadFile(filepath.Join(h.Dir, "serf.log"))
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func (s *serfCluster) pid(h *lab.Host) int {
	s.mu.Lock()
	p := s.procs[h.Index]
	s.mu.Unlock()
	if p == nil {
		return 0
	}
	select {
	case <-p.Done:
		return 0
	default:
		return p.Cmd.Process.Pid
	}
}

func (s *serfCluster) ready(ctx context.Context, h *lab.Host) error {
	_, err := s.members(ctx, h)
	return err
}

func (s *serfCluster) alive(ctx context.Context, h *lab.Host) (int, error) {
	ms, err := s.members(ctx, h)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, m := range ms {
		if m.Status == "alive" {
			n++
		}
	}
	return n, nil
}

// stopAll kills every agent (by the PID it started) and waits for each.
func (s *serfCluster) stopAll() {
	s.mu.Lock()
	procs := make([]*lab.Proc, 0, len(s.procs))
	for _, p := range s.procs {
		procs = append(procs, p)
	}
	s.mu.Unlock()
	for _, p := range procs {
		if err := p.Cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
			continue
		}
	}
	for _, p := range procs {
		<-p.Done
	}
}

// serfMember is the part of serf's RPC member record this harness reads; the decoder
// skips the other fields.
type serfMember struct {
	Name   string
	Status string
}

// rpcHeader is serf's RPC request and response header (serf/client/const.go).
type rpcRequest struct {
	Command string
	Seq     uint64
}
type rpcResponse struct {
	Seq   uint64
	Error string
}

// members asks the agent of h for its member list over a fresh RPC connection: a
// handshake (version 1), then "members".
func (s *serfCluster) members(ctx context.Context, h *lab.Host) ([]serfMember, error) {
	var conn net.Conn
	err := h.Do(func() error {
		var d net.Dialer
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		var err error
		conn, err = d.DialContext(dctx, "tcp", serfRPCAddr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("serf rpc on %s: %w", h.Name, err)
	}
	defer conn.Close()
	deadline := time.Now().Add(5 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	conn.SetDeadline(deadline)

	mh := &codec.MsgpackHandle{}
	mh.RawToString = true
	enc := codec.NewEncoder(conn, mh)
	dec := codec.NewDecoder(conn, mh)
	call := func(cmd string, seq uint64, body, out any) error {
		if err := enc.Encode(rpcRequest{Command: cmd, Seq: seq}); err != nil {
			return err
		}
		if body != nil {
			if err := enc.Encode(body); err != nil {
				return err
			}
		}
		var resp rpcResponse
		if err := dec.Decode(&resp); err != nil {
			return err
		}
		if resp.Error != "" {
			return fmt.Errorf("serf rpc %s: %s", cmd, resp.Error)
		}
		if out != nil {
			return dec.Decode(out)
		}
		return nil
	}
	if err := call("handshake", 0, struct{ Version int32 }{1}, nil); err != nil {
		return nil, fmt.Errorf("serf rpc on %s: %w", h.Name, err)
	}
	var resp struct{ Members []serfMember }
	if err := call("members", 1, nil, &resp); err != nil {
		return nil, fmt.Errorf("serf rpc on %s: %w", h.Name, err)
	}
	return resp.Members, nil
}
