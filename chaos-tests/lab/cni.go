package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// RefPluginDir is where Debian's containernetworking-plugins keeps the reference plugins
// (bridge, host-local, bandwidth, portmap, …).
const RefPluginDir = "/usr/lib/cni"

// CNIOptions selects the network configuration list a CNI handle uses.
type CNIOptions struct {
	// Name is the conflist's "name" (the CNI network). Default "weft".
	Name string
	// CNIVersion of the conflist. Default "1.1.0", or "1.0.0" when Chain is set (the
	// Debian bandwidth and portmap plugins stop at 1.0.0).
	CNIVersion string
	// Network is the weft network ("network" key); empty leaves the plugin's default.
	Network string
	// MTU sets the "mtu" key when non-zero.
	MTU int
	// Chain appends bandwidth and portmap after weft (both with their runtime
	// capabilities, so RuntimeConf.CapabilityArgs drives them).
	Chain bool
	// ConfList, when set, is used verbatim instead of the list built from the fields
	// above (for reference plugins and hand-made configurations).
	ConfList []byte
	// CacheDir is libcni's cache directory. Default: the host's CacheDir. Give a separate
	// one to simulate an attachment that this runtime does not know about.
	CacheDir string
}

// WeftConfList returns a conflist for the weft plugin talking to socket.
func WeftConfList(opts CNIOptions, socket string) []byte {
	if opts.Name == "" {
		opts.Name = "weft"
	}
	if opts.CNIVersion == "" {
		opts.CNIVersion = "1.1.0"
		if opts.Chain {
			opts.CNIVersion = "1.0.0"
		}
	}
	weft := map[string]any{"type": "weft", "socket": socket}
	if opts.Network != "" {
		weft["network"] = opts.Network
	}
	if opts.MTU != 0 {
		weft["mtu"] = opts.MTU
	}
	plugins := []any{weft}
	if opts.Chain {
		plugins = append(plugins,
			map[string]any{"type": "bandwidth", "capabilities": map[string]bool{"bandwidth": true}},
			map[string]any{"type": "portmap", "snat": true, "capabilities": map[string]bool{"portMappings": true}},
		)
	}
	b, _ := json.Marshal(map[string]any{
		"cniVersion": opts.CNIVersion,
		"name":       opts.Name,
		"plugins":    plugins,
	})
	return b
}

// CNI is a container runtime's view of one network on one host: a libcni configuration
// with the plugin search path [lab cni-bin (weft), /usr/lib/cni] and a cache directory.
// Every call runs on a locked thread inside the host namespace, so the plugins (and the
// chained reference plugins, which do kernel work themselves) act on the host.
type CNI struct {
	host *Host
	conf *libcni.CNIConfig
	list *libcni.NetworkConfigList
}

// CNI returns a CNI handle for this host.
func (h *Host) CNI(opts CNIOptions) (*CNI, error) {
	raw := opts.ConfList
	if raw == nil {
		raw = WeftConfList(opts, h.Socket)
	}
	list, err := libcni.NetworkConfFromBytes(raw)
	if err != nil {
		return nil, fmt.Errorf("lab: parse conflist: %w", err)
	}
	cache := opts.CacheDir
	if cache == "" {
		cache = h.CacheDir
	}
	path := []string{h.lab.cniBin, RefPluginDir}
	return &CNI{host: h, conf: libcni.NewCNIConfigWithCacheDir(path, cache, nil), list: list}, nil
}

// Libcni exposes the underlying libcni objects (for timing the bare calls in benchmarks;
// such calls must run inside Host.Do).
func (c *CNI) Libcni() (*libcni.CNIConfig, *libcni.NetworkConfigList) { return c.conf, c.list }

// ConfList returns the conflist bytes.
func (c *CNI) ConfList() []byte { return c.list.Bytes }

// Add runs ADD for the whole list.
func (c *CNI) Add(ctx context.Context, rt *libcni.RuntimeConf) (res types.Result, err error) {
	err = c.host.Do(func() error {
		res, err = c.conf.AddNetworkList(ctx, c.list, rt)
		return err
	})
	return res, err
}

// Check runs CHECK for the whole list (against libcni's cached result).
func (c *CNI) Check(ctx context.Context, rt *libcni.RuntimeConf) error {
	return c.host.Do(func() error { return c.conf.CheckNetworkList(ctx, c.list, rt) })
}

// Del runs DEL for the whole list.
func (c *CNI) Del(ctx context.Context, rt *libcni.RuntimeConf) error {
	return c.host.Do(func() error { return c.conf.DelNetworkList(ctx, c.list, rt) })
}

// GC runs libcni's garbage collection: DEL for cached attachments not in valid, then the
// plugins' GC verb with valid as cni.dev/valid-attachments (cniVersion ≥ 1.1.0).
func (c *CNI) GC(ctx context.Context, valid []types.GCAttachment) error {
	return c.host.Do(func() error {
		return c.conf.GCNetworkList(ctx, c.list, &libcni.GCArgs{ValidAttachments: valid})
	})
}

// Status runs the STATUS verb (cniVersion ≥ 1.1.0; libcni skips it for older lists).
func (c *CNI) Status(ctx context.Context) error {
	return c.host.Do(func() error { return c.conf.GetStatusNetworkList(ctx, c.list) })
}

// Version runs VERSION against the first plugin of the list.
func (c *CNI) Version(ctx context.Context) (info version.PluginInfo, err error) {
	err = c.host.Do(func() error {
		info, err = c.conf.GetVersionInfo(ctx, c.list.Plugins[0].Network.Type)
		return err
	})
	return info, err
}

// ErrorCode returns the CNI error code carried by err, if err wraps a plugin error.
func ErrorCode(err error) (uint, bool) {
	var e *types.Error
	if errors.As(err, &e) {
		return e.Code, true
	}
	return 0, false
}

// ResultAddress converts a result of any version to the current one and returns its
// first IP address (CIDR form).
func ResultAddress(res types.Result) (netip.Prefix, error) {
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("lab: convert result: %w", err)
	}
	if len(r.IPs) == 0 {
		return netip.Prefix{}, errors.New("lab: result has no IPs")
	}
	ipn := r.IPs[0].Address
	a, ok := netip.AddrFromSlice(ipn.IP)
	if !ok {
		return netip.Prefix{}, fmt.Errorf("lab: bad IP %v in result", ipn.IP)
	}
	ones, _ := ipn.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), nil
}
