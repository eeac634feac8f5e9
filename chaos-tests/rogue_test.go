package chaostest

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
)

// A member holding the cluster's secret, built to misbehave (chaos-tests/rogue), runs every
// attack of issue 12 beside three honest peers: floods of garbage to all their control
// ports and silent connections held on Raft, a network 0.0.0.0/0 claimed through leader
// forwarding, and link state and DNS entries forged in an honest peer's name at huge
// versions. Meanwhile the honest peers must keep attaching containers (claiming new blocks
// through Raft included), resolving names and forwarding pings with nothing lost; afterwards
// no route covers 0.0.0.0/1, no name points at the rogue's address, and the honest peers'
// refusal counters show that each attack was seen.
func TestRoguePeer(t *testing.T) {
	rogueBin := buildRogue(t)
	secret := filepath.Join(t.TempDir(), "cluster-secret")
	key := make([]byte, 32)
	rand.Read(key)
	if err := os.WriteFile(secret, []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const honest = 3
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: "wfz", Hosts: honest + 1, NoStart: true, PeerArgs: func(i int) []string {
		// /28 blocks: the attaches during the attack need new blocks, so Raft must keep
		// working under the silent connections and the floods.
		args := []string{"--key-file", secret, "--ipalloc-block", "28", "--raft-voters", "3"}
		if i > 0 {
			args = append(args, "--peers", l.Host(0).Addr.Addr().String())
		}
		return args
	}})
	ctx := testCtx(t, 6*time.Minute)
	hosts := l.Hosts()[:honest]
	rogueHost := l.Host(honest)
	for _, h := range hosts {
		if err := h.Start(ctx); err != nil {
			t.Fatalf("start %s: %v", h.Name, err)
		}
	}
	waitLeader(t, ctx, hosts)
	waitFor(t, ctx, 45*time.Second, "the honest peers to see each other", func() error { return aliveEverywhere(ctx, hosts) })

	// One named container per honest host; every host resolves every name and pings every
	// container.
	type named struct {
		ctr  *lab.Container
		name string
		addr netip.Addr
	}
	var web []named
	for i, h := range hosts {
		ctr, a, _ := attachNamed(t, ctx, h, fmt.Sprintf("web%d", i))
		web = append(web, named{ctr, fmt.Sprintf("web%d", i), netip.MustParseAddr(a)})
	}
	resolvesRight := func() error {
		for _, from := range web {
			for _, w := range web {
				got, err := addrsOf(from.ctr, w.name+".weft.local")
				if err != nil {
					return fmt.Errorf("%s resolving %s: %w", from.name, w.name, err)
				}
				if !slices.Equal(got, []string{w.addr.String()}) {
					return fmt.Errorf("%s resolves %s to %v, want [%s]", from.name, w.name, got, w.addr)
				}
			}
		}
		return nil
	}
	waitFor(t, ctx, 30*time.Second, "every name resolved everywhere", resolvesRight)
	for _, from := range web {
		for _, to := range web {
			if from != to {
				waitPing(t, ctx, from.ctr, to.addr)
			}
		}
	}
	before := make([]map[string]float64, honest)
	for i, h := range hosts {
		m, err := scrapeMetrics(h)
		if err != nil {
			t.Fatalf("metrics of %s: %v", h.Name, err)
		}
		before[i] = m
	}

	// The rogue: host 3, no weft peer there, the cluster secret in hand. It forges host 0's
	// entries (its links, the name web0).
	var peers []string
	for _, h := range hosts {
		peers = append(peers, h.Addr.Addr().String())
	}
	// WEFT_ROGUE_ATTACKS picks a subset (e.g. "flood,silent") to see which attack breaks what;
	// the assertions about the attacks left out then fail, which says so.
	attacks := "flood,silent,claim,forge"
	if a := os.Getenv("WEFT_ROGUE_ATTACKS"); a != "" {
		attacks = a
	}
	var want []string
	for _, a := range strings.Split(attacks, ",") {
		want = append(want, map[string][]string{"flood": {"flood-udp", "flood-tcp"}, "silent": {"silent"}, "claim": {"claim"},
			"forge": {"forge-linkstate", "forge-dns"}}[a]...)
	}
	const fakeAddr = "10.40.255.254"
	victim := web[0]
	rogue := startRogue(t, rogueHost, rogueBin,
		"--name", rogueHost.Name,
		"--addr", rogueHost.Addr.Addr().String(),
		"--peers", strings.Join(peers, ","),
		"--key-file", secret,
		"--victim", hosts[0].Name,
		"--hijack", victim.name+"="+victim.addr.String(),
		"--fake-addr", fakeAddr,
		"--pps", "3000", "--tcp-rate", "50", "--silent", "300", "--every", "2s", "--attacks", attacks)
	waitFor(t, ctx, 45*time.Second, "the rogue to run every attack", func() error {
		seen := rogue.attacks()
		for _, a := range want {
			if seen[a] == 0 {
				return fmt.Errorf("no %s report yet (have %v)", a, seen)
			}
		}
		return nil
	})

	// Under attack: pings between the honest peers' containers the whole time, attaches on
	// every honest host (host 1 enough of them to claim new blocks), names resolved.
	var wg sync.WaitGroup
	pingErrs := make(chan error, 2*honest)
	for i := range web {
		from, to := web[i], web[(i+1)%len(web)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := pingNoLoss(ctx, from.ctr, to.addr, 100, "0.2"); err != nil {
				pingErrs <- fmt.Errorf("%s -> %s under attack: %w", from.name, to.name, err)
			}
		}()
	}
	cnis := make([]*lab.CNI, honest)
	for i, h := range hosts {
		cnis[i] = mustCNI(t, h, lab.CNIOptions{})
	}
	attached := 0
	for round := 0; round < 8; round++ {
		for i, h := range hosts {
			n := 1
			if i == 1 {
				n = 3
			}
			for range n {
				ctr := mustContainer(t, h)
				actx, cancel := context.WithTimeout(ctx, 30*time.Second)
				res, err := cnis[i].Add(actx, ctr.RuntimeConf("eth0"))
				cancel()
				if err != nil {
					t.Errorf("round %d: ADD on %s under attack: %v", round, h.Name, err)
					continue
				}
				a, err := lab.ResultAddress(res)
				if err != nil {
					t.Errorf("round %d: ADD on %s: %v", round, h.Name, err)
					continue
				}
				assertInRange(t, a)
				attached++
			}
		}
		if err := resolvesRight(); err != nil {
			t.Errorf("round %d under attack: %v", round, err)
		}
	}
	wg.Wait()
	close(pingErrs)
	for err := range pingErrs {
		t.Error(err)
	}
	t.Logf("attached %d containers under attack; rogue reports: %v", attached, rogue.attacks())
	rogue.stop(t)
	// Each distinct outcome of the claim once (it is repeated every 2s to every peer).
	outcomes := map[string]bool{}
	for _, line := range rogue.lines("claim") {
		var m map[string]any
		json.Unmarshal([]byte(line), &m)
		k := fmt.Sprint(m["target"], m["answer"], m["err"])
		if !outcomes[k] {
			outcomes[k] = true
			t.Logf("rogue claim: %s", line)
		}
	}

	// Afterwards: nothing of the rogue's stayed.
	for _, h := range hosts {
		out, err := h.Exec(ctx, "ip", "-4", "route", "show")
		if err != nil {
			t.Fatalf("routes of %s: %v", h.Name, err)
		}
		for _, r := range strings.Split(string(out), "\n") {
			f := strings.Fields(r)
			if len(f) > 0 && (f[0] == "0.0.0.0/1" || f[0] == "128.0.0.0/1") {
				t.Errorf("%s routes %q after the rogue claim", h.Name, r)
			}
		}
		st := ipamOf(t, ctx, h)
		victimBlocks := 0
		for _, b := range st.Blocks {
			if b.Network != "default" || b.Owner == rogueHost.Name {
				t.Errorf("%s lists block %s of network %q owned by %s", h.Name, b.CIDR, b.Network, b.Owner)
			}
			if b.Owner == hosts[0].Name {
				victimBlocks++
			}
		}
		if victimBlocks == 0 { // the rogue's remove-peer went through: its blocks are up for grabs
			t.Errorf("%s lists no block of %s after the rogue asked to remove it", h.Name, hosts[0].Name)
		}
	}
	if err := resolvesRight(); err != nil {
		t.Errorf("after the attack: %v", err)
	}
	for _, from := range web {
		if got, _ := addrsOf(from.ctr, victim.name+".weft.local"); slices.Contains(got, fakeAddr) {
			t.Errorf("%s resolves %s to the rogue's %s", from.name, victim.name, fakeAddr)
		}
	}
	// Every attack left a mark in the refusal counters: on every honest peer for what
	// gossip spreads, on some honest peer for what goes to one port. Every series of a
	// family counts, except those of normal traffic (gossip duplicates), which grow with no
	// attack at all.
	marks := []struct {
		attack string
		family *regexp.Regexp
		every  bool
	}{
		{"forged link state", regexp.MustCompile(`^weft_linkstate_rejected_total$`), true},
		{"forged DNS entries", regexp.MustCompile(`^weft_dns_replication_(rejected|refused_entries)_total$`), true},
		{"rogue network claim", regexp.MustCompile(`^weft_ipam_commands_refused_total$`), false},
		{"garbage on the mesh, Raft and probe ports", regexp.MustCompile(`^weft_(mesh|ipam|transport|raft|probe)\w*_(refused|rejected|dropped|unauthenticated)\w*_total$`), true},
		{"silent Raft connections", regexp.MustCompile(`^weft_transport_refused_total$`), true},
	}
	after := make([]map[string]float64, honest)
	for i, h := range hosts {
		m, err := scrapeMetrics(h)
		if err != nil {
			t.Fatalf("metrics of %s: %v", h.Name, err)
		}
		after[i] = m
	}
	refusal := regexp.MustCompile(`_(rejected|refused|dropped|failures|errors|failed)\w*_total\b`)
	for i, h := range hosts {
		var grown []string
		for fam, v := range after[i] {
			if refusal.MatchString(fam) && v > before[i][fam] {
				grown = append(grown, fmt.Sprintf("%s +%g", fam, v-before[i][fam]))
			}
		}
		slices.Sort(grown)
		t.Logf("%s refusal counters that grew under attack: %s", h.Name, strings.Join(grown, ", "))
	}
	normalTraffic := regexp.MustCompile(`reason="duplicate"`)
	for _, mk := range marks {
		seen := 0
		var detail []string
		for i, h := range hosts {
			grew := 0.0
			for series, v := range after[i] {
				name, _, _ := strings.Cut(series, "{")
				if mk.family.MatchString(name) && !normalTraffic.MatchString(series) {
					grew += v - before[i][series]
				}
			}
			detail = append(detail, fmt.Sprintf("%s +%g", h.Name, grew))
			if grew > 0 {
				seen++
			}
		}
		if seen == 0 || mk.every && seen < honest {
			t.Errorf("%s: refusal counters matching %s grew on %d of %d honest peers (%s)", mk.attack, mk.family, seen, honest, strings.Join(detail, ", "))
		}
	}
}

// buildRogue builds chaos-tests/rogue into a temporary directory.
func buildRogue(t *testing.T) string {
	t.Helper()
	requirePrivileges(t)
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "weft-rogue")
	if out, err := exec.Command(goBin, "build", "-o", bin, "github.com/weftnet/weft/chaos-tests/rogue").CombinedOutput(); err != nil {
		t.Fatalf("go build chaos-tests/rogue: %v\n%s", err, out)
	}
	return bin
}

// rogueProc is the running rogue and its JSON report lines.
type rogueProc struct {
	proc    *lab.Proc
	logPath string
	once    sync.Once
}

func startRogue(t *testing.T, h *lab.Host, bin string, args ...string) *rogueProc {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), "rogue.log")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	p, err := h.Spawn(f, append([]string{bin}, args...)...)
	if err != nil {
		t.Fatalf("start the rogue in %s: %v", h.Name, err)
	}
	r := &rogueProc{proc: p, logPath: logPath}
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop sends SIGTERM to the rogue (by its PID), then SIGKILL if it has not ended in 10s.
func (r *rogueProc) stop(t *testing.T) {
	r.once.Do(func() {
		r.proc.Cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-r.proc.Done:
		case <-time.After(10 * time.Second):
			t.Errorf("the rogue did not stop on SIGTERM; killing it")
			r.proc.Cmd.Process.Kill()
			<-r.proc.Done
		}
		// The last report of each attack (its totals), and on failure the rogue's own log.
		last := map[string]string{}
		for _, l := range r.lines("") {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) == nil {
				last[fmt.Sprint(m["attack"])] = l
			} else if t.Failed() {
				t.Logf("rogue: %s", l)
			}
		}
		for _, l := range last {
			t.Logf("rogue's last report: %s", l)
		}
	})
}

// lines returns the rogue's log lines for one attack ("" for every line).
func (r *rogueProc) lines(attack string) []string {
	f, err := os.Open(r.logPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if attack == "" {
			out = append(out, l)
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["attack"] == attack {
			out = append(out, l)
		}
	}
	return out
}

// attacks counts the rogue's report lines by attack, leaving out those that only say it
// failed or is still waiting.
func (r *rogueProc) attacks() map[string]int {
	seen := map[string]int{}
	for _, l := range r.lines("") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) != nil {
			continue
		}
		a, _ := m["attack"].(string)
		if _, failed := m["err"]; failed && a != "claim" {
			continue // a claim refused is still a claim made
		}
		if m["waiting"] == true {
			continue
		}
		seen[a]++
	}
	return seen
}

// pingNoLoss sends count pings from ctr to dst at interval (seconds, as ping takes it) and
// fails unless every one is answered.
func pingNoLoss(ctx context.Context, ctr *lab.Container, dst netip.Addr, count int, interval string) error {
	out, _ := ctr.Exec(ctx, "ping", "-c", strconv.Itoa(count), "-i", interval, "-W", "2", "-q", dst.String())
	m := regexp.MustCompile(`(\d+) packets transmitted, (\d+) (packets )?received`).FindStringSubmatch(string(out))
	if m == nil {
		return fmt.Errorf("no ping summary: %s", out)
	}
	if m[1] != m[2] || m[1] != strconv.Itoa(count) {
		return fmt.Errorf("%s of %s pings answered (want %d of %d): %s", m[2], m[1], count, count, strings.TrimSpace(string(out)))
	}
	return nil
}

// scrapeMetrics reads the peer's /metrics from inside its host namespace: every sample by
// its series (name and labels, as written).
func scrapeMetrics(h *lab.Host) (map[string]float64, error) {
	var body []byte
	err := h.Do(func() error {
		// Dialled here, on the thread that is in the host namespace.
		c, err := net.DialTimeout("tcp", "127.0.0.1:6782", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1:6782\r\n\r\n"); err != nil {
			return err
		}
		body, err = io.ReadAll(c)
		return err
	})
	if err != nil {
		return nil, err
	}
	_, text, ok := strings.Cut(string(body), "\r\n\r\n")
	if !ok {
		return nil, fmt.Errorf("no HTTP body in %q", body)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(text, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		out[line[:i]] += v
	}
	return out, nil
}
