package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"gopkg.in/yaml.v3"

	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/router"
)

// newPolicyCmd is `weft policy` (issue #15): policies are replicated objects in the Raft
// state, so any peer's socket serves them; a write is forwarded to the Raft leader. The peer
// validates the file; the CLI only reads the policy's name from it.
func newPolicyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Apply, list, show and remove the cluster's network policies",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newPolicyApplyCmd(), newPolicyLsCmd(), newPolicyShowCmd(), newPolicyRmCmd(), newPolicyExplainCmd())
	return cmd
}

func newPolicyApplyCmd() *cobra.Command {
	var file string
	cmd := &cobra.Command{
		Use:   "apply -f FILE",
		Short: "Create or replace a policy from a YAML or JSON file (its name from the file's `name`; - reads stdin)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			data, err := readPolicyFile(cmd.InOrStdin(), file)
			if err != nil {
				return err
			}
			name, err := policyName(data)
			if err != nil {
				return fmt.Errorf("policy apply %s: %w", file, err)
			}
			var info router.PolicyInfo
			if err := client(cmd).Post(cmd.Context(), "/v1/policies", router.PolicyRequest{Name: name, File: data}, &info); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "applied policy %s to network %s (version %d)\n", info.Name, info.Network, info.Version)
			return nil
		},
	}
	cmd.Flags().StringVarP(&file, "filename", "f", "", "the policy file, YAML or JSON (required; - for stdin)")
	cmd.MarkFlagRequired("filename")
	return cmd
}

// readPolicyFile reads path (- is in), refusing more than a policy may hold before sending it.
func readPolicyFile(in io.Reader, path string) ([]byte, error) {
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("policy apply: %w", err)
		}
		defer f.Close()
		in = f
	}
	data, err := io.ReadAll(io.LimitReader(in, ipam.MaxPolicySpecBytes+1))
	if err != nil {
		return nil, fmt.Errorf("policy apply: read %s: %w", path, err)
	}
	if len(data) > ipam.MaxPolicySpecBytes {
		return nil, fmt.Errorf("policy apply: %s is larger than %d bytes", path, ipam.MaxPolicySpecBytes)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, fmt.Errorf("policy apply: %s is empty", path)
	}
	return data, nil
}

// errNoPolicyName: the file does not name its policy.
var errNoPolicyName = errors.New(`the file has no top-level "name"`)

// policyName reads the policy's name from the file's top-level `name` (the only place the
// peer's parser reads it: a Kubernetes-style `metadata.name` is refused there as an unknown
// field, so it is not accepted here either). YAML is a superset of JSON, so one parser reads
// both; the peer's validator reports anything else wrong with the file. Pure.
func policyName(data []byte) (string, error) {
	var doc struct {
		Name any `yaml:"name"`
	}
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return "", fmt.Errorf("not YAML or JSON: %w", err)
	}
	name := doc.Name
	switch s, ok := name.(string); {
	case name == nil:
		return "", errNoPolicyName
	case !ok:
		return "", fmt.Errorf("the policy's name %v is not a string", name)
	case s == "":
		return "", errNoPolicyName
	default:
		return s, nil
	}
}

func newPolicyLsCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List the cluster's policies",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var list []router.PolicyInfo
			if err := client(cmd).Get(cmd.Context(), "/v1/policies", &list); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd, list)
			}
			printPolicies(cmd.OutOrStdout(), list)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func newPolicyShowCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Show one policy as the cluster stores it (canonical JSON)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var info router.PolicyInfo
			if err := client(cmd).Get(cmd.Context(), "/v1/policies/"+url.PathEscape(args[0]), &info); err != nil {
				return err
			}
			return printPolicy(cmd.OutOrStdout(), info)
		},
	}
}

func newPolicyRmCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME",
		Short: "Remove a policy",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := client(cmd).Delete(cmd.Context(), "/v1/policies/"+url.PathEscape(args[0]), nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed policy %s\n", args[0])
			return nil
		},
	}
}

func printPolicies(out io.Writer, list []router.PolicyInfo) {
	if len(list) == 0 {
		fmt.Fprintln(out, "no policy")
		return
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tNETWORK\tVERSION")
	for _, p := range list {
		fmt.Fprintf(tw, "%s\t%s\t%d\n", p.Name, p.Network, p.Version)
	}
	tw.Flush()
}

// printPolicy shows the header and the spec indented, so it reads as the file did.
func printPolicy(out io.Writer, p router.PolicyInfo) error {
	fmt.Fprintf(out, "name:    %s\nnetwork: %s\nversion: %d\n", p.Name, p.Network, p.Version)
	var spec bytes.Buffer
	if err := json.Indent(&spec, p.Spec, "", "  "); err != nil {
		return fmt.Errorf("policy show %s: the peer answered a spec that is not JSON: %w", p.Name, err)
	}
	fmt.Fprintf(out, "spec:\n%s\n", spec.String())
	return nil
}

func newPolicyExplainCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "explain SRC DST [PROTO/]PORT",
		Short: "Say what the applied policy does with a new connection from SRC to DST, and which rule decides",
		Long: "SRC and DST are addresses, or containers by ID or name as this peer knows them (its own and\n" +
			"gossiped). PROTO is tcp (the default), udp, sctp or icmp (icmp alone, no port).",
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			proto, port, err := splitProtoPort(args[2])
			if err != nil {
				return fmt.Errorf("policy explain: %w", err)
			}
			q := url.Values{"src": {args[0]}, "dst": {args[1]}, "proto": {proto}}
			if port != 0 {
				q.Set("port", strconv.Itoa(int(port)))
			}
			var ex router.PolicyExplain
			if err := client(cmd).Get(cmd.Context(), "/v1/policy/explain?"+q.Encode(), &ex); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd, ex)
			}
			printExplain(cmd.OutOrStdout(), args[0], args[1], ex)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

// splitProtoPort reads [PROTO/]PORT, or icmp alone. The peer checks the values. Pure.
func splitProtoPort(s string) (string, uint16, error) {
	proto, port, found := strings.Cut(s, "/")
	if !found {
		if strings.EqualFold(s, "icmp") {
			return "icmp", 0, nil
		}
		proto, port = "tcp", s
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return "", 0, fmt.Errorf("port %q: want [PROTO/]PORT with PORT 1-65535, or icmp", s)
	}
	return strings.ToLower(proto), uint16(n), nil
}

// printExplain shows the decision first, then each direction's verdict and its counter.
func printExplain(out io.Writer, src, dst string, ex router.PolicyExplain) {
	verdict := "ALLOWED"
	if !ex.Allowed {
		verdict = "DENIED"
	}
	what := ex.Proto
	if ex.Port != 0 {
		what += "/" + strconv.Itoa(int(ex.Port))
	}
	fmt.Fprintf(out, "%s: %s (%v) -> %s (%v) %s\n", verdict, src, ex.Src, dst, ex.Dst, what)
	fmt.Fprintf(out, "  %s\n", ex.Reason)
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	for _, d := range []struct {
		name string
		v    router.PolicyExplainVerdict
	}{{"egress at source", ex.Egress}, {"ingress at destination", ex.Ingress}} {
		if d.v.Reason == "" {
			continue // not reached: the egress verdict denied
		}
		counter := ""
		if d.v.Counter != "" && !d.v.Allowed {
			counter = "\tcounter " + d.v.Counter
		}
		fmt.Fprintf(tw, "  %s:\t%s%s\n", d.name, d.v.Reason, counter)
	}
	tw.Flush()
}
