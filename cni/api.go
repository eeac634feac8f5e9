package cni

// The control API between weft-cni and its local weft peer: HTTP+JSON over the peer's unix
// socket, versioned under /v1/. The router package serves it; Client speaks it. These types
// are the whole contract, so they live here, in the package the tiny plugin binary links.

// API paths.
const (
	PathAdd    = "/v1/cni/add"
	PathDel    = "/v1/cni/del"
	PathCheck  = "/v1/cni/check"
	PathGC     = "/v1/cni/gc"
	PathStatus = "/v1/cni/status"
)

// AttachRequest carries one CNI ADD, DEL or CHECK to the peer.
type AttachRequest struct {
	ContainerID string `json:"container_id"`
	IfName      string `json:"ifname"`
	// NetNS is the container's network namespace path; empty on a DEL whose netns is gone.
	NetNS string `json:"netns,omitempty"`
	// CNINetwork is the conflist's "name"; GC is scoped to it.
	CNINetwork string `json:"cni_network"`
	// Network is the weft network to attach to ("default" unless the conflist says otherwise).
	Network string `json:"network"`
	// Name is the container's DNS name (K8S_POD_NAME, the "name" CNI arg, else the container ID).
	Name string `json:"name,omitempty"`
	// MTU overrides the network's MTU for this attachment when non-zero.
	MTU int `json:"mtu,omitempty"`
	// Services are published as SRV records of Name: SERVICE/PROTO/PORT, e.g. http/tcp/80
	// (CNI_ARGS WEFT_SERVICES=http/tcp/80,dns/udp/53).
	Services []string `json:"services,omitempty"`
	// Labels are the container's labels (issue #15): the conflist's args.cni.labels and
	// CNI_ARGS WEFT_LABELS=k:v,k:v, the latter winning on the same key.
	Labels map[string]string `json:"labels,omitempty"`
	// Bandwidth is the runtime's bandwidth capability (runtimeConfig.bandwidth), overriding
	// the network's default rates; nil: the network's defaults.
	Bandwidth *Bandwidth `json:"bandwidth,omitempty"`
}

// Bandwidth is a container's rates as the CNI bandwidth capability carries them: bits per
// second and bits of burst; 0 is unlimited.
type Bandwidth struct {
	IngressRate  uint64 `json:"ingressRate,omitempty"`
	IngressBurst uint64 `json:"ingressBurst,omitempty"`
	EgressRate   uint64 `json:"egressRate,omitempty"`
	EgressBurst  uint64 `json:"egressBurst,omitempty"`
}

// AttachResult is the peer's answer to an ADD or CHECK: everything a CNI result needs.
type AttachResult struct {
	ContainerID  string   `json:"container_id"`
	IfName       string   `json:"ifname"`
	NetNS        string   `json:"netns"`
	HostIfName   string   `json:"host_ifname"`
	HostMAC      string   `json:"host_mac"`
	ContainerMAC string   `json:"container_mac"`
	Bridge       string   `json:"bridge"`
	BridgeMAC    string   `json:"bridge_mac"`
	Address      string   `json:"address"` // CIDR notation, e.g. 10.40.0.5/16
	Gateway      string   `json:"gateway"`
	MTU          int      `json:"mtu"`
	DNS          *DNSInfo `json:"dns,omitempty"`
	// Network is the weft network of the attachment; Range its whole range (CIDR).
	Network string `json:"network,omitempty"`
	Range   string `json:"range,omitempty"`
	// Secondary: not the container's primary interface (it had another weft attachment
	// first): its result has a route to Range only, no default route.
	Secondary bool `json:"secondary,omitempty"`
	// Kind is how the container is attached: KindVeth (""), KindSRIOV (a VF netdev moved
	// in; no host interface) or KindDPDK (a VF bound to a userspace driver: no netdev
	// anywhere, PCIID names it).
	Kind string `json:"kind,omitempty"`
	// PCIID is the VF's PCI address (CNI 1.1 interface "pciID") for KindSRIOV and KindDPDK.
	PCIID string `json:"pci_id,omitempty"`
	// DeviceInfo is the path of the Network Plumbing WG device-info file written for a
	// KindDPDK attachment.
	DeviceInfo string `json:"device_info,omitempty"`
}

// Kinds of attachment.
const (
	KindVeth  = ""
	KindSRIOV = "sriov"
	KindDPDK  = "dpdk"
)

// DNSInfo is the resolver configuration handed to the container.
type DNSInfo struct {
	Nameservers []string `json:"nameservers,omitempty"`
	Domain      string   `json:"domain,omitempty"`
	Search      []string `json:"search,omitempty"`
}

// GCRequest asks the peer to release every attachment of CNINetwork not listed in Valid.
type GCRequest struct {
	CNINetwork string         `json:"cni_network"`
	Valid      []GCAttachment `json:"valid"`
}

// GCAttachment names one attachment the runtime still uses.
type GCAttachment struct {
	ContainerID string `json:"container_id"`
	IfName      string `json:"ifname"`
}

// GCResult says what a GC released.
type GCResult struct {
	Released []GCAttachment `json:"released"`
}

// StatusRequest asks whether the peer can serve ADDs on Network.
type StatusRequest struct {
	Network string `json:"network"`
}

// Error is the body of every non-2xx answer. Code is a CNI well-known error code
// (4 bad env, 6 decode, 7 bad config, 11 try again, 50 not available, …), so the plugin can
// hand it to the runtime unchanged.
type Error struct {
	Code    uint   `json:"code"`
	Message string `json:"msg"`
	Details string `json:"details,omitempty"`
}

func (e *Error) Error() string {
	if e.Details != "" {
		return e.Message + ": " + e.Details
	}
	return e.Message
}

// Error codes beyond the spec's well-known ones (the spec leaves 100+ to plugins).
const (
	// CodeCheckFailed: CHECK found the attachment not as ADD left it.
	CodeCheckFailed uint = 100
	// CodeInternal: anything the peer could not classify; the message says what happened.
	CodeInternal uint = 999
)

// CodePluginNotAvailable is the spec's code for "cannot serve ADDs right now" (STATUS).
const CodePluginNotAvailable uint = 50
