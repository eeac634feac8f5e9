package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/router"
)

func newPeerCmd() *cobra.Command {
	def := router.DefaultConfig()
	host, _ := os.Hostname()
	var (
		name, dataDir, httpAddr, ipRange, logLevel            string
		advertise, keyFile, passwordFile, clusterName         string
		mtu, meshPort, raftPort, voters, nonvoters, blockBits int
		seeds, dnsUpstreams                                   []string
		voterGrace, reclaimAfter, attachWait                  time.Duration
		dnsDomain                                             string
		noDirect, pprof, insecure                             bool
		encrypt                                               string
		trusted                                               []string
		wgPort, probePort, linkProbePort                      int
		probeTargets                                          int
		probeInterval, probeTimeout                           time.Duration
		sriovRescan, crossCheckWindow                         time.Duration
		sla                                                   string
		dnsPort                                               int
		dnsTTL, dnsDownGrace                                  time.Duration
		sysfsRoot, devInfoDir, pfConfig                       string
		perfMaxRate                                           string
	)
	cmd := &cobra.Command{
		Use:   "peer",
		Short: "Run the weft peer daemon on this host",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: want debug, info, warn or error", logLevel)
			}
			prefix, err := netip.ParsePrefix(ipRange)
			if err != nil {
				return fmt.Errorf("--ipalloc-range %q: %w", ipRange, err)
			}
			socket, _ := cmd.Flags().GetString("socket")
			cfg := def
			cfg.Name, cfg.DataDir, cfg.Socket, cfg.HTTPAddr, cfg.Pprof = name, dataDir, socket, httpAddr, pprof
			cfg.IPAllocRange, cfg.BlockBits, cfg.MTU, cfg.Version = prefix, blockBits, mtu, version
			cfg.Seeds, cfg.MeshPort, cfg.RaftPort, cfg.RaftVoters = seeds, meshPort, raftPort, voters
			cfg.RaftNonvoters = nonvoters
			cfg.VoterGrace, cfg.ReclaimAfter, cfg.NoDirect = voterGrace, reclaimAfter, noDirect
			cfg.AttachWait = attachWait
			cfg.Encrypt, cfg.WireGuardPort = encrypt, wgPort
			cfg.ProbePort, cfg.LinkProbePort, cfg.ProbeInterval, cfg.ProbeTimeout, cfg.SLA = probePort, linkProbePort, probeInterval, probeTimeout, sla
			cfg.ProbeTargets = probeTargets
			for _, s := range trusted {
				p, err := netip.ParsePrefix(s)
				if err != nil {
					return fmt.Errorf("--trusted-subnets %q: %w", s, err)
				}
				cfg.TrustedSubnets = append(cfg.TrustedSubnets, p.Masked())
			}
			cfg.DNSDomain, cfg.DNSPort, cfg.DNSTTL, cfg.DNSUpstreams, cfg.DNSDownGrace = dnsDomain, dnsPort, dnsTTL, dnsUpstreams, dnsDownGrace
			cfg.SysfsRoot, cfg.SRIOVDeviceInfoDir, cfg.SRIOVPFConfig, cfg.SRIOVRescan = sysfsRoot, devInfoDir, pfConfig, sriovRescan
			cfg.LossCrossCheckWindow = crossCheckWindow
			if cfg.PerfMaxRate, err = router.ParseRate(perfMaxRate); err != nil {
				return fmt.Errorf("--perf-max-rate: %w", err)
			}
			if advertise != "" {
				if cfg.AdvertiseAddr, err = netip.ParseAddr(advertise); err != nil {
					return fmt.Errorf("--advertise-addr %q: %w", advertise, err)
				}
			}
			if cfg.ClusterKey, err = clusterKeyFrom(keyFile, passwordFile, clusterName, insecure); err != nil {
				return err
			}
			cfg.Insecure = insecure
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("peer", name)
			p, err := router.New(cfg)
			if err != nil {
				return err
			}
			return p.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&name, "name", host, "this peer's name, unique in the mesh")
	f.StringVar(&dataDir, "data-dir", def.DataDir, "where the peer keeps its database")
	f.BoolVar(&pprof, "pprof", false, "serve Go's profiler at /debug/pprof/ on --http-addr")
	f.StringVar(&httpAddr, "http-addr", def.HTTPAddr, "loopback address for /metrics, /status and the status page (empty: off)")
	f.StringVar(&ipRange, "ipalloc-range", def.IPAllocRange.String(), "address range of the default network")
	f.IntVar(&blockBits, "ipalloc-block", def.BlockBits, "prefix length of the blocks peers claim (the same on every peer)")
	f.IntVar(&mtu, "mtu", def.MTU, "MTU of container interfaces and bridges (1420 fits VXLAN's 50 and WireGuard's 80 bytes of encapsulation on a 1500-byte underlay)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringSliceVar(&seeds, "peers", nil, "peers to join, host[:port] separated by commas (empty for the first peer)")
	f.StringVar(&advertise, "advertise-addr", "", "this host's underlay address (default: the address of the default-route interface)")
	f.IntVar(&meshPort, "mesh-port", def.MeshPort, "gossip port, tcp and udp")
	f.IntVar(&raftPort, "raft-port", def.RaftPort, "Raft and peer RPC port, tcp")
	// No inline --password: a secret on the command line leaks through /proc and shell history.
	f.StringVar(&keyFile, "key-file", "", "the cluster key (from weft keygen; mode 0600): encrypts and authenticates gossip, Raft (TLS 1.3) and probes")
	f.StringVar(&passwordFile, "password-file", "", "a passphrase file (mode 0600), stretched into the cluster key with argon2id and --cluster-name; --key-file is stronger")
	f.StringVar(&clusterName, "cluster-name", "weft", "salts --password-file's passphrase; set it per cluster, the same on every peer")
	f.BoolVar(&insecure, "insecure", false, "run without a cluster key: anyone who reaches this host's ports can join (warned at every start)")
	f.IntVar(&voters, "raft-voters", def.RaftVoters, "how many of the first peers vote in Raft")
	f.IntVar(&nonvoters, "raft-nonvoters", def.RaftNonvoters, "how many more peers follow the Raft log as spare voters; all others are clients")
	f.DurationVar(&voterGrace, "raft-voter-grace", def.VoterGrace, "how long a voter may be dead before a healthy non-voter replaces it")
	f.DurationVar(&attachWait, "attach-wait", def.AttachWait, "how long an ADD that needs a new block waits for a Raft leader while this peer is still forming or joining its cluster (0: fail at once with CNI 11)")
	f.DurationVar(&reclaimAfter, "reclaim-after", 0, "return the blocks of peers dead this long to the pool (0: only by weft rmpeer)")
	f.StringVar(&encrypt, "encrypt", def.Encrypt, "link encryption: never, auto (unless --insecure) or always; plaintext only between peers that trust each other")
	f.StringSliceVar(&trusted, "trusted-subnets", nil, "underlay CIDRs whose peers may get plaintext links (both ends must trust each other)")
	f.IntVar(&wgPort, "wireguard-port", def.WireGuardPort, "WireGuard UDP port, the same on every peer")
	f.IntVar(&probePort, "probe-port", def.ProbePort, "UDP port peers measure RTT and loss on, the same on every peer")
	f.IntVar(&linkProbePort, "link-probe-port", def.LinkProbePort, "UDP port of the probes sent through the link in use (VXLAN, WireGuard), the same on every peer (0: underlay probes only)")
	f.DurationVar(&probeInterval, "probe-interval", def.ProbeInterval, "time between two probes to one peer (jittered ±20%)")
	f.IntVar(&probeTargets, "probe-targets", def.ProbeTargets, "how many peers to measure directly (the nearest by network coordinates and a few random ones, plus every relay in use); the rest are estimated from coordinates")
	f.DurationVar(&probeTimeout, "probe-timeout", 0, "how long a probe may go unanswered before it counts as lost; 3 lost mark a link down (0: twice --probe-interval, at most 1s)")
	f.StringVar(&sla, "sla", "", `this peer's SLA class, e.g. "gold: rtt<=5ms,jitter<=2ms,loss<=0.1%" (default: any working link)`)
	f.BoolVar(&noDirect, "no-direct", false, "never route plainly to peers on the same L2 segment; use VXLAN")
	f.StringVar(&dnsDomain, "dns-domain", def.DNSDomain, "domain of container names")
	f.IntVar(&dnsPort, "dns-port", def.DNSPort, "DNS port on each network's gateway address")
	f.DurationVar(&dnsTTL, "dns-ttl", def.DNSTTL, "TTL of weft DNS answers")
	f.StringSliceVar(&dnsUpstreams, "dns-upstream", nil, "resolvers for other names, host[:port] (default: the nameservers of /etc/resolv.conf, re-read on change)")
	f.DurationVar(&dnsDownGrace, "dns-down-grace", def.DNSDownGrace, "how long a dead peer's names stay in answers")
	f.StringVar(&sysfsRoot, "sysfs-root", def.SysfsRoot, "where to read SR-IOV PFs and their VFs (a test tree in the lab)")
	f.StringVar(&devInfoDir, "sriov-device-info-dir", def.SRIOVDeviceInfoDir, "where DPDK attachments' device-info files are written (Network Plumbing WG format)")
	f.StringVar(&pfConfig, "sriov-pf-config", def.SRIOVPFConfig, "what programs VF settings (VLAN, spoof check, trust, link state, rates) on the PF: netlink, or record, a stand-in that only logs and remembers them, for hosts without real VFs (the lab)")
	f.DurationVar(&sriovRescan, "sriov-rescan", def.SRIOVRescan, "how often the VFs of SR-IOV networks' PFs are rediscovered, besides on every change of the network table (0: the default)")
	f.DurationVar(&crossCheckWindow, "loss-crosscheck-window", def.LossCrossCheckWindow, "sliding interval of the tunnel loss cross-check (TX here against RX there), at least 20s; a ratio is shown once readings span half of it (0: the default)")
	f.StringVar(&perfMaxRate, "perf-max-rate", "1gbit", "the highest rate a `weft perf` test from or to this peer may use (bits/s: 100mbit, 1gbit)")
	return cmd
}
