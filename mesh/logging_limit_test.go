package mesh

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// A flood of undecryptable packets makes memberlist log one error each; the peer's log
// gets one line per second per kind, with the count of the lines left out.
func TestMemberlistLogFloodIsLimited(t *testing.T) {
	var buf bytes.Buffer
	now := time.Unix(1000, 0)
	w := &slogWriter{
		l:     slog.New(slog.NewTextHandler(&buf, nil)),
		limit: newLogLimiter(time.Second, func() time.Time { return now }),
	}
	for i := range 1000 {
		line := "[ERR] memberlist: Decrypt packet failed: unsupported encryption version " + string(rune('0'+i%10)) + " from=198.18.0.13:5688" + string(rune('0'+i%7))
		w.Write([]byte(line))
	}
	if n := strings.Count(buf.String(), "Decrypt packet failed"); n != 1 {
		t.Fatalf("%d lines for 1000 packets in one second, want 1:\n%s", n, buf.String())
	}
	now = now.Add(1100 * time.Millisecond)
	w.Write([]byte("[ERR] memberlist: Decrypt packet failed: unsupported encryption version 9 from=198.18.0.13:1"))
	if !strings.Contains(buf.String(), "suppressed_since_last=999") {
		t.Fatalf("the second line does not count the 999 left out:\n%s", buf.String())
	}
	// Another kind is not held back by the first, and info lines are never limited.
	w.Write([]byte("[WARN] memberlist: Got ping for unexpected node"))
	for range 3 {
		w.Write([]byte("[INFO] memberlist: Suspect node-a has failed"))
	}
	if !strings.Contains(buf.String(), "unexpected node") || strings.Count(buf.String(), "Suspect") != 3 {
		t.Fatalf("other kinds were held back:\n%s", buf.String())
	}
}
