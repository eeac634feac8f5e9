package router

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/weftnet/weft/datapath/guard"
	"github.com/weftnet/weft/datapath/isolate"
	"github.com/weftnet/weft/datapath/nslab"
	"github.com/weftnet/weft/ipam"
)

func TestIsolationNetworks(t *testing.T) {
	got := isolationNetworks([]ipam.Network{
		{Name: "media", Subnet: netip.MustParsePrefix("10.50.0.0/16"), BlockBits: 26, MTU: 9000, Isolated: true},
		{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16"), BlockBits: 26},
	})
	want := []isolate.Network{
		{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16"), Bridge: "weft"},
		{Name: "media", Subnet: netip.MustParsePrefix("10.50.0.0/16"), Isolated: true, Bridge: "weft-media"},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("%v, want %v", got, want)
	}
	if b := guardBridges(want); !slices.Equal(b, []string{"weft", "weft-media"}) {
		t.Fatalf("bridges %v", b)
	}
}

// Before a restarted peer has rejoined, what it applied before stays isolated, unless the
// table it knows now says otherwise (the same name, or a range reused).
func TestUnionNetworks(t *testing.T) {
	n := func(name, subnet string, isolated bool) isolate.Network {
		return isolate.Network{Name: name, Subnet: netip.MustParsePrefix(subnet), Isolated: isolated, Bridge: bridgeName(name)}
	}
	before := []isolate.Network{n("control", "10.60.0.0/16", true), n("default", "10.40.0.0/16", false),
		n("media", "10.50.0.0/16", true), n("old", "10.70.0.0/16", true)}
	now := []isolate.Network{n("default", "10.40.0.0/16", false), n("media", "10.50.0.0/16", false),
		n("reuse", "10.70.0.0/24", false)}
	want := []isolate.Network{n("control", "10.60.0.0/16", true), n("default", "10.40.0.0/16", false),
		n("media", "10.50.0.0/16", false), n("reuse", "10.70.0.0/24", false)}
	if got := unionNetworks(before, now); !slices.Equal(got, want) {
		t.Fatalf("union %v, want %v", got, want)
	}
	if _, err := isolate.NewPlan(unionNetworks(before, now)); err != nil {
		t.Fatalf("the union is not a valid plan: %v", err)
	}
	if got := unionNetworks(nil, now); !slices.Equal(got, now) {
		t.Fatalf("union with nothing saved %v", got)
	}
}

// isolationKeys are the rule keys of the isolator's egress chain in the current namespace.
func isolationKeys(t *testing.T) []string {
	t.Helper()
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tbl := &nftables.Table{Family: nftables.TableFamilyINet, Name: isolate.TableName}
	ch, err := c.ListChain(tbl, isolate.EgressChain)
	if err != nil {
		return nil // no chain: nothing isolated
	}
	rules, err := c.GetRules(tbl, ch)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, r := range rules {
		keys = append(keys, string(r.UserData))
	}
	return keys
}

func guardBridgeKeys(t *testing.T) []string {
	t.Helper()
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tbl := &nftables.Table{Family: nftables.TableFamilyINet, Name: guard.TableName}
	ch, err := c.ListChain(tbl, guard.InputChain)
	if err != nil {
		t.Fatal(err)
	}
	rules, err := c.GetRules(tbl, ch)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, r := range rules {
		keys = append(keys, string(r.UserData))
	}
	return keys
}

func isolatesNetwork(t *testing.T, name string) error {
	keys := isolationKeys(t)
	for _, k := range keys {
		if strings.Contains(k, " "+name+" ") {
			return nil
		}
	}
	return fmt.Errorf("network %s not isolated; rules %q", name, keys)
}

// A peer isolates a network created at run time and guards its bridge, within a datapath
// tick; removing the network removes its rules. A restarted peer isolates the networks of
// before its restart before it serves its control API, even when the kernel lost the rules
// meanwhile (a reboot) and before its table has caught up.
func TestPeerIsolatesNetworks(t *testing.T) {
	// The peer works in the test process's namespace (TestMain), as every peer test does;
	// the isolation is removed at the end.
	t.Cleanup(func() {
		if iso, err := isolate.New(isolate.Deps{}); err == nil {
			iso.Remove()
		}
	})
	dir := t.TempDir()
	p := startPeer(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	nslab.Eventually(t, 10*time.Second, "the cluster pins its networks", func() error {
		if len(p.cluster.Networks()) == 0 {
			return fmt.Errorf("no network yet")
		}
		return nil
	})
	for _, name := range []string{"wis", "wis2"} {
		subnet := map[string]string{"wis": "10.213.0.0/16", "wis2": "10.214.0.0/16"}[name]
		if err := p.cluster.CreateNetwork(ctx, ipam.Network{Name: name, Subnet: netip.MustParsePrefix(subnet), BlockBits: 26, Isolated: true}); err != nil {
			t.Fatal(err)
		}
	}
	nslab.Eventually(t, 5*time.Second, "wis isolated and its bridge guarded", func() error {
		if err := isolatesNetwork(t, "wis"); err != nil {
			return err
		}
		if keys := guardBridgeKeys(t); !slices.Contains(keys, "weft-guard bridge "+bridgeName("wis")) {
			return fmt.Errorf("guard bridges %q", keys)
		}
		return nil
	})
	if err := p.cluster.RemoveNetwork(ctx, "wis"); err != nil {
		t.Fatal(err)
	}
	nslab.Eventually(t, 5*time.Second, "wis's rules removed with it", func() error {
		if isolatesNetwork(t, "wis") == nil {
			return fmt.Errorf("still isolated: %q", isolationKeys(t))
		}
		return isolatesNetwork(t, "wis2")
	})
	p.stop()

	// The kernel loses the rules while the peer is down; the restarted peer has them back
	// before it is ready.
	iso, err := isolate.New(isolate.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	if err := iso.Remove(); err != nil {
		t.Fatal(err)
	}
	startPeer(t, dir)
	if err := isolatesNetwork(t, "wis2"); err != nil {
		t.Fatalf("a restarted peer is ready before it isolates: %v", err)
	}
}
