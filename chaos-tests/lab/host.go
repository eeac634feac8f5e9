package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/datapath/nslab"
)

const pidFileName = "peer.pid"

// Host is one lab host: a network namespace with an underlay address and a `weft peer`.
type Host struct {
	Index  int
	Name   string       // namespace name and peer --name: <prefix>-h<i>
	NSPath string       // /run/netns/<Name>
	Addr   netip.Prefix // underlay address on eth0

	Dir      string // work directory of this host
	DataDir  string // peer --data-dir
	Socket   string // peer --socket (control API)
	LogPath  string // peer stderr and stdout, appended across restarts
	CacheDir string // libcni cache directory of this host's "runtime"

	lab      *Lab
	log      *slog.Logger
	nsHandle ns.NetNS // open handle on the host namespace, for Do

	mu           sync.Mutex // guards the fields below
	peer         *peerProc  // nil when no peer process is running
	argsOverride []string   // replaces Config.PeerArgs when set (StartWith)
	containers   []*Container
	nextCtr      int
	sriov        *hostSRIOV // stand-in SR-IOV NIC (Config.SRIOV), nil without
}

// Proc is one process the lab started in a host namespace (Host.Spawn). Its reaper
// goroutine waits for it and then closes Done; Err is Wait's result, read only after Done
// is closed.
type Proc struct {
	Cmd  *exec.Cmd
	Done chan struct{}
	Err  error
}

// peerProc is one run of the peer.
type peerProc = Proc

// Spawn starts `ip netns exec <host> args…` in the background, with its output appended to logf, which it
// closes when the process ends. `ip netns exec` enters the namespace (and a private mount
// namespace with this namespace's /sys) and then execs the program, so the PID held is
// the program's. Pdeathsig: the process dies with the thread that started it; that thread
// is locked to the reaper goroutine, which lives exactly as long as the child, so the
// signal fires only when the whole lab process dies (a crashed or killed test run).
func (h *Host) Spawn(logf *os.File, args ...string) (*Proc, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", h.Name}, args...)...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Dir = h.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p := &Proc{Cmd: cmd, Done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.Err = cmd.Wait()
		logf.Close()
		close(p.Done)
	}()
	if err := <-started; err != nil {
		logf.Close()
		return nil, err
	}
	return p, nil
}

func (l *Lab) newHost(i int) (*Host, error) {
	name := fmt.Sprintf("%s-h%d", l.cfg.Prefix, i)
	dir := filepath.Join(l.dir, fmt.Sprintf("h%d", i))
	h := &Host{
		Index:    i,
		Name:     name,
		Dir:      dir,
		DataDir:  filepath.Join(dir, "data"),
		Socket:   filepath.Join(dir, "weft.sock"),
		LogPath:  filepath.Join(dir, "peer.log"),
		CacheDir: filepath.Join(dir, "cni-cache"),
		lab:      l,
		log:      l.log.With("host", name),
	}
	for _, d := range []string{h.Dir, h.DataDir, h.CacheDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	p, err := nslab.CreateNetNS(name)
	if err != nil {
		return nil, err
	}
	h.NSPath = p
	if h.nsHandle, err = ns.GetNS(p); err != nil {
		nslab.DeleteNetNS(name)
		return nil, fmt.Errorf("lab: open %s: %w", p, err)
	}
	return h, nil
}

// PeerArgs returns the full argument list of this host's `weft peer` (after the binary).
func (h *Host) PeerArgs() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.peerArgsLocked()
}

// peerArgsLocked is PeerArgs for a caller that holds h.mu.
func (h *Host) peerArgsLocked() []string {
	cfg := h.lab.cfg
	args := []string{"peer",
		"--name", h.Name,
		"--data-dir", h.DataDir,
		"--socket", h.Socket,
		"--http-addr", "127.0.0.1:6782",
		"--ipalloc-range", cfg.IPAllocRange.String(),
		"--log-level", cfg.LogLevel,
		"--advertise-addr", h.Addr.Addr().String(),
	}
	var extra []string
	switch {
	case h.argsOverride != nil:
		extra = h.argsOverride
	case cfg.PeerArgs != nil:
		extra = cfg.PeerArgs(h.Index)
	}
	args = append(args, h.sriovArgsLocked()...)
	return append(append(args, securityArgs(extra, h.lab.keyFile)...), extra...)
}

// securityArgs are the flags the lab adds for the cluster key: --key-file with the lab's
// key unless the test's own flags choose a key (--key-file, --password-file) or
// --insecure; and --encrypt never unless the test sets --encrypt, since with a key
// --encrypt auto means WireGuard and the tests measure what they were written for
// (plaintext links) unless they ask for encryption.
func securityArgs(extra []string, keyFile string) []string {
	var out []string
	if !hasFlag(extra, "--key-file", "--password-file", "--insecure") {
		out = append(out, "--key-file", keyFile)
	}
	if !hasFlag(extra, "--encrypt") {
		out = append(out, "--encrypt", "never")
	}
	return out
}

// hasFlag says whether args hold one of flags, as "--flag" or "--flag=value".
func hasFlag(args []string, flags ...string) bool {
	for _, a := range args {
		for _, f := range flags {
			if a == f || strings.HasPrefix(a, f+"=") {
				return true
			}
		}
	}
	return false
}

// StartWith starts the peer with extra flags that replace Config.PeerArgs for this host,
// now and on later starts.
func (h *Host) StartWith(ctx context.Context, extra ...string) error {
	h.mu.Lock()
	h.argsOverride = append([]string{}, extra...)
	h.mu.Unlock()
	return h.Start(ctx)
}

// Start starts the peer inside the host namespace and waits until `weft status` answers.
// It fails if the peer is already running. On failure the error carries the log's tail.
func (h *Host) Start(ctx context.Context) error { return h.start(ctx, true) }

// start is Start; with wait false it returns once the process runs (see Launch).
func (h *Host) start(ctx context.Context, wait bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.peer != nil {
		return fmt.Errorf("lab: peer %s already running (pid %d)", h.Name, h.peer.Cmd.Process.Pid)
	}
	logf, err := os.OpenFile(h.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(logf, "=== lab: starting peer %s at %s ===\n", h.Name, time.Now().Format(time.RFC3339Nano))
	p, err := h.Spawn(logf, append([]string{filepath.Join(h.lab.cfg.BinDir, "weft")}, h.peerArgsLocked()...)...)
	if err != nil {
		return fmt.Errorf("lab: start peer %s: %w", h.Name, err)
	}
	h.peer = p
	pid := p.Cmd.Process.Pid
	if err := os.WriteFile(filepath.Join(h.Dir, pidFileName), []byte(strconv.Itoa(pid)+"\n"), 0o644); err != nil {
		h.log.Warn("write pid file", "err", err)
	}
	h.log.Info("peer started", "pid", pid)
	if !wait {
		return nil
	}

	if err := h.waitReadyLocked(ctx, p); err != nil {
		return err
	}
	h.log.Info("peer ready", "pid", pid)
	return nil
}

// WaitReady polls `weft status` until it succeeds, the peer exits, or ctx ends (or
// Config.ReadyTimeout passes when ctx has no deadline).
func (h *Host) WaitReady(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.peer == nil {
		return fmt.Errorf("lab: peer %s is not running", h.Name)
	}
	return h.waitReadyLocked(ctx, h.peer)
}

func (h *Host) waitReadyLocked(ctx context.Context, p *peerProc) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, h.lab.cfg.ReadyTimeout)
		defer cancel()
	}
	var last error
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-p.Done:
			h.reapLocked(p)
			return fmt.Errorf("lab: peer %s exited before it was ready: %v\n--- %s (tail) ---\n%s",
				h.Name, p.Err, h.LogPath, h.LogTail(30))
		default:
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, last = h.Status(cctx)
		cancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lab: peer %s not ready: %w (last status error: %v)\n--- %s (tail) ---\n%s",
				h.Name, ctx.Err(), last, h.LogPath, h.LogTail(30))
		case <-t.C:
		}
	}
}

// reapLocked forgets an exited peer process and its pid file.
func (h *Host) reapLocked(p *peerProc) {
	if h.peer == p {
		h.peer = nil
		os.Remove(filepath.Join(h.Dir, pidFileName))
	}
}

// Running reports whether this host's peer process is alive.
func (h *Host) Running() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.peer == nil {
		return false
	}
	select {
	case <-h.peer.Done:
		h.reapLocked(h.peer)
		return false
	default:
		return true
	}
}

// PID returns the peer's process ID, or 0 when no peer runs.
func (h *Host) PID() int {
	if !h.Running() {
		return 0
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.peer == nil {
		return 0
	}
	return h.peer.Cmd.Process.Pid
}

// Stop sends SIGTERM and waits for the peer to exit, up to Config.StopTimeout or ctx's
// end; then it sends SIGKILL and fails. It also fails when the peer exits with an error
// (a graceful stop must exit 0). Stopping a stopped peer is success.
func (h *Host) Stop(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	p := h.peer
	if p == nil {
		return nil
	}
	select {
	case <-p.Done:
		h.reapLocked(p)
		if p.Err != nil {
			return fmt.Errorf("lab: peer %s had already exited: %v\n--- %s (tail) ---\n%s",
				h.Name, p.Err, h.LogPath, h.LogTail(30))
		}
		return nil
	default:
	}
	if err := p.Cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("lab: SIGTERM peer %s: %w", h.Name, err)
	}
	tm := time.NewTimer(h.lab.cfg.StopTimeout)
	defer tm.Stop()
	select {
	case <-p.Done:
	case <-tm.C:
		return h.killLocked(p, fmt.Errorf("lab: peer %s did not stop within %s of SIGTERM; killed\n--- %s (tail) ---\n%s",
			h.Name, h.lab.cfg.StopTimeout, h.LogPath, h.LogTail(30)))
	case <-ctx.Done():
		return h.killLocked(p, fmt.Errorf("lab: stop peer %s: %w; killed", h.Name, ctx.Err()))
	}
	h.reapLocked(p)
	h.log.Info("peer stopped", "pid", p.Cmd.Process.Pid, "exit", p.Err)
	if p.Err != nil {
		return fmt.Errorf("lab: peer %s exited with %v after SIGTERM\n--- %s (tail) ---\n%s",
			h.Name, p.Err, h.LogPath, h.LogTail(30))
	}
	return nil
}

// Kill sends SIGKILL (kill -9) to the peer and waits until it is gone. Killing a stopped
// peer is success.
func (h *Host) Kill() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.peer == nil {
		return nil
	}
	return h.killLocked(h.peer, nil)
}

func (h *Host) killLocked(p *peerProc, cause error) error {
	if err := p.Cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return errors.Join(cause, fmt.Errorf("lab: SIGKILL peer %s: %w", h.Name, err))
	}
	<-p.Done // SIGKILL cannot be ignored; the reaper returns promptly
	h.reapLocked(p)
	h.log.Info("peer killed", "pid", p.Cmd.Process.Pid)
	return cause
}

// Restart stops the peer gracefully (SIGTERM) and starts it again.
func (h *Host) Restart(ctx context.Context) error {
	if err := h.Stop(ctx); err != nil {
		return err
	}
	return h.Start(ctx)
}

// shutdown is Close's stop: SIGTERM, SIGKILL after grace, never fails on exit status.
func (h *Host) shutdown(grace time.Duration) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	p := h.peer
	if p == nil {
		return nil
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.Done:
		h.reapLocked(p)
		return nil
	case <-time.After(grace):
	}
	return h.killLocked(p, nil)
}

// LogTail returns the last n lines of the peer's log.
func (h *Host) LogTail(n int) string {
	f, err := os.Open(h.LogPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	defer f.Close()
	const max = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size() > max {
		f.Seek(st.Size()-max, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return tail(string(b), n)
}

// Status is the JSON form of `weft status --json`.
type Status struct {
	Name        string          `json:"name"`
	Networks    []NetworkStatus `json:"networks"`
	Attachments []Attachment    `json:"attachments"`
}

// NetworkStatus is one network in Status.
type NetworkStatus struct {
	Name    string        `json:"name"`
	Subnet  string        `json:"subnet"`
	Bridge  string        `json:"bridge"`
	Gateway string        `json:"gateway"`
	Blocks  []BlockStatus `json:"blocks"`
}

// BlockStatus is one address block a peer owns.
type BlockStatus struct {
	CIDR string `json:"cidr"`
	Used int    `json:"used"`
	Free int    `json:"free"`
}

// Attachment is one container attachment the peer knows.
type Attachment struct {
	ContainerID string `json:"container_id"`
	IfName      string `json:"ifname"`
	Network     string `json:"network"`
	CNINetwork  string `json:"cni_network"`
	Name        string `json:"name"`
	Address     string `json:"address"` // CIDR
	HostIfName  string `json:"host_ifname"`
	NetNS       string `json:"netns"`
}

// Used returns the number of used addresses over all blocks of all networks.
func (s *Status) Used() int {
	n := 0
	for _, nw := range s.Networks {
		for _, b := range nw.Blocks {
			n += b.Used
		}
	}
	return n
}

// Attachment returns the attachment with containerID and ifname, if the peer has it.
func (s *Status) Attachment(containerID, ifname string) (Attachment, bool) {
	for _, a := range s.Attachments {
		if a.ContainerID == containerID && a.IfName == ifname {
			return a, true
		}
	}
	return Attachment{}, false
}

// SortedAttachments returns the attachments ordered by container ID and ifname, for
// comparing two statuses.
func (s *Status) SortedAttachments() []Attachment {
	out := append([]Attachment(nil), s.Attachments...)
	sort.Slice(out, func(i, j int) bool {
		if out[i].ContainerID != out[j].ContainerID {
			return out[i].ContainerID < out[j].ContainerID
		}
		return out[i].IfName < out[j].IfName
	})
	return out
}

// Status runs `weft status --json` against this host's peer and decodes it.
func (h *Host) Status(ctx context.Context) (*Status, error) {
	out, err := h.CLI(ctx, "status", "--json")
	if err != nil {
		return nil, err
	}
	var s Status
	if err := json.Unmarshal(out, &s); err != nil {
		return nil, fmt.Errorf("lab: decode weft status --json: %w: %q", err, out)
	}
	return &s, nil
}

// StatusText runs `weft status` (human form).
func (h *Host) StatusText(ctx context.Context) (string, error) {
	out, err := h.CLI(ctx, "status")
	return string(out), err
}

// CLI runs `weft <args…> --socket <this host's socket>` and returns its stdout. The
// control socket is a path, so the CLI needs no namespace switch. On failure the error
// carries stderr.
func (h *Host) CLI(ctx context.Context, args ...string) ([]byte, error) {
	args = append(append([]string(nil), args...), "--socket", h.Socket)
	cmd := exec.CommandContext(ctx, filepath.Join(h.lab.cfg.BinDir, "weft"), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("lab: weft %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// Do runs fn on a locked OS thread inside the host namespace; processes fn starts
// (CNI plugins invoked by libcni) inherit the namespace.
func (h *Host) Do(fn func() error) error {
	return h.nsHandle.Do(func(ns.NetNS) error { return fn() })
}

// Exec runs a command inside the host namespace (`ip netns exec`) and returns its
// combined output.
func (h *Host) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	return nsExec(ctx, h.Name, name, args...)
}

// LinkNames returns the names of the links in the host namespace.
func (h *Host) LinkNames() ([]string, error) { return linkNames(h.NSPath) }

// Link returns a link of the host namespace by name.
func (h *Host) Link(name string) (netlink.Link, error) {
	nh, err := nslab.HandleAt(h.NSPath)
	if err != nil {
		return nil, err
	}
	defer nh.Close()
	return nh.LinkByName(name)
}

func nsExec(ctx context.Context, nsName, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", nsName, name}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("lab: in %s: %s %s: %w: %s", nsName, name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

func linkNames(path string) ([]string, error) {
	h, err := nslab.HandleAt(path)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(links))
	for _, l := range links {
		names = append(names, l.Attrs().Name)
	}
	sort.Strings(names)
	return names, nil
}

// killRecordedPeer kills the process in a lab pid file, but only when its command line
// is a `weft peer` whose --data-dir lies in the pid file's directory.
func killRecordedPeer(pidFile string, logger *slog.Logger) error {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return nil
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return nil
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || len(cmdline) == 0 {
		return nil // gone already, or a zombie waiting to be reaped
	}
	argv := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	wantDir := filepath.Join(filepath.Dir(pidFile), "data")
	isPeer, hasDir := false, false
	for i, a := range argv {
		if a == "peer" {
			isPeer = true
		}
		if a == "--data-dir" && i+1 < len(argv) && argv[i+1] == wantDir {
			hasDir = true
		}
	}
	if !isPeer || !hasDir {
		logger.Warn("pid file does not point at this lab's peer; leaving it alone", "pid", pid, "file", pidFile)
		return nil
	}
	logger.Info("killing leftover peer", "pid", pid)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("lab: kill %d: %w", pid, err)
	}
	return nil
}
