package datapath

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
)

func routeStrings(rs []netlink.Route) []string {
	var out []string
	for _, r := range rs {
		s := r.Dst.String()
		if r.Gw != nil {
			s += " via " + r.Gw.String()
		}
		if r.Src != nil {
			s += " src " + r.Src.String()
		}
		out = append(out, s)
	}
	return out
}

func TestPlanContainerByKind(t *testing.T) {
	base := Attachment{IfName: "net1", Address: netip.MustParsePrefix("10.80.1.2/24"), Gateway: netip.MustParseAddr("10.80.1.1")}
	cases := []struct {
		name      string
		secondary bool
		rng       string
		wantMain  string
	}{
		{"primary", false, "", "0.0.0.0/0 via 10.80.1.1"},
		{"primary ignores range", false, "10.80.0.0/16", "0.0.0.0/0 via 10.80.1.1"},
		{"secondary with a wider range", true, "10.80.0.0/16", "10.80.0.0/16 via 10.80.1.1"},
		{"secondary whose subnet is the range", true, "10.80.1.0/24", ""},
		{"secondary with a range inside the subnet", true, "10.80.1.0/25", ""},
		{"secondary without a range", true, "", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := base
			a.Secondary = c.secondary
			if c.rng != "" {
				a.Range = netip.MustParsePrefix(c.rng)
			}
			if err := a.validate(); err != nil {
				t.Fatal(err)
			}
			p := planContainer(a, 7)
			if got := strings.Join(routeStrings(p.main), ","); got != c.wantMain {
				t.Errorf("main routes = %q, want %q", got, c.wantMain)
			}
			if p.table != 10007 || p.src != netip.MustParsePrefix("10.80.1.2/32") {
				t.Errorf("table %d src %s, want 10007 from 10.80.1.2/32", p.table, p.src)
			}
			// The own table is the same for both kinds: on-link first (the gateway must be
			// reachable when the default route is added), then the default route.
			if got := strings.Join(routeStrings(p.own), ","); got != "10.80.1.0/24 src 10.80.1.2,0.0.0.0/0 via 10.80.1.1" {
				t.Errorf("own table = %q", got)
			}
		})
	}
}

func TestContainerTableAvoidsReservedTables(t *testing.T) {
	for _, idx := range []int{1, 2, 253, 254, 255, 1 << 20, 1<<31 - 1} {
		tb := ContainerTable(idx)
		if tb <= 255 || tb == ProbeTable || tb >= 1<<32 {
			t.Errorf("ContainerTable(%d) = %d: reserved, weft's probe table, or not a table id", idx, tb)
		}
	}
}

func TestAttachmentValidateNamesWhatIsWrong(t *testing.T) {
	good := Attachment{NetNS: "/run/netns/x", IfName: "net1", Address: netip.MustParsePrefix("10.80.1.2/24"),
		Gateway: netip.MustParseAddr("10.80.1.1"), MTU: 1300, Secondary: true, Range: netip.MustParsePrefix("10.80.0.0/16")}
	if err := good.validate(); err != nil {
		t.Fatalf("good attachment: %v", err)
	}
	cases := []struct {
		name string
		edit func(*Attachment)
		want string
	}{
		{"no ifname", func(a *Attachment) { a.IfName = "" }, "interface name"},
		{"long ifname", func(a *Attachment) { a.IfName = "net1234567890123" }, "interface name"},
		{"no address", func(a *Attachment) { a.Address = netip.Prefix{} }, "address"},
		{"IPv6 address", func(a *Attachment) { a.Address = netip.MustParsePrefix("fd00::2/64") }, "not an IPv4"},
		{"host prefix", func(a *Attachment) { a.Address = netip.MustParsePrefix("10.80.1.2/32") }, "/32"},
		{"gateway outside", func(a *Attachment) { a.Gateway = netip.MustParseAddr("10.81.0.1") }, "gateway 10.81.0.1"},
		{"gateway is the address", func(a *Attachment) { a.Gateway = netip.MustParseAddr("10.80.1.2") }, "gateway"},
		{"no gateway", func(a *Attachment) { a.Gateway = netip.Addr{} }, "gateway"},
		{"negative MTU", func(a *Attachment) { a.MTU = -1 }, "MTU -1"},
		{"huge MTU", func(a *Attachment) { a.MTU = 1 << 30 }, "MTU 1073741824"},
		{"range without the address", func(a *Attachment) { a.Range = netip.MustParsePrefix("10.90.0.0/16") }, "range 10.90.0.0/16"},
		{"IPv6 range", func(a *Attachment) { a.Range = netip.MustParsePrefix("::/0") }, "range"},
	}
	for _, c := range cases {
		a := good
		c.edit(&a)
		err := a.validate()
		if !errors.Is(err, ErrBadAttachment) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want ErrBadAttachment naming %q", c.name, err, c.want)
		}
		// Attach and Check refuse it before touching any namespace (this path does not exist).
		if _, err := Attach(a); !errors.Is(err, ErrBadAttachment) {
			t.Errorf("%s: Attach err = %v, want ErrBadAttachment", c.name, err)
		}
		if err := Check(a); !errors.Is(err, ErrBadAttachment) {
			t.Errorf("%s: Check err = %v, want ErrBadAttachment", c.name, err)
		}
	}
}

func TestBridgeConfigValidate(t *testing.T) {
	good := BridgeConfig{Name: "weft-media", Gateway: netip.MustParsePrefix("10.50.0.1/16"), MTU: 9000}
	if err := good.Validate(); err != nil {
		t.Fatalf("good config: %v", err)
	}
	cases := []struct {
		name string
		edit func(*BridgeConfig)
		want string
	}{
		{"no name", func(c *BridgeConfig) { c.Name = "" }, "name"},
		{"long name", func(c *BridgeConfig) { c.Name = "weft-0123456789ab" }, "name"},
		{"slash", func(c *BridgeConfig) { c.Name = "weft/x" }, "name"},
		{"no gateway", func(c *BridgeConfig) { c.Gateway = netip.Prefix{} }, "gateway"},
		{"network address", func(c *BridgeConfig) { c.Gateway = netip.MustParsePrefix("10.50.0.0/16") }, "gateway 10.50.0.0/16"},
		{"host prefix", func(c *BridgeConfig) { c.Gateway = netip.MustParsePrefix("10.50.0.1/32") }, "gateway"},
		{"IPv6", func(c *BridgeConfig) { c.Gateway = netip.MustParsePrefix("fd00::1/64") }, "gateway"},
		{"tiny MTU", func(c *BridgeConfig) { c.MTU = 67 }, "MTU 67"},
		{"huge MTU", func(c *BridgeConfig) { c.MTU = 65536 }, "MTU 65536"},
	}
	for _, c := range cases {
		cfg := good
		c.edit(&cfg)
		err := cfg.Validate()
		if !errors.Is(err, ErrBadBridge) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want ErrBadBridge naming %q", c.name, err, c.want)
		}
	}
}
