// Package mesh is weft's membership layer: a thin, explicit wrapper around
// hashicorp/memberlist (SWIM gossip) that gives every peer
//
//   - an identity and a small, versioned metadata record (underlay address,
//     capabilities, VTEP MAC, WireGuard public key, Raft address, version),
//     see Metadata;
//   - a peer table with the states alive, suspect, dead and left, and a
//     stream of change events (Subscribe);
//   - a join loop that keeps trying its seeds with exponential backoff and
//     jitter, and rejoins them when the peer finds itself alone;
//   - named gossip channels (RegisterChannel, Broadcast) multiplexed over
//     memberlist's single delegate, for later subsystems (link state, DNS);
//   - gossip encryption and authentication from a shared password.
//
// # Lifecycle
//
//	m, err := mesh.New(cfg)          // validates, registers metrics; no I/O
//	m.RegisterChannel("dns", h)      // before Start, so the first push/pull carries it
//	err = m.Start(ctx)               // binds the gossip port, starts the join loop
//	...
//	m.Leave(5 * time.Second)         // optional: tell the others we go on purpose
//	m.Close()                        // safe twice; waits for its goroutines
//
// Cancelling the context passed to Start stops the join and state loops;
// Close is still needed to release the sockets.
//
// # Concurrency contract
//
// Every exported method of *Mesh is safe for concurrent use. The Mesh
// calls user code only in two documented places: the function given to
// UpdateMetadata (under the metadata lock: it must not call the Mesh), and
// ChannelHandler methods, invoked without Mesh locks from memberlist's
// goroutines under the rules written on ChannelHandler. Subscribers get
// events on buffered channels and never block the Mesh (see Subscribe).
//
// Internally: lifeMu serializes Start, Leave, Close and the gossip of
// UpdateMetadata; mu guards the peer table, subscribers and join targets;
// metaMu the local metadata; chMu the channel registry; seen.mu the ids of
// recent messages. memberlist invokes its EventDelegate (and logs) while
// holding its own node lock, and we then take mu, so the order is
// memberlist's node lock → mu: code holding mu, metaMu, chMu or seen.mu
// never calls into memberlist.
//
// How suspect and left are learnt, which memberlist does not report, is
// described in suspicion.go.
package mesh
