package nft

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"testing"

	"github.com/google/nftables"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weftnet/weft/datapath/nslab"
)

func TestBytes(t *testing.T) {
	for p, want := range map[string][]byte{
		"10.0.0.0/20":  {255, 255, 240, 0},
		"10.1.2.3/32":  {255, 255, 255, 255},
		"0.0.0.0/0":    {0, 0, 0, 0},
		"fd00::/9":     {255, 128, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
		"172.31.0.0/1": {128, 0, 0, 0},
	} {
		if got := PrefixMask(netip.MustParsePrefix(p)); !slices.Equal(got, want) {
			t.Errorf("mask of %s: %v, want %v", p, got, want)
		}
	}
	if got := IfName("weft"); len(got) != 16 || string(got[:4]) != "weft" || got[4] != 0 || got[15] != 0 {
		t.Errorf("ifname %q", got)
	}
	if !IsNotFound(fmt.Errorf("x: %w", os.ErrNotExist)) || IsNotFound(errors.New("no such thing")) {
		t.Errorf("IsNotFound")
	}
}

// Two users share a table: each reads back only its own objects and sees the other's as
// foreign; each removes only its own, and the last one the table; removing what is gone
// queues nothing.
func TestTwoUsersShareATable(t *testing.T) {
	lab := nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wnsnt%d-", os.Getpid()%10000), NoIPv6: true})
	r, err := lab.NewNS("r")
	if err != nil {
		t.Fatal(err)
	}
	c, err := Open(int(r.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	table := &nftables.Table{Family: nftables.TableFamilyINet, Name: "wnstest"}
	policy := nftables.ChainPolicyAccept
	base := func(name string) *nftables.Chain {
		return &nftables.Chain{Name: name, Table: table, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &policy}
	}
	a := Mine{Table: table, Chains: []*nftables.Chain{base("a_fwd"), {Name: "a_drop", Table: table}},
		CounterPrefix: "a_", Sets: []string{"a_set"}}
	b := Mine{Table: table, Chains: []*nftables.Chain{base("b_fwd")}, CounterPrefix: "b_"}

	if o, err := Read(c, a); err != nil || o.Table || !o.Empty() || o.Remove(c) {
		t.Fatalf("no table: %+v %v", o, err)
	}
	c.AddTable(table)
	for _, ch := range append(slices.Clone(a.Chains), b.Chains...) {
		c.AddChain(ch)
	}
	set := &nftables.Set{Table: table, Name: "a_set", KeyType: nftables.TypeIPAddr}
	if err := c.AddSet(set, nil); err != nil {
		t.Fatal(err)
	}
	c.AddObj(&nftables.CounterObj{Table: table, Name: "a_x"})
	c.AddObj(&nftables.CounterObj{Table: table, Name: "b_y"})
	for _, k := range []string{"jump one", "jump two"} {
		c.AddRule(&nftables.Rule{Table: table, Chain: a.Chains[0], UserData: []byte(k), Exprs: nil})
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}

	oa, err := Read(c, a)
	if err != nil {
		t.Fatal(err)
	}
	if !oa.Table || !oa.Foreign || oa.Empty() || len(oa.Rules) != 2 || oa.Sets["a_set"] == nil ||
		!slices.Equal(oa.Counters, []string{"a_x"}) || !slices.Equal(Keys(oa.Rules["a_fwd"]), []string{"jump one", "jump two"}) {
		t.Fatalf("a reads %+v", oa)
	}
	counters, err := Counters(c, table, "a_")
	if err != nil || len(counters) != 1 || counters["x"] != 0 {
		t.Fatalf("a's counters %v %v", counters, err)
	}

	// a leaves: b's chain and counter stay, and so does the table.
	if !oa.Remove(c) {
		t.Fatal("a's objects not queued for removal")
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	ob, err := Read(c, b)
	if err != nil {
		t.Fatal(err)
	}
	if !ob.Table || ob.Foreign || len(ob.Rules) != 1 || !slices.Equal(ob.Counters, []string{"b_y"}) {
		t.Fatalf("after a left, b reads %+v", ob)
	}
	if oa, err := Read(c, a); err != nil || !oa.Empty() || oa.Remove(c) {
		t.Fatalf("after a left, a reads %+v %v (or queued a removal)", oa, err)
	}

	// b leaves last: the table goes.
	if !ob.Remove(c) {
		t.Fatal("b's objects not queued for removal")
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ListTableOfFamily(table.Name, table.Family); !IsNotFound(err) {
		t.Fatalf("table after the last user left: %v", err)
	}
	if m, err := Counters(c, table, "a_"); err != nil || len(m) != 0 {
		t.Fatalf("counters of no table: %v %v", m, err)
	}
}

func TestApplier(t *testing.T) {
	reg := prometheus.NewRegistry()
	opts := prometheus.CounterOpts{Name: "wns_test_applies_total", Help: "test"}
	a, err := NewApplier(Deps{Registry: reg}, opts)
	if err != nil {
		t.Fatal(err)
	}
	bad := errors.New("bad input")
	for _, step := range []struct {
		r   Result
		err error
	}{{Changed, nil}, {Unchanged, nil}, {Unchanged, nil}, {"", bad}} {
		if err := a.Apply("test not applied", func() (Result, error) { return step.r, step.err }); err != step.err {
			t.Fatalf("Apply returned %v, want %v", err, step.err)
		}
	}
	for r, want := range map[Result]float64{Changed: 1, Unchanged: 2, Failed: 1} {
		if got := testutil.ToFloat64(a.Applies(r)); got != want {
			t.Errorf("applies %s: %v, want %v", r, got, want)
		}
	}
	if _, err := NewApplier(Deps{Registry: reg}, opts); err == nil {
		t.Fatal("a second applier registered the same counter")
	}
}

func TestCounterCollector(t *testing.T) {
	desc := prometheus.NewDesc("wns_test_drops_total", "test", []string{"kind"}, nil)
	var readErr error
	reg := prometheus.NewRegistry()
	reg.MustRegister(CounterCollector{Desc: desc,
		Read:   func() (map[string]uint64, error) { return map[string]uint64{"mesh": 3, "skip": 1}, readErr },
		Labels: func(name string) ([]string, bool) { return []string{name}, name != "skip" }})
	if n, err := testutil.GatherAndCount(reg, "wns_test_drops_total"); err != nil || n != 1 {
		t.Fatalf("%d series (%v), want 1", n, err)
	}
	readErr = errors.New("kernel says no")
	if _, err := testutil.GatherAndCount(reg, "wns_test_drops_total"); err == nil {
		t.Fatal("a failed read of the counters gathers without an error")
	}
}
