// Command weft-cni is the weft CNI plugin (type "weft"). It is deliberately tiny: every verb
// is forwarded to the local weft peer over its control socket.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/weftnet/weft/cni"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	skel.PluginMainFuncs(cni.Plugin{}.Funcs(), cni.VersionInfo(), "CNI plugin weft "+version)
}
