package ipam

import (
	"bytes"
	"encoding/json"
	"io"
	"math"
	"net/netip"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// The FSM's command decoder is fed garbage (FuzzFSMApply) and valid commands with extreme
// values (FuzzFSMApplyExtreme): prefixes of every length anywhere in IPv4 (0.0.0.0/0 with /1
// blocks, /32s, 255.255.255.255), block sizes past the bounds, huge and empty names, death
// times at the ends of time. Whatever the entry, the state stays valid, a pinned cluster
// never gains a network, every owned block lies inside its network with its block size, and
// a refused entry changes nothing.

// fuzzStates are the starting points: a pinned cluster with one claim, and a cluster whose
// log predates pinning (its first claim may define its one network, within bounds).
func fuzzStates() map[string]func() *fsm {
	return map[string]func() *fsm{
		"pinned": func() *fsm {
			f := newFSM()
			applyCmd(f, 1, command{Op: opInit, ClusterID: "c1", Networks: []Network{clusterNet}})
			applyCmd(f, 2, command{Op: opClaim, Network: clusterNet, Peer: "p1"})
			return f
		},
		"fresh": newFSM,
		"unpinned": func() *fsm {
			f := newFSM()
			applyCmd(f, 1, command{Op: opInit, ClusterID: "c1"})
			return f
		},
	}
}

// checkFSMInvariants fails t if applying data to a fresh state broke an invariant.
func checkFSMInvariants(t *testing.T, data []byte) {
	for name, start := range fuzzStates() {
		f := start()
		before := stateJSON(f)
		pinnedBefore := f.copyState().Pinned
		netsBefore := len(f.copyState().Networks)
		res, ok := f.Apply(&raft.Log{Index: 3, Data: data}).(commandResult)
		if !ok {
			t.Fatalf("%s: Apply answered a %T", name, res)
		}
		st := f.copyState()
		if err := st.validate(); err != nil {
			t.Fatalf("%s: state invalid after %q: %v", name, data, err)
		}
		if res.Err != "" && stateJSON(f) != before {
			t.Fatalf("%s: refused entry %q (%s) changed the state", name, data, res.Err)
		}
		// Only an accepted network-create or network-rm changes a pinned cluster's networks,
		// and nothing removes the default network.
		var entry struct {
			Op string `json:"op"`
		}
		json.Unmarshal(data, &entry)
		netCmd := entry.Op == opNetworkCreate || entry.Op == opNetworkRemove
		if _, had := hasDefault(before); had {
			if _, has := st.Networks[DefaultNetwork]; !has {
				t.Fatalf("%s: entry %q removed the default network", name, data)
			}
		}
		if pinnedBefore && len(st.Networks) != netsBefore && !netCmd {
			t.Fatalf("%s: entry %q added a network to a pinned cluster: %v", name, data, st.Networks)
		}
		if !st.Pinned && len(st.Networks) > 1 {
			t.Fatalf("%s: entry %q defined %d networks by claim", name, data, len(st.Networks))
		}
		for netName, owners := range st.Owners {
			n := st.Networks[netName]
			for b := range owners {
				if !n.ContainsBlock(b) || b.Bits() < MinSubnetBits {
					t.Fatalf("%s: entry %q left block %s in network %v", name, data, b, n)
				}
			}
		}
		if res.Block.IsValid() && res.Block.Bits() != st.Networks[res.Network(st)].BlockBits {
			t.Fatalf("%s: claimed %s of the wrong size", name, res.Block)
		}
	}
}

// hasDefault says whether the encoded state holds the default network (test helper).
func hasDefault(stateJSON string) (Network, bool) {
	var st fsmState
	json.Unmarshal([]byte(stateJSON), &st)
	n, ok := st.Networks[DefaultNetwork]
	return n, ok
}

// Network finds the network holding the result's block (test helper).
func (r commandResult) Network(st fsmState) string {
	for name, n := range st.Networks {
		if n.Subnet.Contains(r.Block.Addr()) {
			return name
		}
	}
	return ""
}

func FuzzFSMApply(f *testing.F) {
	rogue := rogueNet
	for _, cmd := range []command{
		{Op: opClaim, Network: clusterNet, Peer: "p2"},
		{Op: opClaim, Network: rogue, Peer: "mallory"},
		{Op: opClaim, Network: Network{Name: "default", Subnet: netip.MustParsePrefix("255.255.255.255/32"), BlockBits: 32}, Peer: "m"},
		{Op: opClaim, Network: Network{Name: "evil", Subnet: netip.MustParsePrefix("10.0.0.0/8"), BlockBits: 26}, Peer: "m"},
		{Op: opRemovePeer, Peer: "p1"},
		{Op: opInit, ClusterID: "c2", Networks: []Network{rogue}},
		{Op: opLiveness, Dead: map[string]time.Time{"p1": time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)}, Alive: []string{"p1"}},
		{Op: opLiveness, Dead: map[string]time.Time{"p1": time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}},
		{Op: opNetworkCreate, Network: Network{Name: "media", Subnet: netip.MustParsePrefix("10.50.0.0/16"), BlockBits: 26, MTU: 9000, Encrypt: "always", SLA: "gold: rtt<=5ms", Isolated: true}},
		{Op: opNetworkCreate, Network: Network{Name: "over", Subnet: netip.MustParsePrefix("10.40.0.0/24"), BlockBits: 26}},
		{Op: opNetworkCreate, Network: rogue},
		{Op: opNetworkRemove, Network: Network{Name: "default"}},
		{Op: opNetworkRemove, Network: Network{Name: "nope"}},
		{Op: opRelease, Network: Network{Name: "default"}, Peer: "p1", Block: netip.MustParsePrefix("10.40.0.0/26")},
		{Op: opRelease, Network: Network{Name: "media"}, Peer: "p1", Block: netip.MustParsePrefix("0.0.0.0/0")},
		{Op: opPolicyPut, Policy: &PolicyObject{Name: "db", Network: "default", Spec: json.RawMessage(`{"a":1}`)}},
		{Op: opPolicyPut, Policy: &PolicyObject{Name: "db", Network: "nope", Spec: json.RawMessage(`{}`)}},
		{Op: opPolicyRemove, Policy: &PolicyObject{Name: "db"}},
	} {
		f.Add(mustJSON(cmd))
	}
	f.Add([]byte(`{"op":"claim","network":{"name":"default","subnet":"0.0.0.0/0","block_bits":1},"peer":"x"}`))
	f.Add([]byte(`{"op":"claim","network":{"name":"default","subnet":"10.40.0.0/16","block_bits":-1},"peer":"x"}`))
	f.Add([]byte(`{"op":"liveness","dead":{"p1":"0001-01-01T00:00:00Z"}}`))
	f.Add([]byte(`{"op":"init","cluster_id":"c1","networks":null}`))
	f.Add([]byte(`{"op":"network-create","network":{"name":"x","subnet":"10.50.0.0/16","block_bits":26,"mtu":-1,"sla":"a: loss<=NaN"}}`))
	f.Add([]byte(`{"op":"network-rm"}`))
	f.Add([]byte(`not json`))
	f.Fuzz(func(t *testing.T, data []byte) {
		checkFSMInvariants(t, data)
	})
}

func FuzzFSMApplyExtreme(f *testing.F) {
	f.Add(uint8(0), uint32(0), 0, 1, "mallory", int64(0))                      // 0.0.0.0/0 in /1 blocks
	f.Add(uint8(0), uint32(0x0a280000), 16, 26, "p2", int64(0))                // the honest claim
	f.Add(uint8(0), uint32(0xffffffff), 32, 32, "m", int64(0))                 // one broadcast address
	f.Add(uint8(0), uint32(0x0a000000), 8, 30, "m", int64(0))                  // 2^22 blocks
	f.Add(uint8(1), uint32(0x0a280000), 16, 26, "", int64(math.MaxInt64))      // empty name
	f.Add(uint8(2), uint32(0xc0a80000), 16, 26, "c2", int64(0))                // a second init
	f.Add(uint8(3), uint32(0), 0, 0, "p1", int64(math.MinInt64))               // death at the dawn of time
	f.Add(uint8(3), uint32(0), 0, 0, "p1", int64(253402300799))                // death in year 9999
	f.Add(uint8(3), uint32(0), 0, 0, string(make([]byte, 4096)), int64(1.8e9)) // a huge name
	f.Add(uint8(4), uint32(0x0a320000), 16, 26, "", int64(9000))               // a network created
	f.Add(uint8(4), uint32(0), 0, 1, "", int64(math.MaxInt64))                 // a rogue one, huge MTU
	f.Add(uint8(5), uint32(0), 0, 0, "default", int64(0))                      // rm of default
	f.Fuzz(func(t *testing.T, op uint8, addr uint32, bits, blockBits int, peer string, deathUnix int64) {
		a := uint32ToAddr(addr)
		if bits < 0 || bits > 32 {
			bits = int(uint(bits) % 33)
		}
		n := Network{Name: "default", Subnet: netip.PrefixFrom(a, bits).Masked(), BlockBits: blockBits}
		if op%5 == 4 {
			n.Name = "other"
		}
		var cmd command
		switch op % 7 {
		case 0:
			cmd = command{Op: opClaim, Network: n, Peer: peer}
		case 1:
			cmd = command{Op: opRemovePeer, Peer: peer}
		case 2:
			cmd = command{Op: opInit, ClusterID: "c2", Networks: []Network{n}}
		case 3:
			cmd = command{Op: opLiveness, Dead: map[string]time.Time{peer: time.Unix(deathUnix, 0)}, Alive: []string{peer}}
		case 4:
			m := n
			m.Name, m.MTU = "media", int(deathUnix)
			cmd = command{Op: opNetworkCreate, Network: m}
		case 5:
			cmd = command{Op: opNetworkRemove, Network: Network{Name: peer}}
		case 6:
			b := netip.PrefixFrom(a, int(uint(blockBits)%33))
			cmd = command{Op: opRelease, Network: Network{Name: n.Name}, Peer: peer, Block: b}
		}
		data, err := json.Marshal(cmd)
		if err != nil {
			return // a time json cannot encode never reaches the log
		}
		checkFSMInvariants(t, data)
	})
}

// FuzzFSMRestore feeds snapshots: real ones (a pinned cluster with claims, deaths and a
// removal), garbage, and valid JSON with extreme values. A snapshot that is refused leaves
// the state as it was; one that is taken is a valid state whose blocks lie inside their
// networks, and it round-trips through Snapshot unchanged.
func FuzzFSMRestore(f *testing.F) {
	for _, start := range fuzzStates() {
		snap, err := start().Snapshot()
		if err != nil {
			f.Fatal(err)
		}
		f.Add([]byte(snap.(fsmSnapshot)))
	}
	for _, s := range []string{
		`{}`, `null`, `[]`, `{"networks":{"rogue":{"name":"rogue","subnet":"0.0.0.0/0","block_bits":1}}}`,
		`{"networks":{"default":{"name":"default","subnet":"10.40.0.0/16","block_bits":26}},"owners":{"default":{"0.0.0.0/1":"p1"}}}`,
		`{"networks":{"default":{"name":"default","subnet":"10.40.0.0/16","block_bits":26}},"owners":{"default":{"10.40.0.0/26":""}}}`,
		`{"version":18446744073709551615,"dead":{"p1":"9999-12-31T23:59:59Z"}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fs := fuzzStates()["pinned"]()
		before := stateJSON(fs)
		if err := fs.Restore(io.NopCloser(bytes.NewReader(data))); err != nil {
			if got := stateJSON(fs); got != before {
				t.Fatalf("a refused snapshot (%v) changed the state", err)
			}
			return
		}
		st := fs.copyState()
		if err := st.validate(); err != nil {
			t.Fatalf("restored an invalid state: %v", err)
		}
		for name, owners := range st.Owners {
			n, ok := st.Networks[name]
			if !ok && len(owners) > 0 {
				t.Fatalf("blocks of undefined network %q restored", name)
			}
			for b := range owners {
				if !n.ContainsBlock(b) {
					t.Fatalf("block %s outside network %s (%s /%d) restored", b, name, n.Subnet, n.BlockBits)
				}
			}
		}
		snap, err := fs.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		again := newFSM()
		if err := again.Restore(io.NopCloser(bytes.NewReader(snap.(fsmSnapshot)))); err != nil {
			t.Fatalf("a restored state does not restore again: %v", err)
		}
		if stateJSON(again) != stateJSON(fs) {
			t.Fatal("a restored state changed through Snapshot and Restore")
		}
	})
}

// FuzzTableDelta feeds the block-table deltas clients apply from gossip (after the signature
// check, so this is what a Raft member could still send): a refused delta changes nothing, an
// applied one leaves a valid state whose blocks lie inside their networks.
func FuzzTableDelta(f *testing.F) {
	for _, s := range []string{
		`{"prev":2,"index":3,"op":"claim","peer":"p2","network":{"name":"default","subnet":"10.40.0.0/16","block_bits":26},"block":"10.40.0.64/26"}`,
		`{"prev":2,"index":3,"op":"claim","peer":"p2","network":{"name":"rogue","subnet":"0.0.0.0/0","block_bits":1},"block":"0.0.0.0/1"}`,
		`{"prev":2,"index":3,"op":"remove-peer","peer":"p1"}`,
		`{"prev":2,"index":18446744073709551615,"op":"claim","peer":"p2","network":{"name":"default","subnet":"10.40.0.0/16","block_bits":26},"block":"10.40.255.192/26"}`,
		`{"prev":0,"index":1,"op":"init","cluster_id":"c2","networks":[{"name":"default","subnet":"0.0.0.0/0","block_bits":1}],"pinned":true}`,
		`{}`, `null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var d tableDelta
		if json.Unmarshal(data, &d) != nil {
			return // the handler refuses what does not decode, before any state is touched
		}
		fs := fuzzStates()["pinned"]()
		st := fs.copyState()
		before := string(mustJSON(st))
		if err := applyDelta(&st, d); err != nil {
			if got := string(mustJSON(st)); got != before {
				t.Fatalf("a refused delta (%v) changed the state", err)
			}
			return
		}
		if err := st.validate(); err != nil {
			t.Fatalf("an applied delta left an invalid state: %v", err)
		}
		for name, owners := range st.Owners {
			n := st.Networks[name]
			for b := range owners {
				if !n.ContainsBlock(b) {
					t.Fatalf("an applied delta put block %s outside network %q", b, name)
				}
			}
		}
	})
}
