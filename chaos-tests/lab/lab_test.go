package lab

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fakeWeft stands in for the weft binary so the lab's own plumbing (namespaces,
// underlay, process lifecycle, teardown) is tested without the daemon: `peer` creates
// its socket path and waits for SIGTERM; `status` succeeds while that path exists.
const fakeWeft = `#!/bin/sh
cmd=$1; shift
sock=""; prev=""
for a in "$@"; do [ "$prev" = "--socket" ] && sock=$a; prev=$a; done
case $cmd in
peer)
  trap 'rm -f "$sock"; echo "fake peer: stopping" >&2; exit 0' TERM INT
  echo "fake peer: netns $(ip netns identify $$)" >&2
  touch "$sock"
  while :; do sleep 1 & wait $!; done ;;
status)
  [ -e "$sock" ] || { echo "no peer at $sock" >&2; exit 1; }
  echo '{"name":"fake","networks":[],"attachments":[]}' ;;
esac
`

func fakeBinDir(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	for _, n := range []string{"weft", "weft-cni"} {
		if err := os.WriteFile(filepath.Join(d, n), []byte(fakeWeft), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

func TestLabLifecycle(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("lab tests need root (network namespaces)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := New(ctx, Config{Prefix: "wlself", Hosts: 2, BinDir: fakeBinDir(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })

	h0, h1 := l.Host(0), l.Host(1)
	if want := netip.MustParsePrefix("198.18.0.11/24"); h1.Addr != want {
		t.Errorf("h1 underlay %s, want %s", h1.Addr, want)
	}
	// The peer really runs inside its host namespace.
	if err := Poll(ctx, 50*time.Millisecond, func() error {
		if !strings.Contains(h0.LogTail(5), "netns wlself-h0") {
			return errors.New("no netns line yet")
		}
		return nil
	}); err != nil {
		t.Fatalf("peer not in its namespace: %v; log:\n%s", err, h0.LogTail(5))
	}
	// Hosts reach each other over the underlay.
	if out, err := h0.Exec(ctx, "ping", "-c", "1", "-W", "2", h1.Addr.Addr().String()); err != nil {
		t.Fatalf("underlay ping h0→h1: %v %s", err, out)
	}
	c, err := h0.NewContainer()
	if err != nil {
		t.Fatal(err)
	}
	if names, err := c.LinkNames(); err != nil || len(names) != 1 || names[0] != "lo" {
		t.Fatalf("container links %v %v", names, err)
	}

	pid := h0.PID()
	if pid == 0 {
		t.Fatal("no pid")
	}
	if err := h0.Stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if h0.Running() || syscall.Kill(pid, 0) == nil {
		t.Fatal("peer alive after Stop")
	}
	if err := h0.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	pid = h0.PID()
	if err := h0.Kill(); err != nil {
		t.Fatal(err)
	}
	if syscall.Kill(pid, 0) == nil {
		t.Fatal("peer alive after Kill")
	}
	if err := h0.Restart(ctx); err != nil {
		t.Fatalf("restart from killed: %v", err)
	}
	if _, err := h0.Status(ctx); err != nil {
		t.Fatal(err)
	}

	// Cleanup kills the recorded peer of a lab whose process "died".
	pid1 := h1.PID()
	if err := Cleanup("wlself", l.Dir(), nil); err != nil {
		t.Fatalf("cleanup: %v", err)
	}
	if err := Poll(ctx, 20*time.Millisecond, func() error {
		if h1.Running() {
			return errors.New("still running")
		}
		return nil
	}); err != nil {
		t.Fatalf("recorded peer %d not killed by Cleanup: %v", pid1, err)
	}

	if err := l.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if left, _ := listNetNS("wlself"); len(left) != 0 {
		t.Fatalf("namespaces left: %v", left)
	}
	if _, err := os.Stat(l.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("lab dir left: %v", err)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, p := range []string{"", "UPPER", "toolongprefix", "1abc", "a-b"} {
		c := Config{Prefix: p, Hosts: 1, BinDir: "/nonexistent"}
		if err := c.Validate(); err == nil {
			t.Errorf("prefix %q accepted", p)
		}
	}
}

func TestSecurityArgs(t *testing.T) {
	for _, tc := range []struct {
		extra, want []string
	}{
		{nil, []string{"--key-file", "/k", "--encrypt", "never"}},
		{[]string{"--peers", "x"}, []string{"--key-file", "/k", "--encrypt", "never"}},
		{[]string{"--password-file", "/p"}, []string{"--encrypt", "never"}},
		{[]string{"--key-file=/other"}, []string{"--encrypt", "never"}},
		{[]string{"--insecure"}, []string{"--encrypt", "never"}},
		{[]string{"--encrypt", "always"}, []string{"--key-file", "/k"}},
		{[]string{"--encrypt=never", "--insecure"}, nil},
		// A flag's value is not a flag.
		{[]string{"--name", "--insecure-host"}, []string{"--key-file", "/k", "--encrypt", "never"}},
	} {
		if got := securityArgs(tc.extra, "/k"); !slices.Equal(got, tc.want) {
			t.Errorf("securityArgs(%q) = %q, want %q", tc.extra, got, tc.want)
		}
	}
}
