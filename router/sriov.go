package router

// SR-IOV networks (issue #14): a container on a network with Mode ipam.ModeSRIOV gets a
// virtual function of the network's PF instead of a veth on a bridge — its netdev moved into
// the container (kernel mode), or, for a VF bound to a userspace driver, its PCI address and a
// device-info file (DPDK mode). The address still comes from the network's IPAM blocks; only
// the datapath differs: no bridge, no VXLAN, no host interface, no gateway. The VF pool
// (datapath/sriov) keeps which VF is whose in the peer's database, so a restart, a kill -9 in
// the middle of an ADD, a DEL after the netns died and GC are all repaired from it.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/sriov"
	"github.com/weftnet/weft/ipam"
)

// SRIOVCapacity is what one PF of this peer can still hand out: Free VFs of either kind
// (FreeDPDK of them bound to a userspace driver) out of Total enabled.
type SRIOVCapacity struct {
	PF       string
	Free     int
	Total    int
	FreeDPDK int
}

// sriovPart is the peer's SR-IOV state: the pool, what programs the PF, where device-info
// files go, and the last discovery of each PF.
type sriovPart struct {
	pool    *sriov.Pool
	pf      sriov.PFConfig
	devinfo sriov.DeviceInfoFiles
	root    string
	log     *slog.Logger

	mu  sync.Mutex              // guards pfs; held through a scan so two scans of a PF never interleave
	pfs map[string]sriov.PFInfo // PF name → last discovery

	// moving is held for reading by every ADD and DEL while it moves or renames a VF, and
	// for writing by a scan: a scan that read a VF under its temporary name mid-move would
	// otherwise record that name after the move finished, and the next ADD would not find
	// the VF's netdev until the following scan.
	moving sync.RWMutex

	// kick (cap 1) tells the rescan loop the network table changed (networksChanged).
	kick chan struct{}
}

// networksChanged wakes the rescan loop to look for PFs new networks name; nil-safe for
// peers built without SR-IOV.
func (s *sriovPart) networksChanged() {
	if s == nil || s.kick == nil {
		return
	}
	select {
	case s.kick <- struct{}{}:
	default: // already woken
	}
}

// recordPF is --sriov-pf-config=record: a stand-in for hosts whose "VFs" have no PF to
// program (the lab's macvlans). It logs every VF setting and remembers it, so reads give
// back what was written; nothing reaches a NIC.
type recordPF struct {
	fake *sriov.FakePF
	log  *slog.Logger
}

func (r recordPF) VF(pf string, vf int) (sriov.VFSettings, error) { return r.fake.VF(pf, vf) }

func (r recordPF) SetVF(pf string, vf int, s sriov.VFSettings) error {
	r.log.Info("sriov: recording stand-in sets vf (no NIC programmed)", "pf", pf, "vf", vf, "settings", fmtVFSettings(s))
	return r.fake.SetVF(pf, vf, s)
}

// fmtVFSettings shows the fields set, for logs.
func fmtVFSettings(s sriov.VFSettings) string {
	out := ""
	add := func(k string, v any) { out += fmt.Sprintf("%s=%v ", k, v) }
	if s.VLAN != nil {
		add("vlan", *s.VLAN)
	}
	if s.QoS != nil {
		add("qos", *s.QoS)
	}
	if s.SpoofChk != nil {
		add("spoofchk", *s.SpoofChk)
	}
	if s.Trust != nil {
		add("trust", *s.Trust)
	}
	if s.LinkState != nil {
		add("link_state", *s.LinkState)
	}
	if s.MinTxRate != nil {
		add("min_tx_rate", *s.MinTxRate)
	}
	if s.MaxTxRate != nil {
		add("max_tx_rate", *s.MaxTxRate)
	}
	return out
}

// pfConfig is the configurator the config chooses.
func (c Config) pfConfig(log *slog.Logger) sriov.PFConfig {
	switch {
	case c.SRIOVPF != nil:
		return c.SRIOVPF
	case c.SRIOVPFConfig == SRIOVPFRecord:
		return recordPF{fake: sriov.NewFakePF(), log: log}
	}
	return sriov.NetlinkPF{}
}

// startSRIOV opens the VF pool on the peer's database, repairs what a kill -9 left, scans the
// PFs the networks and the pool name, and starts the rescan loop (its stop appended to
// stops). Called after the allocator exists and before the control API serves.
func (p *Peer) startSRIOV(ctx context.Context, stops *[]func()) error {
	log := p.log.With("component", "sriov")
	pool, err := sriov.NewPool(sriov.PoolConfig{DB: p.db, Logger: log, Registry: p.reg})
	if err != nil {
		return fmt.Errorf("sriov pool: %w", err)
	}
	root := p.cfg.SysfsRoot
	if root == "" {
		root = sriov.DefaultSysfsRoot
	}
	s := &sriovPart{pool: pool, pf: p.cfg.pfConfig(log), devinfo: sriov.DeviceInfoFiles{Dir: p.cfg.SRIOVDeviceInfoDir},
		root: root, log: log, pfs: map[string]sriov.PFInfo{}, kick: make(chan struct{}, 1)}
	if p.cfg.SRIOVPFConfig == SRIOVPFRecord && p.cfg.SRIOVPF == nil {
		log.Warn("sriov: --sriov-pf-config=record: VF settings (vlan, spoof check, trust, link state, rates) are only logged, no NIC is programmed")
	}
	p.sriov = s
	p.repairSRIOV()
	pfs := p.sriovPFs()
	for _, pf := range pfs {
		s.scan(pf)
	}
	loopCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { p.runSRIOV(loopCtx, pfs) })
	*stops = append(*stops, func() { cancel(); wg.Wait() })
	return nil
}

// sriovPFs is every PF an SR-IOV network names plus every PF the pool holds a VF of, sorted.
// O(networks + owned VFs).
func (p *Peer) sriovPFs() []string {
	set := map[string]bool{}
	for _, n := range p.cluster.Networks() {
		if n.Mode == ipam.ModeSRIOV && n.PF != "" {
			set[n.PF] = true
		}
	}
	for _, r := range p.sriov.pool.Owned() {
		set[r.VF.PF] = true
	}
	out := make([]string, 0, len(set))
	for pf := range set {
		out = append(out, pf)
	}
	sort.Strings(out)
	return out
}

// runSRIOV rediscovers the PFs' VFs when the set of PFs changes and every SRIOVRescan, so
// VFs enabled, rebound or renamed after start reach the pool, and quarantined VFs seen back
// in the host are restored and freed. The set is read again when the datapath loop sees the
// network table change (sriovPart.networksChanged) and at each rescan, not polled: an idle
// peer is not woken every two seconds.
func (p *Peer) runSRIOV(ctx context.Context, last []string) {
	every := p.cfg.SRIOVRescan
	if every <= 0 {
		every = DefaultSRIOVRescan
	}
	rescan := time.NewTicker(every)
	defer rescan.Stop()
	for {
		periodic := false
		select {
		case <-ctx.Done():
			return
		case <-p.sriov.kick:
		case <-rescan.C:
			periodic = true
		}
		pfs := p.sriovPFs()
		if !sriovScanDue(pfs, last, periodic) {
			continue
		}
		last = pfs
		for _, pf := range pfs {
			p.sriov.scan(pf)
		}
	}
}

// sriovScanDue: the PFs are scanned at every periodic rescan and when their set changed.
func sriovScanDue(pfs, last []string, periodic bool) bool {
	return periodic || !slices.Equal(pfs, last)
}

// scan discovers pf's VFs, merges them into the pool and restores the quarantined VFs that
// are back in the host. A PF this host lacks is logged, not an error: SR-IOV networks are
// cluster-wide, PFs are per host.
func (s *sriovPart) scan(pf string) error {
	s.moving.Lock()
	defer s.moving.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	info, err := sriov.Discover(s.root, pf)
	if err != nil {
		if _, had := s.pfs[pf]; had {
			s.log.Warn("sriov: pf no longer discovered", "pf", pf, "err", err)
		}
		delete(s.pfs, pf)
		// Sync with nothing found: free VFs go, owned ones stay marked missing.
		if _, serr := s.pool.Sync(pf, nil); serr != nil {
			s.log.Warn("sriov: sync", "pf", pf, "err", serr)
		}
		return err
	}
	if _, had := s.pfs[pf]; !had {
		s.log.Info("sriov: pf discovered", "pf", pf, "pci", info.PCI, "vfs", info.NumVFs, "total", info.TotalVFs)
	}
	s.pfs[pf] = info
	back, err := s.pool.Sync(pf, info.VFs)
	if err != nil {
		s.log.Warn("sriov: sync", "pf", pf, "err", err)
		return err
	}
	for _, r := range back {
		s.restoreFound(r)
	}
	return nil
}

// restoreFound frees a quarantined VF seen back in the host: a netdev one after its saved
// name, MAC and MTU are back (and the PF settings its ADD changed).
func (s *sriovPart) restoreFound(r sriov.Record) {
	if !r.VF.DPDK() && r.Saved != nil {
		if err := sriov.RestoreFound("", r.VF.Netdev, *r.Saved); err != nil {
			if !errors.Is(err, sriov.ErrNetdevNotFound) {
				s.log.Warn("sriov: could not restore a quarantined vf back in the host", "pci", r.VF.PCI, "netdev", r.VF.Netdev, "err", err)
			}
			return
		}
		s.restorePF(r)
	}
	if err := s.pool.Found(r.VF.PCI); err != nil {
		s.log.Warn("sriov: could not free a restored vf", "pci", r.VF.PCI, "err", err)
	}
}

// restorePF writes back the saved PF-side settings that differ now (what the ADD changed).
func (s *sriovPart) restorePF(r sriov.Record) error {
	if r.Saved == nil {
		return nil
	}
	cur, err := s.pf.VF(r.VF.PF, r.VF.Index)
	if err != nil {
		return fmt.Errorf("read vf %d of %s: %w", r.VF.Index, r.VF.PF, err)
	}
	saved := sriov.SettingsOf(*r.Saved)
	return sriov.RestoreVF(s.pf, r.VF.PF, r.VF.Index, changedSettings(cur, saved), saved)
}

// changedSettings is the fields of saved that cur differs on (set), nil elsewhere: what
// restoring touches. Pure.
func changedSettings(cur, saved sriov.VFSettings) sriov.VFSettings {
	var out sriov.VFSettings
	differ := func(a, b any) bool { return fmt.Sprint(a) != fmt.Sprint(b) }
	if differ(deref(cur.VLAN), deref(saved.VLAN)) || differ(deref(cur.QoS), deref(saved.QoS)) {
		out.VLAN, out.QoS = saved.VLAN, saved.QoS
	}
	if differ(deref(cur.SpoofChk), deref(saved.SpoofChk)) {
		out.SpoofChk = saved.SpoofChk
	}
	if differ(deref(cur.Trust), deref(saved.Trust)) {
		out.Trust = saved.Trust
	}
	if differ(deref(cur.LinkState), deref(saved.LinkState)) {
		out.LinkState = saved.LinkState
	}
	if differ(deref(cur.MinTxRate), deref(saved.MinTxRate)) || differ(deref(cur.MaxTxRate), deref(saved.MaxTxRate)) {
		out.MinTxRate, out.MaxTxRate = saved.MinTxRate, saved.MaxTxRate
	}
	return out
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

// known says whether pf was discovered, and its info.
func (s *sriovPart) known(pf string) (sriov.PFInfo, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	info, ok := s.pfs[pf]
	return info, ok
}

// repairSRIOV undoes the ADDs a kill -9 interrupted (Pending reservations): the VF goes back
// to the host with its saved state — out of the container's netns if it got there — the
// device-info file and the address go, and the VF is released; a VF whose netns is gone is
// quarantined. Runs before the control API serves, so no ADD races it.
func (p *Peer) repairSRIOV() {
	s := p.sriov
	for _, r := range s.pool.Pending() {
		owner := r.Owner
		err := s.restore(r, owner.NetNS)
		switch {
		case errors.Is(err, sriov.ErrNetNSGone), errors.Is(err, sriov.ErrNetdevNotFound):
			if qerr := s.pool.Quarantine(r.VF.PCI, owner); qerr != nil {
				s.log.Warn("sriov: could not quarantine an interrupted ADD's vf", "pci", r.VF.PCI, "err", qerr)
			}
		case err != nil:
			s.log.Warn("sriov: could not restore the vf of an interrupted ADD; it stays reserved", "pci", r.VF.PCI, "owner", owner.String(), "err", err)
			continue
		default:
			if rerr := s.pool.Release(r.VF.PCI, owner); rerr != nil {
				s.log.Warn("sriov: could not release an interrupted ADD's vf", "pci", r.VF.PCI, "err", rerr)
				continue
			}
		}
		key := ipam.Key{ContainerID: owner.ContainerID, IfName: owner.IfName}
		if rec, ok := p.alloc.Get(key); ok && p.isSRIOVNetwork(rec.Network) {
			if _, _, err := p.alloc.Release(key); err != nil {
				s.log.Warn("sriov: could not release an interrupted ADD's address", "container", owner.ContainerID, "err", err)
			}
		}
		s.log.Info("sriov: repaired an ADD interrupted by a restart", "pci", r.VF.PCI, "owner", owner.String())
	}
}

// isSRIOVNetwork says whether the allocator serves network as an SR-IOV one.
func (p *Peer) isSRIOVNetwork(network string) bool {
	n, ok := p.alloc.Network(network)
	return ok && n.Mode == ipam.ModeSRIOV
}

// restore puts an owned VF back as it was before its owner's ADD, out of the netns at
// netnsPath for a netdev VF (ErrNetNSGone when that netns is gone with the VF inside), its
// device-info file removed for a DPDK one. It does not touch the pool.
func (s *sriovPart) restore(r sriov.Record, netnsPath string) error {
	if r.VF.DPDK() {
		if err := s.devinfo.Remove(r.Owner.CNINetwork, r.Owner.ContainerID, r.Owner.IfName); err != nil {
			return err
		}
		return s.restorePF(r)
	}
	if r.Saved == nil {
		return nil // reserved, nothing touched yet
	}
	pfErr := s.restorePF(r)
	if netnsPath == "" {
		netnsPath = r.Owner.NetNS
	}
	err := sriov.MoveOut(sriov.MoveOutRequest{NetNS: netnsPath, IfName: r.Owner.IfName, Saved: *r.Saved})
	if err != nil && netnsPath == "" {
		err = fmt.Errorf("%w: no netns path: %w", sriov.ErrNetNSGone, err)
	}
	return errors.Join(err, pfErr)
}

// sriovSettings is what an ADD programs on the PF for n: the network's VLAN (0 clears a tag
// left by someone else), and a TX rate cap from the egress rate asked. Pure.
func sriovSettings(n ipam.Network, bw *cni.Bandwidth) sriov.VFSettings {
	vlan := n.VLAN
	s := sriov.VFSettings{VLAN: &vlan}
	if bw != nil && bw.EgressRate != 0 {
		mbit := int((bw.EgressRate + 999_999) / 1_000_000) // bit/s up to whole Mbit/s
		s.MaxTxRate = &mbit
	}
	return s
}

// sriovKinds are the kinds of VF an ADD reserves, in the order tried: held is the kind the owner already
// holds (nil: none). DPDKOn: userspace-bound; DPDKOff: a netdev; auto: what it holds, else a
// netdev first and a userspace-bound VF when no netdev is free. Pure.
func sriovKinds(dpdk string, held *bool) []bool {
	switch {
	case held != nil:
		return []bool{*held}
	case dpdk == ipam.DPDKOn:
		return []bool{true}
	case dpdk == ipam.DPDKOff:
		return []bool{false}
	}
	return []bool{false, true}
}

// sriovAdd is cniAdd for an SR-IOV network; the caller checked the request and holds the
// key's lock. Order: checks (nothing changed on refusal), reserve a VF (persisted), save its
// state (persisted) before touching it, take an address, move it in / write the device-info
// file, mark it attached. Any failure undoes the steps done, in reverse.
func (p *Peer) sriovAdd(ctx context.Context, req cni.AttachRequest, network ipam.Network, secondary bool, arrived time.Time) (*cni.AttachResult, error) {
	s := p.sriov
	if s == nil {
		return nil, errCNI(cni.CodePluginNotAvailable, "peer %s has not started its sr-iov pool", p.cfg.Name)
	}
	if req.Bandwidth != nil && (req.Bandwidth.IngressRate != 0 || req.Bandwidth.IngressBurst != 0) {
		return nil, errCNI(types.ErrInvalidNetworkConfig, "sr-iov network %s cannot limit ingress: a vf only caps its tx rate (egress)", network.Name)
	}
	for _, sv := range req.Services {
		if _, _, _, err := parseService(sv); err != nil {
			return nil, errCNI(types.ErrInvalidEnvironmentVariables, "CNI_ARGS WEFT_SERVICES: %v", err)
		}
	}
	owner := sriov.Owner{ContainerID: req.ContainerID, IfName: req.IfName, CNINetwork: req.CNINetwork, NetNS: req.NetNS}
	held, holds := s.pool.Lookup(owner)
	// repeat: an ADD of an attachment already made converges and never undoes it.
	repeat := holds && held.State == sriov.StateAttached
	if holds && held.State == sriov.StateQuarantined {
		return nil, errCNI(types.ErrTryAgainLater, "container %s interface %s still holds vf %s, quarantined since its netns went away", req.ContainerID, req.IfName, held.VF.PCI)
	}
	if !holds {
		// A repeated ADD finds its VF in the container under ifname; a first one must not.
		if err := datapath.Preflight(datapath.Attachment{NetNS: req.NetNS, IfName: req.IfName}); err != nil {
			return nil, err
		}
	}
	info, ok := s.known(network.PF)
	if !ok {
		if err := s.scan(network.PF); err != nil {
			return nil, errCNI(types.ErrTryAgainLater, "sr-iov network %s: pf %s is not usable on peer %s: %v", network.Name, network.PF, p.cfg.Name, err)
		}
		info, _ = s.known(network.PF)
	}
	s.moving.RLock() // after the scan above: no VF of this peer is mid-move while a scan reads sysfs
	defer s.moving.RUnlock()
	var heldKind *bool
	if holds {
		k := held.VF.DPDK()
		heldKind = &k
	}
	var vf sriov.VF
	var err error
	for _, dpdk := range sriovKinds(network.DPDK, heldKind) {
		if vf, err = s.pool.Reserve(owner, network.PF, dpdk); !errors.Is(err, sriov.ErrNoFreeVF) {
			break
		}
	}
	switch {
	case errors.Is(err, sriov.ErrNoFreeVF):
		return nil, errCNI(types.ErrTryAgainLater, "sr-iov network %s: no free vf on pf %s of peer %s (%v)", network.Name, network.PF, p.cfg.Name, err)
	case errors.Is(err, sriov.ErrOwnerConflict):
		return nil, errCNI(types.ErrInvalidEnvironmentVariables, "%v", err)
	case err != nil:
		return nil, err
	}
	// From here every failure undoes what was done, in reverse.
	var undo []func() error
	fail := func(err error) (*cni.AttachResult, error) {
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				p.log.Error("sriov: could not undo a step of a failed ADD", "container", req.ContainerID, "pci", vf.PCI, "err", uerr)
			}
		}
		return nil, err
	}
	if !repeat {
		undo = append(undo, func() error { return s.pool.Release(vf.PCI, owner) })
	}
	settings := sriovSettings(network, req.Bandwidth)
	var saved sriov.NetdevState
	if vf.DPDK() {
		old, err := s.pf.VF(vf.PF, vf.Index)
		if err != nil {
			return fail(fmt.Errorf("read vf %d of %s: %w", vf.Index, vf.PF, err))
		}
		saved = stateOfSettings(old)
	} else if saved, err = sriov.SaveState("", vf.Netdev, s.pf, vf.PF, vf.Index); err != nil && !holds {
		if errors.Is(err, sriov.ErrNetdevNotFound) {
			// The pool's view of the VF's netdev is older than the kernel's; the next scan
			// brings it up to date, so this is worth retrying, not an internal error.
			return fail(errCNI(types.ErrTryAgainLater, "sr-iov network %s: %v (rediscovering)", network.Name, err))
		}
		return fail(err)
	}
	// The first saved state stays (a retry must not save a half-changed one, sriov-cni #212).
	if err := s.pool.SaveState(vf.PCI, saved); err != nil && !errors.Is(err, sriov.ErrWrongState) {
		return fail(err)
	}
	if r, ok := s.pool.Lookup(owner); ok && r.Saved != nil {
		saved = *r.Saved
	}
	rec, existed, err := p.alloc.Allocate(withArrival(ctx, arrived), ipam.Attachment{
		ContainerID: req.ContainerID, IfName: req.IfName, Network: network.Name, CNINetwork: req.CNINetwork,
		Name: nameOr(req.Name, req.ContainerID), NetNS: req.NetNS, MTU: req.MTU, Services: req.Services, Secondary: secondary,
	})
	if err != nil {
		return fail(err)
	}
	if !existed {
		undo = append(undo, func() error { _, _, err := p.alloc.Release(rec.Key()); return err })
	}
	addr := netip.PrefixFrom(rec.Address, network.Subnet.Bits())
	res := &cni.AttachResult{
		ContainerID: req.ContainerID, IfName: req.IfName, NetNS: req.NetNS, PCIID: vf.PCI,
		Address: addr.String(), Network: network.Name, Range: network.Subnet.String(), Secondary: secondary,
		// No Gateway and no DNS: an SR-IOV network has no host bridge to route through nor a
		// resolver on its gateway; the range is on-link on the VF (the address carries its
		// prefix) and the physical network carries it. Its names resolve on other networks.
	}
	if vf.DPDK() {
		if err := sriov.ApplyVF(s.pf, vf.PF, vf.Index, settings, sriov.SettingsOf(saved)); err != nil {
			return fail(err)
		}
		if !repeat {
			undo = append(undo, func() error { return sriov.RestoreVF(s.pf, vf.PF, vf.Index, settings, sriov.SettingsOf(saved)) })
		}
		path, err := s.devinfo.Write(req.CNINetwork, req.ContainerID, req.IfName, vf.PCI, info.PCI)
		if err != nil {
			return fail(err)
		}
		if !repeat {
			undo = append(undo, func() error { return s.devinfo.Remove(req.CNINetwork, req.ContainerID, req.IfName) })
		}
		res.Kind, res.DeviceInfo = cni.KindDPDK, path
	} else {
		mtu := req.MTU
		if mtu == 0 {
			mtu = network.MTU // 0: the VF keeps its own; no overlay overhead on a VF
		}
		moved, err := sriov.MoveIn(sriov.MoveRequest{
			NetNS: req.NetNS, IfName: req.IfName, Saved: saved,
			PF: s.pf, PFName: vf.PF, VFIndex: vf.Index, VF: settings,
			MTU: mtu, Address: addr, Secondary: secondary, Range: network.Subnet,
		})
		if err != nil {
			return fail(sriovMoveError(err))
		}
		if !repeat {
			undo = append(undo, func() error {
				return sriov.MoveOut(sriov.MoveOutRequest{NetNS: req.NetNS, IfName: req.IfName, Saved: saved,
					PF: s.pf, PFName: vf.PF, VFIndex: vf.Index, VF: settings})
			})
		}
		res.Kind, res.ContainerMAC, res.MTU = cni.KindSRIOV, moved.MAC.String(), moved.MTU
	}
	if err := s.pool.Attached(vf.PCI); err != nil {
		return fail(err)
	}
	p.registerName(rec.Name, rec.Address, rec.Services)
	p.log.Info("attached a vf", "container", req.ContainerID, "ifname", req.IfName, "network", network.Name,
		"pci", vf.PCI, "kind", res.Kind, "address", addr, "name", rec.Name)
	return res, nil
}

// stateOfSettings is a saved state holding only PF-side settings (a DPDK VF has no netdev).
func stateOfSettings(s sriov.VFSettings) sriov.NetdevState {
	st := sriov.NetdevState{VLAN: derefOr(s.VLAN), QoS: derefOr(s.QoS), SpoofChk: derefOr(s.SpoofChk), Trust: derefOr(s.Trust),
		LinkState: derefOr(s.LinkState), MinTxRate: derefOr(s.MinTxRate), MaxTxRate: derefOr(s.MaxTxRate)}
	if st.LinkState == "" {
		st.LinkState = "auto"
	}
	return st
}

func derefOr[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

func nameOr(name, id string) string {
	if name == "" {
		return id
	}
	return name
}

// sriovMoveError maps a refused move to its CNI code.
func sriovMoveError(err error) error {
	switch {
	case errors.Is(err, sriov.ErrNetNSGone):
		return errCNI(types.ErrInvalidEnvironmentVariables, "CNI_NETNS: %v", err)
	case errors.Is(err, sriov.ErrNameTaken):
		return errCNI(types.ErrInvalidEnvironmentVariables, "CNI_IFNAME: %v", err)
	case errors.Is(err, sriov.ErrBadMove), errors.Is(err, sriov.ErrBadVFSettings):
		return errCNI(types.ErrInvalidNetworkConfig, "%v", err)
	}
	return err
}

// sriovDetach returns the VF owner holds, if any, to the host: only a record that still
// belongs to that container and ifname (a stale DEL finds none and leaves the VF's new owner
// alone). A netns gone with the VF inside quarantines it and succeeds. The caller holds the
// key's lock; the address is released by detach.
func (p *Peer) sriovDetach(owner sriov.Owner, netnsPath string) error {
	s := p.sriov
	if s == nil {
		return nil
	}
	r, ok := s.pool.Lookup(owner)
	if !ok || r.State == sriov.StateQuarantined {
		return nil
	}
	s.moving.RLock()
	defer s.moving.RUnlock()
	err := s.restore(r, netnsPath)
	switch {
	case errors.Is(err, sriov.ErrNetNSGone), errors.Is(err, sriov.ErrNetdevNotFound):
		// The VF went with its netns (a real one falls back into the host under another
		// name, sriov-cni #349, #447): unusable until a scan finds it back in the host.
		return s.pool.Quarantine(r.VF.PCI, r.Owner)
	case err != nil:
		return err
	}
	if err := s.pool.Release(r.VF.PCI, r.Owner); err != nil && !errors.Is(err, sriov.ErrNotOwner) {
		return err
	}
	p.log.Info("returned a vf to the host", "container", owner.ContainerID, "ifname", owner.IfName, "pci", r.VF.PCI)
	return nil
}

// sriovCheck is cniCheck for an SR-IOV attachment: the VF is the owner's and, for a netdev
// one, in the container under its name with its MAC, MTU and address.
func (p *Peer) sriovCheck(rec ipam.Attachment, network ipam.Network, netnsPath string) (*cni.AttachResult, error) {
	s := p.sriov
	if s == nil {
		return nil, errCNI(cni.CodePluginNotAvailable, "peer %s has not started its sr-iov pool", p.cfg.Name)
	}
	r, ok := s.pool.Lookup(sriov.Owner{ContainerID: rec.ContainerID, IfName: rec.IfName})
	if !ok || r.State != sriov.StateAttached {
		return nil, errCNI(cni.CodeCheckFailed, "container %s interface %s holds no attached vf on peer %s", rec.ContainerID, rec.IfName, p.cfg.Name)
	}
	addr := netip.PrefixFrom(rec.Address, network.Subnet.Bits())
	res := &cni.AttachResult{ContainerID: rec.ContainerID, IfName: rec.IfName, NetNS: netnsPath, PCIID: r.VF.PCI,
		Address: addr.String(), Network: rec.Network, Range: network.Subnet.String(), Secondary: rec.Secondary}
	if r.VF.DPDK() {
		if _, err := s.devinfo.Read(r.Owner.CNINetwork, rec.ContainerID, rec.IfName); err != nil {
			return nil, errCNI(cni.CodeCheckFailed, "device info of vf %s: %v", r.VF.PCI, err)
		}
		res.Kind = cni.KindDPDK
		res.DeviceInfo, _ = s.devinfo.Path(r.Owner.CNINetwork, rec.ContainerID, rec.IfName)
		return res, nil
	}
	if r.Saved == nil {
		return nil, errCNI(cni.CodeCheckFailed, "vf %s has no saved state", r.VF.PCI)
	}
	mtu := rec.MTU
	if mtu == 0 {
		mtu = network.MTU
	}
	if err := sriov.Check(sriov.MoveRequest{NetNS: netnsPath, IfName: rec.IfName, Saved: *r.Saved, MTU: mtu, Address: addr}); err != nil {
		return nil, errCNI(cni.CodeCheckFailed, "vf %s: %v", r.VF.PCI, err)
	}
	res.Kind, res.MTU = cni.KindSRIOV, mtu
	return res, nil
}

// sriovGC returns the VFs of cniNetwork whose owner the runtime no longer lists and that no
// address record led GC to (restore, then release); it appends what it released.
func (p *Peer) sriovGC(req cni.GCRequest, res *cni.GCResult) error {
	s := p.sriov
	if s == nil {
		return nil
	}
	valid := make([]sriov.Owner, 0, len(req.Valid))
	for _, v := range req.Valid {
		valid = append(valid, sriov.Owner{ContainerID: v.ContainerID, IfName: v.IfName})
	}
	var errs []error
	for _, r := range s.pool.GC(valid, req.CNINetwork) {
		key := ipam.Key{ContainerID: r.Owner.ContainerID, IfName: r.Owner.IfName}
		unlock := p.lockKey(key)
		err := p.sriovDetach(r.Owner, r.Owner.NetNS)
		unlock()
		if err != nil {
			errs = append(errs, fmt.Errorf("release vf %s of %s: %w", r.VF.PCI, r.Owner, err))
			continue
		}
		res.Released = append(res.Released, cni.GCAttachment{ContainerID: r.Owner.ContainerID, IfName: r.Owner.IfName})
	}
	return errors.Join(errs...)
}

// sriovCapacity is what each discovered PF of this peer can still hand out (for gossip and
// `weft status peers`), sorted by PF. O(VFs).
func (p *Peer) sriovCapacity() []SRIOVCapacity {
	s := p.sriov
	if s == nil {
		return nil
	}
	s.mu.Lock()
	infos := make([]sriov.PFInfo, 0, len(s.pfs))
	for _, info := range s.pfs {
		infos = append(infos, info)
	}
	s.mu.Unlock()
	out := make([]SRIOVCapacity, 0, len(infos))
	for _, info := range infos {
		c := SRIOVCapacity{PF: info.Name, Total: info.NumVFs}
		// Both counts from the pool: a quarantined or lost VF is not free of either kind.
		c.Free, c.FreeDPDK = s.pool.FreeCounts(info.Name)
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PF < out[j].PF })
	return out
}
