package chaostest

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/router"
)

// Networks as replicated objects (#13 item 1) on real peers: networks created on one host are
// listed on every host within 2 s; overlapping or malformed definitions are refused with a
// clear error; a removal reaches every host too; a restarted peer still lists them.
func TestNetworksReplicateToEveryHost(t *testing.T) {
	const hosts = 3
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: "wnonet", Hosts: hosts, NoStart: true, PeerArgs: func(i int) []string {
		return []string{"--peers", l.Host((i + 1) % hosts).Addr.Addr().String()}
	}})
	ctx := testCtx(t, 3*time.Minute)
	if err := l.StartAll(ctx); err != nil {
		t.Fatalf("start peers: %v", err)
	}
	// names lists the networks h's peer knows.
	names := func(h *lab.Host) (string, error) {
		var nets []router.NetworkInfo
		if err := cliJSON(ctx, h, &nets, "network", "ls"); err != nil {
			return "", err
		}
		var out []string
		for _, n := range nets {
			out = append(out, n.Name)
		}
		return strings.Join(out, ","), nil
	}
	everywhere := func(want string) func() error {
		return func() error {
			for _, h := range l.Hosts() {
				got, err := names(h)
				if err != nil {
					return err
				}
				if got != want {
					return fmt.Errorf("%s lists %q, want %q", h.Name, got, want)
				}
			}
			return nil
		}
	}
	waitFor(t, ctx, time.Minute, "every host to list the default network", everywhere("default"))

	creator := l.Host(hosts - 1)
	for _, args := range [][]string{
		{"network", "create", "media", "--subnet", "10.50.0.0/16", "--mtu", "9000", "--sla", "gold: rtt<=5ms"},
		{"network", "create", "control", "--subnet", "10.60.0.0/16", "--isolated=false"},
	} {
		if out, err := creator.CLI(ctx, args...); err != nil {
			t.Fatalf("%v: %v %s", args, err, out)
		}
	}
	start := time.Now()
	waitFor(t, ctx, 2*time.Second, "every host to list media and control", everywhere("control,default,media"))
	t.Logf("networks listed on all %d hosts %s after the create returned", hosts, time.Since(start).Round(time.Millisecond))

	for _, tt := range []struct {
		args []string
		msg  string
	}{
		{[]string{"network", "create", "over", "--subnet", "10.50.128.0/17"}, "overlaps network media"},
		{[]string{"network", "create", "under", "--subnet", l.Host(0).Addr.Masked().String()}, "underlay address"},
		{[]string{"network", "create", "bad", "--subnet", "10.70.0.0"}, "not a CIDR"},
		{[]string{"network", "create", "Bad", "--subnet", "10.70.0.0/16"}, "lower-case"},
		{[]string{"network", "create", "media", "--subnet", "10.70.0.0/16"}, "already exists"},
		{[]string{"network", "rm", "default"}, "cannot be removed"},
	} {
		_, err := l.Host(0).CLI(ctx, tt.args...)
		if err == nil || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("%v: %v, want a refusal mentioning %q", tt.args, err, tt.msg)
		}
	}

	if out, err := l.Host(0).CLI(ctx, "network", "rm", "control"); err != nil {
		t.Fatalf("rm control: %v %s", err, out)
	}
	waitFor(t, ctx, 2*time.Second, "every host to forget control", everywhere("default,media"))

	if err := l.Host(1).Restart(ctx); err != nil {
		t.Fatalf("restart %s: %v", l.Host(1).Name, err)
	}
	waitFor(t, ctx, 30*time.Second, "the restarted peer to list media", everywhere("default,media"))
}
