package router

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/ipam"
)

// wplContainer makes a network namespace standing in for a container (this file's prefix).
func wplContainer(t *testing.T, n int) string {
	t.Helper()
	name := fmt.Sprintf("wpl-%d-c%d", os.Getpid(), n)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return "/var/run/netns/" + name
}

// waitUntil polls cond until it holds or the deadline passes.
func waitUntil(t *testing.T, what string, within time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, within, err)
		}
		time.Sleep(20 * time.Millisecond) // poll interval
	}
}

func planeReq(id, ifname, netns, network string) cni.AttachRequest {
	return cni.AttachRequest{ContainerID: id, IfName: ifname, NetNS: netns, CNINetwork: "conf-" + network, Network: network, Name: id}
}

// One container on default (eth0), control (net1) and media (net2), each network created at
// run time: every interface gets an address of its own network, its own bridge and MTU; only
// eth0 is primary; GC, CHECK and DEL stay within their conflist; an unknown network is CNI 7
// and a full range CNI 11, both leaving nothing behind; rm is refused while attached, naming
// the attachments, and succeeds after DEL once the emptied blocks are released.
func TestAttachToCreatedNetworks(t *testing.T) {
	p := startPeer(t, t.TempDir())
	h := p.apiHandler()
	ctx := context.Background()
	waitUntil(t, "the cluster to define its networks", 10*time.Second, func() error {
		if len(p.cluster.Networks()) == 0 {
			return fmt.Errorf("none")
		}
		return nil
	})
	for _, body := range []string{
		`{"name":"media","subnet":"10.50.0.0/16","mtu":1300}`,
		`{"name":"control","subnet":"10.60.0.0/16"}`,
		`{"name":"tiny","subnet":"10.70.0.0/24","block_size":26}`,
	} {
		if code, msg := apiCall(t, h, "POST", "/v1/networks", body, nil); code != 200 {
			t.Fatalf("create %s: %d %s", body, code, msg)
		}
	}
	netns := wplContainer(t, 1)
	want := []struct {
		ifname, network, gateway, rng string
		mtu                           int
		secondary                     bool
	}{
		{"eth0", "default", "10.40.0.1", "10.40.0.0/16", DefaultMTU, false},
		{"net1", "control", "10.60.0.1", "10.60.0.0/16", DefaultMTU, true},
		{"net2", "media", "10.50.0.1", "10.50.0.0/16", 1300, true},
	}
	addrs := map[string]netip.Prefix{}
	for _, w := range want {
		res, err := p.client.Add(ctx, planeReq("c1", w.ifname, netns, w.network))
		if err != nil {
			t.Fatalf("ADD %s on %s: %v", w.ifname, w.network, err)
		}
		a := netip.MustParsePrefix(res.Address)
		addrs[w.ifname] = a
		if !netip.MustParsePrefix(w.rng).Contains(a.Addr()) || res.Gateway != w.gateway || res.MTU != w.mtu ||
			res.Secondary != w.secondary || res.Range != w.rng || res.Network != w.network || res.Bridge != bridgeName(w.network) ||
			res.DNS == nil || len(res.DNS.Nameservers) != 1 || res.DNS.Nameservers[0] != w.gateway {
			t.Fatalf("ADD %s on %s: %+v (dns %+v)", w.ifname, w.network, res, res.DNS)
		}
		br, err := netlink.LinkByName(bridgeName(w.network))
		if err != nil || br.Attrs().MTU != w.mtu {
			t.Fatalf("bridge of %s: %v %v", w.network, br, err)
		}
		// A repeated ADD answers the same.
		again, err := p.client.Add(ctx, planeReq("c1", w.ifname, netns, w.network))
		if err != nil || again.Address != res.Address || again.Secondary != res.Secondary {
			t.Fatalf("repeated ADD %s: %+v %v", w.ifname, again, err)
		}
	}
	// The conflist's mtu overrides the network's.
	c2 := wplContainer(t, 2)
	over := planeReq("c2", "eth0", c2, "media")
	over.MTU = 1200
	if res, err := p.client.Add(ctx, over); err != nil || res.MTU != 1200 || res.Secondary {
		t.Fatalf("ADD with mtu 1200: %+v %v", res, err)
	}
	if err := p.client.Del(ctx, over); err != nil {
		t.Fatal(err)
	}

	// Unknown network: CNI 7 naming it, nothing created.
	before := len(p.alloc.Attachments())
	_, err := p.client.Add(ctx, planeReq("c1", "net3", netns, "nope"))
	if codeOf(err) != types.ErrInvalidNetworkConfig || !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("ADD on an unknown network: %v", err)
	}
	// Full range: every block of tiny taken by another peer; CNI 11, nothing left.
	tiny, _ := p.cluster.Network("tiny")
	for i := 0; i < tiny.NumBlocks(); i++ {
		if _, err := p.cluster.Claim(ctx, tiny, "p9"); err != nil {
			t.Fatal(err)
		}
	}
	_, err = p.client.Add(ctx, planeReq("c1", "net4", netns, "tiny"))
	if codeOf(err) != types.ErrTryAgainLater || !strings.Contains(err.Error(), "tiny") {
		t.Fatalf("ADD on a full range: %v", err)
	}
	if n := len(p.alloc.Attachments()); n != before {
		t.Fatalf("refused ADDs left %d attachments, want %d", n, before)
	}
	for _, name := range []string{bridgeName("nope"), bridgeName("tiny")} {
		if _, err := netlink.LinkByName(name); err == nil {
			t.Fatalf("a refused ADD made bridge %s", name)
		}
	}
	for _, v := range hostVeths(t) {
		if strings.Contains(v, "net3") || strings.Contains(v, "net4") {
			t.Fatalf("a refused ADD left veth %s", v)
		}
	}

	// CHECK is scoped: net2 through media's conflist holds, through control's it does not.
	if _, err := p.client.Check(ctx, planeReq("c1", "net2", netns, "media")); err != nil {
		t.Fatalf("CHECK net2: %v", err)
	}
	if _, err := p.client.Check(ctx, planeReq("c1", "net2", netns, "control")); codeOf(err) != cni.CodeCheckFailed {
		t.Fatalf("CHECK net2 through control's conflist: %v", err)
	}
	// GC of media's conflist with nothing valid releases net2 only; DEL through another
	// conflist leaves an attachment alone.
	gc, err := p.client.GC(ctx, cni.GCRequest{CNINetwork: "conf-media", Valid: []cni.GCAttachment{}})
	if err != nil || len(gc.Released) != 1 || gc.Released[0].IfName != "net2" {
		t.Fatalf("GC of media: %+v %v", gc, err)
	}
	if err := p.client.Del(ctx, planeReq("c1", "net1", netns, "media")); err != nil {
		t.Fatal(err)
	}
	if got := p.alloc.Container("c1"); len(got) != 2 || got[0].IfName != "eth0" || got[1].IfName != "net1" {
		t.Fatalf("after GC of media and a stray DEL: %+v", got)
	}

	// rm control is refused while net1 is attached, naming it; after DEL the block goes back
	// and rm succeeds.
	code, msg := apiCall(t, h, "DELETE", "/v1/networks/control", "", nil)
	if code != 409 || !strings.Contains(msg, "c1/net1 ("+addrs["net1"].Addr().String()+")") {
		t.Fatalf("rm control while attached: %d %s", code, msg)
	}
	if err := p.client.Del(ctx, planeReq("c1", "net1", netns, "control")); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "rm control after DEL", 10*time.Second, func() error {
		code, msg := apiCall(t, h, "DELETE", "/v1/networks/control", "", nil)
		if code != 200 {
			return fmt.Errorf("%d %s", code, msg)
		}
		return nil
	})
	waitUntil(t, "the allocator to drop control", 5*time.Second, func() error {
		if _, ok := p.alloc.Network("control"); ok {
			return fmt.Errorf("still served")
		}
		return nil
	})
	// default keeps its block after its last DEL.
	if err := p.client.Del(ctx, planeReq("c1", "eth0", netns, "default")); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "media released too", 10*time.Second, func() error {
		if b := p.cluster.NetworkBlocks("media"); len(b) != 0 {
			return fmt.Errorf("media blocks %v", b)
		}
		return nil
	})
	if b := p.cluster.NetworkBlocks(ipam.DefaultNetwork); len(b) == 0 {
		t.Fatal("default's block was released")
	}
}

// Bridge names fit the kernel's 15 bytes and stay distinct for long network names.
func TestBridgeNameDistinctWithinFifteenBytes(t *testing.T) {
	seen := map[string]string{}
	for _, n := range []string{"default", "media", "control", "tenchars10", "controlplane1", "controlplane2", "abcdefghijklmno", "abcdefghijklmnp"} {
		b := bridgeName(n)
		if len(b) > 15 {
			t.Fatalf("bridge of %s is %q, %d bytes", n, b, len(b))
		}
		if other, dup := seen[b]; dup {
			t.Fatalf("%s and %s share bridge %s", n, other, b)
		}
		seen[b] = n
	}
	if bridgeName("default") != "weft" || bridgeName("media") != "weft-media" || bridgeName("tenchars10") != "weft-tenchars10" {
		t.Fatalf("short names changed: %q %q", bridgeName("media"), bridgeName("tenchars10"))
	}
}
