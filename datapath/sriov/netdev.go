package sriov

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

var (
	// ErrNetNSGone: the container's network namespace no longer exists. A real VF netdev
	// then falls back to the initial namespace with the container's MAC, under its container
	// name (eth0, net1) or dev<N> when that is taken, so the caller quarantines the VF until
	// it is found (by PCI address in sysfs) and restored.
	ErrNetNSGone = errors.New("container netns gone")
	// ErrNetdevNotFound: the VF's netdev is neither where it was asked to be nor anywhere
	// weft would have left it.
	ErrNetdevNotFound = errors.New("vf netdev not found")
	// ErrNameTaken: another link holds a name the VF netdev must take.
	ErrNameTaken = errors.New("interface name taken")
	// ErrBadMove marks a request that cannot be carried out as written; nothing is changed.
	ErrBadMove = errors.New("bad vf move request")
)

// MoveRequest asks to move a VF's netdev into a container and configure it there.
type MoveRequest struct {
	HostNS string // path of the host's netns; "": the calling thread's namespace
	NetNS  string // path of the container's netns
	IfName string // name in the container (CNI_IFNAME)
	// Saved is the state SaveState read before anything changed; Saved.Name is the netdev's
	// name in the host namespace.
	Saved NetdevState

	// PF programs the VF's settings on its PF; nil: no PF-side settings.
	PF      PFConfig
	PFName  string
	VFIndex int
	VF      VFSettings // only the non-nil fields are applied

	MAC     net.HardwareAddr // nil: keep the VF's MAC
	MTU     int              // 0: keep the VF's MTU
	Address netip.Prefix
	Gateway netip.Addr // invalid: no route via a gateway
	// Secondary: no default route, only a route to Range via Gateway when the address's
	// on-link prefix does not cover it (as datapath.Attachment.Secondary).
	Secondary bool
	Range     netip.Prefix
}

// Result is the VF netdev as MoveIn left it in the container.
type Result struct {
	Index int // ifindex in the container
	MAC   net.HardwareAddr
	MTU   int
}

// MoveOutRequest asks to return a VF's netdev from a container to the host namespace.
type MoveOutRequest struct {
	HostNS string // "": the calling thread's namespace
	NetNS  string
	IfName string
	Saved  NetdevState
	// PF, when set, gets back the saved settings of the fields VF set (what MoveIn applied),
	// even when the container's netns is gone.
	PF      PFConfig
	PFName  string
	VFIndex int
	VF      VFSettings
}

func (r MoveRequest) validate() error {
	switch {
	case r.NetNS == "":
		return fmt.Errorf("%w: no container netns", ErrBadMove)
	case !moveIfNameOK(r.IfName):
		return fmt.Errorf("%w: interface name %q", ErrBadMove, r.IfName)
	case !moveIfNameOK(r.Saved.Name):
		return fmt.Errorf("%w: saved host name %q", ErrBadMove, r.Saved.Name)
	case len(r.Saved.MAC) == 0 || r.Saved.MTU <= 0:
		return fmt.Errorf("%w: saved state of %s has no mac or mtu", ErrBadMove, r.Saved.Name)
	case r.MAC != nil && len(r.MAC) != 6:
		return fmt.Errorf("%w: mac %s is not 6 bytes", ErrBadMove, r.MAC)
	case r.MAC != nil && r.MAC[0]&1 == 1:
		return fmt.Errorf("%w: mac %s is multicast", ErrBadMove, r.MAC)
	case r.MTU < 0:
		return fmt.Errorf("%w: mtu %d", ErrBadMove, r.MTU)
	case !r.Address.IsValid():
		return fmt.Errorf("%w: no address", ErrBadMove)
	case r.Gateway.IsValid() && r.Gateway.Is4() != r.Address.Addr().Is4():
		return fmt.Errorf("%w: gateway %s and address %s differ in family", ErrBadMove, r.Gateway, r.Address)
	case r.PF != nil && r.PFName == "":
		return fmt.Errorf("%w: pf settings without a pf name", ErrBadMove)
	}
	if r.PF != nil {
		if err := r.VF.Validate(); err != nil {
			return fmt.Errorf("%w: %w", ErrBadMove, err)
		}
	}
	return nil
}

func moveIfNameOK(n string) bool {
	return n != "" && len(n) < unix.IFNAMSIZ && n != "." && n != ".." &&
		!bytes.ContainsAny([]byte(n), "/: \t\n")
}

// vfTempName is the name the netdev carries between namespaces: derived from its saved name
// (so a retry uses the same one), shaped unlike anything a runtime or udev picks.
func vfTempName(saved string) string {
	sum := sha256.Sum256([]byte(saved))
	return "wsv" + hex.EncodeToString(sum[:])[:12]
}

// nsHandles are netlink handles in the host namespace and in the container's, opened by
// openNSHandles; a missing container namespace is ErrNetNSGone. No thread changes namespace.
type nsHandles struct {
	host, cont *netlink.Handle
	contNS     netns.NsHandle
	hostNS     netns.NsHandle
}

func openNSHandles(hostPath, contPath string) (*nsHandles, error) {
	hs := &nsHandles{contNS: -1, hostNS: -1}
	var err error
	if hostPath == "" {
		hs.hostNS, err = netns.Get()
	} else {
		hs.hostNS, err = netns.GetFromPath(hostPath)
	}
	if err != nil {
		return nil, fmt.Errorf("open host netns %q: %w", hostPath, err)
	}
	if hs.host, err = netlink.NewHandleAt(hs.hostNS); err != nil {
		hs.close()
		return nil, fmt.Errorf("netlink in host netns: %w", err)
	}
	if hs.contNS, err = netns.GetFromPath(contPath); err != nil {
		hs.close()
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s", ErrNetNSGone, contPath)
		}
		return nil, fmt.Errorf("open container netns %s: %w", contPath, err)
	}
	if !isNetNS(hs.contNS) {
		hs.close()
		// A path that is no longer a namespace bind mount: the runtime removed it.
		return nil, fmt.Errorf("%w: %s is not a network namespace", ErrNetNSGone, contPath)
	}
	if hs.cont, err = netlink.NewHandleAt(hs.contNS); err != nil {
		hs.close()
		return nil, fmt.Errorf("netlink in container netns %s: %w", contPath, err)
	}
	return hs, nil
}

func isNetNS(h netns.NsHandle) bool {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(h), &st); err != nil {
		return false
	}
	return st.Type == unix.NSFS_MAGIC
}

func (hs *nsHandles) close() {
	if hs.host != nil {
		hs.host.Close()
	}
	if hs.cont != nil {
		hs.cont.Close()
	}
	if hs.hostNS >= 0 {
		hs.hostNS.Close()
	}
	if hs.contNS >= 0 {
		hs.contNS.Close()
	}
}

// SaveState reads the netdev ifname in the host namespace at hostNS ("" for the calling
// thread's) and, when pf is not nil, VF vfIndex's settings on pfName: what MoveOut and a
// failed MoveIn put back. Call it before the first change and persist the result.
func SaveState(hostNS, ifname string, pf PFConfig, pfName string, vfIndex int) (NetdevState, error) {
	var nsh netns.NsHandle
	var err error
	if hostNS == "" {
		nsh, err = netns.Get()
	} else {
		nsh, err = netns.GetFromPath(hostNS)
	}
	if err != nil {
		return NetdevState{}, fmt.Errorf("open host netns %q: %w", hostNS, err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return NetdevState{}, fmt.Errorf("netlink in host netns: %w", err)
	}
	defer h.Close()
	l, err := h.LinkByName(ifname)
	if err != nil {
		return NetdevState{}, fmt.Errorf("%w: %s: %v", ErrNetdevNotFound, ifname, err)
	}
	a := l.Attrs()
	st := NetdevState{Name: a.Name, MAC: append(net.HardwareAddr(nil), a.HardwareAddr...), MTU: a.MTU}
	if pf == nil {
		return st, nil
	}
	s, err := pf.VF(pfName, vfIndex)
	if err != nil {
		return NetdevState{}, fmt.Errorf("read vf %d of %s: %w", vfIndex, pfName, err)
	}
	st.VLAN, st.QoS, st.SpoofChk, st.Trust = settingVal(s.VLAN), settingVal(s.QoS), settingVal(s.SpoofChk), settingVal(s.Trust)
	st.LinkState, st.MinTxRate, st.MaxTxRate = settingVal(s.LinkState), settingVal(s.MinTxRate), settingVal(s.MaxTxRate)
	if st.LinkState == "" {
		st.LinkState = "auto"
	}
	return st, nil
}

// MoveIn moves the VF netdev req.Saved.Name from the host namespace into the container
// under req.IfName, applies the asked PF-side settings, then sets MAC, MTU, address, link
// up and routes. On any failure it undoes the steps done, in reverse, leaving the netdev in
// the host namespace under its saved name, MAC and MTU and the PF settings as they were.
// A second MoveIn of the same VF into the same netns and ifname converges and succeeds.
func MoveIn(req MoveRequest) (res Result, err error) {
	if err := req.validate(); err != nil {
		return Result{}, err
	}
	hs, err := openNSHandles(req.HostNS, req.NetNS)
	if err != nil {
		return Result{}, err
	}
	defer hs.close()

	var undo []func() error
	defer func() {
		if err == nil {
			return
		}
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				err = errors.Join(err, fmt.Errorf("undo: %w", uerr))
			}
		}
	}()

	link, err := hs.host.LinkByName(req.Saved.Name)
	if err != nil || !bytes.Equal(link.Attrs().HardwareAddr, req.Saved.MAC) {
		// Not in the host as saved: already moved by an earlier MoveIn?
		l, cerr := hs.cont.LinkByName(req.IfName)
		if cerr != nil || !ours(l, req) {
			return Result{}, fmt.Errorf("%w: %s (mac %s) is not in the host, nor in %s as %s",
				ErrNetdevNotFound, req.Saved.Name, req.Saved.MAC, req.NetNS, req.IfName)
		}
		// Converge only: on failure it stays in the container, where the earlier ADD put it.
		return configure(hs.cont, l, req, nil)
	}
	if other, cerr := hs.cont.LinkByName(req.IfName); cerr == nil {
		return Result{}, fmt.Errorf("%w: %s in %s is another link (index %d)", ErrNameTaken,
			req.IfName, req.NetNS, other.Attrs().Index)
	}
	tmp := vfTempName(req.Saved.Name)
	for _, h := range []*netlink.Handle{hs.host, hs.cont} {
		if _, cerr := h.LinkByName(tmp); cerr == nil {
			return Result{}, fmt.Errorf("%w: temporary name %s", ErrNameTaken, tmp)
		}
	}

	if req.PF != nil && len(req.VF.steps()) > 0 {
		old := SettingsOf(req.Saved)
		if err := ApplyVF(req.PF, req.PFName, req.VFIndex, req.VF, old); err != nil {
			return Result{}, err
		}
		undo = append(undo, func() error { return RestoreVF(req.PF, req.PFName, req.VFIndex, req.VF, old) })
	}

	// Alternative names travel with the netdev and clash in the target namespace
	// (sriov-cni #445, #250): drop them here, give them back if the move is undone.
	for _, alt := range link.Attrs().AltNames {
		if err := hs.host.LinkDelAltName(link, alt); err != nil && !errors.Is(err, unix.ENOENT) {
			return Result{}, fmt.Errorf("delete altname %s of %s: %w", alt, req.Saved.Name, err)
		}
		alt := alt
		undo = append(undo, func() error {
			l, err := hs.host.LinkByName(req.Saved.Name)
			if err != nil {
				return err
			}
			return hs.host.LinkAddAltName(l, alt)
		})
	}

	if err := hs.host.LinkSetDown(link); err != nil {
		return Result{}, fmt.Errorf("set %s down: %w", req.Saved.Name, err)
	}
	// Renamed back under its saved name, MAC and MTU: the last undo step to run.
	// The ifindex may change on the way back (taken in the host meanwhile): find it by name.
	undo = append(undo, func() error {
		l, err := hs.host.LinkByName(tmp)
		if err != nil {
			if l, err = hs.host.LinkByName(req.Saved.Name); err != nil {
				return fmt.Errorf("%w: %s nor %s in the host", ErrNetdevNotFound, tmp, req.Saved.Name)
			}
		}
		return restoreInHost(hs.host, l.Attrs().Index, req.Saved)
	})
	if err := hs.host.LinkSetName(link, tmp); err != nil {
		return Result{}, fmt.Errorf("rename %s to %s: %w", req.Saved.Name, tmp, err)
	}
	if err := hs.host.LinkSetNsFd(link, int(hs.contNS)); err != nil {
		return Result{}, fmt.Errorf("move %s into %s: %w", req.Saved.Name, req.NetNS, err)
	}
	undo = append(undo, func() error {
		l, err := hs.cont.LinkByName(tmp)
		if err != nil {
			if l, err = hs.cont.LinkByName(req.IfName); err != nil {
				return fmt.Errorf("find %s in %s: %w", tmp, req.NetNS, err)
			}
			if err := hs.cont.LinkSetName(l, tmp); err != nil {
				return fmt.Errorf("rename %s to %s: %w", req.IfName, tmp, err)
			}
		}
		hs.cont.LinkSetDown(l)
		return hs.cont.LinkSetNsFd(l, int(hs.hostNS))
	})
	cl, err := hs.cont.LinkByName(tmp)
	if err != nil {
		return Result{}, fmt.Errorf("find %s in %s: %w", tmp, req.NetNS, err)
	}
	if err := hs.cont.LinkSetName(cl, req.IfName); err != nil {
		return Result{}, fmt.Errorf("rename %s to %s in %s: %w", tmp, req.IfName, req.NetNS, err)
	}
	return configure(hs.cont, cl, req, &undo)
}

// ours says whether l, found in the container under the asked name, is the VF of req: it
// carries the MAC req asked for, or the saved one when none was asked.
func ours(l netlink.Link, req MoveRequest) bool {
	want := req.Saved.MAC
	if req.MAC != nil {
		want = req.MAC
	}
	return bytes.Equal(l.Attrs().HardwareAddr, want)
}

// configure sets MAC, MTU, address, up and routes on l in the container, each step
// idempotent; undo, when not nil, collects how to revert each one.
func configure(h *netlink.Handle, l netlink.Link, req MoveRequest, undo *[]func() error) (Result, error) {
	push := func(f func() error) {
		if undo != nil {
			*undo = append(*undo, f)
		}
	}
	a := l.Attrs()
	if req.MAC != nil && !bytes.Equal(a.HardwareAddr, req.MAC) {
		if err := h.LinkSetHardwareAddr(l, req.MAC); err != nil {
			return Result{}, fmt.Errorf("set mac %s on %s: %w", req.MAC, req.IfName, err)
		}
		// restoreInHost sets the saved MAC again; nothing to undo here.
	}
	if req.MTU > 0 && a.MTU != req.MTU {
		if err := h.LinkSetMTU(l, req.MTU); err != nil {
			return Result{}, fmt.Errorf("set mtu %d on %s: %w", req.MTU, req.IfName, err)
		}
	}
	addr := &netlink.Addr{IPNet: prefixToIPNet(req.Address)}
	if err := h.AddrReplace(l, addr); err != nil {
		return Result{}, fmt.Errorf("add address %s to %s: %w", req.Address, req.IfName, err)
	}
	push(func() error { return h.AddrDel(l, addr) })
	// Up before the routes: a route via a gateway needs the on-link route the kernel adds
	// only for an address on a running link.
	if err := h.LinkSetUp(l); err != nil {
		return Result{}, fmt.Errorf("set %s up: %w", req.IfName, err)
	}
	push(func() error { return h.LinkSetDown(l) })
	for _, r := range plannedRoutes(req, a.Index) {
		r := r
		if err := h.RouteReplace(&r); err != nil {
			return Result{}, fmt.Errorf("route %s via %s on %s: %w", r.Dst, r.Gw, req.IfName, err)
		}
		push(func() error { return h.RouteDel(&r) })
	}
	fresh, err := h.LinkByIndex(a.Index)
	if err != nil {
		return Result{}, fmt.Errorf("read %s back: %w", req.IfName, err)
	}
	return Result{Index: a.Index, MAC: fresh.Attrs().HardwareAddr, MTU: fresh.Attrs().MTU}, nil
}

// plannedRoutes is the routes of req through link index idx: a default route via the
// gateway for a primary interface; for a secondary one a route to Range via the gateway
// only when the address's on-link prefix does not already cover Range.
func plannedRoutes(req MoveRequest, idx int) []netlink.Route {
	if !req.Gateway.IsValid() {
		return nil
	}
	gw := req.Gateway.AsSlice()
	if !req.Secondary {
		def := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if req.Gateway.Is6() {
			def = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		return []netlink.Route{{LinkIndex: idx, Dst: prefixToIPNet(def), Gw: gw}}
	}
	if !req.Range.IsValid() {
		return nil
	}
	onlink := req.Address.Masked()
	if onlink.Bits() <= req.Range.Bits() && onlink.Contains(req.Range.Addr()) {
		return nil
	}
	return []netlink.Route{{LinkIndex: idx, Dst: prefixToIPNet(req.Range.Masked()), Gw: gw}}
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// restoreInHost gives the host link idx its saved MAC, MTU and name, down. A name held by
// another link is ErrNameTaken; the netdev then keeps its current name.
func restoreInHost(h *netlink.Handle, idx int, saved NetdevState) error {
	l, err := h.LinkByIndex(idx)
	if err != nil {
		return fmt.Errorf("%w: index %d of %s: %v", ErrNetdevNotFound, idx, saved.Name, err)
	}
	h.LinkSetDown(l)
	a := l.Attrs()
	// An all-zero saved MAC cannot be set on a netdev (the kernel refuses it); the VF keeps
	// the one it has.
	if usableMAC(saved.MAC) && !bytes.Equal(a.HardwareAddr, saved.MAC) {
		if err := h.LinkSetHardwareAddr(l, saved.MAC); err != nil {
			return fmt.Errorf("restore mac %s on %s: %w", saved.MAC, a.Name, err)
		}
	}
	if a.MTU != saved.MTU {
		if err := h.LinkSetMTU(l, saved.MTU); err != nil {
			return fmt.Errorf("restore mtu %d on %s: %w", saved.MTU, a.Name, err)
		}
	}
	if a.Name == saved.Name {
		return nil
	}
	if other, err := h.LinkByName(saved.Name); err == nil && other.Attrs().Index != idx {
		return fmt.Errorf("%w: %s is held by index %d; the vf stays as %s", ErrNameTaken,
			saved.Name, other.Attrs().Index, a.Name)
	}
	if err := h.LinkSetName(l, saved.Name); err != nil {
		return fmt.Errorf("rename %s to %s: %w", a.Name, saved.Name, err)
	}
	return nil
}

// findInHost returns the host link that is the VF: by its saved name with its saved MAC,
// else any link with the saved MAC (left under the temporary name by an earlier MoveOut
// that met a name clash, or renamed by the kernel after its netns died).
func findInHost(h *netlink.Handle, saved NetdevState) (netlink.Link, bool) {
	if l, err := h.LinkByName(saved.Name); err == nil && bytes.Equal(l.Attrs().HardwareAddr, saved.MAC) {
		return l, true
	}
	// Some VFs (mlx5) have an all-zero MAC until one is set, like lo: no search by it.
	if !usableMAC(saved.MAC) {
		return nil, false
	}
	links, err := h.LinkList()
	if err != nil {
		return nil, false
	}
	for _, l := range links {
		if bytes.Equal(l.Attrs().HardwareAddr, saved.MAC) && l.Attrs().Flags&net.FlagLoopback == 0 {
			return l, true
		}
	}
	return nil, false
}

// usableMAC says whether m is a unicast Ethernet MAC that is not all zeros: one the kernel
// lets a netdev take, and one that names a single netdev.
func usableMAC(m net.HardwareAddr) bool {
	return len(m) == 6 && m[0]&1 == 0 && !bytes.Equal(m, make(net.HardwareAddr, 6))
}

// MoveOut returns the VF netdev from the container to the host namespace with its saved
// name, MAC and MTU, down, and restores the PF settings MoveIn applied. A netdev already
// back in the host (by saved name or MAC) is success; a gone container netns is
// ErrNetNSGone (the caller quarantines the VF).
func MoveOut(req MoveOutRequest) error {
	if !moveIfNameOK(req.IfName) || !moveIfNameOK(req.Saved.Name) || len(req.Saved.MAC) == 0 || req.Saved.MTU <= 0 {
		return fmt.Errorf("%w: ifname %q, saved name %q, mac %s, mtu %d", ErrBadMove,
			req.IfName, req.Saved.Name, req.Saved.MAC, req.Saved.MTU)
	}
	var errs []error
	if req.PF != nil {
		if err := RestoreVF(req.PF, req.PFName, req.VFIndex, req.VF, SettingsOf(req.Saved)); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, moveOut(req))
	return errors.Join(errs...)
}

func moveOut(req MoveOutRequest) error {
	hs, err := openNSHandles(req.HostNS, req.NetNS)
	if err != nil {
		if errors.Is(err, ErrNetNSGone) {
			// The netns may have died after an earlier MoveOut brought the VF home.
			if h, herr := hostNSHandle(req.HostNS); herr == nil {
				defer h.Close()
				if l, ok := findInHost(h, req.Saved); ok {
					return restoreInHost(h, l.Attrs().Index, req.Saved)
				}
			}
		}
		return err
	}
	defer hs.close()
	if l, ok := findInHost(hs.host, req.Saved); ok {
		return restoreInHost(hs.host, l.Attrs().Index, req.Saved)
	}
	tmp := vfTempName(req.Saved.Name)
	l, err := hs.cont.LinkByName(req.IfName)
	if err != nil {
		// An earlier MoveOut that failed after the rename left it under the temporary name.
		if l, err = hs.cont.LinkByName(tmp); err != nil {
			return fmt.Errorf("%w: %s not in %s nor in the host as %s (mac %s)", ErrNetdevNotFound,
				req.IfName, req.NetNS, req.Saved.Name, req.Saved.MAC)
		}
	}
	if err := hs.cont.LinkSetDown(l); err != nil {
		return fmt.Errorf("set %s down in %s: %w", req.IfName, req.NetNS, err)
	}
	// Altnames given in the container (by its software, or by kernels and udev that keep an
	// old name as an altname on rename, sriov-cni #445) would clash in the host or stick to
	// the VF for its next container.
	for _, alt := range l.Attrs().AltNames {
		if err := hs.cont.LinkDelAltName(l, alt); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete altname %s of %s in %s: %w", alt, req.IfName, req.NetNS, err)
		}
	}
	// Through the temporary name: the container's name (eth0, net1) may exist in the host.
	if _, err := hs.host.LinkByName(tmp); err == nil {
		return fmt.Errorf("%w: temporary name %s in the host", ErrNameTaken, tmp)
	}
	if err := hs.cont.LinkSetName(l, tmp); err != nil {
		return fmt.Errorf("rename %s to %s in %s: %w", req.IfName, tmp, req.NetNS, err)
	}
	if err := hs.cont.LinkSetNsFd(l, int(hs.hostNS)); err != nil {
		return fmt.Errorf("move %s out of %s: %w", req.IfName, req.NetNS, err)
	}
	hl, err := hs.host.LinkByName(tmp)
	if err != nil {
		return fmt.Errorf("find %s in the host: %w", tmp, err)
	}
	return restoreInHost(hs.host, hl.Attrs().Index, req.Saved)
}

func hostNSHandle(path string) (*netlink.Handle, error) {
	if path == "" {
		return netlink.NewHandle()
	}
	n, err := netns.GetFromPath(path)
	if err != nil {
		return nil, err
	}
	defer n.Close()
	return netlink.NewHandleAt(n)
}

// Check verifies that the VF netdev is in the container under req.IfName with the asked
// MAC (the saved one when none was asked), the asked MTU (the saved one when 0), up, and
// holding req.Address.
func Check(req MoveRequest) error {
	if err := req.validate(); err != nil {
		return err
	}
	hs, err := openNSHandles(req.HostNS, req.NetNS)
	if err != nil {
		return err
	}
	defer hs.close()
	l, err := hs.cont.LinkByName(req.IfName)
	if err != nil {
		return fmt.Errorf("%w: %s in %s: %v", ErrNetdevNotFound, req.IfName, req.NetNS, err)
	}
	a := l.Attrs()
	if !ours(l, req) {
		return fmt.Errorf("%s in %s has mac %s, not the vf's", req.IfName, req.NetNS, a.HardwareAddr)
	}
	mtu := req.MTU
	if mtu == 0 {
		mtu = req.Saved.MTU
	}
	if a.MTU != mtu {
		return fmt.Errorf("%s in %s has mtu %d, want %d", req.IfName, req.NetNS, a.MTU, mtu)
	}
	if a.Flags&net.FlagUp == 0 {
		return fmt.Errorf("%s in %s is down", req.IfName, req.NetNS)
	}
	addrs, err := hs.cont.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("addresses of %s in %s: %w", req.IfName, req.NetNS, err)
	}
	for _, ad := range addrs {
		if p, ok := netipPrefix(ad.IPNet); ok && p == req.Address {
			return nil
		}
	}
	return fmt.Errorf("%s in %s lacks address %s", req.IfName, req.NetNS, req.Address)
}

func netipPrefix(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// RestoreFound gives a VF netdev found back in the host namespace at hostNS ("" for the
// calling thread's) its saved name, MAC and MTU, down: a quarantined VF whose container netns
// died, which the kernel returned under the container's name or dev<N> (ifname, as sysfs
// shows it now) with the container's MAC. A netdev already restored is success; none under
// ifname nor with the saved name and MAC is ErrNetdevNotFound (not back yet).
func RestoreFound(hostNS, ifname string, saved NetdevState) error {
	if !moveIfNameOK(saved.Name) || saved.MTU <= 0 {
		return fmt.Errorf("%w: saved name %q, mtu %d", ErrBadMove, saved.Name, saved.MTU)
	}
	h, err := hostNSHandle(hostNS)
	if err != nil {
		return fmt.Errorf("netlink in host netns %q: %w", hostNS, err)
	}
	defer h.Close()
	if l, ok := findInHost(h, saved); ok {
		return restoreInHost(h, l.Attrs().Index, saved)
	}
	if ifname == "" {
		return fmt.Errorf("%w: %s (mac %s) is not in the host", ErrNetdevNotFound, saved.Name, saved.MAC)
	}
	l, err := h.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("%w: %s (saved as %s) is not in the host: %v", ErrNetdevNotFound, ifname, saved.Name, err)
	}
	return restoreInHost(h, l.Attrs().Index, saved)
}
