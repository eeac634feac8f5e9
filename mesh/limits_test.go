package mesh

import (
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func refusedCount(t *testing.T, tr memberlist.Transport, reason string) float64 {
	t.Helper()
	var m dto.Metric
	if err := tr.(*limitedTransport).refused.WithLabelValues(reason).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// dialFrom opens a TCP connection to addr from the loopback address src.
func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 2 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// closedByServer reports whether the server closed c (within 5s).
func closedByServer(c net.Conn) bool {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := c.Read(make([]byte, 1))
	return err == io.EOF
}

func TestLimitStreams(t *testing.T) {
	nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{"127.0.0.1"}, BindPort: 0})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	tr := LimitStreams(nt, StreamLimits{PerSource: 2, Total: 3, FirstByte: 300 * time.Millisecond, Registry: reg})
	defer tr.Shutdown()
	addr := fmt.Sprintf("127.0.0.1:%d", nt.GetAutoBindPort())

	// The test plays memberlist: it takes the admitted streams and reads them.
	var mu sync.Mutex
	var got []net.Conn
	go func() {
		for c := range tr.StreamCh() {
			mu.Lock()
			got = append(got, c)
			mu.Unlock()
		}
	}()
	admitted := func(n int) func() string {
		return func() string {
			mu.Lock()
			defer mu.Unlock()
			if len(got) != n {
				return fmt.Sprintf("%d streams admitted, want %d", len(got), n)
			}
			return ""
		}
	}

	// Two streams from one source pass, first byte and all.
	for i := range 2 {
		c := dialFrom(t, "127.0.0.1", addr)
		fmt.Fprintf(c, "%cabc", 'x'+i)
	}
	waitFor(t, 5*time.Second, admitted(2))
	mu.Lock()
	b := make([]byte, 4)
	if _, err := io.ReadFull(got[0], b); err != nil || (string(b) != "xabc" && string(b) != "yabc") {
		t.Fatalf("admitted stream reads %q, %v: the first byte was lost", b, err)
	}
	mu.Unlock()

	// A third from the same source is closed unread; another source still gets in.
	over := dialFrom(t, "127.0.0.1", addr)
	if !closedByServer(over) {
		t.Fatalf("a third stream from one source was not closed")
	}
	if v := refusedCount(t, tr, refusedSource); v != 1 {
		t.Fatalf("refused source %v", v)
	}
	other := dialFrom(t, "127.0.0.2", addr)
	other.Write([]byte("z"))
	waitFor(t, 5*time.Second, admitted(3))

	// Three open in all: a fourth source is refused too.
	if !closedByServer(dialFrom(t, "127.0.0.3", addr)) {
		t.Fatalf("a stream over the total was not closed")
	}
	if v := refusedCount(t, tr, refusedTotal); v != 1 {
		t.Fatalf("refused total %v", v)
	}

	// Closing an admitted stream frees its slot; a silent stream is cut after FirstByte.
	mu.Lock()
	got[0].Close()
	mu.Unlock()
	silent := dialFrom(t, "127.0.0.3", addr)
	start := time.Now()
	if !closedByServer(silent) {
		t.Fatalf("a silent stream was not closed")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("a silent stream held %v", d)
	}
	waitFor(t, 5*time.Second, func() string {
		if v := refusedCount(t, tr, refusedSilent); v != 1 {
			return fmt.Sprintf("refused silent %v", v)
		}
		return ""
	})
}

// Two meshes whose transports are limited still join and push/pull (memberlist's TCP
// streams pass through the wrapper).
func TestLimitedMeshesJoin(t *testing.T) {
	wrap := func(cfg *Config) {
		cfg.WrapTransport = StreamLimiter(StreamLimits{Registry: cfg.Registerer})
	}
	ca, _ := testConfig(t, "a")
	wrap(&ca)
	a := startMesh(t, ca)
	cb, _ := testConfig(t, "b")
	wrap(&cb)
	cb.Seeds = []string{addr(a)}
	b := startMesh(t, cb)
	waitFor(t, 10*time.Second, func() string {
		if _, ok := a.Peer("b"); !ok {
			return "a does not see b"
		}
		if _, ok := b.Peer("a"); !ok {
			return "b does not see a"
		}
		return ""
	})
}
