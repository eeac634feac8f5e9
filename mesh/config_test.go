package mesh

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestConfigValidate(t *testing.T) {
	good := DefaultConfig()
	good.Name = "host-1"
	good.Identity = testIdentity("host-1")
	good.Seeds = []string{"10.0.0.1", "peer.example:7000", "[2001:db8::1]:6783", "2001:db8::2"}
	if err := good.Validate(); err != nil {
		t.Fatalf("good config: %v", err)
	}
	for name, edit := range map[string]func(*Config){
		"no name":          func(c *Config) { c.Name = "" },
		"bad name":         func(c *Config) { c.Name = "a/b" },
		"long name":        func(c *Config) { c.Name = strings.Repeat("n", 65) },
		"port":             func(c *Config) { c.BindPort = 70000 },
		"adv port":         func(c *Config) { c.AdvertisePort = -1 },
		"adv unspecified":  func(c *Config) { c.AdvertiseAddr = netip.IPv4Unspecified() },
		"bad seed":         func(c *Config) { c.Seeds = []string{"host:port"} },
		"empty seed":       func(c *Config) { c.Seeds = []string{" "} },
		"seed port 0":      func(c *Config) { c.Seeds = []string{"10.0.0.1:0"} },
		"backoff":          func(c *Config) { c.JoinBackoffMax = c.JoinBackoffMin / 2 },
		"no backoff":       func(c *Config) { c.JoinBackoffMin = 0 },
		"probe":            func(c *Config) { c.ProbeInterval = 0 },
		"probe timeout":    func(c *Config) { c.ProbeTimeout = c.ProbeInterval },
		"suspicion":        func(c *Config) { c.SuspicionMult = 0 },
		"gossip nodes":     func(c *Config) { c.GossipNodes = 0 },
		"gossip nodes big": func(c *Config) { c.GossipNodes = 17 },
		"events":           func(c *Config) { c.EventBuffer = 0 },
		"retention":        func(c *Config) { c.DeadPeerRetention = -time.Second },
		"queue":            func(c *Config) { c.MaxQueuedBroadcasts = 0 },
		"meta name":        func(c *Config) { c.Metadata.Name = "other" },
		"dead retry":       func(c *Config) { c.DeadRetryInterval = 0 },
		"dead retry for":   func(c *Config) { c.DeadRetryFor = -time.Second },
		"snapshot path":    func(c *Config) { c.SnapshotPath = "a\x00b" },
		"no identity":      func(c *Config) { c.Identity = nil },
		"membership mult":  func(c *Config) { c.MembershipRetransmitMult = 0 },
		"membership huge":  func(c *Config) { c.MembershipRetransmitMult = 11 },
	} {
		c := good
		edit(&c)
		if err := c.Validate(); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: Validate = %v, want ErrInvalidConfig", name, err)
		}
	}
	c := good
	c.Metadata.Capabilities = []string{"NOT VALID"}
	if _, err := New(c); !errors.Is(err, ErrBadMetadata) {
		t.Errorf("New with bad metadata: %v", err)
	}
}

func TestNormalizeTarget(t *testing.T) {
	for in, want := range map[string]string{
		"10.0.0.1":            "10.0.0.1:6783",
		" 10.0.0.1:7000 ":     "10.0.0.1:7000",
		"Peer.Example":        "peer.example:6783",
		"peer.example:1":      "peer.example:1",
		"2001:db8::1":         "[2001:db8::1]:6783",
		"[2001:db8::1]:7000":  "[2001:db8::1]:7000",
		"::ffff:10.0.0.1":     "10.0.0.1:6783",
		"[::ffff:10.0.0.1]:9": "10.0.0.1:9",
	} {
		got, err := normalizeTarget(in)
		if err != nil || got != want {
			t.Errorf("normalizeTarget(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "host:", ":6783", "host:65536", "a b", "fe80::1%eth0", "-bad-.example", "[::1]"} {
		if got, err := normalizeTarget(in); err == nil {
			t.Errorf("normalizeTarget(%q) = %q, want an error", in, got)
		}
	}
}

func TestGossipKey(t *testing.T) {
	k1, k2 := GossipKey([]byte("secret")), GossipKey([]byte("secret"))
	if len(k1) != 32 || !bytes.Equal(k1, k2) {
		t.Fatalf("key %x / %x: want 32 equal bytes", k1, k2)
	}
	if bytes.Equal(k1, GossipKey([]byte("secret2"))) {
		t.Fatal("different passwords give one key")
	}
}

func TestDefaultAdvertiseAddr(t *testing.T) {
	a, err := DefaultAdvertiseAddr()
	if err != nil {
		t.Skipf("no usable address on this host: %v", err)
	}
	if !a.IsValid() || a.IsLoopback() || a.IsUnspecified() || a.Zone() != "" {
		t.Fatalf("DefaultAdvertiseAddr() = %v", a)
	}
}

func TestMemberlistLogLines(t *testing.T) {
	var buf bytes.Buffer
	l := newMemberlistLogger(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})))
	l.Printf("[DEBUG] memberlist: Stream connection from=127.0.0.1:1")
	l.Printf("[WARN] memberlist: Refuting a suspect message (from: x)")
	l.Printf("[ERR] memberlist: failed to receive: No installed keys could decrypt the message from=127.0.0.1:2")
	l.Printf("plain line")
	out := buf.String()
	for _, want := range []string{
		`level=DEBUG msg="memberlist: Stream connection from=127.0.0.1:1"`,
		`level=WARN msg="memberlist: Refuting a suspect message (from: x)"`,
		`level=ERROR msg="memberlist: failed to receive: No installed keys could decrypt the message from=127.0.0.1:2" hint="gossip password mismatch`,
		`level=INFO msg="memberlist: plain line"`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log output lacks %s:\n%s", want, out)
		}
	}
}

func TestClassifyJoinError(t *testing.T) {
	for msg, want := range map[string]string{
		"1 error occurred:\n\t* failed to join 127.0.0.1:1: No installed keys could decrypt the message\n\n": joinFailPassword,
		"failed to join x: remote state is encrypted and encryption is not configured":                       joinFailPassword,
		"failed to join x: encryption is configured but remote state is not encrypted":                       joinFailPassword,
		"failed to join 127.0.0.1:1: dial tcp 127.0.0.1:1: connect: connection refused":                      joinFailUnreachable,
		"failed to resolve nowhere.invalid: lookup nowhere.invalid: no such host":                            joinFailUnreachable,
		"something else": joinFailOther,
	} {
		reason, err := classifyJoinError("t:1", errors.New(msg))
		if reason != want {
			t.Errorf("%q: reason %s, want %s", msg, reason, want)
		}
		if errors.Is(err, ErrPasswordMismatch) != (want == joinFailPassword) {
			t.Errorf("%q: %v wraps ErrPasswordMismatch: %v", msg, err, errors.Is(err, ErrPasswordMismatch))
		}
		if strings.Contains(err.Error(), "\n") || strings.Contains(err.Error(), "error occurred") || strings.Contains(err.Error(), "failed to join") {
			t.Errorf("error not flattened: %q", err)
		}
	}
}

func TestBackoff(t *testing.T) {
	b := backoff{min: 100 * time.Millisecond, max: time.Second, cur: 100 * time.Millisecond}
	caps := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i, c := range caps {
		c *= time.Millisecond
		d := b.next()
		if d < c/2 || d > c {
			t.Errorf("step %d: %v outside [%v, %v]", i, d, c/2, c)
		}
	}
	b.reset()
	if d := b.next(); d > 100*time.Millisecond {
		t.Errorf("after reset: %v", d)
	}
}

func TestSubscriberOverflow(t *testing.T) {
	cfg, _ := testConfig(t, "overflow")
	cfg.EventBuffer = 2
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ch, cancel := m.Subscribe()
	defer cancel()
	emit := func(i int) {
		m.mu.Lock()
		defer m.mu.Unlock()
		m.emitLocked(EventJoin, &Peer{Name: fmt.Sprintf("p%d", i)}, StateDead)
	}
	for i := range 5 { // 2 fit, 3 dropped
		emit(i)
	}
	if got := (<-ch).Peer.Name; got != "p0" {
		t.Fatalf("first event for %s", got)
	}
	<-ch
	emit(5) // room again: the overflow marker comes first
	emit(6)
	if ev := <-ch; ev.Type != EventOverflow {
		t.Fatalf("got %v, want overflow", ev.Type)
	}
	if ev := <-ch; ev.Peer.Name != "p5" {
		t.Fatalf("got %s after overflow, want p5", ev.Peer.Name)
	}
	select {
	case ev := <-ch:
		t.Fatalf("unexpected %v (p6 should have been dropped)", ev)
	default:
	}
}
