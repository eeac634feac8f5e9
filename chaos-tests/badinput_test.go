package chaostest

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/weftnet/weft/chaos-tests/lab"
)

// invokeResult is one direct run of the plugin binary.
type invokeResult struct {
	exitErr error
	stdout  []byte
	stderr  []byte
	cniErr  *types.Error // decoded from stdout when the plugin failed
}

// invokePlugin runs the real plugin binary the way a runtime does: env and stdin only.
// It runs inside the host namespace, as a runtime on that host would.
func invokePlugin(t *testing.T, ctx context.Context, l *lab.Lab, h *lab.Host, env map[string]string, stdin []byte) invokeResult {
	t.Helper()
	var r invokeResult
	err := h.Do(func() error {
		cmd := exec.CommandContext(ctx, filepath.Join(l.CNIBinDir(), "weft"))
		cmd.Env = []string{"CNI_PATH=" + l.CNIBinDir()}
		for k, v := range env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		cmd.Stdin = bytes.NewReader(stdin)
		var so, se bytes.Buffer
		cmd.Stdout, cmd.Stderr = &so, &se
		r.exitErr = cmd.Run()
		r.stdout, r.stderr = so.Bytes(), se.Bytes()
		return nil
	})
	if err != nil {
		t.Fatalf("run plugin in %s: %v", h.Name, err)
	}
	if r.exitErr != nil {
		var e types.Error
		if err := json.Unmarshal(r.stdout, &e); err != nil {
			t.Fatalf("plugin failed (%v) without a CNI error on stdout: stdout %q stderr %q", r.exitErr, r.stdout, r.stderr)
		}
		r.cniErr = &e
	}
	return r
}

// Bad input to the real plugin binary gets the right CNI error code and changes nothing
// in the peer or the host.
func TestBadInput(t *testing.T) {
	l := newLab(t, lab.Config{Prefix: "wcbad"})
	ctx := testCtx(t, 2*time.Minute)
	h := l.Host(0)
	cni := mustCNI(t, h, lab.CNIOptions{})

	// One healthy attachment, so "unchanged" means something.
	good := mustContainer(t, h)
	goodAddr := mustAdd(t, ctx, cni, good)

	conf := func(version string) []byte {
		b, _ := json.Marshal(map[string]any{"cniVersion": version, "name": "weft", "type": "weft", "socket": h.Socket})
		return b
	}
	valid := conf("1.1.0")
	target := mustContainer(t, h)
	env := func(cmd, id, netnsPath string) map[string]string {
		e := map[string]string{"CNI_COMMAND": cmd, "CNI_CONTAINERID": id, "CNI_IFNAME": "eth0"}
		if netnsPath != "" {
			e["CNI_NETNS"] = netnsPath
		}
		return e
	}
	regular := filepath.Join(t.TempDir(), "not-a-netns")
	if err := os.WriteFile(regular, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}

	// dup holds an eth0 made before the ADD (a veth: this kernel has no dummy driver),
	// so the ifname is already taken.
	dup := mustContainer(t, h)
	if err := addVethPair(dup.NSPath, "eth0", "eth0peer"); err != nil {
		t.Fatalf("make eth0 in %s: %v", dup.Name, err)
	}
	dupLinks, err := dup.LinkNames()
	if err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name  string
		env   map[string]string
		stdin []byte
		check func(t *testing.T, e *types.Error)
	}{
		{"truncated JSON", env("ADD", "bad-trunc", target.NSPath), valid[:len(valid)/2], wantCode(6)},
		{"unknown cniVersion", env("ADD", "bad-version", target.NSPath), conf("9.9.9"), wantCode(1)},
		{"missing CNI_NETNS", env("ADD", "bad-nonetns", ""), valid, wantCode(4)},
		{"CNI_NETNS is a regular file", env("ADD", "bad-file", regular), valid, func(t *testing.T, e *types.Error) {
			if e.Code != 4 && !strings.Contains(e.Msg+e.Details, regular) {
				t.Errorf("got code %d %q, want code 4 or an error naming %s", e.Code, e.Msg+": "+e.Details, regular)
			}
		}},
		{"CNI_NETNS does not exist", env("ADD", "bad-nofile", "/run/netns/wcbad-does-not-exist"), valid, func(t *testing.T, e *types.Error) {
			if e.Code == 0 {
				t.Errorf("code 0 for a missing netns: %+v", e)
			}
		}},
		{"ifname exists (pre-made eth0)", env("ADD", "bad-dup-veth", dup.NSPath), valid, wantIfnameExists},
		{"ifname exists (eth0 of another container ID)", env("ADD", "bad-dup-attach", good.NSPath), valid, wantIfnameExists},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshot(t, ctx, h)
			r := invokePlugin(t, ctx, l, h, tc.env, tc.stdin)
			if r.exitErr == nil {
				t.Fatalf("plugin succeeded on bad input; stdout %s", r.stdout)
			}
			t.Logf("plugin error: code %d msg %q details %q", r.cniErr.Code, r.cniErr.Msg, r.cniErr.Details)
			tc.check(t, r.cniErr)
			if d := before.diff(snapshot(t, ctx, h)); d != "" {
				t.Errorf("peer or host state changed by rejected input: %s", d)
			}
		})
	}

	// The healthy attachment survived all of it.
	assertAttachment(t, mustStatus(t, ctx, h), h, good.ID, goodAddr)
	if err := cni.Check(ctx, good.RuntimeConf("eth0")); err != nil {
		t.Errorf("CHECK of the healthy container after bad input: %v", err)
	}
	if names, _ := dup.LinkNames(); !slices.Equal(names, dupLinks) {
		t.Errorf("links in %s after rejected ADD: %v, want %v (the pre-made eth0 untouched)", dup.Name, names, dupLinks)
	}
}

func wantCode(code uint) func(t *testing.T, e *types.Error) {
	return func(t *testing.T, e *types.Error) {
		t.Helper()
		if e.Code != code {
			t.Errorf("code %d (%q), want %d", e.Code, e.Msg+": "+e.Details, code)
		}
	}
}

func wantIfnameExists(t *testing.T, e *types.Error) {
	t.Helper()
	if !strings.Contains(e.Msg+" "+e.Details, "eth0") {
		t.Errorf("error does not name the interface eth0: code %d %q", e.Code, e.Msg+": "+e.Details)
	}
	if e.Code != 4 {
		t.Errorf("code %d for an existing ifname, want 4 (invalid environment)", e.Code)
	}
}

// addVethPair creates a veth pair with both ends in the namespace at path.
func addVethPair(path, name, peer string) error {
	n, err := netns.GetFromPath(path)
	if err != nil {
		return err
	}
	defer n.Close()
	nh, err := netlink.NewHandleAt(n)
	if err != nil {
		return err
	}
	defer nh.Close()
	return nh.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: peer})
}
