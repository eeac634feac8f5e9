package pathsel

import (
	"strings"
	"testing"
	"time"
)

// The classes are decided in network-name order, the same on every peer: the first class
// of a name wins, and the bound counts the networks' classes, never the peer's own.
func TestNetworkClasses(t *testing.T) {
	own, _ := ParseSLA("std: loss<=5%")
	const gold, silver = "gold: rtt<=6ms,jitter<=2ms", "silver: rtt<=50ms"
	got := NetworkClasses(map[string]string{
		"z-extra": "bronze: loss<=1%", "voice": gold, "default": "", "media": gold, "bulk": silver,
		"bad": "gold rtt 5ms", "x-clash": "gold: rtt<=9ms", "mine": "std: loss<=5%", "a-own": "std: rtt<=1ms",
	}, own, 3)
	if len(got.SLAs) != 2 || got.SLAs["gold"].MaxRTT != 6*time.Millisecond || got.SLAs["silver"].MaxRTT != 50*time.Millisecond {
		t.Fatalf("classes %v", got.SLAs)
	}
	if len(got.ByNetwork) != 3 || got.ByNetwork["media"] != "gold" || got.ByNetwork["voice"] != "gold" || got.ByNetwork["bulk"] != "silver" {
		t.Fatalf("classes per network %v", got.ByNetwork)
	}
	if !got.OwnServes {
		t.Error("the peer's own class serves default and the refused networks")
	}
	// a-own admits std (rtt<=1ms) and is refused for clashing with own; mine then clashes
	// with a-own's std; bronze is the fourth class.
	for n, why := range map[string]string{"a-own": "this peer's --sla", "bad": "bad SLA", "mine": "already in use",
		"x-clash": "already in use", "z-extra": "more than 3"} {
		if !strings.Contains(got.Refused[n], why) {
			t.Errorf("%s: refusal %q, want it to mention %q", n, got.Refused[n], why)
		}
	}
	if len(got.Refused) != 5 {
		t.Errorf("refused %v", got.Refused)
	}
	// The same networks with another own class admit the same classes.
	other := NetworkClasses(map[string]string{"z-extra": "bronze: loss<=1%", "media": gold, "bulk": silver, "a-own": "std: rtt<=1ms"}, DefaultSLA(), 3)
	if _, ok := other.ByNetwork["z-extra"]; ok || other.ByNetwork["a-own"] != "std" {
		t.Fatalf("the bound must not depend on the peer's own class: %+v", other)
	}

	// A network with the peer's own class, or none, needs no selector of its own.
	got = NetworkClasses(map[string]string{"default": "", "mine": "std: loss<=5%"}, own, 3)
	if len(got.ByNetwork)+len(got.SLAs)+len(got.Refused) != 0 || !got.OwnServes {
		t.Fatalf("%+v", got)
	}
	// Every network with a class of its own: the peer's own class serves none.
	if got := NetworkClasses(map[string]string{"media": gold}, own, 3); got.OwnServes {
		t.Fatal("own class serves no network here")
	}
	if got := NetworkClasses(nil, own, 3); !got.OwnServes {
		t.Fatal("with no network known, the own class serves everything")
	}
}
