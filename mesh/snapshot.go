package mesh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// The member snapshot: what a restarted peer needs to find the mesh again when it has no
// seeds (the first host of a cluster is started without --peers), as Serf's snapshot does.
// Serf appends every membership event to a log and compacts it; a peer only needs "whom
// did I see alive lately, at which address", so weft rewrites one small JSON file instead:
// at most snapshotMaxMembers entries, rewritten atomically (temp file + rename) at most
// every snapshotInterval and only when the set of alive members changed.
//
// Members that die or leave stay in the file (their last-seen time no longer moves): weft
// stops a peer with SIGTERM for restarts too, and a whole cluster restarted member by member
// must still find each other. They fall out when 256 members were seen more recently, or
// after snapshotMaxAge.

// ErrBadSnapshot: the member snapshot file is malformed, too large or from an unknown
// version. The file is then ignored; the peer falls back to its seeds.
var ErrBadSnapshot = errors.New("mesh: bad member snapshot")

const (
	snapshotVersion = 1
	// snapshotMaxMembers bounds the file and the join attempts it feeds.
	snapshotMaxMembers = 256
	// snapshotMaxBytes is far above 256 entries (~150 bytes each); a larger file is refused
	// unread rather than decoded.
	snapshotMaxBytes = 256 << 10
	// snapshotMaxAge drops members not seen alive for a week: their address is likely
	// someone else's by now.
	snapshotMaxAge = 7 * 24 * time.Hour
	// snapshotFutureSkew is how far in the future a last-seen time may lie (clock steps)
	// before the entry is refused as bogus.
	snapshotFutureSkew = time.Hour
	// snapshotInterval rate-limits writes: the alive set is compared, and the file
	// rewritten if it changed, at most this often. A member seen alive for less than this
	// may be missing from the file; a restart needs only one member that is still there.
	snapshotInterval = 3 * time.Second
)

// snapshotMember is one member a peer has seen alive.
type snapshotMember struct {
	Name     string
	Addr     netip.AddrPort // gossip address
	LastSeen time.Time
}

// snapshotFile is the JSON form of the file.
type snapshotFile struct {
	Version int             `json:"version"`
	Members []snapshotEntry `json:"members"`
}

type snapshotEntry struct {
	Name     string    `json:"name"`
	Addr     string    `json:"addr"`
	LastSeen time.Time `json:"last_seen"`
}

// readSnapshot reads the file at path. A missing file is no error (nil members). A file
// that cannot be used at all returns an error wrapping ErrBadSnapshot; single bad entries
// are skipped and described in skipped.
func readSnapshot(path, self string, now time.Time) (members []snapshotMember, skipped []string, err error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrBadSnapshot, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, snapshotMaxBytes+1))
	if err != nil {
		return nil, nil, fmt.Errorf("%w: read %s: %v", ErrBadSnapshot, path, err)
	}
	return parseSnapshot(b, self, now)
}

// parseSnapshot decodes and checks a snapshot. Every entry is untrusted: a name that is not
// a valid peer name, an address that is not a unicast IP with a port, a last-seen time far
// in the future or too old, this peer's own name, or a duplicate is skipped. Of the rest,
// the snapshotMaxMembers most recently seen are returned, most recent first.
func parseSnapshot(b []byte, self string, now time.Time) (members []snapshotMember, skipped []string, err error) {
	if len(b) > snapshotMaxBytes {
		return nil, nil, fmt.Errorf("%w: larger than %d bytes", ErrBadSnapshot, snapshotMaxBytes)
	}
	var f snapshotFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrBadSnapshot, err)
	}
	if f.Version != snapshotVersion {
		return nil, nil, fmt.Errorf("%w: version %d, want %d", ErrBadSnapshot, f.Version, snapshotVersion)
	}
	byName := make(map[string]snapshotMember, min(len(f.Members), snapshotMaxMembers))
	for i, e := range f.Members {
		m, err := checkSnapshotEntry(e, self, now)
		if err != nil {
			skipped = append(skipped, fmt.Sprintf("entry %d: %v", i, err))
			continue
		}
		if old, ok := byName[m.Name]; ok {
			skipped = append(skipped, fmt.Sprintf("entry %d: %s listed twice", i, m.Name))
			if !m.LastSeen.After(old.LastSeen) {
				continue
			}
		}
		byName[m.Name] = m
	}
	members = boundSnapshot(byName, now)
	if n := len(byName) - len(members); n > 0 {
		skipped = append(skipped, fmt.Sprintf("%d entries beyond the %d most recent", n, snapshotMaxMembers))
	}
	return members, skipped, nil
}

func checkSnapshotEntry(e snapshotEntry, self string, now time.Time) (snapshotMember, error) {
	if err := validName(e.Name); err != nil {
		return snapshotMember{}, fmt.Errorf("name: %v", err)
	}
	if e.Name == self {
		return snapshotMember{}, fmt.Errorf("%s is this peer", e.Name)
	}
	ap, err := netip.ParseAddrPort(e.Addr)
	if err != nil {
		return snapshotMember{}, fmt.Errorf("%s: address %q: %v", e.Name, e.Addr, err)
	}
	if a := ap.Addr(); ap.Port() == 0 || a.IsUnspecified() || a.IsMulticast() || a.Zone() != "" {
		return snapshotMember{}, fmt.Errorf("%s: address %s is not a unicast address with a port", e.Name, ap)
	}
	switch {
	case e.LastSeen.After(now.Add(snapshotFutureSkew)):
		return snapshotMember{}, fmt.Errorf("%s: last seen %s, in the future", e.Name, e.LastSeen.Format(time.RFC3339))
	case now.Sub(e.LastSeen) > snapshotMaxAge:
		return snapshotMember{}, fmt.Errorf("%s: last seen %s, too long ago", e.Name, e.LastSeen.Format(time.RFC3339))
	}
	return snapshotMember{Name: e.Name, Addr: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), LastSeen: e.LastSeen}, nil
}

// boundSnapshot returns the members seen within snapshotMaxAge, most recent first (then by
// name, so the file is stable), at most snapshotMaxMembers. O(M log M) in the members held.
func boundSnapshot(byName map[string]snapshotMember, now time.Time) []snapshotMember {
	out := make([]snapshotMember, 0, len(byName))
	for _, m := range byName {
		if now.Sub(m.LastSeen) <= snapshotMaxAge {
			out = append(out, m)
		}
	}
	slices.SortFunc(out, func(a, b snapshotMember) int {
		if c := b.LastSeen.Compare(a.LastSeen); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
	if len(out) > snapshotMaxMembers {
		out = out[:snapshotMaxMembers]
	}
	return out
}

func encodeSnapshot(members []snapshotMember) ([]byte, error) {
	f := snapshotFile{Version: snapshotVersion, Members: make([]snapshotEntry, len(members))}
	for i, m := range members {
		f.Members[i] = snapshotEntry{Name: m.Name, Addr: m.Addr.String(), LastSeen: m.LastSeen.UTC().Round(time.Millisecond)}
	}
	return json.MarshalIndent(f, "", " ")
}

// writeFileAtomic replaces path with data: a crash leaves the old file or the new one,
// never a torn one (temp file in the same directory, fsync, rename).
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // fails harmlessly after the rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// snapshotTable is the snapshot loop's memory of the members seen alive. Owned by that
// loop's goroutine.
type snapshotTable struct {
	members map[string]snapshotMember
	saved   map[string]netip.AddrPort // the alive set at the last write
}

func newSnapshotTable(initial []snapshotMember) *snapshotTable {
	t := &snapshotTable{members: make(map[string]snapshotMember, len(initial)), saved: map[string]netip.AddrPort{}}
	for _, m := range initial {
		t.members[m.Name] = m
	}
	return t
}

// observe records the alive and suspect members of peers as seen now and reports whether
// the alive set (names and addresses) differs from the one last saved. O(N) in peers.
func (t *snapshotTable) observe(peers []Peer, now time.Time) bool {
	alive := make(map[string]netip.AddrPort, len(t.saved))
	for _, p := range peers {
		if p.Self || !p.Addr.IsValid() || (p.State != StateAlive && p.State != StateSuspect) {
			continue
		}
		alive[p.Name] = p.Addr
	}
	changed := len(alive) != len(t.saved)
	for name, a := range alive {
		if t.saved[name] != a {
			changed = true
		}
	}
	if !changed {
		return false
	}
	for name, a := range alive {
		t.members[name] = snapshotMember{Name: name, Addr: a, LastSeen: now}
	}
	t.saved = alive
	return true
}

// list returns what the file should hold now, and forgets what falls out of it.
func (t *snapshotTable) list(now time.Time) []snapshotMember {
	out := boundSnapshot(t.members, now)
	if len(out) < len(t.members) {
		keep := make(map[string]snapshotMember, len(out))
		for _, m := range out {
			keep[m.Name] = m
		}
		t.members = keep
	}
	return out
}

// loadSnapshot reads the configured snapshot for the join loop. Whatever is wrong with the
// file is logged and counted, never fatal.
func (m *Mesh) loadSnapshot(rm *rejoinMetrics) []snapshotMember {
	path := m.cfg.SnapshotPath
	if path == "" {
		return nil
	}
	members, skipped, err := readSnapshot(path, m.cfg.Name, time.Now())
	if err != nil {
		rm.snapshotErrors.WithLabelValues(snapErrRead).Inc()
		m.log.Error("mesh: member snapshot ignored", "path", path, "err", err)
		return nil
	}
	if len(skipped) > 0 {
		rm.snapshotErrors.WithLabelValues(snapErrEntry).Add(float64(len(skipped)))
		m.log.Warn("mesh: member snapshot: entries skipped", "path", path, "skipped", len(skipped), "first", skipped[0])
	}
	if len(members) > 0 {
		m.log.Info("mesh: member snapshot read", "path", path, "members", len(members))
	}
	return members
}

// snapshotLoop keeps the snapshot file in step with the alive set until ctx ends, then
// writes a last time if needed. Every snapshotInterval it reads the peer table (O(N)) and
// rewrites the file (O(min(N, 256))) only when the alive set changed.
func (m *Mesh) snapshotLoop(ctx context.Context, rm *rejoinMetrics, initial []snapshotMember) {
	t := newSnapshotTable(initial)
	save := func() {
		now := time.Now()
		if !t.observe(m.Peers(), now) {
			return
		}
		data, err := encodeSnapshot(t.list(now))
		if err == nil {
			err = writeFileAtomic(m.cfg.SnapshotPath, data)
		}
		if err != nil {
			// Try again at the next tick, not only at the next change.
			t.saved = nil
			rm.snapshotErrors.WithLabelValues(snapErrWrite).Inc()
			m.log.Warn("mesh: could not write the member snapshot", "path", m.cfg.SnapshotPath, "err", err)
			return
		}
		rm.snapshotWrites.Inc()
	}
	tick := time.NewTicker(snapshotInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			save()
			return
		case <-tick.C:
			save()
		}
	}
}
