package cni

import (
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
)

// runtimeConfig.bandwidth (injected by libcni for the "bandwidth" capability) reaches the
// peer as it came: bits per second and bits.
func TestRuntimeBandwidthReachesTheRequest(t *testing.T) {
	for _, tc := range []struct {
		stdin string
		want  *Bandwidth
	}{
		{`{"cniVersion":"1.0.0","name":"weft","type":"weft"}`, nil},
		{`{"cniVersion":"1.0.0","name":"weft","type":"weft","runtimeConfig":{"bandwidth":
			{"ingressRate":10000000,"ingressBurst":2147483647,"egressRate":20000000}}}`,
			&Bandwidth{IngressRate: 10000000, IngressBurst: 2147483647, EgressRate: 20000000}},
	} {
		_, req, err := parseAttach(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: "/var/run/netns/x", StdinData: []byte(tc.stdin)})
		if err != nil {
			t.Fatal(err)
		}
		if (req.Bandwidth == nil) != (tc.want == nil) || tc.want != nil && *req.Bandwidth != *tc.want {
			t.Errorf("%s: bandwidth %+v, want %+v", tc.stdin, req.Bandwidth, tc.want)
		}
	}
	// A negative rate is not a rate: refused while decoding, code 6.
	_, _, err := parseAttach(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", StdinData: []byte(
		`{"cniVersion":"1.0.0","name":"weft","type":"weft","runtimeConfig":{"bandwidth":{"ingressRate":-1}}}`)})
	if err == nil {
		t.Fatal("a negative rate was accepted")
	}
}
