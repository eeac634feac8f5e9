// Package nft is what the users of weft's one nftables table (inet "weft") share: the
// connection (with a receive buffer big enough for the acks of a large transaction),
// reading back the objects one user owns in the table (its chains' rules by the keys in
// their user data, its named counters, its sets) while noting that others hold objects
// there too, removing only those objects (and the table only when nothing else is left in
// it), exporting named counters as metrics, and an Applier that runs a user's convergences
// one at a time and counts them by result. It is a thin layer over github.com/google/nftables:
// planning, building rules and deciding what to change stay with each user
// (datapath/guard, datapath/isolate).
package nft

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// ErrKernel wraps every error of nftables (its users' too: guard.ErrKernel and
// isolate.ErrKernel are this error).
var ErrKernel = errors.New("nftables")

// AckBuffer is the receive buffer of a connection's netlink socket. The kernel acknowledges
// every message of a transaction before the first ack is read, and a transaction of a few
// hundred messages (the isolation of 64 networks, the guard of 100 bridges) overflows the
// default buffer (rmem_default, 208 KiB): the transaction fails with ENOBUFS. nft sizes its
// buffer the same way. It is a bound, not an allocation: the kernel charges what is queued.
const AckBuffer = 8 << 20

// Open connects to nftables in the network namespace netnsFd (0: the current one), with
// an AckBuffer-sized receive buffer. The connection is not lasting: each query or Flush
// uses its own socket, so it holds nothing between calls.
func Open(netnsFd int) (*nftables.Conn, error) {
	opts := []nftables.ConnOption{nftables.WithSockOptions(bigAckBuffer)}
	if netnsFd != 0 {
		opts = append(opts, nftables.WithNetNSFd(netnsFd))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("%w: connect: %w", ErrKernel, err)
	}
	return c, nil
}

// bigAckBuffer sets AckBuffer with SO_RCVBUFFORCE (weft runs with CAP_NET_ADMIN), falling
// back to SO_RCVBUF, which the kernel caps at rmem_max.
func bigAckBuffer(c *netlink.Conn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return c.SetReadBuffer(AckBuffer)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, AckBuffer)
		// A transaction is sent in one sendmsg, refused (EMSGSIZE) above the send buffer
		// (wmem_default): network policy's first apply is megabytes of set elements.
		if serr == nil {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, AckBuffer)
		}
	}); err != nil || serr != nil {
		c.SetWriteBuffer(AckBuffer)
		return c.SetReadBuffer(AckBuffer)
	}
	return nil
}

// IsNotFound reports whether err says the table (or object) asked for does not exist.
func IsNotFound(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, os.ErrNotExist)
}

// IfName is an interface name as the kernel compares it (IFNAMSIZ bytes, NUL-padded).
func IfName(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

// PrefixMask is the netmask of p, as many bytes as its address (4 or 16).
func PrefixMask(p netip.Prefix) []byte {
	m := make([]byte, p.Addr().BitLen()/8)
	for i := 0; i < p.Bits(); i++ {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

// Mine names the objects one user owns in a shared table.
type Mine struct {
	Table *nftables.Table
	// Chains are the user's chains, in the order Remove deletes them: a chain that jumps
	// (a base chain) before the chains it jumps to.
	Chains []*nftables.Chain
	// CounterPrefix starts the name of each of the user's named counters.
	CounterPrefix string
	// Sets are the names of the user's sets.
	Sets []string
}

// Rule is one rule as read back: its key (the user data the user wrote) and its handle.
type Rule struct {
	Key    string
	Handle uint64
}

// Owned is what the kernel holds of one user's objects in the table.
type Owned struct {
	Mine  Mine
	Table bool // the table exists
	// Rules are the rules of each of the user's chains that exist, in order; a chain that
	// is absent has no entry.
	Rules    map[string][]Rule
	Counters []string                 // the user's named counters (full names), sorted
	Sets     map[string]*nftables.Set // the user's sets that exist, by name
	Foreign  bool                     // the table holds chains, objects or sets of others
}

// Keys are the keys of rules, in order.
func Keys(rules []Rule) []string {
	keys := make([]string, len(rules))
	for i, r := range rules {
		keys[i] = r.Key
	}
	return keys
}

// Empty reports whether the table holds nothing of the user's.
func (o Owned) Empty() bool {
	return len(o.Rules) == 0 && len(o.Counters) == 0 && len(o.Sets) == 0
}

// Read returns m's objects as the kernel holds them; the objects of others in the table
// are only noted (Foreign). A table that does not exist is no error. O(chains + rules +
// objects + sets) of the table: a few netlink dumps.
func Read(c *nftables.Conn, m Mine) (Owned, error) {
	o := Owned{Mine: m}
	name := m.Table.Name
	if _, err := c.ListTableOfFamily(name, m.Table.Family); err != nil {
		if IsNotFound(err) {
			return o, nil
		}
		return o, fmt.Errorf("%w: list table %s: %w", ErrKernel, name, err)
	}
	o.Table = true
	o.Rules = make(map[string][]Rule)
	o.Sets = make(map[string]*nftables.Set)
	all, err := c.ListChainsOfTableFamily(m.Table.Family)
	if err != nil {
		return o, fmt.Errorf("%w: list chains: %w", ErrKernel, err)
	}
	for _, ch := range all {
		if ch.Table.Name != name {
			continue
		}
		if !slices.ContainsFunc(m.Chains, func(mine *nftables.Chain) bool { return mine.Name == ch.Name }) {
			o.Foreign = true
			continue
		}
		rules, err := c.GetRules(m.Table, ch)
		if err != nil {
			return o, fmt.Errorf("%w: list rules of %s: %w", ErrKernel, ch.Name, err)
		}
		rs := make([]Rule, len(rules))
		for i, r := range rules {
			rs[i] = Rule{Key: string(r.UserData), Handle: r.Handle}
		}
		o.Rules[ch.Name] = rs
	}
	objs, err := c.GetObjects(m.Table)
	if err != nil && !IsNotFound(err) {
		return o, fmt.Errorf("%w: list objects: %w", ErrKernel, err)
	}
	for _, obj := range objs {
		if co, ok := obj.(*nftables.CounterObj); ok && strings.HasPrefix(co.Name, m.CounterPrefix) {
			o.Counters = append(o.Counters, co.Name)
		} else {
			o.Foreign = true
		}
	}
	slices.Sort(o.Counters)
	sets, err := c.GetSets(m.Table)
	if err != nil && !IsNotFound(err) {
		return o, fmt.Errorf("%w: list sets: %w", ErrKernel, err)
	}
	for _, s := range sets {
		if slices.Contains(m.Sets, s.Name) {
			o.Sets[s.Name] = s
		} else {
			o.Foreign = true
		}
	}
	return o, nil
}

// Remove queues, on c, the deletion of the user's objects that o found: the whole table
// when nothing else is in it, else the rules of its chains first (they refer to the chains,
// sets and counters), then its chains, sets and counters, so that no jump is left into a
// deleted chain and the objects of others stay. It reports whether anything was queued
// (false: no table, or nothing of the user's beside others' objects); the caller flushes.
func (o Owned) Remove(c *nftables.Conn) bool {
	switch {
	case !o.Table, o.Empty() && o.Foreign:
		return false
	case !o.Foreign:
		c.DelTable(o.Mine.Table) // everything in it is the user's
		return true
	}
	for _, ch := range o.Mine.Chains {
		if _, ok := o.Rules[ch.Name]; ok {
			c.FlushChain(ch)
		}
	}
	for _, ch := range o.Mine.Chains {
		if _, ok := o.Rules[ch.Name]; ok {
			c.DelChain(ch)
		}
	}
	for _, name := range o.Mine.Sets {
		if s, ok := o.Sets[name]; ok {
			c.DelSet(s)
		}
	}
	for _, name := range o.Counters {
		c.DeleteObject(&nftables.CounterObj{Table: o.Mine.Table, Name: name})
	}
	return true
}

// Counters returns the packets of the named counters in table whose names start with
// prefix, by name without the prefix; a table that does not exist has none. One netlink
// dump, O(objects of the table).
func Counters(c *nftables.Conn, table *nftables.Table, prefix string) (map[string]uint64, error) {
	objs, err := c.GetObjects(table)
	if err != nil {
		if IsNotFound(err) {
			return map[string]uint64{}, nil
		}
		return nil, fmt.Errorf("%w: read counters: %w", ErrKernel, err)
	}
	out := make(map[string]uint64)
	for _, obj := range objs {
		if co, ok := obj.(*nftables.CounterObj); ok && strings.HasPrefix(co.Name, prefix) {
			out[strings.TrimPrefix(co.Name, prefix)] = co.Packets
		}
	}
	return out, nil
}
