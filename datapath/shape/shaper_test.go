package shape

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// These tests need root and a kernel with netns, veth, ifb, tbf, u32 and mirred. They make
// namespaces named wsh<pid>-…: one plays the host, one the container, and remove them.

type lab struct {
	hostNS, contNS string
	host, cont     *netlink.Handle
	hostIf         string
}

func newNS(t *testing.T, name string) (string, *netlink.Handle) {
	t.Helper()
	name = fmt.Sprintf("wsh%d-%s", os.Getpid()%100000, name)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s (needs root): %v: %s", name, err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	nsh, err := netns.GetFromPath(filepath.Join("/var/run/netns", name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nsh.Close() })
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return name, h
}

// newLab makes a host and a container namespace joined by a veth, 10.9.0.1 on the host end
// and 10.9.0.2 in the container, both up.
func newLab(t *testing.T, tag string) *lab {
	l := &lab{hostIf: "weftshape" + tag}
	l.hostNS, l.host = newNS(t, tag+"h")
	l.contNS, l.cont = newNS(t, tag+"c")
	contNsh, err := netns.GetFromPath(filepath.Join("/var/run/netns", l.contNS))
	if err != nil {
		t.Fatal(err)
	}
	defer contNsh.Close()
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = l.hostIf, 1500
	if err := l.host.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "eth0", PeerNamespace: netlink.NsFd(contNsh)}); err != nil {
		t.Fatal(err)
	}
	for _, s := range []struct {
		h      *netlink.Handle
		ifname string
		addr   string
	}{{l.host, l.hostIf, "10.9.0.1/24"}, {l.cont, "eth0", "10.9.0.2/24"}, {l.cont, "lo", ""}} {
		link, err := s.h.LinkByName(s.ifname)
		if err != nil {
			t.Fatal(err)
		}
		if s.addr != "" {
			a, _ := netlink.ParseAddr(s.addr)
			if err := s.h.AddrAdd(link, a); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.h.LinkSetUp(link); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// qdiscs lists the qdiscs of every link in h's namespace as "link kind parent".
func qdiscs(t *testing.T, h *netlink.Handle) []string {
	t.Helper()
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range links {
		qs, err := h.QdiscList(l)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range qs {
			if q.Type() == "noqueue" || q.Type() == "noop" || q.Type() == "pfifo_fast" || q.Type() == "mq" || q.Type() == "fq_codel" {
				continue // a link's default, not weft's
			}
			out = append(out, fmt.Sprintf("%s %s %s", l.Attrs().Name, q.Type(), netlink.HandleStr(q.Attrs().Parent)))
		}
	}
	return out
}

func linkNames(t *testing.T, h *netlink.Handle) string {
	t.Helper()
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range links {
		names = append(names, l.Attrs().Name)
	}
	return strings.Join(names, " ")
}

func mustPlan(t *testing.T, r Rates) Plan {
	t.Helper()
	p, err := PlanFor(r, 1500)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestApplyIsIdempotentHostSideOnlyAndRemoveLeavesNothing(t *testing.T) {
	l := newLab(t, "a")
	s := New(l.host)
	ifb := IfbName(l.hostIf)
	p := mustPlan(t, Rates{IngressRate: 10e6, EgressRate: 20e6})

	for i := range 3 {
		if err := s.Apply(l.hostIf, p); err != nil {
			t.Fatalf("apply #%d: %v", i+1, err)
		}
	}
	got := strings.Join(qdiscs(t, l.host), ", ")
	want := fmt.Sprintf("%s tbf root, %s ingress ingress, %s tbf root", l.hostIf, l.hostIf, ifb)
	if got != want {
		t.Fatalf("qdiscs on the host after three applies: %s\nwant %s", got, want)
	}
	if c := qdiscs(t, l.cont); len(c) != 0 {
		t.Fatalf("weft put qdiscs in the container: %v", c)
	}
	if links := linkNames(t, l.cont); strings.Contains(links, IfbPrefix) {
		t.Fatalf("an ifb in the container: %s", links)
	}
	link, _ := l.host.LinkByName(l.hostIf)
	filters, err := l.host.FilterList(link, ingressHandle)
	if err != nil || len(filters) != 1 {
		t.Fatalf("ingress filters after three applies: %v %v, want one redirect", filters, err)
	}
	if err := s.Check(l.hostIf, p); err != nil {
		t.Fatalf("check after apply: %v", err)
	}
	st, err := s.Read(l.hostIf)
	if err != nil {
		t.Fatal(err)
	}
	if st.Ingress == nil || st.Ingress.RateBits != 10e6 || st.Egress == nil || st.Egress.RateBits != 20e6 {
		t.Fatalf("read back %+v %+v, want 10 and 20 Mbit/s", st.Ingress, st.Egress)
	}
	if st.Egress.BurstBits < 8*1518 || st.Egress.BurstBits > 8*uint64(p.Egress.LimitBytes)+64 {
		t.Fatalf("egress burst read back as %d bits, outside one frame .. the queue", st.Egress.BurstBits)
	}

	// Another rate replaces in place; CHECK against the old plan now fails.
	p2 := mustPlan(t, Rates{IngressRate: 5e6, EgressRate: 20e6})
	if err := s.Apply(l.hostIf, p2); err != nil {
		t.Fatal(err)
	}
	if err := s.Check(l.hostIf, p); !errors.Is(err, ErrMismatch) {
		t.Fatalf("check against the old plan: %v, want ErrMismatch", err)
	}
	// Dropping the egress limit takes the ifb and the redirect away.
	p3 := mustPlan(t, Rates{IngressRate: 5e6})
	if err := s.Apply(l.hostIf, p3); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(qdiscs(t, l.host), ", "); got != l.hostIf+" tbf root" {
		t.Fatalf("qdiscs with ingress only: %s", got)
	}
	if links := linkNames(t, l.host); strings.Contains(links, ifb) {
		t.Fatalf("ifb left after egress unlimited: %s", links)
	}
	if err := s.Check(l.hostIf, p3); err != nil {
		t.Fatal(err)
	}

	if err := s.Apply(l.hostIf, p); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := s.Remove(l.hostIf); err != nil {
			t.Fatalf("remove #%d: %v", i+1, err)
		}
	}
	if q := qdiscs(t, l.host); len(q) != 0 {
		t.Fatalf("qdiscs left after remove: %v", q)
	}
	if links := linkNames(t, l.host); strings.Contains(links, IfbPrefix) {
		t.Fatalf("ifb left after remove: %s", links)
	}
	if st, err := s.Read(l.hostIf); err != nil || st.Ingress != nil || st.Egress != nil {
		t.Fatalf("read after remove: %+v %v", st, err)
	}
}

// The veth going first (a DEL after the container's netns died) still leaves no ifb.
func TestRemoveAfterTheVethIsGone(t *testing.T) {
	l := newLab(t, "b")
	s := New(l.host)
	if err := s.Apply(l.hostIf, mustPlan(t, Rates{EgressRate: 1e6})); err != nil {
		t.Fatal(err)
	}
	link, _ := l.host.LinkByName(l.hostIf)
	if err := l.host.LinkDel(link); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(l.hostIf); err != nil {
		t.Fatal(err)
	}
	if links := linkNames(t, l.host); strings.Contains(links, IfbPrefix) {
		t.Fatalf("ifb left: %s", links)
	}
	if err := s.Apply(l.hostIf, mustPlan(t, Rates{EgressRate: 1e6})); !errors.Is(err, ErrNoInterface) {
		t.Fatalf("apply to a missing veth: %v, want ErrNoInterface", err)
	}
	if links := linkNames(t, l.host); strings.Contains(links, IfbPrefix) {
		t.Fatalf("apply to a missing veth made an ifb: %s", links)
	}
}

// Traffic from the container really crosses the ifb's tbf and traffic to it the veth's.
func TestTrafficCrossesBothQueues(t *testing.T) {
	l := newLab(t, "c")
	s := New(l.host)
	if err := s.Apply(l.hostIf, mustPlan(t, Rates{IngressRate: 50e6, EgressRate: 50e6})); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("ip", "netns", "exec", l.contNS, "ping", "-c", "5", "-i", "0.01", "-W", "1", "10.9.0.1").CombinedOutput()
	if err != nil {
		t.Fatalf("ping host from container: %v: %s", err, out)
	}
	st, err := s.Read(l.hostIf)
	if err != nil {
		t.Fatal(err)
	}
	if st.Egress.Packets < 5 || st.Ingress.Packets < 5 {
		t.Fatalf("tbf counters after 5 pings: egress %d ingress %d packets, want at least 5 each", st.Egress.Packets, st.Ingress.Packets)
	}
}
