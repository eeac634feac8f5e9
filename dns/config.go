package dns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	mdns "github.com/miekg/dns"
)

// Config of a Server. Start from DefaultConfig.
type Config struct {
	// Domain served from the records, fully qualified (default "weft.local.").
	Domain string
	// Listen holds host:port addresses (each network's gateway, port 53),
	// each served on UDP and TCP. Port 0 picks one free port for both.
	Listen []string
	// TTL of weft answers, and the negative TTL in their SOA (default 30s).
	TTL time.Duration
	// Networks are the weft networks, by name and range: NAME.NETWORK names
	// and the asker's-network-first order come from them (networks.go), and
	// reverse lookups inside them are answered from the records (NXDOMAIN
	// when unknown), never forwarded. Server.SetNetworks replaces them.
	Networks []NetworkRange

	// Upstreams, host:port (port 53 if omitted); when empty, the nameservers
	// of ResolvConf are used. Addresses this server listens on are skipped.
	Upstreams []string
	// ResolvConf is re-read when its modification time or size changes,
	// checked at most every ResolvConfCheck (default "/etc/resolv.conf", 1s).
	ResolvConf      string
	ResolvConfCheck time.Duration
	// ForwardTimeout bounds one try at one upstream (default 2s); a query
	// tries every upstream once, in order.
	ForwardTimeout time.Duration
	// CacheSize bounds the forwarding cache in answers (default 10000;
	// 0 disables it). Positive answers are kept for their smallest TTL, up to
	// CacheMaxTTL (default 1h); negative ones for the SOA minimum, up to
	// CacheMaxNegativeTTL (default 5m), and not at all without a SOA.
	CacheSize           int
	CacheMaxTTL         time.Duration
	CacheMaxNegativeTTL time.Duration

	// UDPSize is the EDNS0 buffer size this server advertises and the
	// largest UDP answer it sends (default 1232). Clients without EDNS0 get
	// at most 512 bytes.
	UDPSize uint16
	// TCPIdleTimeout closes idle TCP connections (default 8s).
	TCPIdleTimeout time.Duration
}

// DefaultConfig returns the defaults; Listen is empty.
func DefaultConfig() Config {
	return Config{
		Domain:              "weft.local.",
		TTL:                 30 * time.Second,
		ResolvConf:          "/etc/resolv.conf",
		ResolvConfCheck:     time.Second,
		ForwardTimeout:      2 * time.Second,
		CacheSize:           10000,
		CacheMaxTTL:         time.Hour,
		CacheMaxNegativeTTL: 5 * time.Minute,
		UDPSize:             1232,
		TCPIdleTimeout:      8 * time.Second,
	}
}

// ErrConfig is wrapped by every Validate error.
var ErrConfig = errors.New("invalid dns config")

// Validate checks the config and normalizes Domain to lower case, fully
// qualified.
func (c *Config) Validate() error {
	d := strings.ToLower(mdns.Fqdn(c.Domain))
	if c.Domain == "" || d == "." {
		return fmt.Errorf("%w: domain must not be empty or the root", ErrConfig)
	}
	if _, ok := mdns.IsDomainName(d); !ok || len(d) > 253-maxNameLen {
		return fmt.Errorf("%w: domain %q is not a domain name of at most %d bytes", ErrConfig, c.Domain, 253-maxNameLen)
	}
	if strings.HasSuffix(d, ".arpa.") || d == "arpa." {
		return fmt.Errorf("%w: domain %q is under arpa", ErrConfig, c.Domain)
	}
	c.Domain = d
	for _, l := range c.Listen {
		if _, _, err := net.SplitHostPort(l); err != nil {
			return fmt.Errorf("%w: listen address %q: %w", ErrConfig, l, err)
		}
	}
	if c.TTL < time.Second || c.TTL > 24*time.Hour {
		return fmt.Errorf("%w: ttl %v must be between 1s and 24h", ErrConfig, c.TTL)
	}
	if _, err := newNetTable(c.Networks, 0); err != nil {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	for _, u := range c.Upstreams {
		if _, err := upstreamAddr(u, "53"); err != nil {
			return fmt.Errorf("%w: %w", ErrConfig, err)
		}
	}
	if len(c.Upstreams) == 0 && c.ResolvConf == "" {
		return fmt.Errorf("%w: neither upstreams nor a resolv.conf path", ErrConfig)
	}
	if c.ResolvConfCheck < 0 {
		return fmt.Errorf("%w: resolv.conf check interval %v", ErrConfig, c.ResolvConfCheck)
	}
	if c.ForwardTimeout <= 0 {
		return fmt.Errorf("%w: forward timeout %v", ErrConfig, c.ForwardTimeout)
	}
	if c.CacheSize < 0 || c.CacheMaxTTL < 0 || c.CacheMaxNegativeTTL < 0 {
		return fmt.Errorf("%w: negative cache size or ttl", ErrConfig)
	}
	if c.UDPSize < mdns.MinMsgSize {
		return fmt.Errorf("%w: udp size %d below %d", ErrConfig, c.UDPSize, mdns.MinMsgSize)
	}
	if c.TCPIdleTimeout <= 0 {
		return fmt.Errorf("%w: tcp idle timeout %v", ErrConfig, c.TCPIdleTimeout)
	}
	return nil
}

// upstreamAddr returns u as ip:port, with defPort when u has none.
func upstreamAddr(u, defPort string) (string, error) {
	host, port, err := net.SplitHostPort(u)
	if err != nil {
		host, port = strings.Trim(u, "[]"), defPort
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return "", fmt.Errorf("upstream %q: not an ip address", u)
	}
	return net.JoinHostPort(a.String(), port), nil
}
