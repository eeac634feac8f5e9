package ipam

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// The SR-IOV and rate fields (issues #14, #15): each wrong value is refused naming the field,
// and a network without them encodes as it did before they existed.
func TestNetworkModeAndRateFields(t *testing.T) {
	base := Network{Name: "fast", Subnet: netip.MustParsePrefix("10.77.0.0/16"), BlockBits: 26}
	sriov := base
	sriov.Mode, sriov.PF, sriov.VLAN, sriov.DPDK = ModeSRIOV, "ens1f0", 100, DPDKAuto
	if err := sriov.Validate(); err != nil {
		t.Fatalf("valid sriov network refused: %v", err)
	}
	rated := base
	rated.EgressRate, rated.EgressBurst, rated.IngressRate = 20_000_000, 80_000, 10_000_000
	if err := rated.Validate(); err != nil {
		t.Fatalf("valid rates refused: %v", err)
	}
	bad := []struct {
		edit func(*Network)
		want string
	}{
		{func(n *Network) { n.Mode = "macvtap" }, "mode"},
		{func(n *Network) { n.PF = "ens1f0" }, "without mode"},
		{func(n *Network) { n.Mode = ModeSRIOV }, "pf"},
		{func(n *Network) { n.Mode, n.PF = ModeSRIOV, "ens1f0 x" }, "pf"},
		{func(n *Network) { n.Mode, n.PF, n.VLAN = ModeSRIOV, "ens1f0", 4095 }, "vlan"},
		{func(n *Network) { n.Mode, n.PF, n.DPDK = ModeSRIOV, "ens1f0", "yes" }, "dpdk"},
		{func(n *Network) { n.Mode, n.PF, n.EgressRate = ModeSRIOV, "ens1f0", 1000 }, "cannot shape"},
		{func(n *Network) { n.IngressBurst = 1000 }, "burst without"},
		{func(n *Network) { n.EgressRate = MaxRate + 1 }, "egress rate"},
		{func(n *Network) { n.IngressRate = 100 }, "below"},
	}
	for _, c := range bad {
		n := base
		c.edit(&n)
		err := n.Validate()
		if !errors.Is(err, ErrInvalidNetwork) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: got %v, want an invalid-network error naming %q", n, err, c.want)
		}
	}
	enc, err := json.Marshal(base)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"mode", "pf", "vlan", "dpdk", "rate", "burst"} {
		if strings.Contains(string(enc), k) {
			t.Errorf("a bridge network without rates encodes %q: %s", k, enc)
		}
	}
}
