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
	"slices"
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
	// Args holds the conventional "args" of a network configuration; weft reads the
	// container's labels from args.cni.labels (issue #15).
	Args *ConfArgs `json:"args,omitempty"`
}

// RuntimeConfig is the part of runtimeConfig weft reads.
type RuntimeConfig struct {
	Bandwidth *Bandwidth `json:"bandwidth,omitempty"`
}

// ConfArgs is the conflist's "args" key as CNI's conventions define it.
type ConfArgs struct {
	CNI *struct {
		Labels []Label `json:"labels,omitempty"`
	} `json:"cni,omitempty"`
}

// Label is one label in the CNI convention args.cni.labels: [{"key":"app","value":"db"}].
type Label struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// confLabels are the labels of args.cni.labels (nil when there are none).
func (c *NetConf) confLabels() []Label {
	if c.Args == nil || c.Args.CNI == nil {
		return nil
	}
	return c.Args.CNI.Labels
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
	// LabelsArg is WEFT_LABELS as given (k:v,k:v), parsed by ContainerLabels: a bad label
	// fails an ADD, never a DEL, so ParseArgs does not refuse it.
	LabelsArg string
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
			case "WEFT_LABELS":
				out.LabelsArg = v
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

// Label bounds, as Kubernetes has them: a key is an optional DNS-subdomain prefix (at most
// 253 bytes) and '/', then a name of at most 63 bytes; a value at most 63 bytes. MaxLabels
// keeps a container's gossip record small.
const (
	MaxLabels          = 32
	MaxLabelNameLen    = 63
	MaxLabelPrefixLen  = 253
	MaxLabelValueLen   = 63
	labelsArgSeparator = ","
)

var (
	// labelNameRE: alphanumerics, '-', '_' and '.', beginning and ending with an alphanumeric.
	labelNameRE = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`)
	// labelPrefixRE: a lower-case DNS subdomain (RFC 1123).
	labelPrefixRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
)

// CheckLabel says what is wrong with label key=value, or nil. Pure.
func CheckLabel(key, value string) error {
	name := key
	if prefix, rest, ok := strings.Cut(key, "/"); ok {
		if len(prefix) > MaxLabelPrefixLen || !labelPrefixRE.MatchString(prefix) {
			return fmt.Errorf("label %q: prefix %q must be a lower-case DNS subdomain of at most %d bytes", key, prefix, MaxLabelPrefixLen)
		}
		name = rest
	}
	if len(name) > MaxLabelNameLen || !labelNameRE.MatchString(name) {
		return fmt.Errorf("label %q: name %q must be 1-%d letters, digits, '-', '_' or '.', beginning and ending with a letter or digit",
			key, name, MaxLabelNameLen)
	}
	if value != "" && (len(value) > MaxLabelValueLen || !labelNameRE.MatchString(value)) {
		return fmt.Errorf("label %q: value %q must be empty or 1-%d letters, digits, '-', '_' or '.', beginning and ending with a letter or digit",
			key, value, MaxLabelValueLen)
	}
	return nil
}

// CheckLabels checks every label of labels and their number. Pure; O(labels).
func CheckLabels(labels map[string]string) error {
	if len(labels) > MaxLabels {
		return fmt.Errorf("%d labels, at most %d", len(labels), MaxLabels)
	}
	keys := make([]string, 0, len(labels))
	for k := range labels {
		keys = append(keys, k)
	}
	slices.Sort(keys) // the first bad one in key order, the same every time
	for _, k := range keys {
		if err := CheckLabel(k, labels[k]); err != nil {
			return err
		}
	}
	return nil
}

// ParseLabelsArg reads WEFT_LABELS: k:v pairs separated by ','. CNI_ARGS values cannot hold
// '=', hence ':'. A key given twice with different values is refused. Pure.
func ParseLabelsArg(arg string) (map[string]string, error) {
	out := map[string]string{}
	for _, pair := range strings.Split(arg, labelsArgSeparator) {
		pair = strings.TrimSpace(pair)
		if pair == "" {
			continue
		}
		k, v, ok := strings.Cut(pair, ":")
		if !ok {
			return nil, fmt.Errorf("label %q is not KEY:VALUE", pair)
		}
		if old, dup := out[k]; dup && old != v {
			return nil, fmt.Errorf("label %q is given twice, as %q and %q", k, old, v)
		}
		out[k] = v
	}
	return out, nil
}

// ContainerLabels are the container's labels: the conflist's args.cni.labels, then CNI_ARGS
// WEFT_LABELS (args), which wins on the same key; nil when there are none. A bad label is a
// CNI error naming it (code 7 for the conflist, 5 for CNI_ARGS).
func ContainerLabels(conf *NetConf, args ContainerArgs) (map[string]string, error) {
	out := map[string]string{}
	for _, l := range conf.confLabels() {
		if old, dup := out[l.Key]; dup && old != l.Value {
			return nil, types.NewError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("args.cni.labels: label %q is given twice, as %q and %q", l.Key, old, l.Value), "")
		}
		if err := CheckLabel(l.Key, l.Value); err != nil {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, "args.cni.labels: "+err.Error(), "")
		}
		out[l.Key] = l.Value
	}
	fromArgs, err := ParseLabelsArg(args.LabelsArg)
	if err == nil {
		err = CheckLabels(fromArgs)
	}
	if err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_ARGS WEFT_LABELS: "+err.Error(), "")
	}
	for k, v := range fromArgs {
		out[k] = v
	}
	if len(out) > MaxLabels {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("labels: %d from args.cni.labels and WEFT_LABELS together, at most %d", len(out), MaxLabels), "")
	}
	if len(out) == 0 {
		return nil, nil
	}
	return out, nil
}
