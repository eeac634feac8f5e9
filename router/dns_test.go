package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/weftnet/weft/dns"
	"github.com/weftnet/weft/ipam"
)

// `weft dns add` with a bad --service answers 400 and publishes nothing: not the name, not
// the good services.
func TestDNSAddValidatesEverythingBeforePublishing(t *testing.T) {
	recs, err := dns.NewRecords("self", nil)
	if err != nil {
		t.Fatal(err)
	}
	sent := 0
	rep, err := dns.NewReplicator(dns.ReplicatorConfig{Records: recs, Broadcast: func([]byte) error { sent++; return nil }})
	if err != nil {
		t.Fatal(err)
	}
	p := &Peer{dnsRep: rep, log: slog.New(slog.DiscardHandler)}
	for _, svc := range []string{"BAD!/tcp/80", "http/sctp/80", "http/tcp/0", "http/tcp", "h_p/tcp/80", "/tcp/80"} {
		err := p.dnsAdd(DNSRequest{Name: "web", Addrs: []string{"10.40.0.2"}, Services: []string{"http/tcp/80", svc}})
		var ae *apiError
		if !errors.As(err, &ae) || ae.status != http.StatusBadRequest {
			t.Fatalf("service %q: err = %v, want a 400", svc, err)
		}
		if recs.Generation() != 0 || sent != 0 {
			t.Fatalf("service %q: the request was refused but %d broadcasts went out, store generation %d", svc, sent, recs.Generation())
		}
	}
	if err := p.dnsAdd(DNSRequest{Name: "web", Addrs: []string{"10.40.0.2"}, Services: []string{"http/tcp/80"}}); err != nil {
		t.Fatal(err)
	}
	if ts, _ := recs.LookupName("web"); len(ts) != 1 || len(recs.LookupSRV("web", "http", "tcp")) != 1 || sent != 1 {
		t.Fatalf("good request: targets %v, %d broadcasts", ts, sent)
	}
	// A CNI attachment with a bad service keeps its name and good services.
	p.registerName("db", netip.MustParseAddr("10.40.0.3"), []string{"BAD!/tcp/1", "pg/tcp/5432"})
	if ts, _ := recs.LookupName("db"); len(ts) != 1 || len(recs.LookupSRV("db", "pg", "tcp")) != 1 {
		t.Fatalf("attachment with a bad service: %v", ts)
	}
}

func TestDNSListenAddrs(t *testing.T) {
	def := ipam.Network{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16")}
	media := ipam.Network{Name: "media", Subnet: netip.MustParsePrefix("10.50.0.0/16")}
	control := ipam.Network{Name: "control", Subnet: netip.MustParsePrefix("10.60.0.0/16")}
	local := map[netip.Addr]bool{netip.MustParseAddr("10.50.0.1"): true, netip.MustParseAddr("10.40.0.1"): true,
		netip.MustParseAddr("10.60.0.9"): true, netip.MustParseAddr("192.168.1.5"): true}
	got := dnsListenAddrs([]ipam.Network{media, control, def}, local, 53)
	want := []netip.AddrPort{netip.MustParseAddrPort("10.40.0.1:53"), netip.MustParseAddrPort("10.50.0.1:53")}
	if !slices.Equal(got, want) {
		t.Fatalf("listen on %v, want %v (control has no gateway here)", got, want)
	}
	if got := dnsListenAddrs(nil, local, 53); len(got) != 0 {
		t.Fatalf("no networks: %v", got)
	}
	// The cluster's definition wins over the local default; local fills in before the
	// cluster's table is known.
	other := ipam.Network{Name: "default", Subnet: netip.MustParsePrefix("10.99.0.0/16")}
	if got := mergeNetworks([]ipam.Network{media, def}, other); !slices.Equal(got, []ipam.Network{media, def}) {
		t.Fatalf("merge: %v", got)
	}
	if got := mergeNetworks(nil, def); !slices.Equal(got, []ipam.Network{def}) {
		t.Fatalf("merge before the table: %v", got)
	}
	if got := dnsRanges([]ipam.Network{media}); len(got) != 1 || got[0] != (dns.NetworkRange{Name: "media", Prefix: media.Subnet}) {
		t.Fatalf("ranges: %v", got)
	}
}

// TestDNSFollowsNetworksAndGateways runs the DNS wiring in a network namespace of its own
// (the test re-executes itself there, so that every thread, netlink's included, is inside):
// the server listens on a network's gateway once that address appears, answers from it with
// the asker's network first, and stops when the network is removed or the address goes.
func TestDNSFollowsNetworksAndGateways(t *testing.T) {
	if os.Getenv("WND_DNS_NETNS") == "" {
		if os.Geteuid() != 0 {
			t.Skip("needs root for a network namespace")
		}
		name := fmt.Sprintf("wnd-dns-%d", os.Getpid())
		if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add: %v: %s", err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
		cmd := exec.Command("ip", "netns", "exec", name, os.Args[0], "-test.run", "^TestDNSFollowsNetworksAndGateways$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), "WND_DNS_NETNS=1")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS") {
			t.Fatalf("in the namespace: %v\n%s", err, out)
		}
		return
	}
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	ip("link", "set", "lo", "up")
	for _, l := range []string{"wnd-def", "wnd-media"} {
		ip("link", "add", l, "type", "bridge")
		ip("link", "set", l, "up")
	}
	ip("addr", "add", "10.40.0.1/16", "dev", "wnd-def")

	def := ipam.Network{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16")}
	media := ipam.Network{Name: "media", Subnet: netip.MustParsePrefix("10.50.0.0/16")}
	var mu sync.Mutex
	nets := []ipam.Network{def, media}
	setNets := func(n ...ipam.Network) { mu.Lock(); nets = n; mu.Unlock() }

	recs, err := dns.NewRecords("self", nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"10.40.0.7", "10.50.0.7"} {
		recs.AddAddr("web", netip.MustParseAddr(a))
	}
	cfg := dns.DefaultConfig()
	cfg.Upstreams = []string{"127.0.0.1:1"}
	srv, err := dns.NewServer(cfg, recs, dns.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	p := &Peer{log: slog.New(slog.DiscardHandler), dnsServer: srv, cfg: Config{DNSPort: 0},
		dnsListen: newDNSListen(func() []ipam.Network { mu.Lock(); defer mu.Unlock(); return slices.Clone(nets) })}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); p.runDNSListen(ctx) }()
	defer func() { cancel(); <-done }()

	listening := func() []string {
		var out []string
		for _, a := range srv.Addrs() {
			h, _, _ := net.SplitHostPort(a.String())
			out = append(out, h)
		}
		return out
	}
	waitListen := func(want ...string) string {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !slices.Equal(listening(), want) {
			if time.Now().After(deadline) {
				t.Fatalf("listening on %v, want %v", listening(), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
		for _, a := range srv.Addrs() {
			if strings.HasPrefix(a.String(), want[len(want)-1]+":") {
				return a.String()
			}
		}
		return ""
	}
	ask := func(addr, name string) []string {
		t.Helper()
		c := &mdns.Client{Timeout: 2 * time.Second}
		m := new(mdns.Msg)
		m.SetQuestion(name, mdns.TypeA)
		r, _, err := c.Exchange(m, addr)
		if err != nil {
			t.Fatalf("%s at %s: %v", name, addr, err)
		}
		var out []string
		for _, rr := range r.Answer {
			out = append(out, rr.(*mdns.A).A.String())
		}
		return out
	}

	p.syncDNS() // as startDNS does: only the default network's gateway is here
	defAddr := waitListen("10.40.0.1")
	// The media bridge gets its gateway (the first attachment here): DNS follows the kernel's event.
	ip("addr", "add", "10.50.0.1/16", "dev", "wnd-media")
	mediaAddr := waitListen("10.40.0.1", "10.50.0.1")
	for range 4 {
		if got := ask(mediaAddr, "web.weft.local."); len(got) != 2 || got[0] != "10.50.0.7" {
			t.Fatalf("asked from media: %v, want 10.50.0.7 first", got)
		}
		if got := ask(defAddr, "web.weft.local."); len(got) != 2 || got[0] != "10.40.0.7" {
			t.Fatalf("asked from default: %v, want 10.40.0.7 first", got)
		}
	}
	if got := ask(defAddr, "web.media.weft.local."); !slices.Equal(got, []string{"10.50.0.7"}) {
		t.Fatalf("web.media: %v", got)
	}
	// The network is removed from the cluster: no listener, no names.
	setNets(def)
	p.dnsNetworksChanged()
	waitListen("10.40.0.1")
	if got := ask(defAddr, "web.media.weft.local."); len(got) != 0 {
		t.Fatalf("web.media after the network is removed: %v", got)
	}
	// Back, then its gateway address goes (the bridge is removed).
	setNets(def, media)
	p.dnsNetworksChanged()
	waitListen("10.40.0.1", "10.50.0.1")
	ip("addr", "del", "10.50.0.1/16", "dev", "wnd-media")
	waitListen("10.40.0.1")
}
