package lab

import (
	"fmt"

	"github.com/weftnet/weft/datapath/nslab"
)

// Capture records every frame on one interface of a host's namespace (nslab.Capture).
type Capture = nslab.Capture

// Capture starts recording frames on ifname in h's namespace, so tests can check what
// crosses the underlay. Stop ends it.
func (h *Host) Capture(ifname string) (*Capture, error) {
	c, err := nslab.StartCapture(h.NSPath, ifname)
	if err != nil {
		return nil, fmt.Errorf("lab: %s: %w", h.Name, err)
	}
	return c, nil
}
