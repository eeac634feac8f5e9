// Package cni is the weft CNI plugin: it parses what the runtime hands over (stdin config,
// CNI_* environment), forwards the request to the local weft peer over its control socket,
// and turns the answer into a CNI result in the version the configuration asks for. It links
// nothing heavy: the peer does all the work.
package cni

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
)

// Defaults for the plugin's configuration keys.
const (
	DefaultSocket  = "/run/weft/weft.sock"
	DefaultNetwork = "default"
)

// SupportedVersions are the CNI spec versions the plugin answers in.
var SupportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

var networkNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`)

// NetConf is the plugin's configuration: the standard keys plus weft's own.
type NetConf struct {
	types.PluginConf
	// Socket is the local peer's control socket.
	Socket string `json:"socket,omitempty"`
	// Network is the weft network to attach to.
	Network string `json:"network,omitempty"`
	// MTU overrides the peer's MTU for this network's attachments.
	MTU int `json:"mtu,omitempty"`
	// ValidAttachments is what the runtime still uses, injected by libcni for GC.
	ValidAttachments []types.GCAttachment `json:"cni.dev/valid-attachments,omitempty"`
	// RuntimeConfig holds what the runtime injects for the capabilities the conflist gives
	// weft: "bandwidth" (bits per second and bits, the CNI convention).
	RuntimeConfig RuntimeConfig `json:"runtimeConfig,omitempty"`
}

// RuntimeConfig is the part of runtimeConfig weft reads.
type RuntimeConfig struct {
	Bandwidth *Bandwidth `json:"bandwidth,omitempty"`
}

// ParseConf decodes and checks stdin. Its errors are CNI errors naming the bad key.
func ParseConf(stdin []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(stdin, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "decode network configuration", err.Error())
	}
	if conf.Socket == "" {
		conf.Socket = DefaultSocket
	}
	if conf.Network == "" {
		conf.Network = DefaultNetwork
	}
	switch {
	case conf.Name == "":
		return nil, types.NewError(types.ErrInvalidNetworkConfig, `network configuration has no "name"`, "")
	case !filepath.IsAbs(conf.Socket):
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(`"socket" %q must be an absolute path`, conf.Socket), "")
	case !networkNameRE.MatchString(conf.Network):
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(`"network" %q must be 1-32 lower-case letters, digits or '-'`, conf.Network), "")
	case conf.MTU != 0 && (conf.MTU < 576 || conf.MTU > 65535):
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(`"mtu" %d must be between 576 and 65535`, conf.MTU), "")
	}
	return conf, nil
}

// ContainerArgs is what weft reads from CNI_ARGS.
type ContainerArgs struct {
	// Name is the container's DNS name: K8S_POD_NAME, else "name", else the container ID.
	Name string
	// Services come from WEFT_SERVICES, a comma-separated list of SERVICE/PROTO/PORT.
	Services []string
}

// ParseArgs reads CNI_ARGS.
//
// CNI_ARGS is parsed here rather than with types.LoadArgs because LoadArgs rejects every key
// its struct does not name unless the runtime also sends IgnoreUnknown, and runtimes pass
// arbitrary keys.
func ParseArgs(cniArgs, containerID string) (ContainerArgs, error) {
	var pod, name string
	var out ContainerArgs
	if cniArgs != "" {
		for _, pair := range strings.Split(cniArgs, ";") {
			k, v, ok := strings.Cut(pair, "=")
			if !ok || k == "" {
				return out, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_ARGS: %q is not KEY=VALUE", pair), "")
			}
			switch k {
			case "K8S_POD_NAME":
				pod = v
			case "name":
				name = v
			case "WEFT_SERVICES":
				for _, s := range strings.Split(v, ",") {
					if s = strings.TrimSpace(s); s != "" {
						out.Services = append(out.Services, s)
					}
				}
			}
		}
	}
	switch {
	case pod != "":
		out.Name = pod
	case name != "":
		out.Name = name
	default:
		out.Name = containerID
	}
	return out, nil
}
