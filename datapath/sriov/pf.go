package sriov

import (
	"errors"
	"fmt"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
)

// ErrBadVFSettings marks VF settings that cannot be applied as asked (an unknown link state,
// a VLAN out of range, a negative rate); nothing is changed.
var ErrBadVFSettings = errors.New("bad vf settings")

// VFSettings are a VF's PF-side settings. A nil field is not asked for: it is neither
// applied nor restored. PFConfig.VF fills every field.
type VFSettings struct {
	VLAN      *int    // 0..4094, 0: untagged
	QoS       *int    // 0..7, sent together with VLAN (the kernel takes them as one)
	SpoofChk  *bool   //
	Trust     *bool   //
	LinkState *string // "auto", "enable" or "disable"
	MinTxRate *int    // Mbit/s, 0: none; sent together with MaxTxRate
	MaxTxRate *int    // Mbit/s, 0: none
}

// PFConfig reads and programs a VF's settings on its PF. SetVF applies only the non-nil
// fields of s, in the fixed order VLAN/QoS, spoof check, trust, link state, TX rates.
// Implementations must be safe for concurrent use on different VFs.
type PFConfig interface {
	VF(pf string, vf int) (VFSettings, error)
	SetVF(pf string, vf int, s VFSettings) error
}

// Validate checks s without touching anything.
func (s VFSettings) Validate() error {
	switch {
	case s.VLAN != nil && (*s.VLAN < 0 || *s.VLAN > 4094):
		return fmt.Errorf("%w: vlan %d not in 0..4094", ErrBadVFSettings, *s.VLAN)
	case s.QoS != nil && (*s.QoS < 0 || *s.QoS > 7):
		return fmt.Errorf("%w: qos %d not in 0..7", ErrBadVFSettings, *s.QoS)
	case s.LinkState != nil && linkStateCode(*s.LinkState) < 0:
		return fmt.Errorf("%w: link state %q is not auto, enable or disable", ErrBadVFSettings, *s.LinkState)
	case s.MinTxRate != nil && *s.MinTxRate < 0:
		return fmt.Errorf("%w: min tx rate %d is negative", ErrBadVFSettings, *s.MinTxRate)
	case s.MaxTxRate != nil && *s.MaxTxRate < 0:
		return fmt.Errorf("%w: max tx rate %d is negative", ErrBadVFSettings, *s.MaxTxRate)
	case s.MinTxRate != nil && s.MaxTxRate != nil && *s.MaxTxRate != 0 && *s.MinTxRate > *s.MaxTxRate:
		return fmt.Errorf("%w: min tx rate %d above max %d", ErrBadVFSettings, *s.MinTxRate, *s.MaxTxRate)
	}
	return nil
}

// steps splits s into one VFSettings per kernel call, in the fixed order; VLAN and QoS are
// one step, as are the two rates.
func (s VFSettings) steps() []VFSettings {
	var out []VFSettings
	if s.VLAN != nil || s.QoS != nil {
		out = append(out, VFSettings{VLAN: s.VLAN, QoS: s.QoS})
	}
	if s.SpoofChk != nil {
		out = append(out, VFSettings{SpoofChk: s.SpoofChk})
	}
	if s.Trust != nil {
		out = append(out, VFSettings{Trust: s.Trust})
	}
	if s.LinkState != nil {
		out = append(out, VFSettings{LinkState: s.LinkState})
	}
	if s.MinTxRate != nil || s.MaxTxRate != nil {
		out = append(out, VFSettings{MinTxRate: s.MinTxRate, MaxTxRate: s.MaxTxRate})
	}
	return out
}

// fill returns step with its nil halves of a paired setting (QoS beside VLAN, one rate
// beside the other) taken from old, so one kernel call never resets the other half.
func (step VFSettings) fill(old VFSettings) VFSettings {
	if step.VLAN != nil && step.QoS == nil {
		step.QoS = old.QoS
	}
	if step.QoS != nil && step.VLAN == nil {
		step.VLAN = old.VLAN
	}
	if step.MinTxRate != nil && step.MaxTxRate == nil {
		step.MaxTxRate = old.MaxTxRate
	}
	if step.MaxTxRate != nil && step.MinTxRate == nil {
		step.MinTxRate = old.MinTxRate
	}
	return step
}

// like returns the fields of old that step sets: what undoing step writes back.
func (step VFSettings) like(old VFSettings) VFSettings {
	var u VFSettings
	if step.VLAN != nil || step.QoS != nil {
		u.VLAN, u.QoS = old.VLAN, old.QoS
	}
	if step.SpoofChk != nil {
		u.SpoofChk = old.SpoofChk
	}
	if step.Trust != nil {
		u.Trust = old.Trust
	}
	if step.LinkState != nil {
		u.LinkState = old.LinkState
	}
	if step.MinTxRate != nil || step.MaxTxRate != nil {
		u.MinTxRate, u.MaxTxRate = old.MinTxRate, old.MaxTxRate
	}
	return u
}

// ApplyVF programs want on VF vf of pf one setting at a time, in the fixed order, with old
// (the settings before, as PFConfig.VF read them) as what to restore. On a failure it
// restores the steps already done in reverse and returns the error (and any restore
// error joined). Only the fields set in want are touched.
func ApplyVF(c PFConfig, pf string, vf int, want, old VFSettings) error {
	if err := want.Validate(); err != nil {
		return err
	}
	var done []VFSettings
	for _, step := range want.steps() {
		step = step.fill(old)
		if err := c.SetVF(pf, vf, step); err != nil {
			err = fmt.Errorf("set vf %d of %s: %w", vf, pf, err)
			for i := len(done) - 1; i >= 0; i-- {
				if rerr := c.SetVF(pf, vf, done[i].like(old)); rerr != nil {
					err = errors.Join(err, fmt.Errorf("restore vf %d of %s: %w", vf, pf, rerr))
				}
			}
			return err
		}
		done = append(done, step)
	}
	return nil
}

// RestoreVF writes back the fields of old that want set (what ApplyVF changed), in reverse
// order, trying every step even when one fails.
func RestoreVF(c PFConfig, pf string, vf int, want, old VFSettings) error {
	steps := want.steps()
	var errs []error
	for i := len(steps) - 1; i >= 0; i-- {
		if err := c.SetVF(pf, vf, steps[i].like(old)); err != nil {
			errs = append(errs, fmt.Errorf("restore vf %d of %s: %w", vf, pf, err))
		}
	}
	return errors.Join(errs...)
}

// SettingsOf returns the PF-side part of a saved state, every field set.
func SettingsOf(s NetdevState) VFSettings {
	return VFSettings{VLAN: settingPtr(s.VLAN), QoS: settingPtr(s.QoS), SpoofChk: settingPtr(s.SpoofChk),
		Trust: settingPtr(s.Trust), LinkState: settingPtr(s.LinkState), MinTxRate: settingPtr(s.MinTxRate),
		MaxTxRate: settingPtr(s.MaxTxRate)}
}

func settingPtr[T any](v T) *T { return &v }

func settingVal[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

func linkStateCode(s string) int {
	switch s {
	case "auto":
		return nl.IFLA_VF_LINK_STATE_AUTO
	case "enable":
		return nl.IFLA_VF_LINK_STATE_ENABLE
	case "disable":
		return nl.IFLA_VF_LINK_STATE_DISABLE
	}
	return -1
}

func linkStateName(c uint32) string {
	switch c {
	case nl.IFLA_VF_LINK_STATE_ENABLE:
		return "enable"
	case nl.IFLA_VF_LINK_STATE_DISABLE:
		return "disable"
	}
	return "auto"
}

// NetlinkPF is PFConfig through rtnetlink on the PF's netdev (ip link set PF vf N …).
type NetlinkPF struct {
	// Handle is a netlink handle in the PF's namespace; nil: the calling thread's namespace.
	Handle *netlink.Handle
}

func (p NetlinkPF) handle() *netlink.Handle {
	if p.Handle == nil {
		return &netlink.Handle{}
	}
	return p.Handle
}

// VF reads VF vf's settings from the PF's IFLA_VFINFO_LIST.
func (p NetlinkPF) VF(pf string, vf int) (VFSettings, error) {
	l, err := p.handle().LinkByName(pf)
	if err != nil {
		return VFSettings{}, fmt.Errorf("pf %s: %w", pf, err)
	}
	for _, v := range l.Attrs().Vfs {
		if v.ID == vf {
			return VFSettings{VLAN: settingPtr(v.Vlan), QoS: settingPtr(v.Qos), SpoofChk: settingPtr(v.Spoofchk),
				Trust: settingPtr(v.Trust != 0), LinkState: settingPtr(linkStateName(v.LinkState)),
				MinTxRate: settingPtr(int(v.MinTxRate)), MaxTxRate: settingPtr(int(v.MaxTxRate))}, nil
		}
	}
	return VFSettings{}, fmt.Errorf("pf %s has no vf %d", pf, vf)
}

// SetVF applies the non-nil fields of s in the fixed order. It does not undo on failure:
// ApplyVF calls it one step at a time and owns the undo.
func (p NetlinkPF) SetVF(pf string, vf int, s VFSettings) error {
	if err := s.Validate(); err != nil {
		return err
	}
	h := p.handle()
	l, err := h.LinkByName(pf)
	if err != nil {
		return fmt.Errorf("pf %s: %w", pf, err)
	}
	if s.VLAN != nil || s.QoS != nil {
		if err := h.LinkSetVfVlanQos(l, vf, settingVal(s.VLAN), settingVal(s.QoS)); err != nil {
			return fmt.Errorf("vlan %d qos %d: %w", settingVal(s.VLAN), settingVal(s.QoS), err)
		}
	}
	if s.SpoofChk != nil {
		if err := h.LinkSetVfSpoofchk(l, vf, *s.SpoofChk); err != nil {
			return fmt.Errorf("spoofchk %v: %w", *s.SpoofChk, err)
		}
	}
	if s.Trust != nil {
		if err := h.LinkSetVfTrust(l, vf, *s.Trust); err != nil {
			return fmt.Errorf("trust %v: %w", *s.Trust, err)
		}
	}
	if s.LinkState != nil {
		if err := h.LinkSetVfState(l, vf, uint32(linkStateCode(*s.LinkState))); err != nil {
			return fmt.Errorf("link state %s: %w", *s.LinkState, err)
		}
	}
	if s.MinTxRate != nil || s.MaxTxRate != nil {
		if err := h.LinkSetVfRate(l, vf, settingVal(s.MinTxRate), settingVal(s.MaxTxRate)); err != nil {
			return fmt.Errorf("tx rate %d..%d: %w", settingVal(s.MinTxRate), settingVal(s.MaxTxRate), err)
		}
	}
	return nil
}

// ErrInjected is the failure FakePF returns on its FailOn-th call.
var ErrInjected = errors.New("injected pf failure")

// FakePF is a recording PFConfig for tests: it keeps each VF's settings in memory, records
// every SetVF call, and fails the FailOn-th SetVF call (1-based; 0: never). Safe for
// concurrent use.
type FakePF struct {
	FailOn int

	mu    sync.Mutex // guards the fields below
	vfs   map[fakeKey]VFSettings
	calls []FakeCall
}

// FakeCall is one recorded SetVF call.
type FakeCall struct {
	PF       string
	VF       int
	Settings VFSettings
	Err      error
}

type fakeKey struct {
	pf string
	vf int
}

// NewFakePF returns a fake whose every VF starts with the kernel's defaults: untagged,
// spoof check on, untrusted, link state auto, no rates.
func NewFakePF() *FakePF { return &FakePF{vfs: map[fakeKey]VFSettings{}} }

func defaultVF() VFSettings {
	return VFSettings{VLAN: settingPtr(0), QoS: settingPtr(0), SpoofChk: settingPtr(true), Trust: settingPtr(false),
		LinkState: settingPtr("auto"), MinTxRate: settingPtr(0), MaxTxRate: settingPtr(0)}
}

// VF returns the VF's current settings.
func (f *FakePF) VF(pf string, vf int) (VFSettings, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.vfs[fakeKey{pf, vf}]
	if !ok {
		s = defaultVF()
	}
	return copySettings(s), nil
}

// SetVF records the call and applies s, unless this is the FailOn-th call.
func (f *FakePF) SetVF(pf string, vf int, s VFSettings) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := FakeCall{PF: pf, VF: vf, Settings: copySettings(s)}
	if err := s.Validate(); err != nil {
		c.Err = err
	} else if f.FailOn > 0 && len(f.calls)+1 == f.FailOn {
		c.Err = ErrInjected
	}
	f.calls = append(f.calls, c)
	if c.Err != nil {
		return c.Err
	}
	k := fakeKey{pf, vf}
	cur, ok := f.vfs[k]
	if !ok {
		cur = defaultVF()
	}
	if s.VLAN != nil {
		cur.VLAN = settingPtr(*s.VLAN)
	}
	if s.QoS != nil {
		cur.QoS = settingPtr(*s.QoS)
	}
	if s.SpoofChk != nil {
		cur.SpoofChk = settingPtr(*s.SpoofChk)
	}
	if s.Trust != nil {
		cur.Trust = settingPtr(*s.Trust)
	}
	if s.LinkState != nil {
		cur.LinkState = settingPtr(*s.LinkState)
	}
	if s.MinTxRate != nil {
		cur.MinTxRate = settingPtr(*s.MinTxRate)
	}
	if s.MaxTxRate != nil {
		cur.MaxTxRate = settingPtr(*s.MaxTxRate)
	}
	f.vfs[k] = cur
	return nil
}

// Calls returns every SetVF call so far, failed ones included.
func (f *FakePF) Calls() []FakeCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]FakeCall(nil), f.calls...)
}

func copySettings(s VFSettings) VFSettings {
	c := func(p *int) *int {
		if p == nil {
			return nil
		}
		return settingPtr(*p)
	}
	var out VFSettings
	out.VLAN, out.QoS, out.MinTxRate, out.MaxTxRate = c(s.VLAN), c(s.QoS), c(s.MinTxRate), c(s.MaxTxRate)
	if s.SpoofChk != nil {
		out.SpoofChk = settingPtr(*s.SpoofChk)
	}
	if s.Trust != nil {
		out.Trust = settingPtr(*s.Trust)
	}
	if s.LinkState != nil {
		out.LinkState = settingPtr(*s.LinkState)
	}
	return out
}
