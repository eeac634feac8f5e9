package mesh

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/memberlist"
)

func TestEnvelopeRoundTrip(t *testing.T) {
	for _, c := range []struct {
		name    string
		payload []byte
	}{
		{"links", []byte("hello")},
		{"dns", nil},
		{strings.Repeat("a", maxChannelNameLen), bytes.Repeat([]byte{0xff}, 900)},
	} {
		b := encodeEnvelope(c.name, 0xfeedface01, c.payload)
		name, id, payload, err := decodeEnvelope(b)
		if err != nil || name != c.name || id != 0xfeedface01 || !bytes.Equal(payload, c.payload) {
			t.Errorf("round trip of %q: %q, %x, %q, %v", c.name, name, id, payload, err)
		}
	}
}

func TestDecodeEnvelopeRejects(t *testing.T) {
	for name, b := range map[string][]byte{
		"empty":       {},
		"one byte":    {1},
		"version 2":   {2, 1, 'a', 0, 0, 0, 0, 0, 0, 0, 0},
		"empty name":  {1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 'x'},
		"overrun":     {1, 5, 'a', 'b', 0, 0, 0, 0, 0, 0, 0, 0},
		"no id":       {1, 1, 'a', 0, 0, 0, 0, 0, 0, 0},
		"bad name":    {1, 2, 'A', 'b', 0, 0, 0, 0, 0, 0, 0, 0},
		"long name":   append([]byte{1, 33}, bytes.Repeat([]byte{'a'}, 41)...),
		"binary name": {1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0},
	} {
		if n, _, p, err := decodeEnvelope(b); !errors.Is(err, ErrBadEnvelope) {
			t.Errorf("%s: decodeEnvelope = %q, %q, %v; want ErrBadEnvelope", name, n, p, err)
		}
	}
}

func TestStateRoundTrip(t *testing.T) {
	in := []stateEntry{
		{"dns", []byte("records")},
		{"links", bytes.Repeat([]byte{7}, 300)},
		{"empty", []byte{}},
	}
	out, err := decodeState(encodeState(in))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(out, in) {
		t.Fatalf("got %q, want %q", out, in)
	}
	// Payloads are capped: appending to one cannot overwrite the next.
	out[0].payload = append(out[0].payload, 'X')
	if string(out[1].payload[:1]) != "\x07" {
		t.Fatal("append to one payload clobbered the next")
	}
}

func TestDecodeStateRejects(t *testing.T) {
	many := []byte{1}
	for i := range maxStateEntries + 1 {
		many = append(many, 2, 'a'+byte(i/26), 'a'+byte(i%26), 0)
	}
	for name, b := range map[string][]byte{
		"empty":        {},
		"version 2":    {2},
		"name overrun": {1, 9, 'a'},
		"bad name":     {1, 1, 'A', 0},
		"no length":    {1, 1, 'a'},
		"overrun":      {1, 1, 'a', 5, 'x'},
		"huge length":  {1, 1, 'a', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01},
		"bad varint":   {1, 1, 'a', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01},
		"repeated":     {1, 1, 'a', 0, 1, 'a', 0},
		"too many":     many,
	} {
		if e, err := decodeState(b); !errors.Is(err, ErrBadEnvelope) {
			t.Errorf("%s: decodeState = %q, %v; want ErrBadEnvelope", name, e, err)
		}
	}
}

func FuzzDecodeEnvelope(f *testing.F) {
	f.Add(encodeEnvelope("links", 42, []byte("payload")))
	f.Add(encodeEnvelope("_", 1, []byte{msgSuspect, 'x'}))
	f.Add([]byte{})
	f.Add([]byte{1, 0})
	f.Add([]byte{1, 255, 'a'})
	f.Add([]byte{2, 1, 'a', 0, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		name, id, payload, err := decodeEnvelope(b)
		if err != nil {
			if !errors.Is(err, ErrBadEnvelope) {
				t.Fatalf("error %v does not wrap ErrBadEnvelope", err)
			}
			return
		}
		if !bytes.Equal(encodeEnvelope(name, id, payload), b) {
			t.Fatalf("re-encoding %q/%q does not give the input back", name, payload)
		}
	})
}

func FuzzDecodeState(f *testing.F) {
	f.Add(encodeState([]stateEntry{{"dns", []byte("x")}, {"links", nil}}))
	f.Add([]byte{})
	f.Add([]byte{1})
	f.Add([]byte{1, 1, 'a', 0x80})
	f.Add([]byte{1, 1, 'a', 0, 1, 'a', 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		entries, err := decodeState(b)
		if err != nil {
			if !errors.Is(err, ErrBadEnvelope) {
				t.Fatalf("error %v does not wrap ErrBadEnvelope", err)
			}
			return
		}
		again, err := decodeState(encodeState(entries))
		if err != nil || len(again) != len(entries) {
			t.Fatalf("re-decode: %q, %v; want %q", again, err, entries)
		}
		for i := range entries {
			if again[i].name != entries[i].name || !bytes.Equal(again[i].payload, entries[i].payload) {
				t.Fatalf("entry %d: %q, want %q", i, again[i], entries[i])
			}
		}
	})
}

// TestChannelDispatch checks NotifyMsg/LocalState/MergeRemoteState routing
// without a network.
func TestChannelDispatch(t *testing.T) {
	cfg, logs := testConfig(t, "dispatch")
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	a, b := &recorder{state: []byte("A")}, &recorder{}
	// memberlist is not started: nothing drains the queue.
	m.RegisterChannel("a", a)
	m.RegisterChannel("b", b)

	d := delegate{m}
	buf := encodeEnvelope("a", 1, []byte("msg"))
	d.NotifyMsg(buf)
	d.NotifyMsg(buf)      // a duplicate is delivered once
	buf[len(buf)-1] = 'X' // memberlist reuses its buffer
	d.NotifyMsg(encodeEnvelope("zzz", 2, []byte("unknown channel")))
	d.NotifyMsg([]byte{0xde, 0xad})
	d.NotifyMsg(encodeEnvelope("_", 3, []byte{msgSuspect})) // no name
	if msgs, _ := a.got(); len(msgs) != 1 || msgs[0] != "msg" {
		t.Fatalf("channel a got %q", msgs)
	}
	// New messages are passed on (relayed), duplicates and garbage not.
	if n := m.queue.NumQueued(); n != 2 {
		t.Errorf("%d messages queued for relay, want 2", n)
	}
	if err := m.RegisterChannel("_x", a); err == nil {
		t.Error("reserved channel name accepted")
	}
	if !logs.contains("dropped malformed gossip message") {
		t.Error("malformed message not logged")
	}

	st := d.LocalState(true)
	entries, err := decodeState(st)
	if err != nil || len(entries) != 1 || entries[0].name != "a" {
		t.Fatalf("LocalState = %q (%v), want only channel a (b has no state)", entries, err)
	}
	d.MergeRemoteState(encodeState([]stateEntry{{"b", []byte("B")}, {"zzz", []byte("?")}}), false)
	d.MergeRemoteState([]byte("garbage"), false)
	d.MergeRemoteState(nil, false)
	if _, merged := b.got(); len(merged) != 1 || merged[0] != "B/false" {
		t.Fatalf("channel b merged %q", merged)
	}
}

func TestSeenForgetsOldest(t *testing.T) {
	var s seen
	for i := range uint64(dedupSize) {
		if !s.first(i) {
			t.Fatalf("id %d not new", i)
		}
	}
	if s.first(5) {
		t.Fatal("duplicate id reported new")
	}
	s.first(dedupSize) // evicts id 0
	if !s.first(0) {
		t.Fatal("oldest id not forgotten")
	}
	if len(s.ids) != dedupSize {
		t.Fatalf("%d ids remembered, want %d", len(s.ids), dedupSize)
	}
}

// A SendTo frame is delivered to its channel every time it arrives, and
// never passed on; a malformed one is dropped and logged.
func TestUnicastDispatch(t *testing.T) {
	cfg, logs := testConfig(t, "unicast")
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	a := &recorder{}
	m.RegisterChannel("a", a)
	d := delegate{m}
	frame := append([]byte{unicastMarker, 1, 'a'}, "hello"...)
	d.NotifyMsg(frame)
	d.NotifyMsg(frame) // unicast has no id: a resend is delivered again
	frame[len(frame)-1] = 'X'
	for _, bad := range [][]byte{{unicastMarker}, {unicastMarker, 9, 'a'}, {unicastMarker, 1, ' '}, {unicastMarker, 1, '_'}} {
		d.NotifyMsg(bad)
	}
	d.NotifyMsg([]byte{unicastMarker, 3, 'z', 'z', 'z', 'x'}) // unregistered channel
	if msgs, _ := a.got(); len(msgs) != 2 || msgs[0] != "hello" || msgs[1] != "hello" {
		t.Fatalf("channel a got %q", msgs)
	}
	if n := m.queue.NumQueued(); n != 0 {
		t.Errorf("%d unicast messages queued for relay, want none", n)
	}
	if !logs.contains("dropped malformed unicast message") || !logs.contains("bad channel name") {
		t.Error("malformed unicast messages not logged")
	}
	if err := m.SendTo("x", "a", []byte("m")); !errors.Is(err, ErrNotStarted) {
		t.Errorf("SendTo before Start: %v", err)
	}
}

// Our broadcasts never invalidate each other and say so to memberlist, which
// otherwise scans its whole queue for every message queued (O(Q) each).
func TestBroadcastsAreUnique(t *testing.T) {
	for _, b := range []memberlist.Broadcast{broadcast("x"), &leaveIntent{msg: []byte("x"), done: make(chan struct{})}} {
		if _, ok := b.(memberlist.UniqueBroadcast); !ok {
			t.Errorf("%T is not a memberlist.UniqueBroadcast: queueing it scans the whole queue", b)
		}
	}
	// Unique messages with equal bytes all stay queued.
	q := &memberlist.TransmitLimitedQueue{NumNodes: func() int { return 10 }, RetransmitMult: 3}
	for range 3 {
		q.QueueBroadcast(broadcast("same"))
	}
	if n := q.NumQueued(); n != 3 {
		t.Fatalf("%d of 3 equal broadcasts queued, want 3", n)
	}
}

// LinkStateQueued counts the link-state queue only, and falls to 0 once each
// message has had its LinkStateRetransmitMult × ⌈log₁₀(N+1)⌉ sends (2 here).
func TestLinkStateQueued(t *testing.T) {
	m := meshWithQueues(t, "lsq", 2)
	if n := m.LinkStateQueued(); n != 0 {
		t.Fatalf("a new mesh has %d link-state broadcasts queued", n)
	}
	for _, b := range []string{"l1", "l2"} {
		if err := m.Broadcast(LinkStateChannelName, []byte(b)); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Broadcast("dns", []byte("d")); err != nil {
		t.Fatal(err)
	}
	if n := m.LinkStateQueued(); n != 2 {
		t.Fatalf("LinkStateQueued %d with two link-state messages and one other queued, want 2", n)
	}
	m.getBroadcasts(2, 1400)
	if n := m.LinkStateQueued(); n != 2 {
		t.Fatalf("LinkStateQueued %d after one of two sends, want 2", n)
	}
	m.getBroadcasts(2, 1400)
	if n := m.LinkStateQueued(); n != 0 {
		t.Fatalf("LinkStateQueued %d after both sends, want 0", n)
	}
}
