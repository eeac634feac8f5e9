package mesh

import (
	"context"
	"log"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// passwordHint is attached to memberlist log lines that mean the remote
// peer's gossip could not be authenticated.
const passwordHint = "gossip password mismatch: the remote peer uses a different password, or only one side has one"

// newMemberlistLogger returns a *log.Logger for memberlist.Config.Logger
// that turns memberlist's "[LEVEL] memberlist: text" lines into slog
// records at the matching level. The lines are only logged: no state is
// learnt from them (see suspicion.go).
func newMemberlistLogger(l *slog.Logger) *log.Logger {
	return log.New(&slogWriter{l: l, limit: newLogLimiter(time.Second, time.Now)}, "", 0)
}

type slogWriter struct {
	l     *slog.Logger
	limit *logLimiter
}

// Write handles one memberlist log line (log.Logger calls Write once per
// line and serializes calls). memberlist logs one error per undecryptable
// packet, so a garbage flood on the gossip port would be a log flood: lines of
// one kind are written at most once a second, with the count of the ones left out.
func (w *slogWriter) Write(p []byte) (int, error) {
	level, msg := parseMemberlistLine(string(p))
	if !w.l.Enabled(context.Background(), level) {
		return len(p), nil
	}
	attrs := []any{}
	if level >= slog.LevelWarn {
		ok, suppressed := w.limit.allow(logKind(msg))
		if !ok {
			return len(p), nil
		}
		if suppressed > 0 {
			attrs = append(attrs, "suppressed_since_last", suppressed)
		}
	}
	if isPasswordError(msg) {
		attrs = append(attrs, "hint", passwordHint)
	}
	w.l.Log(context.Background(), level, msg, attrs...)
	return len(p), nil
}

// logKind is what makes two memberlist lines "the same": the text before the first
// digit or "from=", so that addresses, versions and counts do not make every line new.
func logKind(msg string) string {
	if i := strings.Index(msg, "from="); i >= 0 {
		msg = msg[:i]
	}
	if i := strings.IndexAny(msg, "0123456789"); i >= 0 {
		msg = msg[:i]
	}
	return msg
}

// logLimiter lets one line per kind through per interval and counts the rest. The
// kinds are few (memberlist's own message texts); the map is cleared if it ever
// holds more than maxLogKinds, so hostile text cannot grow it.
type logLimiter struct {
	mu       sync.Mutex
	interval time.Duration
	now      func() time.Time
	kinds    map[string]*logKindState
}

type logKindState struct {
	last       time.Time
	suppressed int
}

const maxLogKinds = 256

func newLogLimiter(interval time.Duration, now func() time.Time) *logLimiter {
	return &logLimiter{interval: interval, now: now, kinds: map[string]*logKindState{}}
}

// allow reports whether a line of this kind may be written now, and how many lines of
// the kind were left out since the last one written.
func (l *logLimiter) allow(kind string) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	st, ok := l.kinds[kind]
	if !ok {
		if len(l.kinds) >= maxLogKinds {
			clear(l.kinds)
		}
		l.kinds[kind] = &logKindState{last: now}
		return true, 0
	}
	if now.Sub(st.last) < l.interval {
		st.suppressed++
		return false, 0
	}
	n := st.suppressed
	st.last, st.suppressed = now, 0
	return true, n
}

// parseMemberlistLine splits "[WARN] memberlist: text" into a level and
// "memberlist: text". Lines without a known prefix are logged at Info.
func parseMemberlistLine(s string) (slog.Level, string) {
	s = strings.TrimRight(s, "\r\n")
	level := slog.LevelInfo
	if strings.HasPrefix(s, "[") {
		if end := strings.IndexByte(s, ']'); end > 0 {
			switch s[1:end] {
			case "DEBUG", "TRACE":
				level = slog.LevelDebug
			case "INFO":
				level = slog.LevelInfo
			case "WARN", "WARNING":
				level = slog.LevelWarn
			case "ERR", "ERROR":
				level = slog.LevelError
			}
			s = strings.TrimSpace(s[end+1:])
		}
	}
	if !strings.HasPrefix(s, "memberlist:") {
		s = "memberlist: " + s
	}
	return level, s
}

// isPasswordError reports whether a memberlist error text means that
// encryption keys do not match. The texts come from memberlist's net.go and
// security.go.
func isPasswordError(s string) bool {
	s = strings.ToLower(s)
	return strings.Contains(s, "no installed keys could decrypt") ||
		strings.Contains(s, "encryption is not configured") ||
		strings.Contains(s, "remote state is not encrypted") ||
		strings.Contains(s, "decrypt")
}
