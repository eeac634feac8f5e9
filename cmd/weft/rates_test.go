package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/weftnet/weft/datapath/shape"
	"github.com/weftnet/weft/router"
)

func TestParseBits(t *testing.T) {
	for in, want := range map[string]uint64{
		"10mbit": 10_000_000, "20Mbit": 20_000_000, "1gbit": 1e9, "2.5kbit": 2500, "800000": 800000, "64kbit": 64000, "96bit": 96,
	} {
		if got, err := parseBits(in); err != nil || got != want {
			t.Errorf("parseBits(%q) = %d %v, want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "fast", "10mb", "-1mbit", "10 mbps", "2000gbit", "NaN"} {
		if _, err := parseBits(bad); err == nil {
			t.Errorf("parseBits(%q) accepted", bad)
		}
	}
}

func TestNetworkCreateRateFlags(t *testing.T) {
	create, _, err := newRootCmd().Find([]string{"network", "create"})
	if err != nil {
		t.Fatal(err)
	}
	if err := create.ParseFlags([]string{"--subnet", "10.50.0.0/16", "--ingress-rate", "10mbit", "--egress-rate", "20mbit", "--egress-burst", "100kbit"}); err != nil {
		t.Fatal(err)
	}
	got, err := networkRequest(create, "capped")
	if err != nil {
		t.Fatal(err)
	}
	if got.IngressRate != 10e6 || got.IngressBurst != 0 || got.EgressRate != 20e6 || got.EgressBurst != 100e3 {
		t.Fatalf("rates %+v", got)
	}
	for _, bad := range [][]string{
		{"--subnet", "10.50.0.0/16", "--ingress-rate", "lots"},
		{"--subnet", "10.50.0.0/16", "--egress-burst", "10kbit"},
		{"--subnet", "10.50.0.0/16", "--egress-rate", "100bit"},
	} {
		create, _, _ := newRootCmd().Find([]string{"network", "create"})
		if err := create.ParseFlags(bad); err != nil {
			t.Fatal(err)
		}
		if _, err := networkRequest(create, "capped"); err == nil || !strings.Contains(err.Error(), "--") {
			t.Errorf("%v: %v, want an error naming the flag", bad, err)
		}
	}
}

func TestPrintRates(t *testing.T) {
	var out bytes.Buffer
	printRates(&out, []router.RateStatus{
		{ContainerID: "0123456789abcdef", IfName: "eth0", Network: "capped",
			Ingress: &shape.DirState{RateBits: 10e6, BurstBits: 20000, LimitBytes: 12144, Drops: 7}},
		{ContainerID: "fedcba9876543210", IfName: "eth0", Network: "default"},
	})
	s := out.String()
	for _, want := range []string{"10mbit/s burst 20kbit queue 12144B", "7", "unlimited", "0123456789ab"} {
		if !strings.Contains(s, want) {
			t.Errorf("output lacks %q:\n%s", want, s)
		}
	}
}
