package sriov

import (
	"errors"
	"strings"
	"testing"
)

func callStrings(calls []FakeCall) []string {
	var out []string
	for _, c := range calls {
		s := fmtSettings(c.Settings)
		if c.Err != nil {
			s += " FAIL"
		}
		out = append(out, s)
	}
	return out
}

func wantCalls(t *testing.T, got []FakeCall, want ...VFSettings) {
	t.Helper()
	g := callStrings(got)
	if len(g) != len(want) {
		t.Fatalf("%d pf calls, want %d:\n%s", len(g), len(want), strings.Join(g, "\n"))
	}
	for i, w := range want {
		if strings.TrimSuffix(g[i], " FAIL") != fmtSettings(w) {
			t.Errorf("pf call %d: %s, want %s", i+1, g[i], fmtSettings(w))
		}
	}
}

var allAsked = VFSettings{VLAN: settingPtr(100), SpoofChk: settingPtr(false), Trust: settingPtr(true),
	LinkState: settingPtr("enable"), MaxTxRate: settingPtr(500)}

// One call per setting, in the fixed order; the paired half not asked (QoS, min rate) is
// sent as it was, so the call does not reset it.
func TestApplyVFOrder(t *testing.T) {
	f := NewFakePF()
	old, _ := f.VF("pf0", 3)
	*old.QoS = 2 // as if the PF had QoS 2 before
	if err := ApplyVF(f, "pf0", 3, allAsked, old); err != nil {
		t.Fatal(err)
	}
	wantCalls(t, f.Calls(),
		VFSettings{VLAN: settingPtr(100), QoS: settingPtr(2)},
		VFSettings{SpoofChk: settingPtr(false)},
		VFSettings{Trust: settingPtr(true)},
		VFSettings{LinkState: settingPtr("enable")},
		VFSettings{MinTxRate: settingPtr(0), MaxTxRate: settingPtr(500)},
	)
	for _, c := range f.Calls() {
		if c.PF != "pf0" || c.VF != 3 {
			t.Errorf("call to %s vf %d, want pf0 vf 3", c.PF, c.VF)
		}
	}
}

func TestApplyVFOnlyAsked(t *testing.T) {
	f := NewFakePF()
	old, _ := f.VF("pf0", 0)
	if err := ApplyVF(f, "pf0", 0, VFSettings{Trust: settingPtr(true)}, old); err != nil {
		t.Fatal(err)
	}
	wantCalls(t, f.Calls(), VFSettings{Trust: settingPtr(true)})
	if err := ApplyVF(f, "pf0", 0, VFSettings{}, old); err != nil {
		t.Fatal(err)
	}
	if n := len(f.Calls()); n != 1 {
		t.Errorf("nothing asked made %d more calls", n-1)
	}
}

// A failure on the Nth call restores the N-1 steps done, in reverse, with the old values.
func TestApplyVFRestoresInReverse(t *testing.T) {
	for failOn := 1; failOn <= 5; failOn++ {
		f := NewFakePF()
		old, _ := f.VF("pf0", 1)
		f.FailOn = failOn
		err := ApplyVF(f, "pf0", 1, allAsked, old)
		if !errors.Is(err, ErrInjected) {
			t.Fatalf("fail on %d: %v, want ErrInjected", failOn, err)
		}
		steps := allAsked.steps()
		want := make([]VFSettings, 0, 2*failOn)
		for i := 0; i < failOn; i++ {
			want = append(want, steps[i].fill(old))
		}
		for i := failOn - 2; i >= 0; i-- {
			want = append(want, steps[i].like(old))
		}
		wantCalls(t, f.Calls(), want...)
		if got, _ := f.VF("pf0", 1); !sameSettings(got, old) {
			t.Errorf("fail on %d: settings %s, want %s", failOn, fmtSettings(got), fmtSettings(old))
		}
	}
}

// RestoreVF tries every step, in reverse, even after one fails.
func TestRestoreVFContinues(t *testing.T) {
	f := NewFakePF()
	old, _ := f.VF("pf0", 0)
	if err := ApplyVF(f, "pf0", 0, allAsked, old); err != nil {
		t.Fatal(err)
	}
	f.FailOn = 7 // the second restore call
	err := RestoreVF(f, "pf0", 0, allAsked, old)
	if !errors.Is(err, ErrInjected) {
		t.Fatalf("RestoreVF: %v, want ErrInjected", err)
	}
	calls := f.Calls()[5:]
	if len(calls) != 5 {
		t.Fatalf("%d restore calls, want 5", len(calls))
	}
	if calls[0].Settings.MaxTxRate == nil || calls[4].Settings.VLAN == nil {
		t.Errorf("restore order: %v, want rates first and vlan last", callStrings(calls))
	}
	got, _ := f.VF("pf0", 0)
	if *got.VLAN != 0 || *got.LinkState != "enable" {
		t.Errorf("after a partial restore: %s, want vlan 0 and link state still enable", fmtSettings(got))
	}
}

func TestVFSettingsValidate(t *testing.T) {
	bad := []VFSettings{
		{VLAN: settingPtr(4095)}, {VLAN: settingPtr(-1)}, {QoS: settingPtr(8)}, {LinkState: settingPtr("up")},
		{MinTxRate: settingPtr(-1)}, {MaxTxRate: settingPtr(-5)}, {MinTxRate: settingPtr(100), MaxTxRate: settingPtr(50)},
	}
	for _, s := range bad {
		f := NewFakePF()
		old, _ := f.VF("pf0", 0)
		if err := ApplyVF(f, "pf0", 0, s, old); !errors.Is(err, ErrBadVFSettings) {
			t.Errorf("%s: %v, want ErrBadVFSettings", fmtSettings(s), err)
		}
		if n := len(f.Calls()); n != 0 {
			t.Errorf("%s: %d pf calls, want none", fmtSettings(s), n)
		}
		if err := (NetlinkPF{}).SetVF("wsk-no-such-pf", 0, s); !errors.Is(err, ErrBadVFSettings) {
			t.Errorf("netlink SetVF %s: %v, want ErrBadVFSettings", fmtSettings(s), err)
		}
	}
	good := VFSettings{VLAN: settingPtr(4094), QoS: settingPtr(7), LinkState: settingPtr("disable"), MinTxRate: settingPtr(10), MaxTxRate: settingPtr(0)}
	if err := good.Validate(); err != nil {
		t.Errorf("%s: %v", fmtSettings(good), err)
	}
}

// NetlinkPF on a stand-in PF (a veth, no VFs) reads no VF and names it.
func TestNetlinkPFNoVF(t *testing.T) {
	l := newMoveLab(t)
	_, err := NetlinkPF{Handle: l.host}.VF(labPF, 0)
	if err == nil || !strings.Contains(err.Error(), "no vf 0") {
		t.Errorf("VF of a veth: %v, want an error naming vf 0", err)
	}
	if _, err := (NetlinkPF{Handle: l.host}).VF("wsk-missing", 0); err == nil {
		t.Error("VF of a missing pf: no error")
	}
}
