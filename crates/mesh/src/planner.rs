//! The controller's side: which node gets which peer entries, and when.
//!
//! [`Planner::plan`] takes the whole membership (built by the controller from the quota tree,
//! the keys and endpoints agents reported, the tamper flags and the leases) and diffs it
//! against what it published before; the [`Outgoing`] updates it returns are what must be
//! sent now. It does no I/O: the controller persists [`Planner::next_seq`] as a high-water
//! mark before sending, signs, and pushes. A (re)connecting agent gets
//! [`Planner::snapshot`].
//!
//! Design:
//! - A member is published in its group while it is eligible (group, key, endpoint and
//!   allowed IPs known, not tampered, a lease with time left). Its entry's TTL is the time
//!   left on its leases, so a published entry never outlives the node's leases: an agent
//!   drops a peer whose leases lapsed even if it never hears from the controller again.
//! - Renewals do not re-publish every time: an entry is re-published when what it configures
//!   changed, when the lease deadline moved earlier, or when the published time left has
//!   fallen below half of the lease's time left. Under renewals every `r` ms of a lease of
//!   TTL `t`, an entry is re-published about every `t/2` ms, not every `r`.
//! - Removals never wait: a member that stops being eligible (or leaves the membership) is
//!   withdrawn, by the key that was published, in the same `plan` call.
//! - Each recipient gets at most one update per `plan` call: the entries and removals of its
//!   group minus its own, or, if it is new to the planner or its group (or tamper state)
//!   changed, a full snapshot of its new group (empty if none) so stale peers go at once.
//!   Recipients with the same content share one [`Outgoing`]; every update has a fresh seq.
//!
//! Not checked here: that members of one group have disjoint allowed IPs and distinct keys.
//! The agents refuse such entries (see [`crate::agent`]); the controller validates the
//! addresses agents report.

use crate::{MeshUpdate, PeerEntry, PeerRemoval, WgKey};
use ipnet::IpNet;
use nicwarden_lease::{NodeId, Time};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// What the controller knows about one node, as input to [`Planner::plan`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub node: NodeId,
    /// From the quota tree; `None` = in no group (gets nothing, is in nobody's set).
    pub group: Option<String>,
    /// `None` until the agent reported one.
    pub public_key: Option<WgKey>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub tampered: bool,
    /// Latest `issued_at + ttl` among the node's active leases (controller wall ms); see
    /// [`lease_deadline`].
    pub lease_deadline: Option<Time>,
}

/// One update to send to every node in `to` (sorted).
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    pub to: Vec<NodeId>,
    pub update: MeshUpdate,
}

/// The latest `issued_at + ttl_ms` of a node's leases, `None` if it has none.
pub fn lease_deadline(leases: impl IntoIterator<Item = (Time, u64)>) -> Option<Time> {
    leases
        .into_iter()
        .map(|(issued_at, ttl_ms)| issued_at.plus_millis(ttl_ms))
        .max()
}

#[derive(Clone, Debug)]
struct Published {
    /// As last sent (its `ttl_ms` is the one it was sent with).
    entry: PeerEntry,
    deadline: Time,
}

/// Why a member is not published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ineligible {
    Removed,
    Tampered,
    NoGroup,
    NoLease,
    NoKey,
    NoEndpoint,
    NoAllowedIps,
}

impl Ineligible {
    /// The reason of the removal that withdraws an entry published in `group`.
    fn reason(self, group: &str) -> String {
        match self {
            Ineligible::Removed => "removed".into(),
            Ineligible::Tampered => "tampered".into(),
            Ineligible::NoGroup => format!("left group {group}"),
            Ineligible::NoLease => "no valid lease".into(),
            Ineligible::NoKey => "no public key".into(),
            Ineligible::NoEndpoint => "no endpoint".into(),
            Ineligible::NoAllowedIps => "no allowed IPs".into(),
        }
    }
}

/// The entry `m` should be published with at `now` (TTL = its lease time left), and its deadline.
fn candidate(m: Option<&Member>, now: Time) -> Result<(PeerEntry, Time), Ineligible> {
    let m = m.ok_or(Ineligible::Removed)?;
    if m.tampered {
        return Err(Ineligible::Tampered);
    }
    let group = m.group.clone().ok_or(Ineligible::NoGroup)?;
    let deadline = m
        .lease_deadline
        .filter(|d| *d > now)
        .ok_or(Ineligible::NoLease)?;
    let public_key = m.public_key.ok_or(Ineligible::NoKey)?;
    let endpoint = m.endpoint.ok_or(Ineligible::NoEndpoint)?;
    if m.allowed_ips.is_empty() {
        return Err(Ineligible::NoAllowedIps);
    }
    let entry = PeerEntry {
        node: m.node.clone(),
        group,
        public_key,
        endpoint,
        allowed_ips: m.allowed_ips.clone(),
        ttl_ms: now.millis_until(deadline),
    };
    Ok((entry, deadline))
}

/// The group a member receives entries of (`None`: it receives nothing).
fn receives(m: &Member) -> Option<String> {
    if m.tampered {
        None
    } else {
        m.group.clone()
    }
}

/// The entries and removals to send to one group's recipients.
#[derive(Default)]
struct Batch {
    entries: Vec<PeerEntry>,
    removals: Vec<PeerRemoval>,
}

/// The controller's mesh planner. See the module docs.
#[derive(Clone, Debug)]
pub struct Planner {
    next_seq: u64,
    published: BTreeMap<NodeId, Published>,
    /// The group each known member was last brought up to date for (`None`: nothing).
    recipients: BTreeMap<NodeId, Option<String>>,
}

impl Planner {
    /// `next_seq` is the first sequence number to use (at least 1: agents start at 0 and
    /// accept only greater ones).
    pub fn new(next_seq: u64) -> Self {
        Planner {
            next_seq: next_seq.max(1),
            published: BTreeMap::new(),
            recipients: BTreeMap::new(),
        }
    }

    /// The next sequence number to use; persist it (or a high-water mark above it) before
    /// sending what `plan` or `snapshot` returned.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Diff the members against what was published; returns the updates to send now.
    pub fn plan(&mut self, members: &BTreeMap<NodeId, Member>, now: Time) -> Vec<Outgoing> {
        // 1. Publications and withdrawals, batched per group.
        let mut batches: BTreeMap<String, Batch> = BTreeMap::new();
        let nodes: BTreeSet<NodeId> = self
            .published
            .keys()
            .chain(members.keys())
            .cloned()
            .collect();
        for node in nodes {
            let wanted = candidate(members.get(&node), now);
            let published = self.published.get(&node);
            let withdraw = match (published, &wanted) {
                (Some(p), Err(why)) => Some(why.reason(&p.entry.group)),
                (Some(p), Ok((e, _))) if e.group != p.entry.group => {
                    Some(Ineligible::NoGroup.reason(&p.entry.group))
                }
                _ => None,
            };
            if let (Some(reason), Some(p)) = (withdraw, published) {
                batches
                    .entry(p.entry.group.clone())
                    .or_default()
                    .removals
                    .push(PeerRemoval {
                        node: node.clone(),
                        public_key: p.entry.public_key,
                        reason,
                    });
                self.published.remove(&node);
            }
            if let Ok((entry, deadline)) = wanted {
                let publish = match self.published.get(&node) {
                    None => true,
                    Some(p) => {
                        !p.entry.same_peer(&entry)
                            || deadline < p.deadline
                            || now.millis_until(p.deadline).saturating_mul(2)
                                < now.millis_until(deadline)
                    }
                };
                if publish {
                    batches
                        .entry(entry.group.clone())
                        .or_default()
                        .entries
                        .push(entry.clone());
                    self.published.insert(node, Published { entry, deadline });
                }
            }
        }

        // 2. Who receives what: new members and members whose group changed get a snapshot.
        self.recipients.retain(|node, _| members.contains_key(node));
        let mut snapshots: BTreeMap<NodeId, Option<String>> = BTreeMap::new();
        for (node, m) in members {
            let group = receives(m);
            if self.recipients.get(node) != Some(&group) {
                self.recipients.insert(node.clone(), group.clone());
                snapshots.insert(node.clone(), group);
            }
        }

        // 3. Incremental updates: per group, one per distinct content (a recipient never gets
        //    its own entry or removal).
        let mut out = Vec::new();
        for (group, batch) in &batches {
            let owners: BTreeSet<&str> = batch
                .entries
                .iter()
                .map(|e| e.node.as_str())
                .chain(batch.removals.iter().map(|r| r.node.as_str()))
                .collect();
            let mut by_excluded: BTreeMap<Option<NodeId>, Vec<NodeId>> = BTreeMap::new();
            for (node, g) in &self.recipients {
                if g.as_deref() == Some(group.as_str()) && !snapshots.contains_key(node) {
                    let excluded = owners.contains(node.as_str()).then(|| node.clone());
                    by_excluded.entry(excluded).or_default().push(node.clone());
                }
            }
            for (excluded, to) in by_excluded {
                let entries: Vec<PeerEntry> = batch
                    .entries
                    .iter()
                    .filter(|e| Some(&e.node) != excluded.as_ref())
                    .cloned()
                    .collect();
                let removals: Vec<PeerRemoval> = batch
                    .removals
                    .iter()
                    .filter(|r| Some(&r.node) != excluded.as_ref())
                    .cloned()
                    .collect();
                if !entries.is_empty() || !removals.is_empty() {
                    out.push(self.outgoing(to, false, entries, removals, now));
                }
            }
        }

        // 4. Snapshots, after the publications above, one per distinct content.
        let mut by_content: BTreeMap<(Option<String>, Option<NodeId>), Vec<NodeId>> =
            BTreeMap::new();
        for (node, group) in snapshots {
            let own_published = group.is_some()
                && self
                    .published
                    .get(&node)
                    .is_some_and(|p| Some(&p.entry.group) == group.as_ref());
            let excluded = own_published.then(|| node.clone());
            by_content.entry((group, excluded)).or_default().push(node);
        }
        for ((group, excluded), to) in by_content {
            let entries = self.snapshot_entries(group.as_deref(), excluded.as_deref(), now);
            out.push(self.outgoing(to, true, entries, Vec::new(), now));
        }
        out
    }

    /// A full snapshot for one (re)connecting node: every published entry of its group except
    /// its own, with TTL = published deadline - now. An empty snapshot if the node is in no
    /// group or tampered (so its set is cleared); `None` if it is not a member. Later `plan`
    /// calls send the node increments from this snapshot on.
    pub fn snapshot(
        &mut self,
        node: &str,
        members: &BTreeMap<NodeId, Member>,
        now: Time,
    ) -> Option<MeshUpdate> {
        let group = receives(members.get(node)?);
        let entries = self.snapshot_entries(group.as_deref(), Some(node), now);
        self.recipients.insert(node.to_string(), group);
        let seq = self.take_seq();
        Some(MeshUpdate {
            seq,
            full: true,
            entries,
            removals: Vec::new(),
            issued_at: now,
        })
    }

    /// What was last published for `node`, and its deadline (controller time).
    pub fn published(&self, node: &str) -> Option<(&PeerEntry, Time)> {
        self.published.get(node).map(|p| (&p.entry, p.deadline))
    }

    /// The published entries of `group` but `excluded`'s that still have time left at `now`.
    fn snapshot_entries(
        &self,
        group: Option<&str>,
        excluded: Option<&str>,
        now: Time,
    ) -> Vec<PeerEntry> {
        let Some(group) = group else {
            return Vec::new();
        };
        self.published
            .values()
            .filter(|p| p.entry.group == group && Some(p.entry.node.as_str()) != excluded)
            .filter(|p| p.deadline > now)
            .map(|p| PeerEntry {
                ttl_ms: now.millis_until(p.deadline),
                ..p.entry.clone()
            })
            .collect()
    }

    fn outgoing(
        &mut self,
        to: Vec<NodeId>,
        full: bool,
        entries: Vec<PeerEntry>,
        removals: Vec<PeerRemoval>,
        now: Time,
    ) -> Outgoing {
        let seq = self.take_seq();
        Outgoing {
            to,
            update: MeshUpdate {
                seq,
                full,
                entries,
                removals,
                issued_at: now,
            },
        }
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An eligible member of `group` with key `k`, endpoint 198.18.0.k:51820, 10.0.k.0/24.
    fn mem(node: &str, group: &str, k: u8, lease_deadline: u64) -> Member {
        Member {
            node: node.into(),
            group: Some(group.into()),
            public_key: Some(WgKey([k; 32])),
            endpoint: Some(format!("198.18.0.{k}:51820").parse().expect("endpoint")),
            allowed_ips: vec![format!("10.0.{k}.0/24").parse().expect("net")],
            tampered: false,
            lease_deadline: Some(Time(lease_deadline)),
        }
    }

    /// `to full|inc: +node/key:ttl -node/key(reason)`, one line per update.
    fn summary(out: &[Outgoing]) -> Vec<String> {
        out.iter()
            .map(|o| {
                let mut items: Vec<String> = o
                    .update
                    .removals
                    .iter()
                    .map(|r| format!("-{}/{}({})", r.node, r.public_key.0[0], r.reason))
                    .collect();
                items.extend(
                    o.update
                        .entries
                        .iter()
                        .map(|e| format!("+{}/{}:{}", e.node, e.public_key.0[0], e.ttl_ms)),
                );
                let kind = if o.update.full { "full" } else { "inc" };
                format!("{} {kind}: {}", o.to.join(","), items.join(" "))
                    .trim_end()
                    .to_string()
            })
            .collect()
    }

    struct Fx {
        planner: Planner,
        members: BTreeMap<NodeId, Member>,
    }

    impl Fx {
        /// The members, after a first plan at time 0 (whose output is discarded).
        fn new(members: Vec<Member>) -> Fx {
            let mut fx = Fx {
                planner: Planner::new(1),
                members: BTreeMap::new(),
            };
            for m in members {
                fx.set(m);
            }
            fx.planner.plan(&fx.members, Time(0));
            fx
        }
        fn set(&mut self, m: Member) {
            self.members.insert(m.node.clone(), m);
        }
        fn plan(&mut self, now: u64) -> Vec<String> {
            let first = self.planner.next_seq();
            let out = self.planner.plan(&self.members, Time(now));
            // Fresh, consecutive seqs; at most one update per recipient.
            let seqs: Vec<u64> = out.iter().map(|o| o.update.seq).collect();
            assert_eq!(seqs, (first..first + out.len() as u64).collect::<Vec<_>>());
            let mut seen = BTreeSet::new();
            for o in &out {
                assert_eq!(o.update.issued_at, Time(now));
                for to in &o.to {
                    assert!(seen.insert(to.clone()), "{to} gets two updates: {out:?}");
                }
            }
            summary(&out)
        }
    }

    /// Group g: a, b, c (leases to 10000); group h: d; e in no group.
    fn fleet() -> Fx {
        Fx::new(vec![
            mem("a", "g", 1, 10_000),
            mem("b", "g", 2, 10_000),
            mem("c", "g", 3, 10_000),
            mem("d", "h", 4, 10_000),
            Member {
                group: None,
                ..mem("e", "g", 5, 10_000)
            },
        ])
    }

    #[test]
    fn first_plan_sends_every_member_a_snapshot() {
        let mut planner = Planner::new(1);
        let members: BTreeMap<NodeId, Member> = fleet().members;
        let out = planner.plan(&members, Time(0));
        assert_eq!(
            summary(&out),
            [
                "e full:",
                "a full: +b/2:10000 +c/3:10000",
                "b full: +a/1:10000 +c/3:10000",
                "c full: +a/1:10000 +b/2:10000",
                "d full:",
            ]
        );
        assert!(out.iter().all(|o| o.update.removals.is_empty()));
        assert_eq!(planner.next_seq(), 6);
        assert!(
            planner.plan(&members, Time(1)).is_empty(),
            "nothing changed"
        );
        assert_eq!(planner.next_seq(), 6);
    }

    #[test]
    fn published_only_while_eligible() {
        let mut fx = fleet();
        let a = mem("a", "g", 1, 10_000);
        let cases: Vec<(Option<Member>, &[&str])> = vec![
            (
                Some(Member {
                    tampered: true,
                    ..a.clone()
                }),
                &["b,c inc: -a/1(tampered)", "a full:"],
            ),
            (
                Some(Member {
                    group: None,
                    ..a.clone()
                }),
                &["b,c inc: -a/1(left group g)", "a full:"],
            ),
            (
                Some(Member {
                    lease_deadline: None,
                    ..a.clone()
                }),
                &["b,c inc: -a/1(no valid lease)"],
            ),
            (
                Some(Member {
                    lease_deadline: Some(Time(100)),
                    ..a.clone()
                }),
                &["b,c inc: -a/1(no valid lease)"],
            ),
            (
                Some(Member {
                    public_key: None,
                    ..a.clone()
                }),
                &["b,c inc: -a/1(no public key)"],
            ),
            (
                Some(Member {
                    endpoint: None,
                    ..a.clone()
                }),
                &["b,c inc: -a/1(no endpoint)"],
            ),
            (
                Some(Member {
                    allowed_ips: vec![],
                    ..a.clone()
                }),
                &["b,c inc: -a/1(no allowed IPs)"],
            ),
            (None, &["b,c inc: -a/1(removed)"]),
        ];
        for (changed, expect) in cases {
            let mut fx2 = Fx::new(fx.members.values().cloned().collect());
            match &changed {
                Some(m) => fx2.set(m.clone()),
                None => {
                    fx2.members.remove("a");
                }
            }
            assert_eq!(fx2.plan(100), expect, "{changed:?}");
            assert_eq!(fx2.planner.published("a"), None, "{changed:?}");
            // Back to eligible: published again, to the same recipients.
            fx2.set(a.clone());
            let expect_back: Vec<String> = match &changed {
                // A re-added member is new to the planner: it gets a snapshot too.
                None => {
                    vec![
                        "b,c inc: +a/1:9800".into(),
                        "a full: +b/2:9800 +c/3:9800".into(),
                    ]
                }
                Some(m) if m.tampered || m.group.is_none() => {
                    vec![
                        "b,c inc: +a/1:9800".into(),
                        "a full: +b/2:9800 +c/3:9800".into(),
                    ]
                }
                _ => vec!["b,c inc: +a/1:9800".into()],
            };
            assert_eq!(fx2.plan(200), expect_back, "back from {changed:?}");
        }
        // Ineligible members still receive their group's entries.
        fx.set(Member {
            public_key: None,
            lease_deadline: None,
            ..mem("f", "g", 6, 0)
        });
        assert_eq!(fx.plan(100), ["f full: +a/1:9900 +b/2:9900 +c/3:9900"]);
        fx.set(mem("f", "g", 6, 5000));
        assert_eq!(fx.plan(200), ["a,b,c inc: +f/6:4800"]);
    }

    #[test]
    fn republish_rules() {
        // Published at 0 with deadline 10000.
        let a = mem("a", "g", 1, 10_000);
        let cases: Vec<(u64, Member, &[&str])> = vec![
            // Renewal that keeps the published entry within half of the lease's time left.
            (1000, mem("a", "g", 1, 11_000), &[]),
            (5000, mem("a", "g", 1, 15_000), &[]),
            // Published time left (3999) below half the lease's (10000): re-publish.
            (6001, mem("a", "g", 1, 16_001), &["b,c inc: +a/1:10000"]),
            // Deadline moved earlier: re-publish at once with the shorter TTL.
            (1000, mem("a", "g", 1, 9000), &["b,c inc: +a/1:8000"]),
            // What configures the peer changed.
            (1000, mem("a", "g", 9, 10_000), &["b,c inc: +a/9:9000"]),
            (
                1000,
                Member {
                    endpoint: Some("198.18.9.9:1".parse().expect("ep")),
                    ..a.clone()
                },
                &["b,c inc: +a/1:9000"],
            ),
            (
                1000,
                Member {
                    allowed_ips: vec!["10.7.0.0/16".parse().expect("net")],
                    ..a.clone()
                },
                &["b,c inc: +a/1:9000"],
            ),
        ];
        for (now, changed, expect) in cases {
            let mut fx = fleet();
            fx.set(changed.clone());
            assert_eq!(fx.plan(now), expect, "{changed:?} at {now}");
            let deadline = fx.planner.published("a").map(|(_, d)| d);
            let republished = !expect.is_empty();
            let expect_deadline = if republished {
                changed.lease_deadline
            } else {
                Some(Time(10_000))
            };
            assert_eq!(deadline, expect_deadline, "{changed:?} at {now}");
        }
    }

    #[test]
    fn entry_past_its_published_deadline_is_republished_while_the_lease_runs() {
        let mut fx = Fx::new(vec![
            mem("a", "g", 1, 10_000),
            mem("b", "g", 2, 100_000),
            mem("c", "g", 3, 100_000),
        ]);
        fx.set(mem("a", "g", 1, 10_500));
        assert_eq!(fx.plan(10_000), ["b,c inc: +a/1:500"]);
        assert_eq!(
            fx.planner.published("a").map(|(_, d)| d),
            Some(Time(10_500))
        );
    }

    #[test]
    fn frequent_renewals_republish_about_every_half_ttl() {
        let mut fx = fleet();
        let mut republished_at = Vec::new();
        for now in (1000..=30_000).step_by(1000) {
            fx.set(mem("a", "g", 1, now + 10_000));
            // (b and c lapse at 10000; only a's entries count here.)
            if fx.plan(now).iter().any(|line| line.contains("+a/1")) {
                republished_at.push(now);
            }
        }
        assert_eq!(republished_at, [6000, 12_000, 18_000, 24_000, 30_000]);
    }

    #[test]
    fn group_change_withdraws_from_old_and_publishes_to_new() {
        let mut fx = fleet();
        fx.set(mem("a", "h", 1, 10_000));
        assert_eq!(
            fx.plan(100),
            [
                "b,c inc: -a/1(left group g)",
                "d inc: +a/1:9900",
                "a full: +d/4:9900"
            ]
        );
        assert_eq!(
            fx.planner.published("a").map(|(e, _)| e.group.as_str()),
            Some("h")
        );
        // A recipient that is ineligible to be published but changes group also gets a snapshot.
        fx.set(Member {
            lease_deadline: None,
            ..mem("e", "h", 5, 0)
        });
        assert_eq!(fx.plan(200), ["e full: +a/1:9800 +d/4:9800"]);
    }

    #[test]
    fn one_update_per_recipient_per_plan() {
        let mut fx = fleet();
        fx.set(mem("a", "g", 7, 10_000)); // key rotated
        fx.set(Member {
            tampered: true,
            ..mem("b", "g", 2, 10_000)
        });
        fx.set(mem("f", "g", 6, 10_000)); // joins
                                          // `Fx::plan` also checks that no recipient appears twice and seqs are consecutive.
        assert_eq!(
            fx.plan(100),
            [
                "c inc: -b/2(tampered) +a/7:9900 +f/6:9900",
                "a inc: -b/2(tampered) +f/6:9900",
                "b full:",
                "f full: +a/7:9900 +c/3:9900",
            ]
        );
        assert!(fx.plan(200).is_empty());
    }

    #[test]
    fn snapshot_for_a_reconnecting_node() {
        let mut fx = fleet();
        let seq = fx.planner.next_seq();
        let snap = |fx: &mut Fx, node: &str, now: u64| {
            fx.planner.snapshot(node, &fx.members, Time(now)).map(|u| {
                assert!(u.full && u.removals.is_empty());
                summary(&[Outgoing {
                    to: vec![node.into()],
                    update: u,
                }])
            })
        };
        assert_eq!(
            snap(&mut fx, "a", 500),
            Some(vec!["a full: +b/2:9500 +c/3:9500".into()])
        );
        assert_eq!(snap(&mut fx, "d", 500), Some(vec!["d full:".into()]));
        assert_eq!(snap(&mut fx, "e", 500), Some(vec!["e full:".into()]));
        assert_eq!(snap(&mut fx, "zz", 500), None);
        assert_eq!(fx.planner.next_seq(), seq + 3, "a fresh seq per snapshot");
        // Tampered: an empty snapshot, whatever its group.
        fx.set(Member {
            tampered: true,
            ..mem("c", "g", 3, 10_000)
        });
        assert_eq!(snap(&mut fx, "c", 600), Some(vec!["c full:".into()]));
        // Entries past their published deadline are left out.
        fx.set(mem("b", "g", 2, 800));
        assert_eq!(
            fx.plan(700),
            ["a inc: -c/3(tampered) +b/2:100", "b inc: -c/3(tampered)"]
        );
        assert_eq!(snap(&mut fx, "a", 800), Some(vec!["a full:".into()]));
    }

    #[test]
    fn snapshot_brings_a_recipient_up_to_date_for_later_plans() {
        let mut fx = fleet();
        // e joins g and reconnects before the next plan: the plan then sends it increments
        // only, no second snapshot.
        fx.set(mem("e", "g", 5, 10_000));
        let snap = fx
            .planner
            .snapshot("e", &fx.members, Time(100))
            .expect("member");
        assert_eq!(snap.entries.len(), 3);
        assert_eq!(fx.plan(100), ["a,b,c inc: +e/5:9900"]);
    }

    #[test]
    fn seq_starts_at_one_at_least_and_only_grows() {
        for (start, first) in [(0, 1), (1, 1), (42, 42)] {
            let mut p = Planner::new(start);
            assert_eq!(p.next_seq(), first);
            let members: BTreeMap<NodeId, Member> = [("a".to_string(), mem("a", "g", 1, 10))]
                .into_iter()
                .collect();
            let out = p.plan(&members, Time(0));
            assert_eq!(
                out.iter().map(|o| o.update.seq).collect::<Vec<_>>(),
                [first]
            );
            let snap = p.snapshot("a", &members, Time(0)).expect("member");
            assert_eq!(snap.seq, first + 1);
            assert_eq!(p.next_seq(), first + 2);
        }
    }

    #[test]
    fn lease_deadline_is_the_latest() {
        type Leases = Vec<(u64, u64)>;
        let cases: Vec<(Leases, Option<u64>)> = vec![
            (vec![], None),
            (vec![(100, 50)], Some(150)),
            (vec![(100, 50), (120, 10), (90, 70)], Some(160)),
            (vec![(0, 0)], Some(0)),
            (vec![(u64::MAX - 1, 10)], Some(u64::MAX)),
        ];
        for (leases, expect) in cases {
            let got = lease_deadline(leases.iter().map(|&(t, ttl)| (Time(t), ttl)));
            assert_eq!(got, expect.map(Time), "{leases:?}");
        }
    }
}
