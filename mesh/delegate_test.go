package mesh

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

func TestStateLoopEvery(t *testing.T) {
	for _, tc := range []struct {
		probe, retention, want time.Duration
	}{
		{time.Second, time.Hour, time.Minute},                                    // the default: prune once a minute
		{time.Second, 5 * time.Minute, 30 * time.Second},                         // a tenth of the retention
		{time.Second, 2 * time.Second, time.Second},                              // never faster than the probe interval
		{time.Second, 0, time.Minute},                                            // nothing to prune
		{0, time.Millisecond, 10 * time.Millisecond},                             // a floor for a zero probe interval
		{100 * time.Millisecond, 200 * time.Millisecond, 100 * time.Millisecond}, // tests' short settings
	} {
		if got := stateLoopEvery(tc.probe, tc.retention); got != tc.want {
			t.Errorf("stateLoopEvery(%v, %v) = %v, want %v", tc.probe, tc.retention, got, tc.want)
		}
	}
}

// A new pin is saved at once, not at the state loop's (now slow) tick.
func TestNewPinSavedPromptly(t *testing.T) {
	pins := filepath.Join(t.TempDir(), "keypins.json")
	cfg, _ := testConfig(t, "pin-now")
	cfg.PinsPath = pins
	cfg.ProbeInterval = time.Second // state loop ticks every minute (DeadPeerRetention 1h)
	m := startMesh(t, cfg)
	if _, err := os.Stat(pins); err == nil {
		t.Fatal("pins file before any peer was pinned")
	}
	pin := func(name string) {
		md := Metadata{Name: name, Underlay: netip.MustParseAddr("127.0.0.9"), PublicKey: testIdentity(name).Public()}
		b, err := md.Encode()
		if err != nil {
			t.Fatal(err)
		}
		if err := (delegate{m}).NotifyAlive(&memberlist.Node{Name: name, Meta: b}); err != nil {
			t.Fatal(err)
		}
	}
	saved := func(name string) bool {
		b, err := os.ReadFile(pins)
		return err == nil && strings.Contains(string(b), `"`+name+`"`)
	}
	waitSaved := func(name string) {
		deadline := time.Now().Add(5 * time.Second)
		for !saved(name) {
			if time.Now().After(deadline) {
				t.Fatalf("pin of %s not saved 5 s after it was made", name)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	pin("b")
	waitSaved("b")
	// A second pin right after a save waits out pinsFlushGap, then is saved too.
	pin("c")
	waitSaved("c")
}
