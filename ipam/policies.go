package ipam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"time"
)

// Policies as replicated objects (issue #15, Policy 2): `weft policy apply` and `weft policy
// rm` are Raft commands, as network create and rm are (networks.go). A policy is opaque here:
// its spec is canonical JSON that a validator passed in through ClusterConfig checks and
// produces (the policy model lives in datapath/netpol; ipam does not import it). The
// validator runs where the file arrives (PutPolicy) and again on the leader before the command
// enters the log, never in the FSM: a log replayed under a later validator must apply the
// same way, so the FSM checks only the bounds, which never change.
//
// Clients learn a change with the block table (a tableDelta carrying the policy). A delta
// whose spec would not fit one gossip message goes out without it, and a client receiving
// that fetches the table instead (see stripPolicySpec).

// Bounds on the policy table. MaxPolicies × MaxPolicySpecBytes would be 64 MiB, more than a
// fetched table may hold (maxTableBytes), so the specs together are bounded too.
const (
	MaxPolicies         = 1000
	MaxPolicySpecBytes  = 64 << 10
	MaxPolicyTotalBytes = 8 << 20
	// MaxPolicyNameLen: a policy name is a DNS label, as Kubernetes object names are.
	MaxPolicyNameLen = 63
)

// Policy errors, matched with errors.Is.
var (
	// ErrInvalidPolicy: the file or the spec is refused (the validator's reason, or a bound).
	ErrInvalidPolicy = errors.New("invalid policy")
	// ErrUnknownPolicy: no policy of that name.
	ErrUnknownPolicy = errors.New("no such policy")
	// ErrPolicyLimit: the table is full (MaxPolicies or MaxPolicyTotalBytes).
	ErrPolicyLimit = errors.New("policy table full")
)

// PolicyValidator checks a policy file (YAML or JSON, as the operator wrote it) named name,
// and returns its canonical JSON and the network it applies to; its error names the reason
// and, where it can, the position in the file. It must be deterministic and safe for
// concurrent use. The lead wires netpol.Parse in.
type PolicyValidator func(name string, spec []byte) (canonical []byte, network string, err error)

// PolicyObject is one replicated policy. Spec is the validator's canonical JSON (a
// json.RawMessage, so it travels as JSON, not base64); Version is the Raft index of the put
// that last changed it.
type PolicyObject struct {
	Name    string          `json:"name"`
	Network string          `json:"network"`
	Spec    json.RawMessage `json:"spec,omitempty"`
	Version uint64          `json:"version"`
	// Created is when the apply reached a peer (Unix ns, that peer's clock): the policy's
	// sync lag is measured from it (router/netpol.go). Informational only.
	Created int64 `json:"created,omitempty"`
}

var policyNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// CheckPolicyName refuses a name that is not a DNS label of at most MaxPolicyNameLen bytes.
func CheckPolicyName(name string) error {
	if !policyNameRE.MatchString(name) {
		return fmt.Errorf("%w: name %q must be 1-%d lower-case letters, digits or '-', starting and ending with a letter or digit",
			ErrInvalidPolicy, name, MaxPolicyNameLen)
	}
	return nil
}

// checkShape checks the bounds of one policy that every table must hold: name, network named,
// spec non-empty valid JSON of at most MaxPolicySpecBytes. Pure; O(spec).
func (p PolicyObject) checkShape() error {
	if err := CheckPolicyName(p.Name); err != nil {
		return err
	}
	if p.Network == "" || len(p.Network) > maxNameLen {
		return fmt.Errorf("%w: policy %s names network %q", ErrInvalidPolicy, p.Name, p.Network)
	}
	if len(p.Spec) == 0 {
		return fmt.Errorf("%w: policy %s has an empty spec", ErrInvalidPolicy, p.Name)
	}
	if len(p.Spec) > MaxPolicySpecBytes {
		return fmt.Errorf("%w: policy %s spec is %d bytes, at most %d", ErrInvalidPolicy, p.Name, len(p.Spec), MaxPolicySpecBytes)
	}
	if !json.Valid(p.Spec) {
		return fmt.Errorf("%w: policy %s spec is not valid JSON", ErrInvalidPolicy, p.Name)
	}
	return nil
}

// checkPutPolicy says whether p may be put on st: its shape, its network defined, and room in
// the table (counting the policy it replaces). unchanged is true when st already holds p
// exactly (a retried apply). Pure; O(policies) for the byte total.
func (st *fsmState) checkPutPolicy(p PolicyObject) (unchanged bool, err error) {
	if err := p.checkShape(); err != nil {
		return false, err
	}
	if _, ok := st.Networks[p.Network]; !ok {
		return false, fmt.Errorf("%w: policy %s applies to network %q, which the cluster does not define", ErrUnknownNetwork, p.Name, p.Network)
	}
	old, exists := st.Policies[p.Name]
	if exists && old.Network == p.Network && string(old.Spec) == string(p.Spec) {
		return true, nil
	}
	if !exists && len(st.Policies) >= MaxPolicies {
		return false, fmt.Errorf("%w: %d policies, at most %d; remove one first", ErrPolicyLimit, len(st.Policies), MaxPolicies)
	}
	total := len(p.Spec) - len(old.Spec)
	for _, q := range st.Policies {
		total += len(q.Spec)
	}
	if total > MaxPolicyTotalBytes {
		return false, fmt.Errorf("%w: the specs would total %d bytes, at most %d", ErrPolicyLimit, total, MaxPolicyTotalBytes)
	}
	return false, nil
}

// putPolicy stores p at index if checkPutPolicy allows it, or changes nothing. changed is
// false for a retried put of the same policy. Caller holds the state's lock.
func (st *fsmState) putPolicy(p PolicyObject, index uint64) (stored PolicyObject, changed bool, err error) {
	unchanged, err := st.checkPutPolicy(p)
	if err != nil {
		return PolicyObject{}, false, err
	}
	if unchanged {
		return st.Policies[p.Name], false, nil
	}
	p.Version = index
	st.Policies[p.Name] = p
	st.PolicyIndex = index
	return p, true, nil
}

// removePolicy takes policy name away, or says it does not exist.
func (st *fsmState) removePolicy(name string, index uint64) error {
	if _, ok := st.Policies[name]; !ok {
		return fmt.Errorf("%w: %q", ErrUnknownPolicy, name)
	}
	delete(st.Policies, name)
	st.PolicyIndex = index
	return nil
}

// validatePolicies checks the policy table of a snapshot or fetched table: every policy well
// shaped, filed under its name, and the bounds held. Networks are not required to exist: a
// network removed after its policies leaves them inert, not the table invalid.
func (st *fsmState) validatePolicies() error {
	if len(st.Policies) > MaxPolicies {
		return fmt.Errorf("%w: %d policies, at most %d", ErrBadTable, len(st.Policies), MaxPolicies)
	}
	total := 0
	for name, p := range st.Policies {
		if p.Name != name {
			return fmt.Errorf("%w: policy %q is filed under %q", ErrBadTable, p.Name, name)
		}
		if err := p.checkShape(); err != nil {
			return fmt.Errorf("%w: %v", ErrBadTable, err)
		}
		total += len(p.Spec)
	}
	if total > MaxPolicyTotalBytes {
		return fmt.Errorf("%w: policy specs total %d bytes, at most %d", ErrBadTable, total, MaxPolicyTotalBytes)
	}
	return nil
}

// policyResult is the answer to a refused policy command; the sentinel travels as a flag so
// it survives the forwarding RPC (commandResult.err rebuilds it).
func policyResult(err error) commandResult {
	var res commandResult
	sentinel := ErrInvalidPolicy
	switch {
	case errors.Is(err, ErrUnknownPolicy):
		res.NoPolicy, sentinel = true, ErrUnknownPolicy
	case errors.Is(err, ErrPolicyLimit):
		res.PolicyFull, sentinel = true, ErrPolicyLimit
	case errors.Is(err, ErrUnknownNetwork):
		res.Unknown, sentinel = true, ErrUnknownNetwork
	case errors.Is(err, ErrInvalidPolicy):
		res.BadPolicy = true
	default:
		res.Conflict, sentinel = true, ErrConflict
	}
	res.Err = strings.TrimPrefix(err.Error(), sentinel.Error()+": ")
	return res
}

// maxPolicyDeltaBytes: a policy delta larger than this, encoded, goes out without its spec
// (stripPolicySpec), so that the signed message fits one gossip broadcast (1 KiB).
const maxPolicyDeltaBytes = 640

// stripPolicySpec returns d without the policy's spec when d is a policy put too large to
// gossip; a client that receives it fetches the table (applyPolicyDelta). O(1) beyond encoding.
func stripPolicySpec(d tableDelta) tableDelta {
	if d.Op != opPolicyPut || d.Policy == nil {
		return d
	}
	if raw, err := json.Marshal(d); err == nil && len(raw) <= maxPolicyDeltaBytes {
		return d
	}
	p := *d.Policy
	p.Spec = nil
	d.Policy = &p
	return d
}

// applyPolicyDelta applies a gossiped policy put or remove to a client's view. A put without
// its spec (stripped for size) cannot be applied: errTableGap makes the client fetch.
func applyPolicyDelta(st *fsmState, d tableDelta) error {
	if d.Policy == nil {
		return fmt.Errorf("%w: %s delta %d without a policy", ErrBadTable, d.Op, d.Index)
	}
	if d.Op == opPolicyRemove {
		if err := st.removePolicy(d.Policy.Name, d.Index); err != nil {
			return fmt.Errorf("%w: %s delta %d: %v", ErrBadTable, d.Op, d.Index, err)
		}
		return nil
	}
	if len(d.Policy.Spec) == 0 {
		return errTableGap
	}
	if _, _, err := st.putPolicy(*d.Policy, d.Index); err != nil {
		return fmt.Errorf("%w: %s delta %d: %v", ErrBadTable, d.Op, d.Index, err)
	}
	return nil
}

// PutPolicy validates file (as the operator wrote it) with the configured validator and puts
// the policy named name through the log: on the leader directly, forwarded from any other
// peer. The leader validates the canonical spec again before proposing. Putting a policy
// exactly as it is stored succeeds and changes nothing. Errors: ErrInvalidPolicy (the
// validator's reason and position, or a bound), ErrUnknownNetwork, ErrPolicyLimit,
// ErrNoQuorum.
func (c *Cluster) PutPolicy(ctx context.Context, name string, file []byte) (PolicyObject, error) {
	p, err := c.validatePolicy(name, file)
	if err != nil {
		return PolicyObject{}, err
	}
	p.Created = time.Now().UnixNano()
	res, err := c.apply(ctx, command{Op: opPolicyPut, Policy: &p})
	if err != nil {
		return PolicyObject{}, err
	}
	if err := res.err(); err != nil {
		return PolicyObject{}, err
	}
	p.Version = res.Index
	return p, nil
}

// validatePolicy runs the configured validator on file and checks the bounds of the result.
func (c *Cluster) validatePolicy(name string, file []byte) (PolicyObject, error) {
	if err := CheckPolicyName(name); err != nil {
		return PolicyObject{}, err
	}
	if len(file) > MaxPolicySpecBytes {
		return PolicyObject{}, fmt.Errorf("%w: policy %s file is %d bytes, at most %d", ErrInvalidPolicy, name, len(file), MaxPolicySpecBytes)
	}
	if c.cfg.ValidatePolicy == nil {
		return PolicyObject{}, fmt.Errorf("%w: this peer has no policy validator configured", ErrInvalidPolicy)
	}
	canonical, network, err := c.cfg.ValidatePolicy(name, file)
	if err != nil {
		return PolicyObject{}, invalidPolicy{err}
	}
	p := PolicyObject{Name: name, Network: network, Spec: canonical}
	if err := p.checkShape(); err != nil {
		return PolicyObject{}, err
	}
	// A spec that names itself must name this policy: stored under one name and compiled
	// under another, it could not be removed by the name the compiler reports.
	var top struct {
		Name *string `json:"name"`
	}
	if json.Unmarshal(canonical, &top) == nil && top.Name != nil && *top.Name != name {
		return PolicyObject{}, fmt.Errorf("%w: the file names policy %q, not %q", ErrInvalidPolicy, *top.Name, name)
	}
	return p, nil
}

// RemovePolicy takes policy name out of the cluster through the log. Errors:
// ErrUnknownPolicy, ErrInvalidPolicy (a bad name), ErrNoQuorum.
func (c *Cluster) RemovePolicy(ctx context.Context, name string) error {
	if err := CheckPolicyName(name); err != nil {
		return err
	}
	res, err := c.apply(ctx, command{Op: opPolicyRemove, Policy: &PolicyObject{Name: name}})
	if err != nil {
		return err
	}
	return res.err()
}

// Policy returns policy name as the table this node goes by says.
func (c *Cluster) Policy(name string) (PolicyObject, bool) {
	var p PolicyObject
	var ok bool
	c.readTable(func(st *fsmState) { p, ok = st.Policies[name] })
	return p, ok
}

// Policies lists every policy, by name, and the Raft index of the last policy change (a
// watcher compares it to know whether anything changed). O(policies).
func (c *Cluster) Policies() ([]PolicyObject, uint64) {
	var out []PolicyObject
	var index uint64
	c.readTable(func(st *fsmState) {
		out = make([]PolicyObject, 0, len(st.Policies))
		for _, p := range st.Policies {
			out = append(out, p)
		}
		index = st.PolicyIndex
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, index
}

// PolicyIndex is the Raft index of the last policy change this node knows: O(1), for a
// watcher polling on every membership tick.
func (c *Cluster) PolicyIndex() uint64 {
	var index uint64
	c.readTable(func(st *fsmState) { index = st.PolicyIndex })
	return index
}

// leaderCheckPolicy checks a policy command on the leader before it enters the log: the
// cluster initialised, the canonical spec validated again (a forwarded command is untrusted;
// it must name the same network), and the table's bounds. refused is true when the command
// must not be proposed; res (or err, when there is no quorum) is the answer.
func (c *Cluster) leaderCheckPolicy(cmd command) (res commandResult, refused bool, err error) {
	if cmd.Policy == nil {
		err := fmt.Errorf("%w: %s without a policy", ErrInvalidPolicy, cmd.Op)
		c.refuseCommand("policy", err)
		return policyResult(err), true, nil
	}
	if err := c.EnsureClusterID(); errors.Is(err, ErrInvalidNetwork) {
		c.refuseCommand("uninitialised", err)
		return commandResult{Err: err.Error(), Conflict: true}, true, nil
	} else if err != nil {
		return commandResult{}, true, err
	}
	p := *cmd.Policy
	if cmd.Op == opPolicyPut {
		checked, err := c.validatePolicy(p.Name, p.Spec)
		if err == nil && checked.Network != p.Network {
			err = fmt.Errorf("%w: policy %s names network %q, its spec %q", ErrInvalidPolicy, p.Name, p.Network, checked.Network)
		}
		if err != nil {
			c.refuseCommand("policy_put", err)
			return policyResult(err), true, nil
		}
	}
	c.fsm.mu.RLock()
	if cmd.Op == opPolicyPut {
		_, err = c.fsm.state.checkPutPolicy(p)
	} else if _, ok := c.fsm.state.Policies[p.Name]; !ok {
		err = fmt.Errorf("%w: %q", ErrUnknownPolicy, p.Name)
	}
	c.fsm.mu.RUnlock()
	if err != nil {
		c.refuseCommand(strings.ReplaceAll(cmd.Op, "-", "_"), err)
		return policyResult(err), true, nil
	}
	return commandResult{}, false, nil
}

// invalidPolicy is a validator's refusal as ErrInvalidPolicy, without saying "invalid policy"
// twice when the validator's own error already starts with it (netpol's does).
type invalidPolicy struct{ err error }

func (e invalidPolicy) Error() string {
	if msg := e.err.Error(); strings.HasPrefix(msg, ErrInvalidPolicy.Error()) {
		return msg
	}
	return ErrInvalidPolicy.Error() + ": " + e.err.Error()
}

func (e invalidPolicy) Unwrap() []error { return []error{ErrInvalidPolicy, e.err} }
