package netpol

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"
)

// Parse reads one policy from a YAML or JSON file (JSON is read as YAML, so both give
// positions) and validates it. Everything wrong is an ErrPolicy naming the file, the line
// and column, and the reason: a syntax error, an unknown field, a value of the wrong type,
// a bad value, a file above MaxFileBytes, more than one document. Field names are those
// of the JSON tags (name, network, selector.matchLabels, ingress[].peers[].cidr,
// ports[].proto/from/to, with port as a shorthand for from alone).
func Parse(name string, data []byte) (Policy, error) {
	fail := func(format string, args ...any) (Policy, error) {
		return Policy{}, fmt.Errorf("%w: %s: %s", ErrPolicy, name, fmt.Sprintf(format, args...))
	}
	if len(data) > MaxFileBytes {
		return fail("%d bytes, at most %d", len(data), MaxFileBytes)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return fail("empty file")
	}
	// Tabs are whitespace in JSON but not YAML indentation: a JSON file indented with
	// tabs is read with the tabs as spaces (a tab inside a JSON string is invalid anyway).
	if data = bytes.TrimSpace(data); data[0] == '{' {
		data = bytes.ReplaceAll(data, []byte("\t"), []byte(" "))
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var p Policy
	if err := dec.Decode(&p); err != nil {
		return fail("%s", yamlReason(err))
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			return fail("%s", yamlReason(err))
		}
		return fail("line %d: a second document: one policy per file", extra.Line)
	}
	if err := p.Validate(); err != nil {
		return Policy{}, fmt.Errorf("%s: %w", name, err)
	}
	return p, nil
}

// yamlReason is the text of a yaml error without the library's prefix.
func yamlReason(err error) string {
	var te *yaml.TypeError
	if errors.As(err, &te) {
		return strings.Join(te.Errors, "; ")
	}
	return strings.TrimPrefix(err.Error(), "yaml: ")
}

// keysError refuses a mapping with a key not in allowed (a typo would otherwise be a rule
// silently missing), and anything that is not a mapping.
func keysError(n *yaml.Node, what string, allowed ...string) error {
	if n.Kind != yaml.MappingNode {
		return fmt.Errorf("line %d column %d: %s: want a mapping", n.Line, n.Column, what)
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k := n.Content[i]
		if !slices.Contains(allowed, k.Value) {
			return fmt.Errorf("line %d column %d: %s: unknown field %.40q (want one of %s)",
				k.Line, k.Column, what, k.Value, strings.Join(allowed, ", "))
		}
	}
	return nil
}

// UnmarshalYAML decodes a policy, refusing unknown fields and noting its position.
func (p *Policy) UnmarshalYAML(n *yaml.Node) error {
	if err := keysError(n, "policy", "name", "network", "selector", "order", "types", "ingress", "egress"); err != nil {
		return err
	}
	type plain Policy
	var v plain
	if err := n.Decode(&v); err != nil {
		return err
	}
	*p = Policy(v)
	p.pos = position{n.Line, n.Column}
	return nil
}

// UnmarshalYAML decodes a rule, refusing unknown fields and noting its position.
func (r *Rule) UnmarshalYAML(n *yaml.Node) error {
	if err := keysError(n, "rule", "action", "peers", "ports"); err != nil {
		return err
	}
	type plain Rule
	var v plain
	if err := n.Decode(&v); err != nil {
		return err
	}
	*r = Rule(v)
	r.pos = position{n.Line, n.Column}
	return nil
}

// UnmarshalYAML decodes a peer, its cidr with the position of a bad one.
func (p *Peer) UnmarshalYAML(n *yaml.Node) error {
	if err := keysError(n, "peer", "selector", "network", "cidr"); err != nil {
		return err
	}
	var v struct {
		Selector *Selector `yaml:"selector"`
		Network  string    `yaml:"network"`
		CIDR     yaml.Node `yaml:"cidr"`
	}
	if err := n.Decode(&v); err != nil {
		return err
	}
	*p = Peer{Selector: v.Selector, Network: v.Network, pos: position{n.Line, n.Column}}
	if v.CIDR.Kind != 0 {
		pfx, err := netip.ParsePrefix(v.CIDR.Value)
		if err != nil {
			return fmt.Errorf("line %d column %d: cidr %.60q: want an address/bits prefix", v.CIDR.Line, v.CIDR.Column, v.CIDR.Value)
		}
		p.CIDR = pfx
	}
	return nil
}

// UnmarshalYAML decodes a port range; port is from alone.
func (r *PortRange) UnmarshalYAML(n *yaml.Node) error {
	if err := keysError(n, "port range", "proto", "port", "from", "to"); err != nil {
		return err
	}
	var v struct {
		Proto Proto  `yaml:"proto"`
		Port  uint16 `yaml:"port"`
		From  uint16 `yaml:"from"`
		To    uint16 `yaml:"to"`
	}
	if err := n.Decode(&v); err != nil {
		return err
	}
	if v.Port != 0 && (v.From != 0 || v.To != 0) {
		return fmt.Errorf("line %d column %d: port range: port or from/to, not both", n.Line, n.Column)
	}
	*r = PortRange{Proto: v.Proto, From: v.From, To: v.To, pos: position{n.Line, n.Column}}
	if v.Port != 0 {
		r.From = v.Port
	}
	return nil
}

// UnmarshalYAML decodes a selector, refusing unknown fields.
func (s *Selector) UnmarshalYAML(n *yaml.Node) error {
	if err := keysError(n, "selector", "matchLabels", "matchExpressions"); err != nil {
		return err
	}
	type plain Selector
	var v plain
	if err := n.Decode(&v); err != nil {
		return err
	}
	*s = Selector(v)
	return nil
}

// UnmarshalYAML decodes an expression, refusing unknown fields and noting its position.
func (r *Requirement) UnmarshalYAML(n *yaml.Node) error {
	if err := keysError(n, "expression", "key", "operator", "values"); err != nil {
		return err
	}
	type plain Requirement
	var v plain
	if err := n.Decode(&v); err != nil {
		return err
	}
	*r = Requirement(v)
	r.pos = position{n.Line, n.Column}
	return nil
}
