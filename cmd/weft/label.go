package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/router"
)

// newLabelCmd is `weft label CONTAINER k=v k2-` (issue #15): set and remove a container's
// labels, kubectl style, on the peer the container is attached to. The peer stores them with
// the attachment and gossips them; policies that select by label follow.
func newLabelCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "label CONTAINER KEY=VALUE... KEY-...",
		Short: "Set (KEY=VALUE) and remove (KEY-) labels of a container attached to this peer (by ID or name)",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			req, err := labelRequest(args[0], args[1:])
			if err != nil {
				return err
			}
			var res router.LabelResult
			if err := client(cmd).Post(cmd.Context(), "/v1/labels", req, &res); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "container %s labels: %s\n", res.Container, formatLabels(res.Labels))
			return nil
		},
	}
}

// labelRequest reads KEY=VALUE (set) and KEY- (remove) arguments. A key set twice with
// different values is refused here; the peer checks the labels themselves. Pure.
func labelRequest(container string, args []string) (router.LabelRequest, error) {
	req := router.LabelRequest{Container: container}
	for _, a := range args {
		if k, v, ok := strings.Cut(a, "="); ok {
			if k == "" {
				return req, fmt.Errorf("label %q has no key", a)
			}
			if old, dup := req.Set[k]; dup && old != v {
				return req, fmt.Errorf("label %q is set twice, to %q and %q", k, old, v)
			}
			if req.Set == nil {
				req.Set = map[string]string{}
			}
			req.Set[k] = v
			continue
		}
		if k, ok := strings.CutSuffix(a, "-"); ok && k != "" {
			req.Remove = append(req.Remove, k)
			continue
		}
		return req, fmt.Errorf("%q is neither KEY=VALUE (set) nor KEY- (remove)", a)
	}
	return req, nil
}

// formatLabels shows labels as k=v,k2=v2 in key order, "(none)" for none. Pure.
func formatLabels(labels map[string]string) string {
	if len(labels) == 0 {
		return "(none)"
	}
	parts := make([]string, 0, len(labels))
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		parts = append(parts, k+"="+labels[k])
	}
	return strings.Join(parts, ",")
}
