package cni

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// Plugin holds what the verbs need from outside, so tests can run them in-process.
type Plugin struct {
	// Timeout bounds one call to the peer; 0 means 60s. An ADD may wait for a block claim,
	// and on a peer still forming its cluster first for a Raft leader (its --attach-wait,
	// at most 50s), so keep it above that.
	Timeout time.Duration
	// Stdout receives the result; nil means os.Stdout.
	Stdout io.Writer
}

// Funcs returns the verbs for skel.PluginMainFuncs. Every verb is real: skel treats a nil
// verb as success, which would claim support the plugin does not have.
func (p Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.Check, GC: p.GC, Status: p.Status}
}

// VersionInfo lists the spec versions the plugin answers in.
func VersionInfo() version.PluginInfo { return version.PluginSupports(SupportedVersions...) }

func (p Plugin) stdout() io.Writer {
	if p.Stdout != nil {
		return p.Stdout
	}
	return os.Stdout
}

func (p Plugin) client(conf *NetConf) (*Client, context.Context, context.CancelFunc) {
	timeout := p.Timeout
	if timeout == 0 {
		timeout = 60 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	return NewClient(conf.Socket, timeout), ctx, cancel
}

// parseAttach reads the configuration and CNI_ARGS of an ADD, DEL or CHECK into the request
// for the peer.
func parseAttach(args *skel.CmdArgs) (*NetConf, AttachRequest, error) {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return nil, AttachRequest{}, err
	}
	req, err := attachRequest(conf, args)
	return conf, req, err
}

func attachRequest(conf *NetConf, args *skel.CmdArgs) (AttachRequest, error) {
	ca, err := ParseArgs(args.Args, args.ContainerID)
	if err != nil {
		return AttachRequest{}, err
	}
	return AttachRequest{
		ContainerID: args.ContainerID, IfName: args.IfName, NetNS: args.Netns,
		CNINetwork: conf.Name, Network: conf.Network, Name: ca.Name, MTU: conf.MTU, Services: ca.Services,
		Bandwidth: conf.RuntimeConfig.Bandwidth, // the peer validates it and refuses it naming the key
	}, nil
}

// requestLabels are the labels an ADD carries (args.cni.labels and WEFT_LABELS). Only ADD
// reads them: a DEL must succeed whatever labels the runtime passes, or a pod whose ADD was
// refused for a bad label could never be torn down.
func requestLabels(conf *NetConf, args *skel.CmdArgs) (map[string]string, error) {
	ca, err := ParseArgs(args.Args, args.ContainerID)
	if err != nil {
		return nil, err
	}
	return ContainerLabels(conf, ca)
}

// Add attaches the container through the peer and prints the result.
func (p Plugin) Add(args *skel.CmdArgs) error {
	conf, req, err := parseAttach(args)
	if err != nil {
		return err
	}
	if req.Labels, err = requestLabels(conf, args); err != nil {
		return err
	}
	c, ctx, cancel := p.client(conf)
	defer cancel()
	res, err := c.Add(ctx, req)
	if err != nil {
		return toCNIError(err, types.ErrTryAgainLater)
	}
	result, err := buildResult(res)
	if err != nil {
		return err
	}
	out, err := result.GetAsVersion(conf.CNIVersion)
	if err != nil {
		return types.NewError(types.ErrIncompatibleCNIVersion, fmt.Sprintf("cannot answer in cniVersion %q", conf.CNIVersion), err.Error())
	}
	return out.PrintTo(p.stdout())
}

// Del detaches the container. It succeeds when there is nothing left to undo; when the peer
// is down it fails with "try again" so the runtime retries and the address is not leaked.
func (p Plugin) Del(args *skel.CmdArgs) error {
	conf, req, err := parseAttach(args)
	if err != nil {
		return err
	}
	c, ctx, cancel := p.client(conf)
	defer cancel()
	return toCNIError(c.Del(ctx, req), types.ErrTryAgainLater)
}

// Check asks the peer to verify the attachment in the kernel and compares the address with
// the runtime's prevResult.
func (p Plugin) Check(args *skel.CmdArgs) error {
	conf, req, err := parseAttach(args)
	if err != nil {
		return err
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return types.NewError(types.ErrDecodingFailure, "decode prevResult", err.Error())
	}
	c, ctx, cancel := p.client(conf)
	defer cancel()
	res, err := c.Check(ctx, req)
	if err != nil {
		return toCNIError(err, types.ErrTryAgainLater)
	}
	if conf.PrevResult == nil {
		return nil
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "convert prevResult", err.Error())
	}
	for _, ip := range prev.IPs {
		if ip.Address.String() == res.Address {
			return nil
		}
	}
	return types.NewError(CodeCheckFailed, fmt.Sprintf("prevResult does not hold the attached address %s", res.Address), "")
}

// GC releases every attachment of this network the runtime no longer lists.
func (p Plugin) GC(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	valid := make([]GCAttachment, 0, len(conf.ValidAttachments))
	for _, v := range conf.ValidAttachments {
		valid = append(valid, GCAttachment{ContainerID: v.ContainerID, IfName: v.IfName})
	}
	c, ctx, cancel := p.client(conf)
	defer cancel()
	_, err = c.GC(ctx, GCRequest{CNINetwork: conf.Name, Valid: valid})
	return toCNIError(err, types.ErrTryAgainLater)
}

// Status says whether ADDs can succeed now: code 50 when the peer is unreachable.
func (p Plugin) Status(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	c, ctx, cancel := p.client(conf)
	defer cancel()
	return toCNIError(c.Status(ctx, StatusRequest{Network: conf.Network}), CodePluginNotAvailable)
}

// toCNIError passes the peer's CNI errors through and turns an unreachable peer into
// unreachableCode.
func toCNIError(err error, unreachableCode uint) error {
	if err == nil {
		return nil
	}
	var apiErr *Error
	if errors.As(err, &apiErr) {
		return types.NewError(apiErr.Code, apiErr.Message, apiErr.Details)
	}
	if errors.Is(err, ErrPeerUnreachable) {
		return types.NewError(unreachableCode, "weft peer is not reachable (is `weft peer` running?)",
			strings.TrimPrefix(err.Error(), ErrPeerUnreachable.Error()+": "))
	}
	return types.NewError(CodeInternal, err.Error(), "")
}

// buildResult turns the peer's answer into a CNI result: the bridge, the host end and the
// container end (in the sandbox), the address on the container end, and a default route —
// or, for a secondary interface, a route to its network's range only.
func buildResult(res *AttachResult) (*current.Result, error) {
	prefix, err := netip.ParsePrefix(res.Address)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "the weft peer answered a bad address", res.Address)
	}
	if res.Kind == KindSRIOV || res.Kind == KindDPDK {
		return deviceResult(res, prefix), nil
	}
	gw := net.ParseIP(res.Gateway)
	if gw == nil {
		return nil, types.NewError(types.ErrDecodingFailure, "the weft peer answered a bad gateway", res.Gateway)
	}
	result := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: res.Bridge, Mac: res.BridgeMAC},
			{Name: res.HostIfName, Mac: res.HostMAC},
			{Name: res.IfName, Mac: res.ContainerMAC, Mtu: res.MTU, Sandbox: res.NetNS},
		},
		IPs: []*current.IPConfig{{
			Interface: current.Int(2),
			Address:   net.IPNet{IP: prefix.Addr().AsSlice(), Mask: net.CIDRMask(prefix.Bits(), prefix.Addr().BitLen())},
			Gateway:   gw,
		}},
		Routes: []*types.Route{{Dst: net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}, GW: gw}},
	}
	if res.Secondary {
		// Only the primary interface routes everything; a second plane routes its range.
		rng, err := netip.ParsePrefix(res.Range)
		if err != nil || !rng.Contains(prefix.Addr()) {
			return nil, types.NewError(types.ErrDecodingFailure, "the weft peer answered a bad range for a secondary interface", res.Range)
		}
		result.Routes = []*types.Route{{Dst: net.IPNet{IP: rng.Addr().AsSlice(), Mask: net.CIDRMask(rng.Bits(), 32)}, GW: gw}}
	}
	if res.DNS != nil {
		result.DNS = types.DNS{Nameservers: res.DNS.Nameservers, Domain: res.DNS.Domain, Search: res.DNS.Search}
	}
	return result, nil
}

// deviceResult is the CNI result of a VF attachment (issue #14): one interface, the
// container's, naming the VF by its PCI address (CNI 1.1 "pciID"); no bridge and no host end
// (the VF has none), no gateway and no routes beyond the address's on-link prefix (an SR-IOV
// network has no host bridge to route through). A DPDK VF has no MAC to report.
func deviceResult(res *AttachResult, prefix netip.Prefix) *current.Result {
	result := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{{Name: res.IfName, Mac: res.ContainerMAC, Mtu: res.MTU, Sandbox: res.NetNS, PciID: res.PCIID}},
		IPs: []*current.IPConfig{{
			Interface: current.Int(0),
			Address:   net.IPNet{IP: prefix.Addr().AsSlice(), Mask: net.CIDRMask(prefix.Bits(), prefix.Addr().BitLen())},
		}},
	}
	if res.DNS != nil {
		result.DNS = types.DNS{Nameservers: res.DNS.Nameservers, Domain: res.DNS.Domain, Search: res.DNS.Search}
	}
	return result
}
