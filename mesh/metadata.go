package mesh

import (
	"bytes"
	"crypto/ed25519"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
)

// MaxMetadataSize is memberlist's limit on node metadata (MetaMaxSize).
const MaxMetadataSize = 512

// metadataVersion is the first byte of an encoded Metadata. Bump it only for
// an incompatible change; new optional fields get new tags instead, which
// older decoders skip.
const metadataVersion = 1

// Limits on metadata fields. Each field is bounded, but the total can still
// exceed MaxMetadataSize (many long capabilities): Encode reports that.
const (
	maxCapabilities  = 16
	maxCapabilityLen = 32
	maxVersionLen    = 64
	// maxSRIOVPFs and maxVFCount bound the SR-IOV capacity: a host has a few
	// PFs, and sriov_totalvfs of current NICs is at most 256.
	maxSRIOVPFs  = 8
	maxVFCount   = 256
	maxPFNameLen = 15 // IFNAMSIZ - 1
)

// Metadata is what a peer tells the others about itself, carried in
// memberlist's node meta and so refreshed with every alive message.
type Metadata struct {
	// Name is the peer's name; it equals the memberlist node name.
	Name string
	// Underlay is the address the datapath uses to reach this host.
	Underlay netip.Addr
	// Capabilities lists what the peer supports, e.g. "vxlan",
	// "wireguard", "direct", "sriov": lower-case [a-z0-9._-], at most 16
	// of at most 32 bytes each, no duplicates.
	Capabilities []string
	// VTEPMAC is the MAC address of the peer's VXLAN device (EUI-48), or
	// nil.
	VTEPMAC net.HardwareAddr
	// WireGuardKey is the peer's WireGuard public key; all zero means none.
	WireGuardKey [32]byte
	// RaftAddr is the peer's Raft address; the zero value means the peer
	// does not take part in Raft.
	RaftAddr netip.AddrPort
	// Version is the weft version the peer runs (printable ASCII, at most
	// 64 bytes).
	Version string
	// RaftMember says the peer belongs to a Raft cluster (it has Raft state);
	// a peer without state waits to be added rather than bootstrap a second one.
	RaftMember bool
	// Encrypt says the peer wants its links encrypted, except to peers inside its
	// TrustedSubnets (Weave's rule: plaintext only when each end trusts the other).
	Encrypt bool
	// TrustedSubnets are the underlay ranges this peer trusts (at most 16).
	TrustedSubnets []netip.Prefix
	// ClusterID names the Raft cluster the peer belongs to, once it knows it
	// (lower-case [a-z0-9._-], at most 32 bytes); peers of different clusters
	// refuse to merge.
	ClusterID string
	// PublicKey is the peer's ed25519 identity (mesh/identity): receivers
	// verify what the peer signs (link state, coordinates, DNS records,
	// usage) against it. Pinned on first sight (see keypins.go). nil: none
	// (the mesh refuses such peers; Mesh.New fills in its own).
	PublicKey ed25519.PublicKey
	// SRIOV says, per physical function, how many of its virtual functions
	// this peer could hand to a container now (at most 8 PFs, each named
	// once). Empty: no SR-IOV PF, or a peer older than this field.
	SRIOV []PFCapacity
}

// PFCapacity is one SR-IOV physical function of a peer and its VFs. The
// field layout matches router.SRIOVCapacity so the router converts one to the
// other directly.
type PFCapacity struct {
	// PF is the physical function's interface name: 1-15 bytes of
	// [A-Za-z0-9_.-], the first a letter or digit.
	PF string
	// Free counts the VFs that could be handed out now, of either kind;
	// Total counts the VFs the PF has; FreeDPDK counts the free VFs bound
	// to a userspace driver (a subset of Free). 0 <= FreeDPDK <= Free <=
	// Total <= 256.
	Free, Total, FreeDPDK int
}

// Field tags of the encoding. Tags 1–63 are defined by this version;
// unknown tags are skipped so that later versions can add optional fields.
const (
	tagName       = 1
	tagUnderlay   = 2
	tagCapability = 3 // repeated, in order
	tagVTEPMAC    = 4
	tagWGKey      = 5
	tagRaftAddr   = 6
	tagVersion    = 7
	tagRaftMember = 8 // one byte, 1; absent means false
	tagClusterID  = 9
	tagEncrypt    = 10 // one byte, 1; absent means false
	tagTrusted    = 11 // repeated: address (4 or 16 bytes) then prefix length
	tagPublicKey  = 12 // 32 bytes, ed25519
	// tagSRIOV holds every PF in one field (a repeated tag would not do: decoders before it
	// refuse a repeated unknown tag below 64): per PF free, total, free DPDK (2 bytes each,
	// big endian), name length (1 byte), name.
	tagSRIOV = 13
)

const maxTrustedSubnets = 16

// HasCapability reports whether c is among the capabilities.
func (md *Metadata) HasCapability(c string) bool {
	return slices.Contains(md.Capabilities, c)
}

// Clone returns a deep copy.
func (md Metadata) Clone() Metadata {
	md.Capabilities = slices.Clone(md.Capabilities)
	md.TrustedSubnets = slices.Clone(md.TrustedSubnets)
	md.SRIOV = slices.Clone(md.SRIOV)
	if md.VTEPMAC != nil {
		md.VTEPMAC = slices.Clone(md.VTEPMAC)
	}
	if md.PublicKey != nil {
		md.PublicKey = slices.Clone(md.PublicKey)
	}
	return md
}

// Validate checks every field (not the encoded size; Encode does).
func (md *Metadata) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrBadMetadata, fmt.Sprintf(format, a...))
	}
	if err := validName(md.Name); err != nil {
		return bad("name: %v", err)
	}
	if !md.Underlay.IsValid() || md.Underlay.IsUnspecified() || md.Underlay.Zone() != "" {
		return bad("underlay address %v must be a specific address without zone", md.Underlay)
	}
	if len(md.Capabilities) > maxCapabilities {
		return bad("%d capabilities, at most %d", len(md.Capabilities), maxCapabilities)
	}
	for i, c := range md.Capabilities {
		if err := validToken(c, maxCapabilityLen); err != nil {
			return bad("capability %d: %v", i, err)
		}
		if slices.Contains(md.Capabilities[:i], c) {
			return bad("capability %q listed twice", c)
		}
	}
	if md.VTEPMAC != nil && len(md.VTEPMAC) != 6 {
		return bad("VTEP MAC %v: need 6 bytes, got %d", md.VTEPMAC, len(md.VTEPMAC))
	}
	if md.RaftAddr.IsValid() {
		a := md.RaftAddr.Addr()
		if a.IsUnspecified() || a.Zone() != "" || md.RaftAddr.Port() == 0 {
			return bad("raft address %v must be a specific address without zone and a non-zero port", md.RaftAddr)
		}
	}
	if len(md.TrustedSubnets) > maxTrustedSubnets {
		return bad("%d trusted subnets, at most %d", len(md.TrustedSubnets), maxTrustedSubnets)
	}
	for _, p := range md.TrustedSubnets {
		if !p.IsValid() || p.Masked() != p {
			return bad("trusted subnet %v must be a masked prefix", p)
		}
	}
	if md.ClusterID != "" {
		if err := validToken(md.ClusterID, maxCapabilityLen); err != nil {
			return bad("cluster ID: %v", err)
		}
	}
	if md.PublicKey != nil && len(md.PublicKey) != ed25519.PublicKeySize {
		return bad("public key: %d bytes, need %d", len(md.PublicKey), ed25519.PublicKeySize)
	}
	if len(md.SRIOV) > maxSRIOVPFs {
		return bad("%d SR-IOV PFs, at most %d", len(md.SRIOV), maxSRIOVPFs)
	}
	for i, c := range md.SRIOV {
		if err := c.Validate(); err != nil {
			return bad("SR-IOV PF %d: %v", i, err)
		}
		for _, o := range md.SRIOV[:i] {
			if o.PF == c.PF {
				return bad("SR-IOV PF %q listed twice", c.PF)
			}
		}
	}
	if len(md.Version) > maxVersionLen {
		return bad("version: %d bytes, at most %d", len(md.Version), maxVersionLen)
	}
	for i := 0; i < len(md.Version); i++ {
		if c := md.Version[i]; c <= ' ' || c > '~' {
			return bad("version %q: byte %d is not printable ASCII", md.Version, i)
		}
	}
	return nil
}

// Encode validates md and returns its compact encoding:
//
//	version byte (1), then fields as tag (1 byte) | length (1 byte) | value
//
// in tag order, optional fields omitted when empty. Addresses are 4 or 16
// bytes, the Raft address is address then port (big endian). The result is
// at most MaxMetadataSize bytes or Encode fails.
func (md *Metadata) Encode() ([]byte, error) {
	if err := md.Validate(); err != nil {
		return nil, err
	}
	b := make([]byte, 0, 128)
	b = append(b, metadataVersion)
	field := func(tag byte, v []byte) {
		b = append(b, tag, byte(len(v)))
		b = append(b, v...)
	}
	field(tagName, []byte(md.Name))
	field(tagUnderlay, addrBytes(md.Underlay))
	for _, c := range md.Capabilities {
		field(tagCapability, []byte(c))
	}
	if md.VTEPMAC != nil {
		field(tagVTEPMAC, md.VTEPMAC)
	}
	if md.WireGuardKey != ([32]byte{}) {
		field(tagWGKey, md.WireGuardKey[:])
	}
	if md.RaftAddr.IsValid() {
		field(tagRaftAddr, binary.BigEndian.AppendUint16(addrBytes(md.RaftAddr.Addr()), md.RaftAddr.Port()))
	}
	if md.Version != "" {
		field(tagVersion, []byte(md.Version))
	}
	if md.RaftMember {
		field(tagRaftMember, []byte{1})
	}
	if md.ClusterID != "" {
		field(tagClusterID, []byte(md.ClusterID))
	}
	if md.Encrypt {
		field(tagEncrypt, []byte{1})
	}
	for _, p := range md.TrustedSubnets {
		field(tagTrusted, append(addrBytes(p.Addr()), byte(p.Bits())))
	}
	if md.PublicKey != nil {
		field(tagPublicKey, md.PublicKey)
	}
	if len(md.SRIOV) > 0 { // at most 8 × 22 bytes: fits the one-byte length
		var v []byte
		for _, c := range md.SRIOV {
			v = binary.BigEndian.AppendUint16(v, uint16(c.Free))
			v = binary.BigEndian.AppendUint16(v, uint16(c.Total))
			v = binary.BigEndian.AppendUint16(v, uint16(c.FreeDPDK))
			v = append(v, byte(len(c.PF)))
			v = append(v, c.PF...)
		}
		field(tagSRIOV, v)
	}
	if len(b) > MaxMetadataSize {
		return nil, fmt.Errorf("%w: encoded size %d exceeds %d bytes", ErrBadMetadata, len(b), MaxMetadataSize)
	}
	return b, nil
}

// DecodeMetadata parses an encoding made by Encode. It rejects anything
// else — empty input, another version, truncated or repeated fields, values
// of the wrong size, missing name or underlay — with an error wrapping
// ErrBadMetadata that says what is wrong. Unknown tags are skipped.
func DecodeMetadata(b []byte) (Metadata, error) {
	var md Metadata
	bad := func(format string, a ...any) (Metadata, error) {
		return Metadata{}, fmt.Errorf("%w: %s", ErrBadMetadata, fmt.Sprintf(format, a...))
	}
	if len(b) == 0 {
		return bad("empty")
	}
	if len(b) > MaxMetadataSize {
		return bad("%d bytes, at most %d", len(b), MaxMetadataSize)
	}
	if b[0] != metadataVersion {
		return bad("version %d, this peer understands %d", b[0], metadataVersion)
	}
	var seen uint64 // bit per singleton tag
	for off := 1; off < len(b); {
		if len(b)-off < 2 {
			return bad("truncated field header at offset %d", off)
		}
		tag, n := b[off], int(b[off+1])
		off += 2
		if len(b)-off < n {
			return bad("field %d at offset %d: length %d overruns the %d bytes left", tag, off-2, n, len(b)-off)
		}
		v := b[off : off+n]
		off += n
		if tag != tagCapability && tag != tagTrusted && tag < 64 {
			if seen&(1<<tag) != 0 {
				return bad("field %d repeated", tag)
			}
			seen |= 1 << tag
		}
		switch tag {
		case tagName:
			md.Name = string(v)
		case tagUnderlay:
			a, ok := addrFromBytes(v)
			if !ok {
				return bad("underlay address: %d bytes, need 4 or 16", len(v))
			}
			md.Underlay = a
		case tagCapability:
			md.Capabilities = append(md.Capabilities, string(v))
		case tagVTEPMAC:
			if len(v) != 6 {
				return bad("VTEP MAC: %d bytes, need 6", len(v))
			}
			md.VTEPMAC = net.HardwareAddr(bytes.Clone(v))
		case tagWGKey:
			if len(v) != 32 {
				return bad("WireGuard key: %d bytes, need 32", len(v))
			}
			copy(md.WireGuardKey[:], v)
			if md.WireGuardKey == ([32]byte{}) {
				return bad("WireGuard key is all zero")
			}
		case tagRaftAddr:
			if len(v) != 6 && len(v) != 18 {
				return bad("raft address: %d bytes, need 6 or 18", len(v))
			}
			a, _ := addrFromBytes(v[:len(v)-2])
			md.RaftAddr = netip.AddrPortFrom(a, binary.BigEndian.Uint16(v[len(v)-2:]))
		case tagVersion:
			if len(v) == 0 {
				return bad("empty version field")
			}
			md.Version = string(v)
		case tagRaftMember:
			if len(v) != 1 || v[0] != 1 {
				return bad("raft member flag: want the single byte 1, got %x", v)
			}
			md.RaftMember = true
		case tagEncrypt:
			if len(v) != 1 || v[0] != 1 {
				return bad("encrypt flag: want the single byte 1, got %x", v)
			}
			md.Encrypt = true
		case tagTrusted:
			if len(v) != 5 && len(v) != 17 {
				return bad("trusted subnet: %d bytes, need 5 or 17", len(v))
			}
			a, _ := addrFromBytes(v[:len(v)-1])
			p, err := a.Prefix(int(v[len(v)-1]))
			if err != nil || p.Bits() != int(v[len(v)-1]) {
				return bad("trusted subnet %v/%d: bad prefix length", a, v[len(v)-1])
			}
			md.TrustedSubnets = append(md.TrustedSubnets, p)
		case tagPublicKey:
			if len(v) != ed25519.PublicKeySize {
				return bad("public key: %d bytes, need %d", len(v), ed25519.PublicKeySize)
			}
			md.PublicKey = ed25519.PublicKey(bytes.Clone(v))
		case tagSRIOV:
			if len(v) == 0 {
				return bad("empty SR-IOV field")
			}
			for len(v) > 0 {
				if len(v) < 7 || len(v) < 7+int(v[6]) {
					return bad("SR-IOV PF %d: truncated (%d bytes left)", len(md.SRIOV), len(v))
				}
				if len(md.SRIOV) == maxSRIOVPFs {
					return bad("more than %d SR-IOV PFs", maxSRIOVPFs)
				}
				n := int(v[6])
				md.SRIOV = append(md.SRIOV, PFCapacity{
					Free:     int(binary.BigEndian.Uint16(v[0:2])),
					Total:    int(binary.BigEndian.Uint16(v[2:4])),
					FreeDPDK: int(binary.BigEndian.Uint16(v[4:6])),
					PF:       string(v[7 : 7+n]),
				})
				v = v[7+n:]
			}
		case tagClusterID:
			if len(v) == 0 {
				return bad("empty cluster ID field")
			}
			md.ClusterID = string(v)
		default:
			// An optional field from a later version: skip it.
		}
	}
	if seen&(1<<tagName) == 0 {
		return bad("no name")
	}
	if seen&(1<<tagUnderlay) == 0 {
		return bad("no underlay address")
	}
	if err := md.Validate(); err != nil {
		return Metadata{}, err
	}
	return md, nil
}

// Validate checks one PF's name and counts (the bounds Metadata.Validate
// applies to each).
func (c PFCapacity) Validate() error {
	if c.PF == "" || len(c.PF) > maxPFNameLen {
		return fmt.Errorf("name %q: 1-%d bytes, got %d", c.PF, maxPFNameLen, len(c.PF))
	}
	for i := 0; i < len(c.PF); i++ {
		if ch := c.PF[i]; !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '_' || ch == '.' || ch == '-') {
			return fmt.Errorf("name %q: byte %d (%q) is not one of [A-Za-z0-9_.-]", c.PF, i, ch)
		}
	}
	if ch := c.PF[0]; ch == '_' || ch == '.' || ch == '-' {
		return fmt.Errorf("name %q: must start with a letter or digit, as ipam.Network's pf does", c.PF)
	}
	if c.Total < 0 || c.Total > maxVFCount {
		return fmt.Errorf("%s: total %d VFs, want 0-%d", c.PF, c.Total, maxVFCount)
	}
	if c.Free < 0 || c.Free > c.Total {
		return fmt.Errorf("%s: %d free VFs, want 0-%d (the total)", c.PF, c.Free, c.Total)
	}
	if c.FreeDPDK < 0 || c.FreeDPDK > c.Free {
		return fmt.Errorf("%s: %d free DPDK VFs, want 0-%d (the free ones)", c.PF, c.FreeDPDK, c.Free)
	}
	return nil
}

func addrBytes(a netip.Addr) []byte {
	if a.Is4() {
		b := a.As4()
		return b[:]
	}
	b := a.As16()
	return b[:]
}

func addrFromBytes(b []byte) (netip.Addr, bool) {
	switch len(b) {
	case 4:
		return netip.AddrFrom4([4]byte(b)), true
	case 16:
		return netip.AddrFrom16([16]byte(b)), true
	}
	return netip.Addr{}, false
}

// validToken checks a capability or channel name: 1..max bytes of
// [a-z0-9._-].
func validToken(s string, max int) error {
	if s == "" {
		return fmt.Errorf("empty")
	}
	if len(s) > max {
		return fmt.Errorf("%q: %d bytes, at most %d", s, len(s), max)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%q: byte %d (%q) is not one of [a-z0-9._-]", s, i, c)
		}
	}
	return nil
}
