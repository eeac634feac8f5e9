package pathsel

import (
	"fmt"
	"maps"
	"slices"
)

// Classes is the SLA class of every network (NetworkClasses): what a peer runs path
// selection for besides its own class.
type Classes struct {
	// ByNetwork: the class name of every network with a class of its own other than the
	// peer's own (those networks are relayed by that class's selector).
	ByNetwork map[string]string
	// SLAs: the distinct classes of ByNetwork, by name.
	SLAs map[string]SLA
	// OwnServes: some network uses the peer's own class (none of its own, the peer's own
	// class, or a refused one), or there is no network at all.
	OwnServes bool
	// Refused: networks whose class was refused, with the reason; they use the peer's own.
	Refused map[string]string
}

// NetworkClasses decides the class of every network from the networks' SLA texts (network
// → ParseSLA text, "" for none) and the peer's own class: a network without a class, or
// with own, uses own. Refused, and so on own: an unparsable class; a class named like one
// already admitted with other bounds (the first in network-name order wins); a class past
// the first max distinct ones in network-name order; a class named like own with other
// bounds (the metrics' sla label must name one class). Counting never depends on own, so
// every peer, seeing the same replicated networks, admits the same classes and both ends of
// a pair relay a network by the same class. Pure; O(M log M) for M networks.
func NetworkClasses(netSLA map[string]string, own SLA, max int) Classes {
	out := Classes{ByNetwork: map[string]string{}, SLAs: map[string]SLA{}, Refused: map[string]string{},
		OwnServes: len(netSLA) == 0}
	seen := map[string]SLA{} // the distinct classes admitted so far
	for _, network := range slices.Sorted(maps.Keys(netSLA)) {
		text := netSLA[network]
		if text == "" {
			out.OwnServes = true
			continue
		}
		sla, err := ParseSLA(text)
		var why string
		prev, known := seen[sla.Name]
		switch {
		case err != nil:
			why = err.Error()
		case known && prev != sla:
			why = fmt.Sprintf("class %q is already in use with other bounds (%s)", sla.Name, prev)
		case !known && len(seen) >= max:
			why = fmt.Sprintf("more than %d SLA classes among the networks", max)
		}
		if why == "" {
			seen[sla.Name] = sla
			if sla.Name == own.Name && sla != own {
				why = fmt.Sprintf("class %q is this peer's --sla with other bounds (%s)", sla.Name, own)
			}
		}
		if why != "" {
			out.Refused[network] = why
			out.OwnServes = true
			continue
		}
		if sla == own {
			out.OwnServes = true
			continue
		}
		out.ByNetwork[network] = sla.Name
		out.SLAs[sla.Name] = sla
	}
	return out
}
