package router

import (
	"slices"
	"testing"

	"github.com/google/nftables"

	"github.com/weftnet/weft/datapath/guard"
	"github.com/weftnet/weft/datapath/vxlan"
)

// A started peer has closed its ports to the containers of its bridge; restarting it
// re-applies the same guard without error.
func TestPeerGuardsItsPorts(t *testing.T) {
	dir := t.TempDir()
	p := startPeer(t, dir)
	cfg := p.guardConfig(p.cfg.AdvertiseAddr, p.filters.guardedBridges())
	if len(cfg.Underlay) != 1 || !cfg.Underlay[0].Contains(p.cfg.AdvertiseAddr) {
		t.Fatalf("guarded underlay %v does not hold the advertise address %v", cfg.Underlay, p.cfg.AdvertiseAddr)
	}
	if !slices.Equal(cfg.Bridges, []string{bridgeName("default")}) {
		t.Fatalf("guarded bridges %v", cfg.Bridges)
	}
	want := map[guard.Port]bool{
		{Kind: guard.KindProbe, Proto: guard.UDP, Port: uint16(p.cfg.ProbePort)}:         true,
		{Kind: guard.KindLinkProbe, Proto: guard.UDP, Port: uint16(p.cfg.LinkProbePort)}: true,
		{Kind: guard.KindWireGuard, Proto: guard.UDP, Port: uint16(p.cfg.WireGuardPort)}: true,
		{Kind: guard.KindVXLAN, Proto: guard.UDP, Port: vxlan.DefaultPort}:               true,
	}
	for _, port := range cfg.Ports {
		delete(want, port)
	}
	if len(want) != 0 {
		t.Fatalf("ports not guarded: %v (guarded %v)", want, cfg.Ports)
	}
	conn, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tbl := &nftables.Table{Family: nftables.TableFamilyINet, Name: guard.TableName}
	ch, err := conn.ListChain(tbl, guard.PortsChain)
	if err != nil {
		t.Fatalf("no guard chain after start: %v", err)
	}
	rules, err := conn.GetRules(tbl, ch)
	if err != nil || len(rules) < len(cfg.Ports) {
		t.Fatalf("guard rules %d (%v), want at least %d", len(rules), err, len(cfg.Ports))
	}
	// The mesh's streams are limited too (mesh.StreamLimiter, wired in startMesh).
	mfs, err := p.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mf := range mfs {
		found = found || mf.GetName() == "weft_mesh_streams_refused_total"
	}
	if !found {
		t.Fatalf("weft_mesh_streams_refused_total not registered: the mesh's streams are not limited")
	}
	p.stop()
	startPeer(t, dir)
}
