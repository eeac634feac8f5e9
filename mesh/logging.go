package mesh

import (
	"context"
	"log"
	"log/slog"
	"strings"
)

// passwordHint is attached to memberlist log lines that mean the remote
// peer's gossip could not be authenticated.
const passwordHint = "gossip password mismatch: the remote peer uses a different password, or only one side has one"

// newMemberlistLogger returns a *log.Logger for memberlist.Config.Logger
// that turns memberlist's "[LEVEL] memberlist: text" lines into slog
// records at the matching level. The lines are only logged: no state is
// learnt from them (see suspicion.go).
func newMemberlistLogger(l *slog.Logger) *log.Logger {
	return log.New(slogWriter{l}, "", 0)
}

type slogWriter struct {
	l *slog.Logger
}

// Write handles one memberlist log line (log.Logger calls Write once per
// line and serializes calls).
func (w slogWriter) Write(p []byte) (int, error) {
	level, msg := parseMemberlistLine(string(p))
	if !w.l.Enabled(context.Background(), level) {
		return len(p), nil
	}
	if isPasswordError(msg) {
		w.l.Log(context.Background(), level, msg, "hint", passwordHint)
	} else {
		w.l.Log(context.Background(), level, msg)
	}
	return len(p), nil
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
