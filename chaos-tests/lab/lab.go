package lab

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/weftnet/weft/datapath/nslab"
	"github.com/weftnet/weft/datapath/wireguard"
)

// Config describes a lab. Prefix, Hosts and BinDir are required; the rest has defaults.
type Config struct {
	// Prefix names every namespace and link of the lab: 1 to 8 characters of [a-z0-9],
	// starting with a letter, unique among labs that run at the same time.
	Prefix string
	// Hosts is the number of hosts (peers), at least 1.
	Hosts int
	// BinDir holds the `weft` and `weft-cni` binaries.
	BinDir string
	// Logger receives the lab's own progress messages; nil discards them.
	Logger *slog.Logger
	// Underlay is the subnet shared by the hosts' eth0; host i gets address .10+i.
	// Default 198.18.0.0/24 (RFC 2544 benchmarking range, never routed on the Internet).
	Underlay netip.Prefix
	// IPAllocRange is passed to every peer as --ipalloc-range. Default 10.40.0.0/16.
	IPAllocRange netip.Prefix
	// LogLevel is passed to every peer as --log-level. Default "info".
	LogLevel string
	// PeerArgs, when set, returns extra `weft peer` flags for host i (seed lists and so on).
	PeerArgs func(i int) []string
	// Dir is the lab's work directory; it must not exist yet and is removed by Close.
	// Default: a fresh temporary directory.
	Dir string
	// ReadyTimeout bounds the wait for a peer to answer `weft status` when the context
	// given to Start has no deadline. Default 30s.
	ReadyTimeout time.Duration
	// StopTimeout is how long Stop waits after SIGTERM before it sends SIGKILL and fails.
	// Default 15s.
	StopTimeout time.Duration
	// NoStart leaves the peers stopped after New; call Host.Start or Lab.StartAll.
	NoStart bool
	// SRIOV, when set, gives every host a stand-in SR-IOV NIC and its peer --sysfs-root
	// (see SRIOVConfig).
	SRIOV *SRIOVConfig
}

var prefixRE = regexp.MustCompile(`^[a-z][a-z0-9]{0,7}$`)

// Validate checks the config and fills in defaults.
func (c *Config) Validate() error {
	if !prefixRE.MatchString(c.Prefix) {
		return fmt.Errorf("lab: prefix %q must be 1-8 characters of [a-z0-9] starting with a letter", c.Prefix)
	}
	if c.Hosts < 1 || c.Hosts > 200 {
		return fmt.Errorf("lab: hosts %d out of range 1..200", c.Hosts)
	}
	if c.BinDir == "" {
		return errors.New("lab: bin dir is empty")
	}
	for _, b := range []string{"weft", "weft-cni"} {
		if _, err := os.Stat(filepath.Join(c.BinDir, b)); err != nil {
			return fmt.Errorf("lab: binary %s: %w", b, err)
		}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if !c.Underlay.IsValid() {
		c.Underlay = netip.MustParsePrefix("198.18.0.0/24")
	}
	c.Underlay = c.Underlay.Masked()
	if !c.Underlay.Addr().Is4() || c.Underlay.Bits() > 24 {
		return fmt.Errorf("lab: underlay %s must be IPv4 and /24 or larger", c.Underlay)
	}
	if !c.IPAllocRange.IsValid() {
		c.IPAllocRange = netip.MustParsePrefix("10.40.0.0/16")
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.ReadyTimeout <= 0 {
		c.ReadyTimeout = 30 * time.Second
	}
	if c.StopTimeout <= 0 {
		c.StopTimeout = 15 * time.Second
	}
	if c.SRIOV != nil {
		s := *c.SRIOV // a copy: the caller's config is not filled in behind its back
		if err := s.validate(c.Prefix); err != nil {
			return err
		}
		c.SRIOV = &s
	}
	return nil
}

// Lab is a running lab. Create it with New and always Close it.
type Lab struct {
	cfg     Config
	log     *slog.Logger
	dir     string
	cniBin  string // holds the `weft` symlink to weft-cni
	keyFile string // the lab's cluster key, given to every peer (see securityArgs)
	ulNS    string // underlay namespace name
	hosts   []*Host
	closeMu sync.Mutex // guards closed
	closed  bool
}

// New builds the lab: the underlay namespace and bridge, one namespace per host wired to
// it, a work directory per host, and (unless cfg.NoStart) a running, ready peer per host.
// On error everything made so far is torn down.
func New(ctx context.Context, cfg Config) (_ *Lab, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	binDir, err := filepath.Abs(cfg.BinDir)
	if err != nil {
		return nil, err
	}
	cfg.BinDir = binDir
	l := &Lab{cfg: cfg, log: cfg.Logger.With("lab", cfg.Prefix), ulNS: cfg.Prefix + "-ul"}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()

	// Leftovers of an earlier lab with this prefix (a crashed run) would make every
	// create below fail with EEXIST.
	stale, err := listNetNS(cfg.Prefix)
	if err != nil {
		return nil, err
	}
	for _, n := range stale {
		l.log.Warn("removing leftover namespace", "netns", n)
		if err := nslab.DeleteNetNS(n); err != nil {
			return nil, err
		}
	}

	if cfg.Dir != "" {
		if err := os.Mkdir(cfg.Dir, 0o700); err != nil {
			return nil, fmt.Errorf("lab: create dir: %w", err)
		}
		l.dir = cfg.Dir
	} else if l.dir, err = os.MkdirTemp("", "weftlab-"+cfg.Prefix+"-"); err != nil {
		return nil, fmt.Errorf("lab: create dir: %w", err)
	}
	// The CNI plugin is `type: "weft"`, so the runtime looks for a binary named weft:
	// a directory of its own holds that name, pointing at weft-cni.
	l.cniBin = filepath.Join(l.dir, "cni-bin")
	if err := os.Mkdir(l.cniBin, 0o755); err != nil {
		return nil, err
	}
	if err := os.Symlink(filepath.Join(cfg.BinDir, "weft-cni"), filepath.Join(l.cniBin, "weft")); err != nil {
		return nil, err
	}

	l.keyFile = filepath.Join(l.dir, "cluster.key")
	if err := writeClusterKey(l.keyFile); err != nil {
		return nil, err
	}

	if err := l.buildUnderlay(); err != nil {
		return nil, err
	}
	if !cfg.NoStart {
		if err := l.StartAll(ctx); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// buildUnderlay makes the underlay namespace with its bridge and every host namespace,
// each joined to the bridge by a veth whose host end is eth0.
func (l *Lab) buildUnderlay() error {
	p := l.cfg.Prefix
	if _, err := nslab.CreateNetNS(l.ulNS); err != nil {
		return err
	}
	ulH, err := nslab.HandleAt(nslab.NetNSPath(l.ulNS))
	if err != nil {
		return err
	}
	defer ulH.Close()
	if err := nslab.LinkUp(ulH, "lo"); err != nil {
		return err
	}
	br, err := nslab.AddBridge(ulH, p+"br", 0)
	if err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	base := l.cfg.Underlay.Addr().As4()
	for i := range l.cfg.Hosts {
		h, err := l.newHost(i)
		if err != nil {
			return err
		}
		l.hosts = append(l.hosts, h)

		a := base
		a[3] += byte(10 + i)
		h.Addr = netip.PrefixFrom(netip.AddrFrom4(a), l.cfg.Underlay.Bits())
		err = nslab.AddUplink(nslab.Uplink{
			Underlay: ulH, Name: fmt.Sprintf("%sh%d", p, i), Bridge: br,
			HostPath: h.NSPath, HostDev: "eth0", Addr: h.Addr,
		})
		if err != nil {
			return fmt.Errorf("lab: host %s: %w", h.Name, err)
		}
		if l.cfg.SRIOV != nil {
			if err := h.setupSRIOV(*l.cfg.SRIOV); err != nil {
				return err
			}
		}
		l.log.Info("host ready", "host", h.Name, "underlay", h.Addr)
	}
	return nil
}

// Dir returns the lab's work directory.
func (l *Lab) Dir() string { return l.dir }

// KeyFile is the lab's cluster key file (mode 0600), which every peer gets as --key-file
// unless its flags choose otherwise.
func (l *Lab) KeyFile() string { return l.keyFile }

// ClusterKey is the content of KeyFile: the key in base64 on one line, without the newline.
func (l *Lab) ClusterKey() (string, error) {
	b, err := os.ReadFile(l.keyFile)
	return strings.TrimSpace(string(b)), err
}

// writeClusterKey writes a random cluster key to path, mode 0600, in the format of `weft
// keygen` (32 bytes, standard base64, one line). Made here rather than by running the
// binary, so the lab's own tests work with a stand-in binary.
func writeClusterKey(path string) error {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return fmt.Errorf("lab: cluster key: %w", err)
	}
	if err := os.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600); err != nil {
		return fmt.Errorf("lab: cluster key: %w", err)
	}
	return nil
}

// Prefix returns the lab's name prefix.
func (l *Lab) Prefix() string { return l.cfg.Prefix }

// CNIBinDir returns the directory holding the `weft` plugin name (a symlink to weft-cni).
func (l *Lab) CNIBinDir() string { return l.cniBin }

// UnderlayNetNS returns the name of the underlay namespace.
func (l *Lab) UnderlayNetNS() string { return l.ulNS }

// Hosts returns the lab's hosts, in index order.
func (l *Lab) Hosts() []*Host { return l.hosts }

// Host returns host i.
func (l *Lab) Host(i int) *Host { return l.hosts[i] }

// StartAll starts every host's peer that is not running and waits until all are ready.
func (l *Lab) StartAll(ctx context.Context) error {
	for _, h := range l.hosts {
		if h.Running() {
			continue
		}
		if err := h.Start(ctx); err != nil {
			return err
		}
	}
	return nil
}

// Close stops every peer (SIGTERM, then SIGKILL after a short grace), deletes every
// namespace the lab made (which deletes every link in them) and removes the work
// directory. It is safe to call twice; the second call does nothing.
func (l *Lab) Close() error {
	l.closeMu.Lock()
	defer l.closeMu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true

	var errs []error
	for _, h := range l.hosts {
		if err := h.shutdown(5 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	for _, h := range l.hosts {
		// A peer killed with SIGKILL cannot remove its userspace WireGuard UAPI socket, and
		// /var/run/wireguard is shared by every namespace: remove it with the lab.
		sock := filepath.Join("/var/run/wireguard", wireguard.DeriveName(h.Name)+".sock")
		if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		if err := h.closeSRIOV(); err != nil {
			errs = append(errs, err)
		}
		if err := h.deleteContainers(); err != nil {
			errs = append(errs, err)
		}
		h.nsHandle.Close()
		if err := nslab.DeleteNetNS(h.Name); err != nil {
			errs = append(errs, err)
		}
	}
	if err := nslab.DeleteNetNS(l.ulNS); err != nil {
		errs = append(errs, err)
	}
	// Anything else carrying the prefix (a container created behind the lab's back).
	if rest, err := listNetNS(l.cfg.Prefix); err == nil {
		for _, n := range rest {
			if err := nslab.DeleteNetNS(n); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if l.dir != "" {
		if err := os.RemoveAll(l.dir); err != nil {
			errs = append(errs, err)
		}
	}
	l.log.Info("lab closed")
	return errors.Join(errs...)
}

// Cleanup removes what a lab with prefix left behind when its process died without
// Close: it sends SIGKILL to the peers recorded in dir/h*/peer.pid (only when
// /proc/<pid>/cmdline shows that very peer: a `weft peer` with this lab's data dir, so a
// recycled PID is never hit), deletes the prefix's namespaces and removes dir.
// dir may be empty when only namespaces are to be removed.
func Cleanup(prefix, dir string, logger *slog.Logger) error {
	if !prefixRE.MatchString(prefix) {
		return fmt.Errorf("lab: bad prefix %q", prefix)
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	var errs []error
	if dir != "" {
		pidFiles, _ := filepath.Glob(filepath.Join(dir, "h*", pidFileName))
		for _, pf := range pidFiles {
			if err := killRecordedPeer(pf, logger); err != nil {
				errs = append(errs, err)
			}
		}
	}
	names, err := listNetNS(prefix)
	if err != nil {
		errs = append(errs, err)
	}
	for _, n := range names {
		logger.Info("deleting namespace", "netns", n)
		if err := nslab.DeleteNetNS(n); err != nil {
			errs = append(errs, err)
		}
	}
	if dir != "" {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Poll calls fn every interval until it returns nil or ctx ends; then it returns the last
// error of fn, wrapped with the context's error. Tests use it instead of fixed sleeps.
// It is nslab.Poll, kept under this name for the chaos tests.
func Poll(ctx context.Context, interval time.Duration, fn func() error) error {
	return nslab.Poll(ctx, interval, fn)
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	s = strings.TrimRight(s, "\n")
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
