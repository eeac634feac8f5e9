package mesh

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
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
