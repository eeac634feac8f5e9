package datapath

import (
	"bytes"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func TestRejectPeerLogsCountsAndWraps(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	err := RejectPeer(log, m, ModeVXLAN, "b", "VTEP MAC %q: %s", "zz", "not a MAC")
	if !errors.Is(err, ErrBadPeer) || !strings.Contains(err.Error(), "b: VTEP MAC") {
		t.Fatalf("error %v: want ErrBadPeer naming the peer and the reason", err)
	}
	if !strings.Contains(logs.String(), "peer=b") || !strings.Contains(logs.String(), "not a MAC") {
		t.Fatalf("log %q: want the peer and the reason", logs.String())
	}
	var got dto.Metric
	if err := m.badPeers.WithLabelValues(ModeVXLAN).Write(&got); err != nil || got.GetCounter().GetValue() != 1 {
		t.Fatalf("weft_datapath_bad_peers_total{mode=vxlan} = %v (%v), want 1", got.GetCounter().GetValue(), err)
	}
	// Without a logger or metrics it still reports.
	if err := RejectPeer(nil, nil, ModeDirect, "c", "x"); !errors.Is(err, ErrBadPeer) {
		t.Fatalf("error %v", err)
	}
}

func TestBlockClaims(t *testing.T) {
	v4 := netip.MustParseAddr("192.0.2.1")
	var c BlockClaims
	if b, why := c.Claim("a", netip.MustParsePrefix("10.40.1.7/26"), v4); why != "" || b != netip.MustParsePrefix("10.40.1.0/26") {
		t.Fatalf("first claim: %v %q", b, why)
	}
	if _, why := c.Claim("b", netip.MustParsePrefix("10.40.1.0/26"), v4); !strings.Contains(why, "already routed to a") {
		t.Fatalf("second claim of the same block: %q", why)
	}
	if _, why := c.Claim("b", netip.MustParsePrefix("fd00::/64"), v4); !strings.Contains(why, "differ in family") {
		t.Fatalf("IPv6 block over an IPv4 underlay: %q", why)
	}
	if _, why := c.Claim("b", netip.MustParsePrefix("fd00::/64"), netip.Addr{}); why != "" {
		t.Fatalf("a tunnel carries either family: %q", why)
	}
	if _, why := c.Claim("b", netip.Prefix{}, v4); why == "" {
		t.Fatal("the zero prefix was claimed")
	}
}

func TestPrefixConversions(t *testing.T) {
	for _, s := range []string{"10.40.0.5/16", "10.40.1.0/26", "fd00::1/64", "192.0.2.1/32"} {
		p := netip.MustParsePrefix(s)
		got, ok := IPNetToPrefix(PrefixToIPNet(p))
		if !ok || got != p {
			t.Errorf("%s round trip: %v %v", s, got, ok)
		}
	}
	// An IPv4-mapped address with a 128-bit mask, as some netlink replies carry it.
	mapped := &net.IPNet{IP: net.ParseIP("10.40.1.0").To16(), Mask: net.CIDRMask(120, 128)}
	if got, ok := IPNetToPrefix(mapped); !ok || got != netip.MustParsePrefix("10.40.1.0/24") {
		t.Errorf("mapped: %v %v", got, ok)
	}
	if _, ok := IPNetToPrefix(nil); ok {
		t.Error("nil converted")
	}
}
