package shape

import (
	"fmt"

	"github.com/vishvananda/netlink"
)

// DirState is one direction's tbf as the kernel holds it, with its counters.
type DirState struct {
	// RateBits is the configured rate in bits per second; BurstBits the bucket in bits.
	RateBits  uint64 `json:"rate_bits"`
	BurstBits uint64 `json:"burst_bits"`
	// LimitBytes is the queue length in bytes.
	LimitBytes uint32 `json:"limit_bytes"`
	// Counters since the qdisc was made.
	Bytes      uint64 `json:"bytes"`
	Packets    uint64 `json:"packets"`
	Drops      uint64 `json:"drops"`
	Overlimits uint64 `json:"overlimits"`
	Backlog    uint64 `json:"backlog_bytes"`
}

// State is an attachment's shaping as the kernel holds it; a nil direction is unlimited.
type State struct {
	Ingress *DirState `json:"ingress,omitempty"`
	Egress  *DirState `json:"egress,omitempty"`
}

// Read returns the shaping of hostIf from the kernel: the kernel is the record of what was
// applied (the qdiscs live as long as the veth, across peer restarts). An interface that
// does not exist is ErrNoInterface. O(qdiscs on the veth and its ifb).
func (s *Shaper) Read(hostIf string) (State, error) {
	link, err := s.h.LinkByName(hostIf)
	if err != nil {
		if isNotFound(err) {
			return State{}, fmt.Errorf("%w: %s", ErrNoInterface, hostIf)
		}
		return State{}, fmt.Errorf("read shaping of %s: %w", hostIf, err)
	}
	var st State
	if st.Ingress, err = s.readTbf(link.Attrs().Index); err != nil {
		return State{}, fmt.Errorf("read shaping of %s: %w", hostIf, err)
	}
	ifb, err := s.h.LinkByName(IfbName(hostIf))
	switch {
	case err == nil && ifb.Type() == "ifb":
		if st.Egress, err = s.readTbf(ifb.Attrs().Index); err != nil {
			return State{}, fmt.Errorf("read shaping of %s: %w", hostIf, err)
		}
	case err != nil && !isNotFound(err):
		return State{}, fmt.Errorf("read shaping of %s: %w", hostIf, err)
	}
	return st, nil
}

func (s *Shaper) readTbf(idx int) (*DirState, error) {
	q, err := s.find(idx, netlink.HANDLE_ROOT, tbfHandle, "tbf")
	if err != nil || q == nil {
		return nil, err
	}
	t := q.(*netlink.Tbf)
	d := &DirState{RateBits: t.Rate * 8, LimitBytes: t.Limit, BurstBits: uint64(netlink.Xmitsize(t.Rate, t.Buffer)) * 8}
	if st := t.Statistics; st != nil {
		if st.Basic != nil {
			d.Bytes, d.Packets = st.Basic.Bytes, uint64(st.Basic.Packets)
		}
		if st.Queue != nil {
			d.Drops, d.Overlimits, d.Backlog = uint64(st.Queue.Drops), uint64(st.Queue.Overlimits), uint64(st.Queue.Backlog)
		}
	}
	return d, nil
}

// Check compares hostIf's shaping with p: each direction limited at p's rate and queue, or
// not at all, and the redirect to the ifb in place. A difference is ErrMismatch naming it.
func (s *Shaper) Check(hostIf string, p Plan) error {
	st, err := s.Read(hostIf)
	if err != nil {
		return err
	}
	if err := checkDir("ingress", hostIf, st.Ingress, p.Ingress); err != nil {
		return err
	}
	if err := checkDir("egress", hostIf, st.Egress, p.Egress); err != nil {
		return err
	}
	if p.Egress == nil {
		return nil
	}
	link, err := s.h.LinkByName(hostIf)
	if err != nil {
		return fmt.Errorf("check shaping of %s: %w", hostIf, err)
	}
	ifb, err := s.h.LinkByName(IfbName(hostIf))
	if err != nil {
		return fmt.Errorf("check shaping of %s: %w", hostIf, err)
	}
	filters, err := s.h.FilterList(link, ingressHandle)
	if err != nil {
		return fmt.Errorf("check shaping of %s: list ingress filters: %w", hostIf, err)
	}
	for _, f := range filters {
		if f.Attrs().Priority == filterPrio && redirectsTo(f, ifb.Attrs().Index) {
			return nil
		}
	}
	return fmt.Errorf("%w: %s: its ingress is not redirected to %s", ErrMismatch, hostIf, ifb.Attrs().Name)
}

func checkDir(dir, hostIf string, got *DirState, want *Direction) error {
	switch {
	case got == nil && want == nil:
		return nil
	case got == nil:
		return fmt.Errorf("%w: %s: %s should be limited to %d bit/s and is not limited", ErrMismatch, hostIf, dir, want.RateBytes*8)
	case want == nil:
		return fmt.Errorf("%w: %s: %s is limited to %d bit/s and should not be", ErrMismatch, hostIf, dir, got.RateBits)
	case got.RateBits != want.RateBytes*8 || got.LimitBytes != want.LimitBytes:
		return fmt.Errorf("%w: %s: %s is limited to %d bit/s with a %d-byte queue, not %d bit/s with %d bytes",
			ErrMismatch, hostIf, dir, got.RateBits, got.LimitBytes, want.RateBytes*8, want.LimitBytes)
	}
	return nil
}
