package main

import (
	"bytes"
	"compress/lzw"
	"encoding/binary"
	"fmt"
	"math"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/memberlist"
)

// envelope frames a mesh channel message as mesh/channels.go does.
func envelope(name string, payload []byte) []byte {
	b := []byte{1, byte(len(name))}
	b = append(b, name...)
	b = binary.BigEndian.AppendUint64(b, 42)
	return append(b, payload...)
}

func compound(msgs ...[]byte) []byte {
	b := []byte{mlCompound, byte(len(msgs))}
	for _, m := range msgs {
		b = binary.BigEndian.AppendUint16(b, uint16(len(m)))
	}
	for _, m := range msgs {
		b = append(b, m...)
	}
	return b
}

// compressLikeMemberlist wraps b as memberlist's compressPayload does.
func compressLikeMemberlist(t *testing.T, b []byte) []byte {
	t.Helper()
	var z bytes.Buffer
	w := lzw.NewWriter(&z, lzw.LSB, 8)
	w.Write(b)
	w.Close()
	var enc []byte
	if err := codec.NewEncoderBytes(&enc, &codec.MsgpackHandle{}).Encode(&compressed{Algo: 0, Buf: z.Bytes()}); err != nil {
		t.Fatal(err)
	}
	return append([]byte{mlCompress}, enc...)
}

func withCRC(b []byte) []byte { return append([]byte{mlHasCRC, 0, 0, 0, 0}, b...) }

func TestClassifyPacket(t *testing.T) {
	user := append([]byte{mlUser}, envelope("linkstate", bytes.Repeat([]byte{7}, 300))...)
	alive := append([]byte{mlAlive}, bytes.Repeat([]byte{1}, 100)...)
	ping := append([]byte{mlPing}, bytes.Repeat([]byte{2}, 50)...)
	cases := []struct {
		name string
		pkt  []byte
		want []part
	}{
		{"ping", ping, []part{{kindSWIMProbe, len(ping)}}},
		{"alive with crc", withCRC(alive), []part{{kindSWIMAlive, len(alive)}}},
		{"compound", compound(alive, user, ping), []part{{kindSWIMAlive, len(alive)}, {"ch:linkstate", len(user)}, {kindSWIMProbe, len(ping)}}},
		{"crc, compressed compound", withCRC(compressLikeMemberlist(t, compound(user, alive))), []part{{"ch:linkstate", len(user)}, {kindSWIMAlive, len(alive)}}},
		{"user without envelope", []byte{mlUser, 9}, []part{{kindUserOther, 2}}},
		{"truncated compound keeps the whole parts", compound(alive, ping)[:2+4+len(alive)+3], []part{{kindSWIMAlive, len(alive)}}},
		{"encrypted", []byte{mlEncrypt, 1, 2, 3}, []part{{kindEncrypted, 4}}},
		{"garbage compression", []byte{mlCompress, 0xff, 0xff}, []part{{kindOther, 3}}},
		{"empty", nil, []part{{kindOther, 0}}},
		{"compound count beyond the lengths", []byte{mlCompound, 200, 0, 1}, []part{{kindOther, 4}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := classifyPacket(c.pkt)
			if len(got) != len(c.want) {
				t.Fatalf("got %v, want %v", got, c.want)
			}
			for i := range got {
				if got[i] != c.want[i] {
					t.Fatalf("part %d: got %v, want %v", i, got[i], c.want[i])
				}
			}
		})
	}
}

func TestCounterSharesWireBytesByPart(t *testing.T) {
	alive := append([]byte{mlAlive}, bytes.Repeat([]byte{1}, 99)...)                 // 100 bytes
	user := append([]byte{mlUser}, envelope("dns", bytes.Repeat([]byte{7}, 287))...) // 1+2+3+8+287 = 301
	pkt := withCRC(compressLikeMemberlist(t, compound(alive, user)))
	c := newCounter()
	c.addPacket(pkt)
	s := c.snapshot()
	sum := s[kindSWIMAlive].bytes + s["ch:dns"].bytes
	if math.Abs(sum-float64(len(pkt))) > 1e-9 {
		t.Fatalf("kinds add up to %v bytes, the packet has %d", sum, len(pkt))
	}
	if want := float64(len(pkt)) * 100 / 401; math.Abs(s[kindSWIMAlive].bytes-want) > 1e-9 {
		t.Fatalf("alive share %v, want %v", s[kindSWIMAlive].bytes, want)
	}
	if s[kindUDPPackets].msgs != 1 || s[kindSWIMAlive].msgs != 1 || s["ch:dns"].msgs != 1 {
		t.Fatalf("counts: %+v", s)
	}
}

func TestClassifyStream(t *testing.T) {
	pushPull := append([]byte{mlPushPull}, bytes.Repeat([]byte{3}, 5000)...)
	for _, c := range []struct {
		name  string
		first []byte
		want  string
	}{
		{"push/pull", pushPull, kindPushPull},
		{"compressed push/pull", compressLikeMemberlist(t, pushPull), kindPushPull},
		{"tcp ping", []byte{mlPing, 1}, kindSWIMProbe},
		{"reliable user message", []byte{mlUser, 1}, kindStreamOther},
		{"garbage", []byte{mlCompress, 1}, kindStreamOther},
	} {
		if got := classifyStream(c.first); got != c.want {
			t.Errorf("%s: got %q, want %q", c.name, got, c.want)
		}
	}
}

func TestSlope(t *testing.T) {
	x := []float64{50, 100, 200, 500}
	for _, k := range []float64{0, 0.5, 1, 2, 3} {
		y := make([]float64, len(x))
		for i := range x {
			y[i] = 7 * math.Pow(x[i], k)
		}
		if got := slope(x, y); math.Abs(got-k) > 1e-9 {
			t.Errorf("y = 7 x^%v: slope %v", k, got)
		}
	}
	if got := slope([]float64{50, 100}, []float64{0, 3}); !math.IsNaN(got) {
		t.Errorf("one usable point: slope %v, want NaN", got)
	}
	if got := slope([]float64{50, 100, 200}, []float64{1, math.NaN(), 4}); math.Abs(got-1) > 1e-9 {
		t.Errorf("NaN point not skipped: slope %v, want 1", got)
	}
}

func TestQuantile(t *testing.T) {
	var d []time.Duration
	for i := 100; i >= 1; i-- {
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	if got := quantile(d, 0.5); got != 50*time.Millisecond {
		t.Errorf("median %v", got)
	}
	if got := quantile(d, 0.99); got != 99*time.Millisecond {
		t.Errorf("p99 %v", got)
	}
	if got := quantile(nil, 0.5); got != 0 {
		t.Errorf("empty: %v", got)
	}
	if d[0] != 100*time.Millisecond {
		t.Error("quantile reordered its input")
	}
}

func TestNodeAddr(t *testing.T) {
	base := netip.MustParseAddr("127.1.0.0")
	for _, c := range []struct {
		i    int
		want string
	}{{0, "127.1.0.1"}, {249, "127.1.0.250"}, {250, "127.1.1.1"}, {999, "127.1.3.250"}} {
		got, err := nodeAddr(base, c.i)
		if err != nil || got.String() != c.want {
			t.Errorf("peer %d: %v %v, want %s", c.i, got, err, c.want)
		}
	}
	if _, err := nodeAddr(netip.MustParseAddr("10.1.0.0"), 0); err == nil {
		t.Error("a base outside 127.0.0.0/8 was accepted")
	}
	if _, err := nodeAddr(base, 250*256); err == nil {
		t.Error("an index beyond the /16 was accepted")
	}
}

// A stream accepted while nobody reads StreamCh any more must not keep the
// inner transport's Shutdown waiting (memberlist's listener blocks on its
// channel until it is read).
func TestCountingTransportShutdownWithPendingStream(t *testing.T) {
	nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{"127.0.0.1"}, BindPort: 0})
	if err != nil {
		t.Fatal(err)
	}
	tr := wrapTransport(newCounter())(nt)
	for range 2 { // one conn held by the forwarder, one by the inner listener
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", nt.GetAutoBindPort()), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
	}
	done := make(chan error, 1)
	go func() { done <- tr.Shutdown() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown still waiting after 10s")
	}
	if err := tr.Shutdown(); err != nil { // twice is safe
		t.Fatal(err)
	}
}

// The run-queue quantiles read only the waits recorded since the first
// snapshot, report upper bucket bounds, and count waits at or over the bound.
func TestSchedQuantilesSince(t *testing.T) {
	buckets := []float64{0, 0.001, 0.01, 0.1, 1, math.Inf(1)}
	before := schedHist{counts: []uint64{100, 0, 0, 0, 0}, buckets: buckets}
	after := schedHist{counts: []uint64{100, 90, 5, 4, 1}, buckets: buckets}
	q, over := after.quantilesSince(before, 0.1, 0.5, 0.95, 1)
	want := []time.Duration{10 * time.Millisecond, 100 * time.Millisecond, time.Second}
	for i := range want {
		if q[i] != want[i] {
			t.Errorf("quantile %d = %v, want %v (the 100 waits before must not count)", i, q[i], want[i])
		}
	}
	if over != 5 {
		t.Errorf("waits >= 100 ms = %d, want 5", over)
	}
	// The last bucket is open: its lower bound is reported.
	open := schedHist{counts: []uint64{0, 0, 0, 0, 3}, buckets: buckets}
	if q, _ := open.quantilesSince(schedHist{counts: make([]uint64, 5), buckets: buckets}, 1, 0.5); q[0] != time.Second {
		t.Errorf("open bucket quantile = %v, want 1s", q[0])
	}
	// Mismatched snapshots give zeros, not a panic.
	if q, n := after.quantilesSince(schedHist{}, 0.1, 0.5); q[0] != 0 || n != 0 {
		t.Errorf("mismatched snapshots: %v, %d", q, n)
	}
}
