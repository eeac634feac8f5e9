package router

import (
	"log/slog"
	"maps"
	"slices"
	"time"

	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh/pathsel"
)

// SLA classes per network: a network may carry a class of its own (ipam.Network.SLA), so
// that media is gold while std is best effort. Path choice runs once per distinct class in
// use — one pathsel.Selector each, all fed the same links and destinations — and each
// network's traffic takes the relays of its class (plan.Input.NetRelays). The peer's own
// class (--sla) is paths.def, which also serves every network without a class of its own;
// when no network has one, def is the only selector and nothing here costs anything.
// Networks are replicated, so both ends of a pair run the same class for a network and,
// from the same link state, choose mirror paths per network.

// maxSLAClasses bounds the networks' own classes (selectors beyond def): every class costs
// a selector fed every link, O(K × links) memory and feed time. The first maxSLAClasses
// distinct classes in network-name order are served — the same on every peer, as every
// peer sees the same network list; a network whose class comes later uses the peer's own
// class, with a counted, logged refusal.
const maxSLAClasses = 8

// slaClass is path selection for one SLA class: its selector, and its choices and relays
// as of its last Select (those two guarded by paths.mu).
type slaClass struct {
	sel     *pathsel.Selector
	sla     pathsel.SLA
	choices map[string]pathsel.Choice
	relays  map[string]string // destination → relay, for relayed destinations
}

func newSLAClass(self string, sla pathsel.SLA, est pathsel.Estimator) (*slaClass, error) {
	sel, err := pathsel.New(pathsel.Config{Self: self, SLA: sla, Estimator: est})
	if err != nil {
		return nil, err
	}
	return &slaClass{sel: sel, sla: sla, choices: map[string]pathsel.Choice{}, relays: map[string]string{}}, nil
}

// allClasses is def followed by the networks' classes in name order. O(K log K).
func (pt *paths) allClasses() []*slaClass {
	pt.classMu.Lock()
	defer pt.classMu.Unlock()
	out := make([]*slaClass, 0, 1+len(pt.classes))
	out = append(out, pt.def)
	for _, name := range slices.Sorted(maps.Keys(pt.classes)) {
		out = append(out, pt.classes[name])
	}
	return out
}

// setLinkLocked gives a link to every selector (classMu held); def's error is the one
// reported, the others validate the same way. O(K × D).
func (pt *paths) setLinkLocked(from, to string, l pathsel.Link) error {
	err := pt.def.sel.SetLink(from, to, l)
	for _, cl := range pt.classes {
		_ = cl.sel.SetLink(from, to, l) // same input, same verdict as def's
	}
	return err
}

func (pt *paths) removeLinkLocked(from, to string) {
	pt.def.sel.RemoveLink(from, to)
	for _, cl := range pt.classes {
		cl.sel.RemoveLink(from, to)
	}
}

// removePeer forgets a peer's links in every selector. O(K × D²) at worst.
func (pt *paths) removePeer(name string) {
	pt.classMu.Lock()
	defer pt.classMu.Unlock()
	pt.def.sel.RemovePeer(name)
	for _, cl := range pt.classes {
		cl.sel.RemovePeer(name)
	}
}

// setDestinations gives every selector the destinations (each keeps the map: dests must not
// be modified afterwards). O(K × N).
func (pt *paths) setDestinations(dests map[string]pathsel.Dest) {
	pt.classMu.Lock()
	defer pt.classMu.Unlock()
	pt.dests = dests
	pt.def.sel.SetDestinations(dests)
	for _, cl := range pt.classes {
		cl.sel.SetDestinations(dests)
	}
}

// selectAll runs every selector and takes in the choices that changed: the metrics (the
// path figures are def's; SLA health and violations are per class) and each class's
// relays. It returns def's relays (a copy) and whether any class's relays changed, or a
// class came or went. O(K × changed × D).
func (pt *paths) selectAll(now time.Time) (map[string]string, bool) {
	classes := pt.allClasses()
	changed := make([]map[string]pathsel.Choice, len(classes))
	for i, cl := range classes {
		changed[i] = cl.sel.Select(now)
	}
	pt.mu.Lock()
	defer pt.mu.Unlock()
	relaysChanged := pt.classesMoved
	pt.classesMoved = false
	for i, cl := range classes {
		if pt.takeChoices(cl, cl == pt.def, changed[i]) {
			relaysChanged = true
		}
	}
	// Choices whose reason alone moved (a hold's progress) are refreshed for status only
	// when asked: routes() reads the selectors.
	return maps.Clone(pt.def.relays), relaysChanged
}

// takeChoices records one class's changed choices and forgets destinations gone (pt.mu
// held); figures says whether the class's figures go to the per-peer path metrics (def's
// only: the path figures of a peer have no class label). O(changed + choices).
func (pt *paths) takeChoices(cl *slaClass, figures bool, changed map[string]pathsel.Choice) bool {
	relaysChanged := false
	for name := range cl.choices {
		if _, ok := pt.dests[name]; ok {
			continue
		}
		if _, relayed := cl.relays[name]; relayed {
			relaysChanged = true
		}
		delete(cl.choices, name)
		delete(cl.relays, name)
		pt.slaOK.DeleteLabelValues(name, cl.sla.Name)
		if figures {
			pt.rtt.DeleteLabelValues(name)
			pt.jitter.DeleteLabelValues(name)
			pt.loss.DeleteLabelValues(name)
			pt.hops.DeleteLabelValues(name)
			pt.estimated.DeleteLabelValues(name)
		}
	}
	for name, c := range changed {
		prev, had := cl.choices[name]
		if c.Switch != "" {
			pt.switches.WithLabelValues(c.Switch).Inc()
			if pt.log != nil { // switches are rare once the policy holds; each is worth a line
				pt.log.Info("path switch", "peer", name, "sla", cl.sla.Name, "from", prev.Path, "to", c.Path,
					"why", c.Switch, "reason", c.Reason)
			}
		}
		cl.choices[name] = c
		was, relayed := cl.relays[name]
		if len(c.Path) == 2 {
			cl.relays[name] = c.Path[0]
			relaysChanged = relaysChanged || !relayed || was != c.Path[0]
		} else {
			delete(cl.relays, name)
			relaysChanged = relaysChanged || relayed
		}
		if !c.SLAOK && !c.Unmeasured && len(c.Path) > 0 && (!had || prev.SLAOK) {
			pt.violations.WithLabelValues(name, cl.sla.Name).Inc()
		}
		ok := 0.0
		if c.SLAOK {
			ok = 1
		}
		pt.slaOK.WithLabelValues(name, cl.sla.Name).Set(ok)
		if !figures {
			continue
		}
		pt.rtt.WithLabelValues(name).Set(c.RTT.Seconds())
		pt.jitter.WithLabelValues(name).Set(c.Jitter.Seconds())
		pt.loss.WithLabelValues(name).Set(c.Loss)
		pt.hops.WithLabelValues(name).Set(float64(len(c.Path)))
		est := 0.0
		switch {
		case c.Estimated:
			est = 1
		case c.Unmeasured:
			est = 2
		}
		pt.estimated.WithLabelValues(name).Set(est)
	}
	return relaysChanged
}

// netRelays are the relays of every network with a class of its own (plan.Input.NetRelays),
// nil when there is none. O(M + K·N).
func (pt *paths) netRelays() map[string]map[string]string {
	pt.classMu.Lock()
	defer pt.classMu.Unlock()
	if len(pt.netClass) == 0 {
		return nil
	}
	pt.mu.Lock()
	defer pt.mu.Unlock()
	byClass := make(map[string]map[string]string, len(pt.classes))
	out := make(map[string]map[string]string, len(pt.netClass))
	for network, class := range pt.netClass {
		r, ok := byClass[class]
		if !ok {
			r = maps.Clone(pt.classes[class].relays)
			byClass[class] = r
		}
		out[network] = r // shared between a class's networks; nobody writes it
	}
	return out
}

// syncClasses brings the selectors in line with the networks' classes (runDatapath calls it
// when the network list changed): a class newly in use gets a selector seeded with every
// link known and the destinations (O(N × D)), a class no longer in use goes with its
// metrics. Refusals are logged and counted once per network and value. It says whether
// anything changed (the relays per network must then be applied again).
func (pt *paths) syncClasses(log *slog.Logger, nets []ipam.Network) bool {
	slaOf := make(map[string]string, len(nets))
	for _, n := range nets {
		slaOf[n.Name] = n.SLA
	}
	dec := pathsel.NetworkClasses(slaOf, pt.def.sla, maxSLAClasses)
	netClass, want, ownServes, refused := dec.ByNetwork, dec.SLAs, dec.OwnServes, dec.Refused
	for network, why := range refused {
		if pt.classRefused[network] == slaOf[network] {
			continue
		}
		pt.classRefused[network] = slaOf[network]
		pt.refusedClasses.Inc()
		log.Error("network's SLA class refused; it uses this peer's --sla class", "network", network,
			"sla", slaOf[network], "peer_sla", pt.def.sla.String(), "reason", why)
	}
	for network := range pt.classRefused {
		if _, still := refused[network]; !still {
			delete(pt.classRefused, network)
		}
	}
	pt.classMu.Lock()
	defer pt.classMu.Unlock()
	moved := !maps.Equal(netClass, pt.netClass) || ownServes != pt.defServes
	var gone []*slaClass
	for name, cl := range pt.classes {
		if sla, ok := want[name]; !ok || sla != cl.sla {
			gone = append(gone, cl)
			delete(pt.classes, name)
			moved = true
			log.Info("SLA class no longer used by any network; its path selection stops", "sla", cl.sla.String())
		}
	}
	var links map[string]map[string]pathsel.Link // read once, for every new class
	for _, name := range slices.Sorted(maps.Keys(want)) {
		if _, ok := pt.classes[name]; ok {
			continue
		}
		cl, err := newSLAClass(pt.def.sel.Self(), want[name], pt.est)
		if err != nil { // a parsed SLA always fits a selector: only a bug gets here
			log.Error("path selection for an SLA class", "sla", want[name].String(), "err", err)
			continue
		}
		if links == nil {
			links = pt.def.sel.Links()
		}
		for from, tos := range links {
			for to, l := range tos {
				_ = cl.sel.SetLink(from, to, l) // def took them: valid and within bounds
			}
		}
		cl.sel.SetDestinations(pt.dests)
		pt.classes[name] = cl
		moved = true
		var served []string
		for n, c := range netClass {
			if c == name {
				served = append(served, n)
			}
		}
		slices.Sort(served)
		log.Info("path selection for a network's SLA class", "sla", cl.sla.String(), "networks", served)
	}
	pt.netClass, pt.defServes = netClass, ownServes
	pt.mu.Lock()
	defer pt.mu.Unlock()
	for _, cl := range gone {
		for name := range cl.choices {
			pt.slaOK.DeleteLabelValues(name, cl.sla.Name)
			pt.violations.DeleteLabelValues(name, cl.sla.Name)
		}
	}
	if moved {
		pt.classesMoved = true
	}
	return moved
}
