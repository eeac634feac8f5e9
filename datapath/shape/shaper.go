package shape

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Handles weft uses, so that Remove and Read touch only what Apply made.
var (
	// tbfHandle is weft's root tbf ("we" in ASCII as the major number).
	tbfHandle     = netlink.MakeHandle(0x7765, 0)
	ingressHandle = netlink.MakeHandle(0xffff, 0)
)

// filterPrio is the priority of the redirect filter on the host veth's ingress.
const filterPrio = 1

// IfbPrefix starts the name of every ifb weft makes.
const IfbPrefix = "wfb"

// IfbName is the ifb device that shapes the egress of host interface hostIf: IfbPrefix and
// a hash of hostIf, 15 characters, the longest a Linux interface name may be.
func IfbName(hostIf string) string {
	sum := sha256.Sum256([]byte(hostIf))
	return IfbPrefix + hex.EncodeToString(sum[:])[:12]
}

// Shaper applies plans to host interfaces through one netlink handle, that of the host's
// network namespace. Its methods are safe for concurrent use on different interfaces; calls
// for one interface must be serialised by the caller (the router holds the attachment's
// lock).
type Shaper struct {
	h *netlink.Handle
}

// New returns a Shaper working through h; nil is the calling process's namespace.
func New(h *netlink.Handle) *Shaper {
	if h == nil {
		h = &netlink.Handle{}
	}
	return &Shaper{h: h}
}

// Apply converges hostIf to p: a tbf where a direction is limited, nothing of weft's where it
// is not. Idempotent: the tbf is replaced in place, which the kernel does without dropping
// what waits in its queue (tbf_change resizes its fifo), the ifb and the redirect are kept
// when they are right.
func (s *Shaper) Apply(hostIf string, p Plan) error {
	link, err := s.h.LinkByName(hostIf)
	if err != nil {
		if isNotFound(err) {
			return fmt.Errorf("%w: %s", ErrNoInterface, hostIf)
		}
		return fmt.Errorf("shape %s: %w", hostIf, err)
	}
	idx := link.Attrs().Index
	if p.Ingress != nil {
		if err := s.h.QdiscReplace(tbf(idx, *p.Ingress)); err != nil {
			return fmt.Errorf("shape ingress of %s: replace tbf: %w", hostIf, err)
		}
	} else if err := s.deleteTbf(idx); err != nil {
		return fmt.Errorf("unshape ingress of %s: %w", hostIf, err)
	}
	if p.Egress == nil {
		return s.removeEgress(hostIf, idx)
	}
	ifb, err := s.ensureIfb(IfbName(hostIf))
	if err != nil {
		return fmt.Errorf("shape egress of %s: %w", hostIf, err)
	}
	if err := s.h.QdiscReplace(tbf(ifb.Attrs().Index, *p.Egress)); err != nil {
		return fmt.Errorf("shape egress of %s: replace tbf on %s: %w", hostIf, ifb.Attrs().Name, err)
	}
	if err := s.ensureRedirect(idx, ifb.Attrs().Index); err != nil {
		return fmt.Errorf("shape egress of %s: %w", hostIf, err)
	}
	return nil
}

// Remove takes away everything Apply made for hostIf. An interface or ifb already gone is
// success, so it may be called before or after the veth is deleted, and twice.
func (s *Shaper) Remove(hostIf string) error {
	idx := 0
	link, err := s.h.LinkByName(hostIf)
	switch {
	case err == nil:
		idx = link.Attrs().Index
		if err := s.deleteTbf(idx); err != nil {
			return fmt.Errorf("unshape ingress of %s: %w", hostIf, err)
		}
	case !isNotFound(err):
		return fmt.Errorf("unshape %s: %w", hostIf, err)
	}
	return s.removeEgress(hostIf, idx)
}

// removeEgress deletes the redirect on hostIf (index idx, 0 when it is gone) and its ifb.
func (s *Shaper) removeEgress(hostIf string, idx int) error {
	if idx != 0 {
		q, err := s.find(idx, netlink.HANDLE_INGRESS, ingressHandle, "ingress")
		if err != nil {
			return fmt.Errorf("unshape egress of %s: %w", hostIf, err)
		}
		if q != nil {
			if err := s.h.QdiscDel(q); err != nil && !isNotFound(err) {
				return fmt.Errorf("unshape egress of %s: delete ingress qdisc: %w", hostIf, err)
			}
		}
	}
	name := IfbName(hostIf)
	ifb, err := s.h.LinkByName(name)
	if err != nil {
		if isNotFound(err) {
			return nil
		}
		return fmt.Errorf("unshape egress of %s: %w", hostIf, err)
	}
	if ifb.Type() != "ifb" {
		return fmt.Errorf("unshape egress of %s: %s is a %s, not weft's ifb; left alone", hostIf, name, ifb.Type())
	}
	if err := s.h.LinkDel(ifb); err != nil && !isNotFound(err) {
		return fmt.Errorf("unshape egress of %s: delete %s: %w", hostIf, name, err)
	}
	return nil
}

// deleteTbf deletes the root qdisc of link idx if it is weft's tbf, so the veth falls back
// to its default (noqueue).
func (s *Shaper) deleteTbf(idx int) error {
	q, err := s.find(idx, netlink.HANDLE_ROOT, tbfHandle, "tbf")
	if err != nil || q == nil {
		return err
	}
	if err := s.h.QdiscDel(q); err != nil && !isNotFound(err) {
		return fmt.Errorf("delete tbf: %w", err)
	}
	return nil
}

// find is the qdisc of type kind with parent and handle on link idx, nil if there is none.
// (Deleting one that is not there fails with EINVAL for ingress, so look first.)
func (s *Shaper) find(idx int, parent, handle uint32, kind string) (netlink.Qdisc, error) {
	qs, err := s.h.QdiscList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: idx}})
	if err != nil {
		if isNotFound(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("list qdiscs: %w", err)
	}
	for _, q := range qs {
		if q.Type() == kind && q.Attrs().Parent == parent && q.Attrs().Handle == handle {
			return q, nil
		}
	}
	return nil, nil
}

// ensureIfb returns the ifb named name, up, creating it if needed; a link of that name of
// another type is an error, not something to delete.
func (s *Shaper) ensureIfb(name string) (netlink.Link, error) {
	link, err := s.h.LinkByName(name)
	if err != nil && !isNotFound(err) {
		return nil, err
	}
	if err != nil {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = name
		attrs.TxQLen = 1000
		if err := s.h.LinkAdd(&netlink.Ifb{LinkAttrs: attrs}); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("create %s: %w", name, err)
		}
		if link, err = s.h.LinkByName(name); err != nil {
			return nil, fmt.Errorf("find %s: %w", name, err)
		}
	}
	if link.Type() != "ifb" {
		return nil, fmt.Errorf("%s exists and is a %s, not an ifb", name, link.Type())
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := s.h.LinkSetUp(link); err != nil {
			return nil, fmt.Errorf("set %s up: %w", name, err)
		}
	}
	return link, nil
}

// ensureRedirect makes the host veth's ingress go to the ifb: an ingress qdisc and a u32
// filter matching everything with a mirred redirect. u32 rather than matchall: matchall is
// a module many kernels (this lab's among them) lack, u32 is everywhere. A filter already
// pointing at the ifb is kept; one pointing elsewhere (an ifb recreated with a new index)
// is replaced.
func (s *Shaper) ensureRedirect(idx, ifbIdx int) error {
	err := s.h.QdiscAdd(&netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: idx, Handle: ingressHandle, Parent: netlink.HANDLE_INGRESS}})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add ingress qdisc: %w", err)
	}
	link := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: idx}}
	filters, err := s.h.FilterList(link, ingressHandle)
	if err != nil {
		return fmt.Errorf("list ingress filters: %w", err)
	}
	stale := false
	for _, f := range filters {
		if f.Attrs().Priority != filterPrio {
			continue
		}
		if redirectsTo(f, ifbIdx) {
			return nil
		}
		stale = true
	}
	if stale {
		// Deleting by priority without a handle deletes the whole u32 tree at it.
		del := &netlink.U32{FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: ingressHandle, Priority: filterPrio, Protocol: unix.ETH_P_ALL}}
		if err := s.h.FilterDel(del); err != nil && !isNotFound(err) {
			return fmt.Errorf("delete stale redirect: %w", err)
		}
	}
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: ingressHandle, Priority: filterPrio, Protocol: unix.ETH_P_ALL},
		ClassId:     netlink.MakeHandle(1, 1),
		Sel:         &netlink.TcU32Sel{Flags: netlink.TC_U32_TERMINAL, Nkeys: 1, Keys: []netlink.TcU32Key{{Mask: 0, Val: 0}}},
		Actions:     []netlink.Action{netlink.NewMirredAction(ifbIdx)},
	}
	if err := s.h.FilterAdd(f); err != nil {
		return fmt.Errorf("add redirect to the ifb: %w", err)
	}
	return nil
}

// redirectsTo says whether filter f redirects to link ifbIdx.
func redirectsTo(f netlink.Filter, ifbIdx int) bool {
	u, ok := f.(*netlink.U32)
	if !ok {
		return false
	}
	for _, a := range u.Actions {
		if m, ok := a.(*netlink.MirredAction); ok && m.Ifindex == ifbIdx && m.MirredAction == netlink.TCA_EGRESS_REDIR {
			return true
		}
	}
	return false
}

// tbf is the root tbf of link idx for d.
func tbf(idx int, d Direction) *netlink.Tbf {
	return &netlink.Tbf{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: idx, Handle: tbfHandle, Parent: netlink.HANDLE_ROOT},
		Rate:       d.RateBytes,
		Limit:      d.LimitBytes,
		Buffer:     netlink.Xmittime(d.RateBytes, d.BurstBytes),
	}
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}
