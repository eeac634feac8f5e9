package chaostest

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	mdns "github.com/miekg/dns"

	"github.com/weftnet/weft/chaos-tests/lab"
)

// query asks the DNS server at the gateway from inside ctr's namespace, as a container's
// resolver would: the UDP socket is made inside the namespace.
func query(ctr *lab.Container, name string, qtype uint16) (*mdns.Msg, error) {
	return queryVia(ctr, "10.40.0.1", name, qtype)
}

// queryVia asks the DNS server at server (a network's gateway) from inside ctr; the answer's
// order depends on the network the query's source address is in.
func queryVia(ctr *lab.Container, server, name string, qtype uint16) (*mdns.Msg, error) {
	cns, err := ns.GetNS(ctr.NSPath)
	if err != nil {
		return nil, err
	}
	defer cns.Close()
	var conn net.Conn
	err = cns.Do(func(ns.NetNS) error {
		var err error
		conn, err = net.Dial("udp", net.JoinHostPort(server, "53"))
		return err
	})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	m := new(mdns.Msg)
	m.SetQuestion(mdns.Fqdn(name), qtype)
	c := &mdns.Client{Timeout: 2 * time.Second}
	r, _, err := c.ExchangeWithConn(m, &mdns.Conn{Conn: conn})
	return r, err
}

// addrsOf resolves name (A) from ctr; NXDOMAIN is an empty answer.
func addrsOf(ctr *lab.Container, name string) ([]string, error) {
	r, err := query(ctr, name, mdns.TypeA)
	if err != nil {
		return nil, err
	}
	if r.Rcode != mdns.RcodeSuccess && r.Rcode != mdns.RcodeNameError {
		return nil, fmt.Errorf("%s: rcode %s", name, mdns.RcodeToString[r.Rcode])
	}
	var out []string
	for _, rr := range r.Answer {
		if a, ok := rr.(*mdns.A); ok {
			out = append(out, a.A.String())
		}
	}
	sort.Strings(out)
	return out, nil
}

// attachNamed attaches a container under a DNS name (CNI_ARGS name=…, and WEFT_SERVICES when
// services are given).
func attachNamed(t *testing.T, ctx context.Context, h *lab.Host, name string, services ...string) (*lab.Container, string, *current.Result) {
	t.Helper()
	ctr := mustContainer(t, h)
	rt := ctr.RuntimeConf("eth0")
	rt.Args = append(rt.Args, [2]string{"name", name})
	if len(services) > 0 {
		rt.Args = append(rt.Args, [2]string{"WEFT_SERVICES", strings.Join(services, ",")})
	}
	c := mustCNI(t, h, lab.CNIOptions{})
	res, err := c.Add(ctx, rt)
	if err != nil {
		t.Fatalf("ADD %s on %s: %v", name, h.Name, err)
	}
	r, err := current.GetResult(res)
	if err != nil {
		t.Fatal(err)
	}
	return ctr, r.IPs[0].Address.IP.String(), r
}

func delContainer(t *testing.T, ctx context.Context, h *lab.Host, ctr *lab.Container) {
	t.Helper()
	c := mustCNI(t, h, lab.CNIOptions{})
	if err := c.Del(ctx, ctr.RuntimeConf("eth0")); err != nil {
		t.Fatalf("DEL %s: %v", ctr.ID, err)
	}
}

func TestServiceDNS(t *testing.T) {
	mostlyWaiting(t) // a partition and a death wait for failure detection
	// A local fake upstream inside host 0's namespace: weft forwards other names to it.
	var l *lab.Lab
	var upstream *mdns.Server
	l = newLab(t, lab.Config{Prefix: "wdns", Hosts: 3, NoStart: true, PeerArgs: func(i int) []string {
		args := []string{"--dns-down-grace", "4s", "--dns-upstream", l.Host(0).Addr.Addr().String() + ":5353"}
		if i > 0 {
			args = append(args, "--peers", l.Host(0).Addr.Addr().String(), "--raft-voters", "3")
		}
		return args
	}})
	ctx := testCtx(t, 4*time.Minute)
	h0, h1, h2 := l.Host(0), l.Host(1), l.Host(2)
	err := h0.Do(func() error {
		pc, err := net.ListenPacket("udp", h0.Addr.Addr().String()+":5353")
		if err != nil {
			return err
		}
		upstream = &mdns.Server{PacketConn: pc, Handler: mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
			m := new(mdns.Msg)
			m.SetReply(r)
			if r.Question[0].Name == "upstream.example." {
				m.Answer = append(m.Answer, &mdns.A{Hdr: mdns.RR_Header{Name: r.Question[0].Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60},
					A: net.ParseIP("192.0.2.99")})
			} else {
				m.Rcode = mdns.RcodeNameError
			}
			w.WriteMsg(m)
		})}
		go upstream.ActivateAndServe()
		return nil
	})
	if err != nil {
		t.Fatalf("fake upstream: %v", err)
	}
	t.Cleanup(func() { upstream.Shutdown() })
	if err := l.StartAll(ctx); err != nil {
		t.Fatal(err)
	}
	hosts := l.Hosts()
	waitFor(t, ctx, 45*time.Second, "the mesh", func() error { return aliveEverywhere(ctx, hosts) })
	waitLeader(t, ctx, hosts)

	// Three containers named "web", one per host, and a client container on host 0.
	var webs []*lab.Container
	var webAddrs []string
	for _, h := range hosts {
		ctr, addr, res := attachNamed(t, ctx, h, "web")
		if len(res.DNS.Nameservers) != 1 || res.DNS.Nameservers[0] != "10.40.0.1" || res.DNS.Domain != "weft.local" {
			t.Fatalf("CNI result DNS = %+v, want nameserver 10.40.0.1 and domain weft.local", res.DNS)
		}
		webs = append(webs, ctr)
		webAddrs = append(webAddrs, addr)
	}
	sort.Strings(webAddrs)
	client, _, _ := attachNamed(t, ctx, h0, "client")
	lone, loneAddr, _ := attachNamed(t, ctx, h2, "lone", "http/tcp/8080")

	t.Run("a container on one host resolves a container on another", func(t *testing.T) {
		waitFor(t, ctx, 10*time.Second, "lone.weft.local from host 0", func() error {
			got, err := addrsOf(client, "lone.weft.local")
			if err != nil || !slices.Equal(got, []string{loneAddr}) {
				return fmt.Errorf("got %v, %v; want %s", got, err, loneAddr)
			}
			return nil
		})
		got, err := addrsOf(client, "LONE.Weft.Local")
		if err != nil || !slices.Equal(got, []string{loneAddr}) {
			t.Fatalf("names must be case-insensitive: %v, %v", got, err)
		}
		r, err := query(client, "nobody.weft.local", mdns.TypeA)
		if err != nil || r.Rcode != mdns.RcodeNameError {
			t.Fatalf("unknown name: %v, %v; want NXDOMAIN", r, err)
		}
		r, err = query(client, "lone.weft.local", mdns.TypeAAAA)
		if err != nil || r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 0 {
			t.Fatalf("known name, other type: %v, %v; want NOERROR and no data", r, err)
		}
		r, err = query(client, "lone.weft.local", mdns.TypeA)
		if err != nil || len(r.Answer) != 1 || r.Answer[0].Header().Ttl != 30 {
			t.Fatalf("TTL: %v, %v; want 30", r, err)
		}
		// WEFT_SERVICES in CNI_ARGS became an SRV record, its target's address alongside.
		r, err = query(client, "_http._tcp.lone.weft.local", mdns.TypeSRV)
		if err != nil || len(r.Answer) != 1 {
			t.Fatalf("SRV: %v, %v; want one answer", r, err)
		}
		if srv, ok := r.Answer[0].(*mdns.SRV); !ok || srv.Port != 8080 || srv.Target != "lone.weft.local." {
			t.Fatalf("SRV answer %v; want port 8080 on lone.weft.local.", r.Answer[0])
		}
		// A reverse lookup of a weft address names the container.
		rev, _ := mdns.ReverseAddr(loneAddr)
		r, err = query(client, rev, mdns.TypePTR)
		if err != nil || len(r.Answer) != 1 || r.Answer[0].(*mdns.PTR).Ptr != "lone.weft.local." {
			t.Fatalf("PTR for %s: %v, %v", loneAddr, r, err)
		}
	})

	t.Run("three containers with one name answer three addresses, nearest first", func(t *testing.T) {
		waitFor(t, ctx, 10*time.Second, "three addresses for web", func() error {
			for _, h := range []*lab.Container{client, lone} {
				got, err := addrsOf(h, "web.weft.local")
				if err != nil || !slices.Equal(got, webAddrs) {
					return fmt.Errorf("from %s: %v, %v; want %v", h.Name, got, err, webAddrs)
				}
			}
			return nil
		})
		// The container on the client's own host is the nearest (RTT 0): always first.
		// Rotation among equally near addresses is covered by the dns package's tests.
		local := webs[0]
		for i := 0; i < 6; i++ {
			r, err := query(client, "web.weft.local", mdns.TypeA)
			if err != nil {
				t.Fatal(err)
			}
			if first := r.Answer[0].(*mdns.A).A.String(); first != webAddrOn(t, local) {
				t.Fatalf("query %d: first answer %s, want the local container %s", i, first, webAddrOn(t, local))
			}
		}
	})

	t.Run("a removed container is gone on every host within 2s", func(t *testing.T) {
		delContainer(t, ctx, h1, webs[1])
		deadline := time.Now().Add(2 * time.Second)
		for _, c := range []*lab.Container{client, lone} {
			for {
				got, err := addrsOf(c, "web.weft.local")
				if err == nil && len(got) == 2 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("from %s after 2s: %v, %v; want 2 addresses", c.Name, got, err)
				}
				time.Sleep(50 * time.Millisecond) // poll interval
			}
		}
	})

	t.Run("a name removed during a partition is gone after it heals", func(t *testing.T) {
		if err := l.Partition([]*lab.Host{h2}, []*lab.Host{h0, h1}); err != nil {
			t.Fatal(err)
		}
		delContainer(t, ctx, h0, webs[0])
		// Keep the partition until host 0 has given host 2 up, so that the removal's gossip
		// is long spent and only the rejoin's state exchange can carry it.
		waitFor(t, ctx, 60*time.Second, "host 0 to declare host 2 dead", func() error {
			return aliveEverywhere(ctx, []*lab.Host{h0, h1})
		})
		// h2 still answers the stale address while cut off…
		got, err := addrsOf(lone, "web.weft.local")
		if err != nil || len(got) != 2 {
			t.Fatalf("partitioned host: %v, %v; want the 2 addresses it knew", got, err)
		}
		if err := l.Heal(); err != nil {
			t.Fatal(err)
		}
		// …and forgets it once healed.
		waitFor(t, ctx, 60*time.Second, "the partitioned host to drop the removed name", func() error {
			got, err := addrsOf(lone, "web.weft.local")
			if err != nil || len(got) != 1 {
				return fmt.Errorf("%v, %v; want only host 2's own web", got, err)
			}
			return nil
		})
		// Host 0 had forgotten host 2 while it was cut off: its names must come back.
		waitFor(t, ctx, 10*time.Second, "host 2's names back on host 0", func() error {
			got, err := addrsOf(client, "lone.weft.local")
			if err != nil || !slices.Equal(got, []string{loneAddr}) {
				return fmt.Errorf("%v, %v; want %s", got, err, loneAddr)
			}
			return nil
		})
	})

	t.Run("a dead peer's names leave the answers after the grace", func(t *testing.T) {
		if err := h2.Kill(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, 60*time.Second, "lone to disappear after host 2 died", func() error {
			got, err := addrsOf(client, "lone.weft.local")
			if err != nil || len(got) != 0 {
				return fmt.Errorf("%v, %v", got, err)
			}
			return nil
		})
	})

	t.Run("other names go to the upstream", func(t *testing.T) {
		got, err := addrsOf(client, "upstream.example")
		if err != nil || !slices.Equal(got, []string{"192.0.2.99"}) {
			t.Fatalf("forwarded: %v, %v; want 192.0.2.99 from the fake upstream", got, err)
		}
		r, err := query(client, "missing.example", mdns.TypeA)
		if err != nil || r.Rcode != mdns.RcodeNameError {
			t.Fatalf("forwarded NXDOMAIN: %v, %v", r, err)
		}
	})

	t.Run("weft dns add, lookup and remove", func(t *testing.T) {
		if out, err := h0.CLI(ctx, "dns", "add", "db", "10.40.200.7"); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		waitFor(t, ctx, 5*time.Second, "db from host 1", func() error {
			out, err := h1.CLI(ctx, "dns", "lookup", "db")
			if err != nil {
				return fmt.Errorf("%v %s", err, out)
			}
			return nil
		})
		if out, err := h0.CLI(ctx, "dns", "add", "bad name!", "10.40.200.7"); err == nil {
			t.Fatalf("a bad name was accepted: %s", out)
		}
		if out, err := h0.CLI(ctx, "dns", "remove", "db"); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		waitFor(t, ctx, 5*time.Second, "db gone", func() error {
			got, err := addrsOf(client, "db.weft.local")
			if err != nil || len(got) != 0 {
				return fmt.Errorf("%v, %v", got, err)
			}
			return nil
		})
	})
}

// webAddrOn is the address of a container attached by attachNamed.
func webAddrOn(t *testing.T, ctr *lab.Container) string {
	t.Helper()
	st := mustStatus(t, testCtx(t, 10*time.Second), ctr.Host)
	a, ok := st.Attachment(ctr.ID, "eth0")
	if !ok {
		t.Fatalf("%s not attached", ctr.ID)
	}
	return strings.Split(a.Address, "/")[0]
}
