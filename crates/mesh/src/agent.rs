//! The agent's peer-set state machine: which WireGuard peers this node may have, right now.
//!
//! Inputs: verified [`MeshUpdate`]s ([`MeshCore::apply`]), timer expiries ([`MeshCore::poll`])
//! and the tamper response ([`MeshCore::tamper`]). Output: a [`MeshDiff`] per input, which
//! the shell turns into WireGuard configuration: first every `removed` (by public key, in
//! order), then every `upserted`. A refresh that changes only the deadline is silent, so
//! WireGuard is not reconfigured on every renewal. `now` is the agent's *monotonic* clock: a
//! peer's deadline is `receipt + ttl_ms`, like a lease's.
//!
//! Conflicts: WireGuard routes by allowed IP and keys peers by public key, so the held set never
//! has two peers with overlapping allowed IPs (containment counts) or the same key. An entry is
//! checked against the set *as it will be after the update* (the other entries of the update
//! replace their nodes' held entries), so one update may move addresses between peers or swap
//! them. Every entry that conflicts is rejected together, in rounds until none does (a rejected
//! entry leaves its node's held entry in place, which may in turn conflict): no entry wins
//! because of its position in the update.
//!
//! Architecture Invariants:
//! - Accepted sequence numbers strictly grow; a replayed update changes nothing.
//! - A peer past its deadline is removed by [`MeshCore::poll`] (and before any update is
//!   applied) whether or not the controller is reachable; [`MeshCore::poll_timeout`] says when.
//! - The held set has no overlapping allowed IPs, no duplicate key, and never this node itself.
//! - Tampering is final: every peer is removed and every later update is refused.

use crate::{MeshUpdate, PeerEntry, WgKey};
use nicwarden_lease::{NodeId, Time};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A peer the node holds, with its deadline on the agent's clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// As received (its `ttl_ms` is the one issued with it).
    pub entry: PeerEntry,
    /// `receipt + ttl_ms` of the last update that set or refreshed it.
    pub deadline: Time,
    /// Sequence number of that update.
    pub seq: u64,
}

/// What an input changed; the shell applies `removed` first, then `upserted`.
#[derive(Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshDiff {
    /// New peers, and peers whose key, endpoint, allowed IPs or group changed.
    pub upserted: Vec<PeerEntry>,
    pub removed: Vec<Removed>,
    /// Entries of an update that were refused (the rest of the update still applies).
    pub rejected: Vec<Rejected>,
}

impl MeshDiff {
    /// Nothing to configure and nothing to report.
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty() && self.rejected.is_empty()
    }
}

/// A peer that was removed; WireGuard peers are keyed by `public_key`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub node: NodeId,
    pub public_key: WgKey,
    pub cause: RemoveCause,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoveCause {
    /// Its deadline passed.
    Expired,
    /// The controller withdrew it, for this reason.
    Withdrawn(String),
    /// The same node was published with a new key (the new one is in `upserted`).
    Replaced,
    /// A full snapshot did not contain it.
    NotInSnapshot,
    /// This node detected tampering and dropped the whole mesh.
    Tampered,
}

/// An entry that was refused, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub node: NodeId,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    #[error(
        "apply mesh update {seq}: replayed or reordered, last accepted sequence number is {last}"
    )]
    Replay { seq: u64, last: u64 },
    #[error("apply mesh update: refused, this node's mesh is shut down after tampering: {0}")]
    Tampered(String),
}

/// The agent's peer set. See the module docs.
#[derive(Clone, Debug)]
pub struct MeshCore {
    node: NodeId,
    last_seq: u64,
    peers: BTreeMap<NodeId, Held>,
    tampered: Option<String>,
}

impl MeshCore {
    pub fn new(node: NodeId) -> Self {
        Self::restore(node, 0, Vec::new(), None)
    }

    /// Rebuild after a restart from persisted state (entries keep their deadlines; the caller
    /// translates them to the new clock). Expired ones are dropped at the next poll.
    pub fn restore(node: NodeId, last_seq: u64, held: Vec<Held>, tampered: Option<String>) -> Self {
        let peers = if tampered.is_some() {
            BTreeMap::new()
        } else {
            held.into_iter()
                .filter(|h| h.entry.node != node)
                .map(|h| (h.entry.node.clone(), h))
                .collect()
        };
        MeshCore {
            node,
            last_seq,
            peers,
            tampered,
        }
    }

    /// Apply a verified update. Expired peers are removed first (as by [`MeshCore::poll`]),
    /// then the removals, then the entries. An accepted update raises `last_seq` even if every
    /// entry in it is rejected; the caller persists `last_seq` before acting on the diff.
    pub fn apply(&mut self, update: MeshUpdate, now: Time) -> Result<MeshDiff, MeshError> {
        if let Some(reason) = &self.tampered {
            return Err(MeshError::Tampered(reason.clone()));
        }
        if update.seq <= self.last_seq {
            return Err(MeshError::Replay {
                seq: update.seq,
                last: self.last_seq,
            });
        }
        self.last_seq = update.seq;
        let mut diff = self.poll(now);

        for removal in update.removals {
            let matches = self
                .peers
                .get(&removal.node)
                .is_some_and(|h| h.entry.public_key == removal.public_key);
            if matches {
                self.peers.remove(&removal.node);
                diff.removed.push(Removed {
                    node: removal.node,
                    public_key: removal.public_key,
                    cause: RemoveCause::Withdrawn(removal.reason),
                });
            }
        }

        let mut candidates = Vec::new();
        let mut seen = BTreeSet::new();
        for entry in update.entries {
            let refusal = if entry.node == self.node {
                Some("entry names this node itself".to_string())
            } else if entry.ttl_ms == 0 {
                Some("ttl_ms is 0 (already expired)".to_string())
            } else if entry.allowed_ips.is_empty() {
                Some("no allowed IPs".to_string())
            } else if !seen.insert(entry.node.clone()) {
                Some(format!(
                    "duplicate entry for the node in update {}",
                    update.seq
                ))
            } else {
                None
            };
            match refusal {
                Some(reason) => diff.rejected.push(Rejected {
                    node: entry.node,
                    reason,
                }),
                None => candidates.push(entry),
            }
        }

        let accepted = self.resolve_conflicts(candidates, update.full, &mut diff);

        let mut old = if update.full {
            std::mem::take(&mut self.peers)
        } else {
            BTreeMap::new()
        };
        for entry in accepted {
            let previous = if update.full {
                old.remove(&entry.node)
            } else {
                self.peers.remove(&entry.node)
            };
            match previous {
                Some(p) if p.entry.same_peer(&entry) => {}
                Some(p) if p.entry.public_key != entry.public_key => {
                    diff.removed.push(Removed {
                        node: p.entry.node,
                        public_key: p.entry.public_key,
                        cause: RemoveCause::Replaced,
                    });
                    diff.upserted.push(entry.clone());
                }
                _ => diff.upserted.push(entry.clone()),
            }
            let held = Held {
                deadline: now.plus_millis(entry.ttl_ms),
                seq: update.seq,
                entry,
            };
            self.peers.insert(held.entry.node.clone(), held);
        }
        for (node, h) in old {
            diff.removed.push(Removed {
                node,
                public_key: h.entry.public_key,
                cause: RemoveCause::NotInSnapshot,
            });
        }
        Ok(diff)
    }

    /// Reject (into `diff`) every candidate that conflicts with the set as it would be after
    /// the update, in rounds until none does; returns the rest in their original order.
    fn resolve_conflicts(
        &self,
        candidates: Vec<PeerEntry>,
        full: bool,
        diff: &mut MeshDiff,
    ) -> Vec<PeerEntry> {
        let mut accepted = vec![true; candidates.len()];
        loop {
            // The set after the update if every still-accepted candidate applies.
            let mut after: BTreeMap<&str, &PeerEntry> = BTreeMap::new();
            if !full {
                after.extend(self.peers.iter().map(|(n, h)| (n.as_str(), &h.entry)));
            }
            for (c, _) in candidates.iter().zip(&accepted).filter(|(_, ok)| **ok) {
                after.insert(c.node.as_str(), c);
            }
            let conflicts: Vec<(usize, String)> = candidates
                .iter()
                .enumerate()
                .filter(|(i, _)| accepted[*i])
                .filter_map(|(i, c)| conflict(c, &after).map(|reason| (i, reason)))
                .collect();
            if conflicts.is_empty() {
                break;
            }
            for (i, reason) in conflicts {
                accepted[i] = false;
                diff.rejected.push(Rejected {
                    node: candidates[i].node.clone(),
                    reason,
                });
            }
        }
        candidates
            .into_iter()
            .zip(accepted)
            .filter_map(|(c, ok)| ok.then_some(c))
            .collect()
    }

    /// Remove every peer whose deadline is `<= now`.
    pub fn poll(&mut self, now: Time) -> MeshDiff {
        let mut diff = MeshDiff::default();
        let expired: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for node in expired {
            if let Some(h) = self.peers.remove(&node) {
                diff.removed.push(Removed {
                    node,
                    public_key: h.entry.public_key,
                    cause: RemoveCause::Expired,
                });
            }
        }
        diff
    }

    /// The earliest deadline: call [`MeshCore::poll`] then, even if no update arrives.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.peers.values().map(|h| h.deadline).min()
    }

    /// The held peers, sorted by node.
    pub fn peers(&self) -> impl Iterator<Item = &Held> {
        self.peers.values()
    }

    /// Tamper response: remove every peer and refuse every later update. The first reason
    /// is kept.
    pub fn tamper(&mut self, reason: &str) -> MeshDiff {
        if self.tampered.is_none() {
            self.tampered = Some(reason.to_string());
        }
        let removed = std::mem::take(&mut self.peers)
            .into_iter()
            .map(|(node, h)| Removed {
                node,
                public_key: h.entry.public_key,
                cause: RemoveCause::Tampered,
            })
            .collect();
        MeshDiff {
            removed,
            ..MeshDiff::default()
        }
    }

    pub fn tampered(&self) -> Option<&str> {
        self.tampered.as_deref()
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn node(&self) -> &str {
        &self.node
    }
}

/// Why `entry` cannot join `after` (the set after the update, which may contain `entry`'s own
/// node: that one is skipped).
fn conflict(entry: &PeerEntry, after: &BTreeMap<&str, &PeerEntry>) -> Option<String> {
    for (node, other) in after {
        if *node == entry.node {
            continue;
        }
        if other.public_key == entry.public_key {
            return Some(format!(
                "public key {} is also peer {node}'s",
                entry.public_key
            ));
        }
        for mine in &entry.allowed_ips {
            if let Some(theirs) = other.allowed_ips.iter().find(|t| overlap(mine, t)) {
                return Some(format!(
                    "allowed IP {mine} overlaps {theirs} of peer {node}"
                ));
            }
        }
    }
    None
}

/// Two prefixes overlap iff one contains the other (different families never do).
pub(crate) fn overlap(a: &ipnet::IpNet, b: &ipnet::IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeerRemoval;

    fn key(k: u8) -> WgKey {
        WgKey([k; 32])
    }

    /// An entry of group "g" with endpoint 198.18.0.<k>:51820; `ips` comma-separated.
    fn e(node: &str, k: u8, ips: &str, ttl_ms: u64) -> PeerEntry {
        PeerEntry {
            node: node.into(),
            group: "g".into(),
            public_key: key(k),
            endpoint: format!("198.18.0.{k}:51820").parse().expect("endpoint"),
            allowed_ips: ips
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().expect("net"))
                .collect(),
            ttl_ms,
        }
    }

    fn rm(node: &str, k: u8, reason: &str) -> PeerRemoval {
        PeerRemoval {
            node: node.into(),
            public_key: key(k),
            reason: reason.into(),
        }
    }

    fn inc(seq: u64, entries: Vec<PeerEntry>, removals: Vec<PeerRemoval>) -> MeshUpdate {
        MeshUpdate {
            seq,
            full: false,
            entries,
            removals,
            issued_at: Time(0),
        }
    }

    fn full(seq: u64, entries: Vec<PeerEntry>) -> MeshUpdate {
        MeshUpdate {
            full: true,
            ..inc(seq, entries, Vec::new())
        }
    }

    /// Node "me" at seq 5 holding a (key 1, 10.0.1.0/24, deadline 1000) and
    /// b (key 2, 10.0.2.0/24, deadline 2000).
    fn base() -> MeshCore {
        let held = |entry: PeerEntry, deadline| Held {
            entry,
            deadline: Time(deadline),
            seq: 5,
        };
        MeshCore::restore(
            "me".into(),
            5,
            vec![
                held(e("a", 1, "10.0.1.0/24", 1000), 1000),
                held(e("b", 2, "10.0.2.0/24", 2000), 2000),
            ],
            None,
        )
    }

    fn summary(diff: &MeshDiff) -> String {
        let mut parts = Vec::new();
        for r in &diff.removed {
            let cause = match &r.cause {
                RemoveCause::Expired => "expired".to_string(),
                RemoveCause::Withdrawn(why) => format!("withdrawn({why})"),
                RemoveCause::Replaced => "replaced".into(),
                RemoveCause::NotInSnapshot => "not-in-snapshot".into(),
                RemoveCause::Tampered => "tampered".into(),
            };
            parts.push(format!("-{}/{}:{cause}", r.node, r.public_key.0[0]));
        }
        for u in &diff.upserted {
            parts.push(format!("+{}/{}", u.node, u.public_key.0[0]));
        }
        for r in &diff.rejected {
            parts.push(format!("!{}:{}", r.node, r.reason));
        }
        parts.join(" ")
    }

    fn peers(core: &MeshCore) -> String {
        core.peers()
            .map(|h| {
                format!(
                    "{}/{}@{}",
                    h.entry.node, h.entry.public_key.0[0], h.deadline.0
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Apply `update` to [`base`] at time 100; compare the diff and the resulting set.
    fn check(update: MeshUpdate, expect_diff: &str, expect_peers: &str) {
        let mut core = base();
        let seq = update.seq;
        let diff = core.apply(update.clone(), Time(100)).expect("apply");
        assert_eq!(summary(&diff), expect_diff, "diff of {update:?}");
        assert_eq!(peers(&core), expect_peers, "peers after {update:?}");
        assert_eq!(core.last_seq(), seq);
        for u in &diff.upserted {
            let held = core
                .peers()
                .find(|h| h.entry.node == u.node)
                .expect("upserted is held");
            assert_eq!(&held.entry, u);
            assert_eq!(held.seq, seq);
        }
    }

    #[test]
    fn replay_is_refused_and_changes_nothing() {
        for seq in [0, 1, 4, 5] {
            let mut core = base();
            let before = peers(&core);
            let err = core
                .apply(full(seq, vec![]), Time(100))
                .expect_err("replay");
            assert_eq!(err, MeshError::Replay { seq, last: 5 });
            assert!(err.to_string().contains("apply mesh update"), "{err}");
            assert_eq!(peers(&core), before);
            assert_eq!(core.last_seq(), 5);
        }
        let mut core = base();
        assert!(core.apply(inc(6, vec![], vec![]), Time(100)).is_ok());
        assert!(core.apply(inc(6, vec![], vec![]), Time(100)).is_err());
        assert!(core.apply(inc(100, vec![], vec![]), Time(100)).is_ok());
        assert_eq!(core.last_seq(), 100);
    }

    #[test]
    fn seq_advances_even_if_every_entry_is_rejected() {
        check(
            inc(
                9,
                vec![e("me", 3, "10.0.3.0/24", 10), e("c", 4, "10.0.4.0/24", 0)],
                vec![],
            ),
            "!me:entry names this node itself !c:ttl_ms is 0 (already expired)",
            "a/1@1000 b/2@2000",
        );
    }

    #[test]
    fn removals_need_the_held_key() {
        check(
            inc(6, vec![], vec![rm("a", 1, "tampered")]),
            "-a/1:withdrawn(tampered)",
            "b/2@2000",
        );
        // An old key's removal must not remove the rotated one.
        check(
            inc(6, vec![], vec![rm("a", 9, "removed")]),
            "",
            "a/1@1000 b/2@2000",
        );
        check(
            inc(6, vec![], vec![rm("zz", 1, "removed")]),
            "",
            "a/1@1000 b/2@2000",
        );
        check(
            inc(
                6,
                vec![],
                vec![rm("a", 1, "left group g"), rm("b", 2, "no valid lease")],
            ),
            "-a/1:withdrawn(left group g) -b/2:withdrawn(no valid lease)",
            "",
        );
        // Removals come first: a removal and a re-publication in one update.
        check(
            inc(
                6,
                vec![e("a", 7, "10.0.1.0/24", 50)],
                vec![rm("a", 1, "removed")],
            ),
            "-a/1:withdrawn(removed) +a/7",
            "a/7@150 b/2@2000",
        );
    }

    #[test]
    fn invalid_entries_are_rejected() {
        let cases: Vec<(PeerEntry, &str)> = vec![
            (
                e("me", 3, "10.0.3.0/24", 10),
                "!me:entry names this node itself",
            ),
            (
                e("c", 3, "10.0.3.0/24", 0),
                "!c:ttl_ms is 0 (already expired)",
            ),
            (e("c", 3, "", 10), "!c:no allowed IPs"),
            (
                e("c", 3, "10.0.1.0/24", 10),
                "!c:allowed IP 10.0.1.0/24 overlaps 10.0.1.0/24 of peer a",
            ),
            (
                e("c", 3, "10.0.0.0/16", 10),
                "!c:allowed IP 10.0.0.0/16 overlaps 10.0.1.0/24 of peer a",
            ),
            (
                e("c", 3, "10.9.0.0/16,10.0.2.128/25", 10),
                "!c:allowed IP 10.0.2.128/25 overlaps 10.0.2.0/24 of peer b",
            ),
            (
                e("c", 3, "10.0.2.7/32", 10),
                "!c:allowed IP 10.0.2.7/32 overlaps 10.0.2.0/24 of peer b",
            ),
            (
                e("c", 2, "10.0.3.0/24", 10),
                "!c:public key AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI= is also peer b's",
            ),
        ];
        for (entry, expect) in cases {
            check(inc(6, vec![entry], vec![]), expect, "a/1@1000 b/2@2000");
        }
        // Near misses are accepted (adjacent prefixes, the other family); a host route inside
        // a peer's prefix is not.
        for (ips, ok) in [
            ("10.0.3.0/24", true),
            ("10.0.0.0/24,10.0.4.0/22", true),
            ("fd00::/8", true),
            ("10.0.2.255/32", false),
            ("10.0.0.0/23", false),
        ] {
            let mut core = base();
            let diff = core
                .apply(inc(6, vec![e("c", 3, ips, 10)], vec![]), Time(100))
                .expect("apply");
            assert_eq!(diff.rejected.is_empty(), ok, "{ips}: {diff:?}");
        }
    }

    #[test]
    fn duplicate_node_in_one_update_keeps_the_first() {
        check(
            inc(
                6,
                vec![e("c", 3, "10.0.3.0/24", 10), e("c", 4, "10.0.4.0/24", 10)],
                vec![],
            ),
            "+c/3 !c:duplicate entry for the node in update 6",
            "a/1@1000 b/2@2000 c/3@110",
        );
    }

    #[test]
    fn refresh_is_silent_and_moves_the_deadline_either_way() {
        check(
            inc(6, vec![e("a", 1, "10.0.1.0/24", 5000)], vec![]),
            "",
            "a/1@5100 b/2@2000",
        );
        check(
            inc(6, vec![e("b", 2, "10.0.2.0/24", 10)], vec![]),
            "",
            "a/1@1000 b/2@110",
        );
        check(
            full(
                6,
                vec![e("a", 1, "10.0.1.0/24", 1), e("b", 2, "10.0.2.0/24", 1)],
            ),
            "",
            "a/1@101 b/2@101",
        );
    }

    #[test]
    fn changes_are_upserted_and_a_new_key_replaces_the_old() {
        let a = e("a", 1, "10.0.1.0/24", 50);
        let cases: Vec<(PeerEntry, &str)> = vec![
            (e("a", 1, "10.0.1.0/25", 50), "+a/1"),
            (
                PeerEntry {
                    group: "h".into(),
                    ..a.clone()
                },
                "+a/1",
            ),
            (
                PeerEntry {
                    endpoint: "198.18.0.77:1".parse().expect("ep"),
                    ..a.clone()
                },
                "+a/1",
            ),
            (
                PeerEntry {
                    public_key: key(8),
                    ..a.clone()
                },
                "-a/1:replaced +a/8",
            ),
        ];
        for (entry, expect) in cases {
            let k = entry.public_key.0[0];
            check(
                inc(6, vec![entry], vec![]),
                expect,
                &format!("a/{k}@150 b/2@2000"),
            );
        }
        check(
            inc(6, vec![e("c", 3, "10.0.3.0/24", 10)], vec![]),
            "+c/3",
            "a/1@1000 b/2@2000 c/3@110",
        );
    }

    #[test]
    fn conflicts_are_judged_against_the_set_after_the_update() {
        // Swapping addresses between two peers in one update is fine.
        check(
            inc(
                6,
                vec![e("a", 1, "10.0.2.0/24", 50), e("b", 2, "10.0.1.0/24", 50)],
                vec![],
            ),
            "+a/1 +b/2",
            "a/1@150 b/2@150",
        );
        // Moving b's address to a new peer c while b moves away.
        check(
            inc(
                6,
                vec![e("c", 3, "10.0.2.0/24", 50), e("b", 2, "10.0.9.0/24", 50)],
                vec![],
            ),
            "+c/3 +b/2",
            "a/1@1000 b/2@150 c/3@150",
        );
        // Two new entries claiming one prefix: neither wins by position.
        check(
            inc(
                6,
                vec![e("c", 3, "10.0.7.0/24", 50), e("d", 4, "10.0.7.0/25", 50)],
                vec![],
            ),
            "!c:allowed IP 10.0.7.0/24 overlaps 10.0.7.0/25 of peer d \
             !d:allowed IP 10.0.7.0/25 overlaps 10.0.7.0/24 of peer c",
            "a/1@1000 b/2@2000",
        );
        // Cascade: b's move is refused (overlaps c), so b keeps 10.0.2.0/24, which a's new
        // prefix claims: a is refused in the second round.
        check(
            inc(
                6,
                vec![
                    e("a", 1, "10.0.2.0/24", 50),
                    e("b", 2, "10.0.5.0/24", 50),
                    e("c", 3, "10.0.5.0/24", 50),
                ],
                vec![],
            ),
            "!b:allowed IP 10.0.5.0/24 overlaps 10.0.5.0/24 of peer c \
             !c:allowed IP 10.0.5.0/24 overlaps 10.0.5.0/24 of peer b \
             !a:allowed IP 10.0.2.0/24 overlaps 10.0.2.0/24 of peer b",
            "a/1@1000 b/2@2000",
        );
        // Removed in the same update: its addresses are free.
        check(
            inc(
                6,
                vec![e("c", 3, "10.0.1.0/24", 50)],
                vec![rm("a", 1, "removed")],
            ),
            "-a/1:withdrawn(removed) +c/3",
            "b/2@2000 c/3@150",
        );
    }

    #[test]
    fn full_snapshot_replaces_the_set() {
        check(
            full(6, vec![]),
            "-a/1:not-in-snapshot -b/2:not-in-snapshot",
            "",
        );
        check(
            full(
                6,
                vec![e("b", 2, "10.0.2.0/24", 10), e("c", 3, "10.0.1.0/24", 10)],
            ),
            "-a/1:not-in-snapshot +c/3",
            "b/2@110 c/3@110",
        );
        check(
            full(6, vec![e("a", 9, "10.0.1.0/24", 10)]),
            "-a/1:replaced -b/2:not-in-snapshot +a/9",
            "a/9@110",
        );
        // A rejected entry is not in the set afterwards, even if its node was held.
        check(
            full(6, vec![e("a", 1, "", 10), e("b", 2, "10.0.2.0/24", 10)]),
            "-a/1:not-in-snapshot !a:no allowed IPs",
            "b/2@110",
        );
    }

    #[test]
    fn poll_expires_at_the_deadline() {
        let cases: Vec<(u64, &str, &str, Option<u64>)> = vec![
            (999, "", "a/1@1000 b/2@2000", Some(1000)),
            (1000, "-a/1:expired", "b/2@2000", Some(2000)),
            (5000, "-a/1:expired -b/2:expired", "", None),
        ];
        for (now, expect_diff, expect_peers, timeout) in cases {
            let mut core = base();
            assert_eq!(core.poll_timeout(), Some(Time(1000)));
            assert_eq!(summary(&core.poll(Time(now))), expect_diff, "at {now}");
            assert_eq!(peers(&core), expect_peers, "at {now}");
            assert_eq!(core.poll_timeout(), timeout.map(Time), "at {now}");
            assert!(core.poll(Time(now)).is_empty(), "second poll at {now}");
        }
    }

    #[test]
    fn apply_expires_before_applying() {
        let mut core = base();
        let diff = core
            .apply(
                inc(6, vec![e("a", 1, "10.0.1.0/24", 10)], vec![]),
                Time(1500),
            )
            .expect("apply");
        // a had lapsed: it is removed, and the refresh brings it back as a new peer.
        assert_eq!(summary(&diff), "-a/1:expired +a/1");
        assert_eq!(peers(&core), "a/1@1510 b/2@2000");
        // An expired peer's addresses are free.
        let mut core = base();
        let diff = core
            .apply(
                inc(6, vec![e("c", 3, "10.0.1.0/24", 10)], vec![]),
                Time(1000),
            )
            .expect("apply");
        assert_eq!(summary(&diff), "-a/1:expired +c/3");
    }

    #[test]
    fn tamper_is_final() {
        let mut core = base();
        let diff = core.tamper("fabric link rewired");
        assert_eq!(summary(&diff), "-a/1:tampered -b/2:tampered");
        assert_eq!(peers(&core), "");
        assert_eq!(core.poll_timeout(), None);
        assert_eq!(core.tampered(), Some("fabric link rewired"));
        let err = core
            .apply(full(99, vec![e("c", 3, "10.0.3.0/24", 10)]), Time(100))
            .expect_err("tampered");
        assert_eq!(err, MeshError::Tampered("fabric link rewired".into()));
        assert_eq!(core.last_seq(), 5);
        assert_eq!(peers(&core), "");
        // A second tamper keeps the first reason.
        assert!(core.tamper("again").is_empty());
        assert_eq!(core.tampered(), Some("fabric link rewired"));
    }

    #[test]
    fn restore_keeps_deadlines_and_state() {
        let held = vec![
            Held {
                entry: e("a", 1, "10.0.1.0/24", 10),
                deadline: Time(50),
                seq: 3,
            },
            Held {
                entry: e("me", 2, "10.0.2.0/24", 10),
                deadline: Time(500),
                seq: 3,
            },
            Held {
                entry: e("b", 3, "10.0.3.0/24", 10),
                deadline: Time(700),
                seq: 4,
            },
        ];
        let json = serde_json::to_string(&held).expect("persist");
        let held: Vec<Held> = serde_json::from_str(&json).expect("load");
        let mut core = MeshCore::restore("me".into(), 7, held.clone(), None);
        assert_eq!(core.node(), "me");
        assert_eq!(core.last_seq(), 7);
        assert_eq!(core.tampered(), None);
        assert_eq!(peers(&core), "a/1@50 b/3@700");
        assert_eq!(summary(&core.poll(Time(100))), "-a/1:expired");
        assert!(core.apply(inc(7, vec![], vec![]), Time(100)).is_err());

        let mut core = MeshCore::restore("me".into(), 7, held, Some("probe".into()));
        assert_eq!(peers(&core), "");
        assert_eq!(core.tampered(), Some("probe"));
        assert!(matches!(
            core.apply(inc(8, vec![], vec![]), Time(0)),
            Err(MeshError::Tampered(_))
        ));
    }

    #[test]
    fn new_core_accepts_seq_one() {
        let mut core = MeshCore::new("me".into());
        assert_eq!((core.last_seq(), core.poll_timeout()), (0, None));
        let diff = core
            .apply(full(1, vec![e("a", 1, "10.0.1.0/24", 10)]), Time(0))
            .expect("apply");
        assert_eq!(summary(&diff), "+a/1");
        assert_eq!(core.poll_timeout(), Some(Time(10)));
    }
}
