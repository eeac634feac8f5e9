package nft

import (
	"fmt"
	"log/slog"
	"sync"

	"github.com/google/nftables"
	"github.com/prometheus/client_golang/prometheus"
)

// Deps are the collaborators of a user of the table (a Guard, an Isolator).
type Deps struct {
	Logger   *slog.Logger          // nil: discard
	Registry prometheus.Registerer // nil: metrics not exported
	// NetNSFd is a network namespace to work in (tests); 0 means the current one.
	NetNSFd int
}

// Result is what one convergence did: the label of a user's applies counter.
type Result string

// Results.
const (
	Changed   Result = "changed"   // one transaction changed the kernel
	Unchanged Result = "unchanged" // the kernel already held the desired state
	Failed    Result = "error"     // refused input or a kernel error: nothing changed
)

// Applier runs one user's convergences: one at a time, each on a connection of its own in
// the user's namespace, counted by result and logged when it fails. It keeps no copy of the
// kernel's state: each convergence reads what it needs. Safe for concurrent use (one mutex
// serialises Apply: each is a read of the user's objects and at most one transaction).
type Applier struct {
	log     *slog.Logger
	netns   int
	applies *prometheus.CounterVec // result
	mu      sync.Mutex             // serialises Apply
}

// NewApplier builds an Applier whose convergences are counted by applies (a name and help;
// its one label is result) and registers that counter and collectors on deps.Registry.
func NewApplier(deps Deps, applies prometheus.CounterOpts, collectors ...prometheus.Collector) (*Applier, error) {
	log := deps.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &Applier{log: log, netns: deps.NetNSFd, applies: prometheus.NewCounterVec(applies, []string{"result"})}
	if deps.Registry != nil {
		for _, c := range append([]prometheus.Collector{a.applies}, collectors...) {
			if err := deps.Registry.Register(c); err != nil {
				return nil, fmt.Errorf("metrics of %s: %w", applies.Name, err)
			}
		}
	}
	return a, nil
}

// Log is the applier's logger.
func (a *Applier) Log() *slog.Logger { return a.log }

// Applies is the counter of convergences with result r (tests read it).
func (a *Applier) Applies(r Result) prometheus.Counter { return a.applies.WithLabelValues(string(r)) }

// Conn connects to nftables in the applier's namespace (Open).
func (a *Applier) Conn() (*nftables.Conn, error) { return Open(a.netns) }

// Apply runs fn alone and counts its result, Failed for an error, which is logged with
// msg and returned.
func (a *Applier) Apply(msg string, fn func() (Result, error)) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	r, err := fn()
	if err != nil {
		a.applies.WithLabelValues(string(Failed)).Inc()
		a.log.Error(msg, "err", err)
		return err
	}
	a.applies.WithLabelValues(string(r)).Inc()
	return nil
}

// Clear deletes the objects of m (and the table when nothing else is left in it) in one
// transaction, as a convergence to run inside Apply: Unchanged when there are none. The
// log line and the error name what (e.g. "container guard").
func (a *Applier) Clear(m Mine, what string) (Result, error) {
	c, err := a.Conn()
	if err != nil {
		return "", err
	}
	o, err := Read(c, m)
	if err != nil {
		return "", err
	}
	if !o.Remove(c) {
		return Unchanged, nil
	}
	if err := c.Flush(); err != nil {
		return "", fmt.Errorf("%w: remove %s: %w", ErrKernel, what, err)
	}
	a.log.Info(what + " removed")
	return Changed, nil
}
