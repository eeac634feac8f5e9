package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/cni"
)

// weftCluster runs `weft peer` on every host through the lab. It talks to the peers'
// control sockets in-process (no CLI process per poll), decoding only the fields it
// needs, so it works with any weft that keeps the /v1 API.
type weftCluster struct {
	lab     *lab.Lab
	mu      sync.Mutex // guards clients
	clients map[string]*cni.Client
}

func newWeftCluster(l *lab.Lab) *weftCluster {
	return &weftCluster{lab: l, clients: map[string]*cni.Client{}}
}

// weftPeerArgs returns the extra flags of host i: the control plane alone
// (--encrypt=never; the lab adds --key-file, so gossip is encrypted as serf's), the first peer without seeds, every other seeded with hosts 0..2,
// then extra.
func weftPeerArgs(l **lab.Lab, extra []string) func(i int) []string {
	return func(i int) []string {
		args := []string{"--encrypt=never"}
		args = append(args, extra...)
		if i > 0 {
			args = append(args, "--peers", seedList(*l, i, 6783))
		}
		return args
	}
}

// seedList returns seeds(l, i) as host:port, comma-separated.
func seedList(l *lab.Lab, i, port int) string {
	s := ""
	for _, a := range seeds(l, i) {
		if s != "" {
			s += ","
		}
		s += netip.AddrPortFrom(a, uint16(port)).String()
	}
	return s
}

// seeds returns the seeds of host i: none for host 0 (the first peer of a new cluster),
// hosts 0..2 except i for every other.
func seeds(l *lab.Lab, i int) []netip.Addr {
	var out []netip.Addr
	if i == 0 {
		return nil
	}
	for j := 0; j < 3 && j < len(l.Hosts()); j++ {
		if j != i {
			out = append(out, l.Host(j).Addr.Addr())
		}
	}
	return out
}

func (w *weftCluster) client(h *lab.Host) *cni.Client {
	w.mu.Lock()
	defer w.mu.Unlock()
	c, ok := w.clients[h.Name]
	if !ok {
		c = cni.NewClient(h.Socket, 10*time.Second)
		w.clients[h.Name] = c
	}
	return c
}

func (w *weftCluster) launch(h *lab.Host) error { return h.Launch() }
func (w *weftCluster) pid(h *lab.Host) int      { return h.PID() }

func (w *weftCluster) logTail(h *lab.Host, n int) string { return h.LogTail(n) }

func (w *weftCluster) ready(ctx context.Context, h *lab.Host) error {
	var v struct {
		Name string `json:"name"`
	}
	return w.client(h).Get(ctx, "/v1/status", &v)
}

func (w *weftCluster) alive(ctx context.Context, h *lab.Host) (int, error) {
	var peers []struct {
		State string `json:"state"`
	}
	if err := w.client(h).Get(ctx, "/v1/peers", &peers); err != nil {
		return 0, err
	}
	n := 0
	for _, p := range peers {
		if p.State == "alive" {
			n++
		}
	}
	return n, nil
}

// leader returns the Raft leader h knows, and the voters.
func (w *weftCluster) leader(ctx context.Context, h *lab.Host) (string, []string, error) {
	var v struct {
		Leader string   `json:"leader"`
		Voters []string `json:"voters"`
	}
	if err := w.client(h).Get(ctx, "/v1/ipam", &v); err != nil {
		return "", nil, err
	}
	if v.Leader == "" {
		return "", nil, errors.New("no raft leader known")
	}
	return v.Leader, v.Voters, nil
}

// stopAll kills every peer at once: the measurements are taken, and a graceful stop of
// 100 peers one after the other (Lab.Close) takes minutes.
func (w *weftCluster) stopAll() {
	parallel(w.lab.Hosts(), 16, func(h *lab.Host) { h.Kill() })
}

// sampleIndexes returns k host indexes spread evenly over 0..n-1 (first and last
// included), without repeats.
func sampleIndexes(n, k int) []int {
	if k >= n {
		k = n
	}
	if k <= 1 {
		return []int{0}[:min(1, n)]
	}
	var out []int
	for j := range k {
		i := int(float64(j)*float64(n-1)/float64(k-1) + 0.5)
		if len(out) == 0 || out[len(out)-1] != i {
			out = append(out, i)
		}
	}
	return out
}

// ctr is an attached container and its address.
type ctr struct {
	c    *lab.Container
	addr netip.Addr
}

// attach makes a container on h and attaches it through the weft CNI plugin.
func attach(ctx context.Context, w *weftCluster, h *lab.Host) (ctr, error) {
	if w.pid(h) == 0 {
		return ctr{}, errors.New("its peer does not run")
	}
	c, err := h.NewContainer()
	if err != nil {
		return ctr{}, err
	}
	cn, err := h.CNI(lab.CNIOptions{})
	if err != nil {
		return ctr{}, err
	}
	res, err := cn.Add(ctx, c.RuntimeConf("eth0"))
	if err != nil {
		return ctr{}, fmt.Errorf("attach: %w", err)
	}
	pfx, err := lab.ResultAddress(res)
	if err != nil {
		return ctr{}, fmt.Errorf("attach: %w", err)
	}
	return ctr{c, pfx.Addr()}, nil
}

// containerPings waits for a Raft leader, attaches one container on each sampled host
// and pings every ordered pair of them until each answers once or wait passes.
func containerPings(ctx context.Context, l *lab.Lab, w *weftCluster, sample int, wait time.Duration, r *result) error {
	progress("weft N=%d: waiting for the raft leader, attaching %d containers, pinging", r.n, sample)
	t0 := time.Now()
	lctx, cancel := context.WithTimeout(ctx, wait)
	err := lab.Poll(lctx, 200*time.Millisecond, func() error {
		var err error
		r.leader, r.voters, err = w.leader(lctx, l.Host(0))
		return err
	})
	cancel()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		r.note("no raft leader within %s: %v", wait, err)
	}
	r.leaderTook = time.Since(t0)

	// Attach all at once, each bounded by wait: one slow claim must not hold up the rest.
	var (
		mu   sync.Mutex // guards ctrs and r's notes
		ctrs []ctr
	)
	actx, cancel := context.WithTimeout(ctx, wait)
	parallel(sampleIndexes(len(l.Hosts()), sample), sample, func(i int) {
		h := l.Host(i)
		c, err := attach(actx, w, h)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			r.note("no container on %s: %v", h.Name, err)
			return
		}
		ctrs = append(ctrs, c)
	})
	cancel()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	slices.SortFunc(ctrs, func(a, b ctr) int { return a.c.Host.Index - b.c.Host.Index })
	type pair struct{ a, b ctr }
	var pairs []pair
	for _, a := range ctrs {
		for _, b := range ctrs {
			if a.c != b.c {
				pairs = append(pairs, pair{a, b})
			}
		}
	}
	// Pairs with a host whose container did not attach count as failed.
	n := len(sampleIndexes(len(l.Hosts()), sample))
	r.pingsTotal = n * (n - 1)
	if len(pairs) == 0 {
		return nil
	}
	t1 := time.Now()
	pctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	var failed []string
	parallel(pairs, 4, func(p pair) {
		err := lab.Poll(pctx, 200*time.Millisecond, func() error { return p.a.c.Ping(pctx, p.b.addr) })
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			failed = append(failed, fmt.Sprintf("%s→%s", p.a.c.Host.Name, p.b.c.Host.Name))
			return
		}
		r.pingsOK++
		r.pingTook = time.Since(t1)
	})
	if len(failed) > 0 {
		r.note("pings that never answered within %s: %v", wait, failed)
	}
	return ctx.Err()
}
