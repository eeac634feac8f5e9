package lab

import (
	"errors"
	"fmt"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// Faults are nftables rules inside a host's namespace, in a table of their own, so that
// removing the table undoes every fault on that host and nothing else.

const faultTable = "weftlab_fault"

// Block makes h drop every underlay packet from and to the given hosts: to both sides the
// link looks cut, while each keeps talking to everyone else.
func (h *Host) Block(others ...*Host) error {
	conn, err := nftables.New(nftables.WithNetNSFd(int(h.nsHandle.Fd())))
	if err != nil {
		return fmt.Errorf("lab: nftables in %s: %w", h.Name, err)
	}
	table := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: faultTable}
	conn.AddTable(table) // adding an existing table is a no-op in nftables
	in := conn.AddChain(&nftables.Chain{Name: "in", Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter})
	out := conn.AddChain(&nftables.Chain{Name: "out", Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter})
	for _, o := range others {
		ip := o.Addr.Addr().As4()
		conn.AddRule(dropRule(table, in, 12, ip[:]))  // source address
		conn.AddRule(dropRule(table, out, 16, ip[:])) // destination address
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("lab: block on %s: %w", h.Name, err)
	}
	return nil
}

// dropRule drops IPv4 packets whose address at offset (12 source, 16 destination) is ip.
func dropRule(t *nftables.Table, c *nftables.Chain, offset uint32, ip []byte) *nftables.Rule {
	return &nftables.Rule{Table: t, Chain: c, Exprs: []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ip},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}}
}

// Unblock removes every fault on h; a host without faults is fine.
func (h *Host) Unblock() error {
	conn, err := nftables.New(nftables.WithNetNSFd(int(h.nsHandle.Fd())))
	if err != nil {
		return fmt.Errorf("lab: nftables in %s: %w", h.Name, err)
	}
	conn.DelTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: faultTable})
	if err := conn.Flush(); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("lab: unblock on %s: %w", h.Name, err)
	}
	return nil
}

// Partition cuts every underlay link between group a and group b.
func (l *Lab) Partition(a, b []*Host) error {
	for _, h := range a {
		if err := h.Block(b...); err != nil {
			return err
		}
	}
	for _, h := range b {
		if err := h.Block(a...); err != nil {
			return err
		}
	}
	return nil
}

// Heal removes every fault on every host.
func (l *Lab) Heal() error {
	var errs []error
	for _, h := range l.hosts {
		errs = append(errs, h.Unblock())
	}
	return errors.Join(errs...)
}
