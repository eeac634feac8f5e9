package lab

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Faults are nftables rules inside a host's namespace, in a table of their own, so that
// removing the table undoes every fault on that host and nothing else.

const faultTable = "weftlab_fault"

// Block makes h drop every underlay packet from and to the given hosts: to both sides the
// link looks cut, while each keeps talking to everyone else.
func (h *Host) Block(others ...*Host) error {
	return h.block(0, others)
}

// BlockUDP makes h drop the UDP packets to port (in either direction) between h and the
// given hosts, and nothing else: blocking a tunnel's port (VXLAN 6784, WireGuard 6786)
// breaks the tunnel while the underlay, gossip and underlay probes keep working.
func (h *Host) BlockUDP(port uint16, others ...*Host) error {
	if port == 0 {
		return fmt.Errorf("lab: BlockUDP needs a port")
	}
	return h.block(port, others)
}

// block adds the drop rules: every packet, or with udpPort only UDP to that port.
func (h *Host) block(udpPort uint16, others []*Host) error {
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
		conn.AddRule(dropRule(table, in, 12, ip[:], udpPort))  // source address
		conn.AddRule(dropRule(table, out, 16, ip[:], udpPort)) // destination address
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("lab: block on %s: %w", h.Name, err)
	}
	return nil
}

// dropRule drops IPv4 packets whose address at offset (12 source, 16 destination) is ip,
// and with udpPort only UDP packets to that destination port.
func dropRule(t *nftables.Table, c *nftables.Chain, offset uint32, ip []byte, udpPort uint16) *nftables.Rule {
	exprs := []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ip},
	}
	if udpPort != 0 {
		exprs = append(exprs,
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, udpPort)},
		)
	}
	return &nftables.Rule{Table: t, Chain: c, Exprs: append(exprs, &expr.Verdict{Kind: expr.VerdictDrop})}
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

// BreakTunnel drops the UDP packets to port between group a and group b in both directions
// (see BlockUDP).
func (l *Lab) BreakTunnel(port uint16, a, b []*Host) error {
	for _, pair := range [][2][]*Host{{a, b}, {b, a}} {
		for _, h := range pair[0] {
			if err := h.BlockUDP(port, pair[1]...); err != nil {
				return err
			}
		}
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
