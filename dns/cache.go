package dns

import (
	"container/list"
	"strings"
	"sync"
	"time"

	mdns "github.com/miekg/dns"
)

// cache is a bounded LRU cache of upstream answers, keyed by question and
// the DO/CD bits. Positive answers live for their smallest TTL, negative
// ones (NXDOMAIN, or NOERROR without answers) for the SOA minimum (RFC 2308);
// both are capped; answers without a usable TTL are not kept.
type cache struct {
	size     int
	maxTTL   time.Duration
	maxNeg   time.Duration
	now      func() time.Time
	mu       sync.Mutex // guards the fields below
	lru      *list.List // of *cacheEntry, most recent first
	byKey    map[cacheKey]*list.Element
	disabled bool
}

type cacheKey struct {
	name   string
	qtype  uint16
	qclass uint16
	do, cd bool
}

type cacheEntry struct {
	key     cacheKey
	msg     *mdns.Msg // as received, without OPT
	stored  time.Time
	expires time.Time
}

func newCache(size int, maxTTL, maxNeg time.Duration, now func() time.Time) *cache {
	return &cache{
		size: size, maxTTL: maxTTL, maxNeg: maxNeg, now: now,
		lru: list.New(), byKey: make(map[cacheKey]*list.Element), disabled: size <= 0,
	}
}

func keyOf(q *mdns.Msg) cacheKey {
	k := cacheKey{name: strings.ToLower(q.Question[0].Name), qtype: q.Question[0].Qtype, qclass: q.Question[0].Qclass, cd: q.CheckingDisabled}
	if o := q.IsEdns0(); o != nil {
		k.do = o.Do()
	}
	return k
}

// get returns a copy of a live cached answer for the query, with TTLs
// decreased by its age, or nil.
func (c *cache) get(q *mdns.Msg) *mdns.Msg {
	if c.disabled {
		return nil
	}
	k := keyOf(q)
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.byKey[k]
	if !ok {
		return nil
	}
	e := el.Value.(*cacheEntry)
	if !now.Before(e.expires) {
		c.lru.Remove(el)
		delete(c.byKey, k)
		return nil
	}
	c.lru.MoveToFront(el)
	m := e.msg.Copy()
	age := uint32(now.Sub(e.stored) / time.Second)
	for _, sec := range [][]mdns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range sec {
			h := rr.Header()
			if h.Ttl > age {
				h.Ttl -= age
			} else {
				h.Ttl = 0
			}
		}
	}
	return m
}

// put stores a copy of resp (the answer to q) if it may be cached.
func (c *cache) put(q, resp *mdns.Msg) {
	if c.disabled || resp.Truncated {
		return
	}
	ttl, ok := c.ttlOf(resp)
	if !ok || ttl <= 0 {
		return
	}
	m := resp.Copy()
	// Drop OPT: it is per hop, the writer adds ours.
	extra := m.Extra[:0]
	for _, rr := range m.Extra {
		if rr.Header().Rrtype != mdns.TypeOPT {
			extra = append(extra, rr)
		}
	}
	m.Extra = extra
	now := c.now()
	e := &cacheEntry{key: keyOf(q), msg: m, stored: now, expires: now.Add(ttl)}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.byKey[e.key]; ok {
		el.Value = e
		c.lru.MoveToFront(el)
		return
	}
	c.byKey[e.key] = c.lru.PushFront(e)
	for c.lru.Len() > c.size {
		old := c.lru.Back()
		c.lru.Remove(old)
		delete(c.byKey, old.Value.(*cacheEntry).key)
	}
}

// ttlOf returns how long resp may be cached.
func (c *cache) ttlOf(resp *mdns.Msg) (time.Duration, bool) {
	switch {
	case resp.Rcode == mdns.RcodeSuccess && len(resp.Answer) > 0:
		min := uint32(1<<32 - 1)
		for _, sec := range [][]mdns.RR{resp.Answer, resp.Ns, resp.Extra} {
			for _, rr := range sec {
				if rr.Header().Rrtype == mdns.TypeOPT {
					continue
				}
				min = minU32(min, rr.Header().Ttl)
			}
		}
		return minDur(time.Duration(min)*time.Second, c.maxTTL), true
	case resp.Rcode == mdns.RcodeNameError || resp.Rcode == mdns.RcodeSuccess:
		for _, rr := range resp.Ns {
			if soa, ok := rr.(*mdns.SOA); ok {
				ttl := minU32(soa.Minttl, soa.Hdr.Ttl)
				return minDur(time.Duration(ttl)*time.Second, c.maxNeg), true
			}
		}
	}
	return 0, false
}

func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}

func minU32(a, b uint32) uint32 {
	if a < b {
		return a
	}
	return b
}

func minDur(a, b time.Duration) time.Duration {
	if a < b {
		return a
	}
	return b
}
