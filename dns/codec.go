package dns

import (
	"cmp"
	"crypto/ed25519"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Delta is an immutable, sorted set of entries: a delta to broadcast, or a
// full state. It is what Records.Merge takes and returns.
type Delta struct {
	entries []Entry
}

// NewDelta returns a delta holding a copy of entries, after checking each.
// It is for tests and tools; peers exchange encoded deltas.
func NewDelta(entries ...Entry) (*Delta, error) {
	d := &Delta{entries: slices.Clone(entries)}
	for i := range d.entries {
		if err := d.entries[i].validate(); err != nil {
			return nil, err
		}
	}
	d.sort()
	if i := d.duplicate(); i >= 0 {
		return nil, fmt.Errorf("%w: duplicate entry for %q", ErrInvalidEntry, d.entries[i].Name)
	}
	return d, nil
}

// Len returns the number of entries.
func (d *Delta) Len() int {
	if d == nil {
		return 0
	}
	return len(d.entries)
}

// Empty reports whether the delta has no entry.
func (d *Delta) Empty() bool { return d.Len() == 0 }

// Entries returns a copy of the entries, sorted.
func (d *Delta) Entries() []Entry {
	if d == nil {
		return nil
	}
	return slices.Clone(d.entries)
}

func compareEntries(a, b Entry) int {
	return cmp.Or(
		strings.Compare(a.Peer, b.Peer),
		strings.Compare(a.Name, b.Name),
		cmp.Compare(a.Kind, b.Kind),
		a.Addr.Compare(b.Addr),
		strings.Compare(a.Service, b.Service),
		strings.Compare(a.Proto, b.Proto),
		cmp.Compare(a.Port, b.Port),
	)
}

func (d *Delta) sort() { slices.SortFunc(d.entries, compareEntries) }

// duplicate returns the index of an entry whose key repeats the previous
// one in the sorted entries, or -1.
func (d *Delta) duplicate() int {
	for i := 1; i < len(d.entries); i++ {
		if compareEntries(d.entries[i-1], d.entries[i]) == 0 {
			return i
		}
	}
	return -1
}

// Wire format, version 2 (all integers unsigned varints unless noted):
//
//	magic "WDR" | format version byte (2) | count
//	count × entry:
//	  body:
//	    peer string | name string | flags byte (bits 0-1 kind, bit 7 deleted) | version
//	    kind addr: address length byte (4 or 16) | address bytes
//	    kind srv:  service string | proto byte (1 tcp, 2 udp) | port (2 bytes, big endian)
//	  signature string (0 or 64 bytes: ed25519 over RecordDomain and the body)
//	strings: length | bytes
//
// Entries are sorted and unique, so equal states encode to equal bytes.
// Version 1 (unsigned) is refused: a peer that cannot sign cannot be trusted.
const (
	codecMagic   = "WDR"
	codecVersion = 2
	flagDeleted  = 0x80
	kindMask     = 0x03
	protoTCP     = 1
	protoUDP     = 2
	// minEntryLen is the smallest encoded entry, to bound count early.
	minEntryLen = 1 + 1 + 1 + 1 + 1 + 4 + 1
)

// Encode returns the wire form of the delta.
func (d *Delta) Encode() []byte {
	b := make([]byte, 0, 16+d.Len()*48)
	b = append(b, codecMagic...)
	b = append(b, codecVersion)
	b = binary.AppendUvarint(b, uint64(d.Len()))
	if d == nil {
		return b
	}
	for _, e := range d.entries {
		b = appendEntryBody(b, e)
		b = appendString(b, e.Sig)
	}
	return b
}

// appendEntryBody appends e's wire form without its signature: what the
// owner signs.
func appendEntryBody(b []byte, e Entry) []byte {
	b = appendString(b, e.Peer)
	b = appendString(b, e.Name)
	flags := byte(e.Kind) & kindMask
	if e.Deleted {
		flags |= flagDeleted
	}
	b = append(b, flags)
	b = binary.AppendUvarint(b, e.Version)
	switch e.Kind {
	case KindAddr:
		s := e.Addr.AsSlice()
		b = append(b, byte(len(s)))
		b = append(b, s...)
	case KindSRV:
		b = appendString(b, e.Service)
		p := byte(protoTCP)
		if e.Proto == "udp" {
			p = protoUDP
		}
		b = append(b, p)
		b = binary.BigEndian.AppendUint16(b, e.Port)
	}
	return b
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// DecodeDelta parses the wire form. Anything malformed (bad magic or
// version, truncation, trailing bytes, invalid or duplicate entries) gives an
// error wrapping ErrDecode.
func DecodeDelta(b []byte) (*Delta, error) {
	d, err := decodeDelta(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDecode, err)
	}
	return d, nil
}

type reader struct {
	b   []byte
	off int
}

func (r *reader) uvarint(what string) (uint64, error) {
	v, n := binary.Uvarint(r.b[r.off:])
	if n <= 0 {
		return 0, fmt.Errorf("bad %s at offset %d", what, r.off)
	}
	r.off += n
	return v, nil
}

func (r *reader) bytes(what string, n int) ([]byte, error) {
	if n < 0 || len(r.b)-r.off < n {
		return nil, fmt.Errorf("truncated %s at offset %d", what, r.off)
	}
	s := r.b[r.off : r.off+n]
	r.off += n
	return s, nil
}

func (r *reader) byte(what string) (byte, error) {
	s, err := r.bytes(what, 1)
	if err != nil {
		return 0, err
	}
	return s[0], nil
}

func (r *reader) string(what string, max int) (string, error) {
	n, err := r.uvarint(what + " length")
	if err != nil {
		return "", err
	}
	if n > uint64(max) {
		return "", fmt.Errorf("%s length %d over %d at offset %d", what, n, max, r.off)
	}
	s, err := r.bytes(what, int(n))
	return string(s), err
}

func decodeDelta(b []byte) (*Delta, error) {
	r := &reader{b: b}
	head, err := r.bytes("header", len(codecMagic)+1)
	if err != nil {
		return nil, err
	}
	if string(head[:len(codecMagic)]) != codecMagic {
		return nil, fmt.Errorf("bad magic %q", head[:len(codecMagic)])
	}
	if v := head[len(codecMagic)]; v != codecVersion {
		return nil, fmt.Errorf("unsupported format version %d", v)
	}
	count, err := r.uvarint("entry count")
	if err != nil {
		return nil, err
	}
	if count > uint64((len(b)-r.off)/minEntryLen) {
		return nil, fmt.Errorf("entry count %d larger than the message", count)
	}
	d := &Delta{entries: make([]Entry, 0, int(count))}
	for i := uint64(0); i < count; i++ {
		e, err := r.entry()
		if err != nil {
			return nil, fmt.Errorf("entry %d: %w", i, err)
		}
		d.entries = append(d.entries, e)
	}
	if r.off != len(b) {
		return nil, fmt.Errorf("%d trailing bytes", len(b)-r.off)
	}
	d.sort()
	if i := d.duplicate(); i >= 0 {
		return nil, fmt.Errorf("duplicate entry for %q", d.entries[i].Name)
	}
	return d, nil
}

func (r *reader) entry() (Entry, error) {
	var e Entry
	var err error
	if e.Peer, err = r.string("peer", maxPeerLen); err != nil {
		return e, err
	}
	if e.Name, err = r.string("name", maxNameLen); err != nil {
		return e, err
	}
	flags, err := r.byte("flags")
	if err != nil {
		return e, err
	}
	if flags&^(flagDeleted|kindMask) != 0 {
		return e, fmt.Errorf("unknown flags %#x", flags)
	}
	e.Kind = Kind(flags & kindMask)
	e.Deleted = flags&flagDeleted != 0
	if e.Version, err = r.uvarint("version"); err != nil {
		return e, err
	}
	switch e.Kind {
	case KindAddr:
		n, err := r.byte("address length")
		if err != nil {
			return e, err
		}
		if n != 4 && n != 16 {
			return e, fmt.Errorf("address length %d", n)
		}
		s, err := r.bytes("address", int(n))
		if err != nil {
			return e, err
		}
		e.Addr, _ = netip.AddrFromSlice(s)
		if e.Addr.Is4In6() {
			return e, fmt.Errorf("ipv4-mapped address %v", e.Addr)
		}
	case KindSRV:
		if e.Service, err = r.string("service", maxLabelLen); err != nil {
			return e, err
		}
		p, err := r.byte("proto")
		if err != nil {
			return e, err
		}
		switch p {
		case protoTCP:
			e.Proto = "tcp"
		case protoUDP:
			e.Proto = "udp"
		default:
			return e, fmt.Errorf("proto %d", p)
		}
		port, err := r.bytes("port", 2)
		if err != nil {
			return e, err
		}
		e.Port = binary.BigEndian.Uint16(port)
	default:
		return e, fmt.Errorf("kind %d", e.Kind)
	}
	if e.Sig, err = r.string("signature", ed25519.SignatureSize); err != nil {
		return e, err
	}
	return e, e.validate()
}
