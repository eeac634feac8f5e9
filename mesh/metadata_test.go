package mesh

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/memberlist"
)

func fullMetadata() Metadata {
	mac, _ := net.ParseMAC("02:42:ac:11:00:02")
	return Metadata{
		Name:           "host-1",
		Underlay:       netip.MustParseAddr("192.0.2.10"),
		Capabilities:   []string{"direct", "vxlan", "wireguard"},
		VTEPMAC:        mac,
		WireGuardKey:   [32]byte{0: 9, 31: 7},
		RaftAddr:       netip.MustParseAddrPort("192.0.2.10:6785"),
		RaftMember:     true,
		ClusterID:      "0123456789abcdef",
		Encrypt:        true,
		TrustedSubnets: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8::/32")},
		Version:        "0.1.0-dev+abc",
		PublicKey:      testIdentity("host-1").Public(),
	}
}

func TestMetadataRoundTrip(t *testing.T) {
	for name, md := range map[string]Metadata{
		"full":    fullMetadata(),
		"minimal": {Name: "a", Underlay: netip.MustParseAddr("10.0.0.1")},
		"ipv6":    {Name: "b", Underlay: netip.MustParseAddr("2001:db8::1"), RaftAddr: netip.MustParseAddrPort("[2001:db8::1]:6785")},
	} {
		t.Run(name, func(t *testing.T) {
			b, err := md.Encode()
			if err != nil {
				t.Fatal(err)
			}
			got, err := DecodeMetadata(b)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, md) {
				t.Fatalf("round trip:\n got %+v\nwant %+v", got, md)
			}
		})
	}
	full := fullMetadata()
	if b, _ := full.Encode(); len(b) > 192 {
		t.Errorf("full metadata takes %d bytes; the encoding should stay compact", len(b))
	}
}

func TestMetadataEncodeRejects(t *testing.T) {
	long := make([]string, 16)
	for i := range long {
		long[i] = strings.Repeat("c", 30) + string(rune('a'+i))
	}
	for name, edit := range map[string]func(*Metadata){
		"no name":          func(md *Metadata) { md.Name = "" },
		"bad name":         func(md *Metadata) { md.Name = "a b" },
		"no underlay":      func(md *Metadata) { md.Underlay = netip.Addr{} },
		"zero underlay":    func(md *Metadata) { md.Underlay = netip.IPv4Unspecified() },
		"zoned underlay":   func(md *Metadata) { md.Underlay = netip.MustParseAddr("fe80::1%eth0") },
		"dup capability":   func(md *Metadata) { md.Capabilities = []string{"vxlan", "vxlan"} },
		"upper capability": func(md *Metadata) { md.Capabilities = []string{"VXLAN"} },
		"many caps":        func(md *Metadata) { md.Capabilities = append(long, "x") },
		"too big":          func(md *Metadata) { md.Capabilities = long },
		"short mac":        func(md *Metadata) { md.VTEPMAC = net.HardwareAddr{1, 2, 3} },
		"raft port 0":      func(md *Metadata) { md.RaftAddr = netip.MustParseAddrPort("10.0.0.1:0") },
		"version space":    func(md *Metadata) { md.Version = "1 0" },
		"long version":     func(md *Metadata) { md.Version = strings.Repeat("v", 65) },
		"short public key": func(md *Metadata) { md.PublicKey = md.PublicKey[:31] },
	} {
		md := fullMetadata()
		edit(&md)
		if _, err := md.Encode(); !errors.Is(err, ErrBadMetadata) {
			t.Errorf("%s: Encode error = %v, want ErrBadMetadata", name, err)
		}
	}
}

func TestDecodeMetadataRejects(t *testing.T) {
	full := fullMetadata()
	good, _ := full.Encode()
	for name, b := range map[string][]byte{
		"empty":         {},
		"version 0":     {0},
		"version 2":     append([]byte{2}, good[1:]...),
		"only version":  {1},
		"truncated hdr": good[:len(good)-len("0.1.0-dev+abc")-1],
		"truncated val": good[:len(good)-1],
		"dup name":      append(bytes.Clone(good), tagName, 1, 'x'),
		"bad underlay":  {1, tagName, 1, 'a', tagUnderlay, 3, 1, 2, 3},
		"no underlay":   {1, tagName, 1, 'a'},
		"no name":       {1, tagUnderlay, 4, 10, 0, 0, 1},
		"bad mac":       {1, tagName, 1, 'a', tagUnderlay, 4, 10, 0, 0, 1, tagVTEPMAC, 2, 1, 2},
		"zero wg key":   append([]byte{1, tagName, 1, 'a', tagUnderlay, 4, 10, 0, 0, 1, tagWGKey, 32}, make([]byte, 32)...),
		"bad raft":      {1, tagName, 1, 'a', tagUnderlay, 4, 10, 0, 0, 1, tagRaftAddr, 4, 10, 0, 0, 1},
		"bad member":    {1, tagName, 1, 'a', tagUnderlay, 4, 10, 0, 0, 1, tagRaftMember, 1, 2},
		"empty version": {1, tagName, 1, 'a', tagUnderlay, 4, 10, 0, 0, 1, tagVersion, 0},
		"bad name":      {1, tagName, 2, 'a', ' ', tagUnderlay, 4, 10, 0, 0, 1},
		"too long":      append(bytes.Clone(good), make([]byte, MaxMetadataSize)...),
		"short key":     {1, tagName, 1, 'a', tagUnderlay, 4, 10, 0, 0, 1, tagPublicKey, 2, 1, 2},
		"dup key":       append(bytes.Clone(good), append([]byte{tagPublicKey, 32}, make([]byte, 32)...)...),
	} {
		if md, err := DecodeMetadata(b); !errors.Is(err, ErrBadMetadata) {
			t.Errorf("%s: DecodeMetadata = %+v, %v; want ErrBadMetadata", name, md, err)
		}
	}
	// An unknown optional field from a later version is skipped.
	ext := append(bytes.Clone(good), 100, 3, 'n', 'e', 'w')
	md, err := DecodeMetadata(ext)
	if err != nil || !reflect.DeepEqual(md, fullMetadata()) {
		t.Fatalf("unknown field: %+v, %v", md, err)
	}
	// Errors say what is wrong.
	if _, err := DecodeMetadata([]byte{9}); err == nil || !strings.Contains(err.Error(), "version 9") {
		t.Errorf("error does not name the version: %v", err)
	}
}

func FuzzDecodeMetadata(f *testing.F) {
	full := fullMetadata()
	good, _ := full.Encode()
	f.Add(good)
	f.Add([]byte{})
	f.Add([]byte{1})
	f.Add([]byte{1, tagName, 1, 'a', tagUnderlay, 4, 10, 0, 0, 1})
	f.Add([]byte{1, tagName, 200})
	f.Add(append(bytes.Clone(good), 100, 1, 0))
	sr := sriovMetadata()
	withPFs, _ := sr.Encode()
	f.Add(withPFs)
	f.Fuzz(func(t *testing.T, b []byte) {
		md, err := DecodeMetadata(b)
		if err != nil {
			if !errors.Is(err, ErrBadMetadata) {
				t.Fatalf("error %v does not wrap ErrBadMetadata", err)
			}
			return
		}
		// Whatever decodes re-encodes, and decodes to the same value.
		enc, err := md.Encode()
		if err != nil {
			t.Fatalf("decoded %+v does not re-encode: %v", md, err)
		}
		again, err := DecodeMetadata(enc)
		if err != nil || !reflect.DeepEqual(again, md) {
			t.Fatalf("re-decode: %+v, %v; want %+v", again, err, md)
		}
	})
}

// fullMetadataEncoding is fullMetadata's encoding as weft wrote it before the
// SR-IOV field existed: metadata without SR-IOV PFs must stay byte for byte
// the same, so peers of both versions keep agreeing on what a peer announces.
const fullMetadataEncoding = "010106686f73742d310204c000020a0306646972656374030576786c616e030977697265677561726404060242ac110002" +
	"052009000000000000000000000000000000000000000000000000000000000000070606c000020a1a81070d302e312e302d6465762b616263" +
	"0801010910303132333435363738396162636465660a01010b05c0000200180b1120010db8000000000000000000000000200c203fcb51e13134" +
	"f694af8599da778540f98c759a84807e5faa6baaa23f22103a43"

func sriovMetadata() Metadata {
	md := fullMetadata()
	md.SRIOV = []PFCapacity{{PF: "ens1f0", Free: 3, Total: 4, FreeDPDK: 1}, {PF: "ens1f1", Free: 0, Total: 8}}
	return md
}

func TestMetadataSRIOVRoundTrip(t *testing.T) {
	md := sriovMetadata()
	b, err := md.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeMetadata(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, md) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, md)
	}
	// Clone copies the PFs: editing the clone leaves the original alone.
	c := md.Clone()
	c.SRIOV[0].Free = 0
	if md.SRIOV[0].Free != 3 {
		t.Fatal("Clone shares the SR-IOV slice")
	}
}

// Without PFs the encoding is what older weft wrote; with them, it is that
// encoding followed by one SR-IOV field (an unknown tag older decoders skip;
// they refuse an unknown tag below 64 that repeats), and the old encoding
// decodes to no PFs.
func TestMetadataSRIOVKeepsOldEncoding(t *testing.T) {
	old, err := hex.DecodeString(fullMetadataEncoding)
	if err != nil {
		t.Fatal(err)
	}
	for name, pfs := range map[string][]PFCapacity{"nil": nil, "empty": {}} {
		md := fullMetadata()
		md.SRIOV = pfs
		b, err := md.Encode()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, old) {
			t.Errorf("%s: encoding without SR-IOV changed:\n got %x\nwant %x", name, b, old)
		}
	}
	md, err := DecodeMetadata(old)
	if err != nil {
		t.Fatal(err)
	}
	if md.SRIOV != nil {
		t.Errorf("old encoding decodes to SR-IOV %+v, want none", md.SRIOV)
	}
	withPFs := sriovMetadata()
	b, err := withPFs.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, old) {
		t.Fatalf("SR-IOV PFs changed the bytes before them:\n got %x\nwant prefix %x", b, old)
	}
	// Decoders before the field refuse metadata in which a tag below 64, other
	// than the capability and trusted-subnet tags, repeats: with eight PFs none does.
	many := sriovMetadata()
	many.SRIOV = nil
	for i := 0; i < maxSRIOVPFs; i++ {
		many.SRIOV = append(many.SRIOV, PFCapacity{PF: fmt.Sprintf("ens%df0", i), Free: 1, Total: 2})
	}
	enc, err := many.Encode()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[byte]bool{}
	for off := 1; off < len(enc); off += 2 + int(enc[off+1]) {
		tag := enc[off]
		if seen[tag] && tag != tagCapability && tag != tagTrusted && tag < 64 {
			t.Fatalf("tag %d repeats: older peers would refuse this metadata", tag)
		}
		seen[tag] = true
	}
	rest := b[len(old):]
	want := []byte{tagSRIOV, 26, 0, 3, 0, 4, 0, 1, 6, 'e', 'n', 's', '1', 'f', '0', 0, 0, 0, 8, 0, 0, 6, 'e', 'n', 's', '1', 'f', '1'}
	if !bytes.Equal(rest, want) {
		t.Fatalf("SR-IOV fields %v, want %v", rest, want)
	}
}

// The largest metadata a router builds — longest name, IPv6 everywhere, every
// link mode, longest version and cluster ID, keys — with the most SR-IOV PFs at
// their longest names and largest counts still fits memberlist's limit. Trusted
// subnets are left out: up to 16 of them overflow the limit without any PF, so
// the router drops PFs that do not fit (router/sriovcaps.go).
func TestMetadataSRIOVWorstCaseFits(t *testing.T) {
	md := fullMetadata()
	md.Name = strings.Repeat("n", maxNameLen)
	md.Underlay = netip.MustParseAddr("2001:db8::1")
	md.RaftAddr = netip.MustParseAddrPort("[2001:db8::1]:65535")
	md.Capabilities = []string{"direct", "vxlan", "wireguard", "sriov"}
	md.Version = strings.Repeat("v", maxVersionLen)
	md.ClusterID = strings.Repeat("c", maxCapabilityLen)
	md.TrustedSubnets = nil
	for i := 0; i < maxSRIOVPFs; i++ {
		md.SRIOV = append(md.SRIOV, PFCapacity{PF: fmt.Sprintf("%s%d", strings.Repeat("p", maxPFNameLen-1), i), Free: maxVFCount, Total: maxVFCount, FreeDPDK: maxVFCount})
	}
	if len(md.SRIOV[0].PF) != maxPFNameLen {
		t.Fatalf("PF name %q is not the longest", md.SRIOV[0].PF)
	}
	b, err := md.Encode()
	if err != nil {
		t.Fatalf("worst case does not encode: %v", err)
	}
	t.Logf("worst case: %d of %d bytes (SR-IOV PFs take %d)", len(b), MaxMetadataSize, 2+maxSRIOVPFs*(7+maxPFNameLen))
	got, err := DecodeMetadata(b)
	if err != nil || !reflect.DeepEqual(got, md) {
		t.Fatalf("worst case round trip: %+v, %v", got, err)
	}
}

func TestMetadataSRIOVEncodeRejects(t *testing.T) {
	pf := func(name string, free, total, dpdk int) []PFCapacity {
		return []PFCapacity{{PF: name, Free: free, Total: total, FreeDPDK: dpdk}}
	}
	nine := make([]PFCapacity, maxSRIOVPFs+1)
	for i := range nine {
		nine[i] = PFCapacity{PF: fmt.Sprintf("pf%d", i), Total: 1}
	}
	for name, pfs := range map[string][]PFCapacity{
		"nine PFs":       nine,
		"empty name":     pf("", 0, 1, 0),
		"long name":      pf("enp1234567890abc", 0, 1, 0),
		"space in name":  pf("ens 1", 0, 1, 0),
		"slash in name":  pf("ens/1", 0, 1, 0),
		"dot name":       pf(".", 0, 1, 0),
		"dash first":     pf("-ens1", 0, 1, 0),
		"total 257":      pf("ens1", 0, 257, 0),
		"negative total": pf("ens1", 0, -1, 0),
		"free > total":   pf("ens1", 5, 4, 0),
		"negative free":  pf("ens1", -1, 4, 0),
		"dpdk > free":    pf("ens1", 2, 4, 3),
		"negative dpdk":  pf("ens1", 2, 4, -1),
		"duplicate PF":   append(pf("ens1", 0, 1, 0), pf("ens1", 1, 1, 0)...),
	} {
		md := fullMetadata()
		md.SRIOV = pfs
		_, err := md.Encode()
		if !errors.Is(err, ErrBadMetadata) || !strings.Contains(err.Error(), "SR-IOV") {
			t.Errorf("%s: Encode error = %v, want ErrBadMetadata naming SR-IOV", name, err)
		}
	}
}

func TestDecodeMetadataSRIOVRejects(t *testing.T) {
	base, _ := hex.DecodeString(fullMetadataEncoding)
	pf := func(free, total, dpdk uint16, name string) []byte {
		return append([]byte{byte(free >> 8), byte(free), byte(total >> 8), byte(total), byte(dpdk >> 8), byte(dpdk), byte(len(name))}, name...)
	}
	field := func(pfs ...[]byte) []byte {
		v := bytes.Join(pfs, nil)
		return append([]byte{tagSRIOV, byte(len(v))}, v...)
	}
	with := func(fields ...[]byte) []byte { return append(bytes.Clone(base), bytes.Join(fields, nil)...) }
	var nine [][]byte
	for i := 0; i <= maxSRIOVPFs; i++ {
		nine = append(nine, pf(0, 1, 0, fmt.Sprintf("pf%d", i)))
	}
	for name, b := range map[string][]byte{
		"empty field":   with(field()),
		"no name":       with(field(pf(0, 1, 0, ""))),
		"short counts":  with([]byte{tagSRIOV, 3, 0, 1, 0}),
		"name overruns": with([]byte{tagSRIOV, 9, 0, 0, 0, 1, 0, 0, 5, 'e', 'n'}),
		"trailing byte": with(field(pf(0, 1, 0, "ens1"), []byte{0})),
		"nine PFs":      with(field(nine...)),
		"free > total":  with(field(pf(5, 4, 0, "ens1"))),
		"dpdk > free":   with(field(pf(1, 4, 2, "ens1"))),
		"total 300":     with(field(pf(0, 300, 0, "ens1"))),
		"total 65535":   with(field(pf(65535, 65535, 65535, "ens1"))),
		"bad name":      with(field(pf(0, 1, 0, "ens\x001"))),
		"long name":     with(field(pf(0, 1, 0, "enp1234567890abc"))),
		"duplicate PF":  with(field(pf(0, 1, 0, "ens1"), pf(1, 1, 0, "ens1"))),
		"field twice":   with(field(pf(0, 1, 0, "ens1")), field(pf(0, 1, 0, "ens2"))),
		"truncated":     with(field(pf(0, 1, 0, "ens1")))[:len(base)+8],
	} {
		md, err := DecodeMetadata(b)
		if !errors.Is(err, ErrBadMetadata) {
			t.Errorf("%s: DecodeMetadata = %+v, %v; want ErrBadMetadata", name, md.SRIOV, err)
		}
	}
	// The error names the PF and what is wrong with it.
	_, err := DecodeMetadata(with(field(pf(5, 4, 0, "ens1f0"))))
	if err == nil || !strings.Contains(err.Error(), "ens1f0") || !strings.Contains(err.Error(), "free") {
		t.Errorf("error does not say what is wrong: %v", err)
	}
}

// A node whose SR-IOV field is garbage is refused like any bad metadata:
// counted, never a peer.
func TestGarbageSRIOVMetadataIsRefused(t *testing.T) {
	t.Parallel()
	cfg, logs := testConfig(t, "sriov-guard")
	m := startMesh(t, cfg)
	md := Metadata{Name: "liar", Underlay: netip.MustParseAddr("127.0.0.1"), PublicKey: testIdentity("liar").Public()}
	good, err := md.Encode()
	if err != nil {
		t.Fatal(err)
	}
	bad := append(good, tagSRIOV, 11, 0, 9, 0, 4, 0, 0, 4, 'e', 'n', 's', '1') // 9 free of 4

	mc := memberlist.DefaultLANConfig()
	mc.Name = "liar"
	mc.BindAddr, mc.BindPort, mc.AdvertisePort = "127.0.0.1", 0, 0
	mc.Delegate = rawMeta(bad)
	mc.LogOutput = &logBuffer{}
	ml, err := memberlist.Create(mc)
	if err != nil {
		t.Fatal(err)
	}
	defer ml.Shutdown()
	ml.Join([]string{addr(m)})
	waitFor(t, converge, func() string {
		if !logs.contains("ignoring alive message for 'liar'") {
			return "no log line about the refused node"
		}
		return ""
	})
	if _, ok := m.Peer("liar"); ok {
		t.Fatal("a node with a garbage SR-IOV field became a peer")
	}
	if got := metricValue(m.metrics.metadataRejected); got < 1 {
		t.Errorf("weft_mesh_metadata_rejected_total = %v", got)
	}
}
