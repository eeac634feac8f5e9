// Package dns is weft's service DNS, served by every peer on each network's
// gateway address, port 53, UDP and TCP (miekg/dns).
//
// # Records
//
// Records holds every attached container's name → addresses (A and AAAA) and
// SRV entries, per owning peer, as mergeable gossip state: each peer writes
// only its own entries, every write carries a version from the owner's clock,
// removals are tombstones, and Merge returns only what changed so that the
// gossip layer broadcasts deltas (full state, Encode/State, on join). The
// wire format is a small versioned binary encoding; DecodeDelta rejects
// anything malformed with an error wrapping ErrDecode and Merge never sees
// it. Dead peers: the membership layer calls PeerDown/PeerUp and, on a
// ticker, ExpirePeers(grace) and ExpireTombstones(ttl); a dead peer's
// records leave every answer within grace plus the ticker period.
//
// # Answers
//
// Server runs a CoreDNS-style handler chain, sanitize → weft zone → forward:
//
//   - name.<domain> (default weft.local.): A/AAAA of every container with
//     that name, on every peer and every network, rotated one step per query
//     (round robin), nearest peer first once SetNearest gives RTTs, and the
//     addresses in the asker's own network (the one whose range holds the
//     query's source) first. Names are case-insensitive. Unknown name:
//     NXDOMAIN; known name, other type: NOERROR with no data. Both carry the
//     zone's SOA, whose minimum (the negative TTL) equals the TTL.
//   - name.network.<domain>: the addresses of name inside that network's
//     range only (NOERROR with no data when it has none there); a
//     registered name "name.network" wins; network.<domain> alone is an
//     empty non-terminal (no data). The networks (name and range) come from
//     Config.Networks and Server.SetNetworks; the network of an address is
//     derived from them, never gossiped (networks.go).
//   - _service._proto.name.<domain>: SRV records (priority 0, weight 10,
//     target name.<domain>), with the target's addresses as additional data.
//   - PTR for every weft address, under in-addr.arpa and ip6.arpa; reverse
//     names inside Config.Networks that have no record get NXDOMAIN,
//     others are forwarded.
//   - The TTL of every weft answer is Config.TTL, 30 seconds by default.
//   - Everything else is forwarded to the upstreams (Config.Upstreams, or
//     the nameservers of resolv.conf, re-read when it changes), each tried
//     in turn with a per-try timeout, through a bounded LRU cache that keeps
//     positive answers for their TTL and negative ones for their SOA
//     minimum. SERVFAIL when every upstream fails.
//
// UDP: each listen address has one SO_REUSEPORT socket per CPU, each read
// by one goroutine. That goroutine answers A and AAAA queries for weft names
// itself, from the wire bytes and a per-socket cache of answer records that
// is rebuilt when Records.Generation changes (fastpath.go): no allocation, no
// goroutine, no miekg unpack or pack, answers identical to the handler
// chain's. Everything else (other types, forwarding, EDNS0 options,
// malformed queries, answers needing truncation) is handed to a bounded pool
// of workers running the handler chain (udp.go: dropped and counted in
// weft_dns_dropped_total when the queue is full or one source holds too much
// of it); identical upstream questions in flight share one upstream query.
// TCP is miekg's server behind a per-source connection limit.
//
// Robustness: malformed queries get FORMERR (or NOTIMP, REFUSED, BADVERS) or
// are dropped; a panic in a handler is recovered and answered SERVFAIL; UDP
// answers are truncated with TC to 512 bytes, or to the client's EDNS0
// buffer size capped at Config.UDPSize (1232), and are complete over TCP.
//
// Listeners: Config.Listen at Start; then SetListen converges to the
// gateway addresses the router asks for (a network's bridge appearing on or
// leaving the host), keeping the sockets it already has.
//
// Decisions: zone transfers are refused; empty non-terminals (such as
// _tcp.name) answer NXDOMAIN, except a network's name (see above); an
// upstream equal to one of the server's own listen addresses is skipped (no
// forwarding loop).
package dns
