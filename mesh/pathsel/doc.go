// Package pathsel chooses, for every destination peer, the path its traffic
// takes: the direct link or one relay. It is pure (no I/O, no clock of its
// own, no import of mesh) and incremental: measurements come in one directed
// link at a time (SetLink, RemoveLink, RemovePeer), each marks only the
// destinations whose best path it can change, and Select recomputes only
// those (plus the ones whose hold timer expired).
//
// Cost. A link costs RTT + LossPenalty × loss. The default penalty, 200 ms
// per unit of loss (2 ms per percentage point), is about what a loss costs
// a TCP flow: a retransmission timeout is at least 200 ms on Linux, so a
// link losing a fraction p of packets delays them on average by about
// p × 200 ms. A path costs the sum of its links' costs. Jitter is not in
// the cost; it is an SLA constraint only.
//
// Symmetry. A pair's link is taken as the worse of its two directions where
// both ends published it (up only when both say up, the larger RTT, jitter
// and loss, encrypted only when both say so), else as the one direction
// published. Both ends of a pair thus see the same costs and choose mirror
// paths: WireGuard accepts a peer's packets only from the peer its blocks
// are routed to, so a pair relayed one way and direct the other would drop
// its replies. A destination that must be encrypted (Dest.Encrypted) uses
// only encrypted links, every hop of a relay included.
//
// End-to-end figures: RTT and jitter are the sums over the links (each
// link's RTT is a round trip over that hop, so the sum is the path's round
// trip), loss is 1 − Π(1 − loss_i).
//
// Search. Paths are direct or through one relay (the >2-hop option of the
// former mesh.PathSelector is gone: with bounded probing a longer path
// would run over estimated links). The best relay is min over r of
// cost(self,r)+cost(r,dst) for r in the neighbours of dst that are also
// neighbours of self: O(min(deg self, deg dst)) per destination, bounded
// by the per-peer link bound, no sorting and no allocation per candidate.
// Among the paths that meet the SLA the cheapest wins; when none does, the
// cheapest of all is used and SLAOK is false. The direct link wins ties: it
// is chosen when it costs at most TieEpsilon more than the cheapest (and
// meets the SLA when the cheapest does); among relays of equal cost the
// smaller name wins, so the choice is deterministic.
//
// Estimates. Relays run only over measured links. A destination without a
// measured direct link (with bounded probing, most of them) gets the direct
// path with the RTT the Estimator gives (Choice.Estimated; never counted as
// broken); without an estimate it is reported Unmeasured, still with the
// direct path (the datapath's default), never silently dropped.
//
// Hysteresis, per destination. The current path is kept unless
//   - it broke (a link is down or gone): switch at once;
//   - it violates the SLA while another path meets it: switch at once;
//   - another path has been better for Hold without interruption: switch to
//     the best path of that moment. "Better" means cheaper by the switch
//     margin — the largest of SwitchMin, SwitchRatio of the current cost and
//     JitterMargin × (the jitter of the current path + the candidate's) — or
//     being the direct link within TieEpsilon of a current relayed path
//     (going back to the direct link spares the relay).
//
// So a direct link that meets the SLA is never left for a relay that is
// merely faster: only for one whose gain stands out of the noise both paths
// measure, held for Hold. RTT noise within the measured jitter moves no
// traffic (TestNoiseWithinJitterDoesNotSwitch). Estimates never move traffic
// off a measured path: a relayed destination whose direct link is no longer
// measured keeps its relay while the relay's links work. Every move between
// measured paths is tagged in Choice.Switch (broken, sla, better) so that
// flapping can be counted.
//
// A single evaluation without a better candidate restarts the hold, so
// metrics that alternate do not move traffic. Every input that can change
// an evaluation marks the destination dirty, so evaluating only dirty
// destinations (and those whose hold expires) gives the same choices as
// evaluating all of them every time; the property test checks that.
package pathsel
