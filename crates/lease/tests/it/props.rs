//! Property tests of the lease core's invariants:
//! - a parent is never oversubscribed,
//! - an expired lease is never enforced as Allow,
//! - sequence numbers only grow (across take_dirty/restore),
//! - a revocation is final.

use nicwarden_lease::agent::{AgentCore, Enforce};
use nicwarden_lease::ledger::{
    Effect, LeaseRecord, LeaseStatus, LeaseTerms, Ledger, LedgerConfig, NodeRecord,
};
use nicwarden_lease::quota::{allocate, divide, Algorithm, QuotaTree, Want};
use nicwarden_lease::{Directive, Floor, Lease, LeaseId, Revocation, Scope, Time, Usage};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn algorithm() -> impl Strategy<Value = Algorithm> {
    prop_oneof![Just(Algorithm::Static), Just(Algorithm::FairShare)]
}

/// A random tree: fabric, 1..4 groups `g0..`, 1..6 nodes `n0..`, each in some group.
fn tree() -> impl Strategy<Value = QuotaTree> {
    (
        1u64..1_000,
        algorithm(),
        prop::collection::vec((1u64..1_000, algorithm()), 1..4),
        prop::collection::vec(
            (any::<prop::sample::Index>(), 1u64..1_000, algorithm()),
            1..6,
        ),
    )
        .prop_map(|(fcap, falgo, groups, nodes)| {
            let mut t = QuotaTree::new(fcap, falgo);
            t.groups.clear();
            for (i, (cap, algo)) in groups.iter().enumerate() {
                t.set_group(&format!("g{i}"), *cap, *algo).expect("group");
            }
            for (i, (g, cap, algo)) in nodes.iter().enumerate() {
                let group = format!("g{}", g.index(groups.len()));
                t.set_node(&format!("n{i}"), &group, *cap, *algo)
                    .expect("node");
            }
            t
        })
}

/// Sum of allocations is within every tree node's capacity and every lease within its want.
fn assert_within(tree: &QuotaTree, wants: &[Want], alloc: &BTreeMap<LeaseId, u64>) {
    let mut per_node: BTreeMap<&str, u64> = BTreeMap::new();
    let mut per_group: BTreeMap<&str, u64> = BTreeMap::new();
    let mut total = 0u64;
    for w in wants {
        let a = alloc[&w.lease];
        assert!(
            a <= w.want_bps,
            "lease {} got {a} > want {}",
            w.lease,
            w.want_bps
        );
        *per_node.entry(&w.node).or_default() += a;
        *per_group.entry(&tree.nodes[&w.node].group).or_default() += a;
        total += a;
    }
    for (n, sum) in per_node {
        assert!(
            sum <= tree.nodes[n].capacity_bps,
            "node {n} oversubscribed: {sum}"
        );
    }
    for (g, sum) in per_group {
        assert!(
            sum <= tree.groups[g].capacity_bps,
            "group {g} oversubscribed: {sum}"
        );
    }
    assert!(
        total <= tree.fabric.capacity_bps,
        "fabric oversubscribed: {total}"
    );
}

proptest! {
    #[test]
    fn divide_never_exceeds_capacity_or_wants(
        cap in 0u64..10_000,
        algo in algorithm(),
        wants in prop::collection::vec(0u64..5_000, 0..10),
    ) {
        let shares = divide(cap, algo, &wants);
        prop_assert_eq!(shares.len(), wants.len());
        for (s, w) in shares.iter().zip(&wants) {
            prop_assert!(s <= w);
        }
        // Work-conserving: all capacity is used while some want is unmet.
        let total: u64 = shares.iter().sum();
        prop_assert_eq!(total, cap.min(wants.iter().sum()));
        if algo == Algorithm::FairShare {
            // Max-min fair: an unmet want gets at least as much as anyone else (minus rounding).
            let max = shares.iter().copied().max().unwrap_or(0);
            for (s, w) in shares.iter().zip(&wants) {
                if s < w {
                    prop_assert!(s + 1 >= max, "unmet {s} < max {max} in {shares:?}");
                }
            }
        }
    }

    #[test]
    fn a_parent_is_never_oversubscribed(
        tree in tree(),
        raw in prop::collection::vec((any::<prop::sample::Index>(), 0u64..800), 0..20),
    ) {
        let nodes: Vec<String> = tree.nodes.keys().cloned().collect();
        let wants: Vec<Want> = raw
            .iter()
            .enumerate()
            .map(|(i, (n, w))| Want { lease: LeaseId(i as u64 + 1), node: nodes[n.index(nodes.len())].clone(), want_bps: *w })
            .collect();
        let alloc = allocate(&tree, &wants).expect("allocate");
        prop_assert_eq!(alloc.len(), wants.len());
        assert_within(&tree, &wants, &alloc);
    }
}

// ---- agent: an expired lease is never enforced as Allow; a revocation is final ----

#[derive(Clone, Debug)]
enum AgentOp {
    Advance(u64),
    Lease {
        id: u64,
        scope: usize,
        ttl: u64,
        seq_step: u64,
        volume: Option<u64>,
    },
    Revoke {
        id: u64,
        scope: usize,
        seq_step: u64,
    },
    Timeout,
    Usage {
        scope: usize,
        bytes: u64,
    },
}

fn agent_op() -> impl Strategy<Value = AgentOp> {
    prop_oneof![
        (0u64..6_000).prop_map(AgentOp::Advance),
        (
            1u64..5,
            0usize..3,
            1_000u64..10_000,
            0u64..3,
            prop::option::of(1u64..1000)
        )
            .prop_map(|(id, scope, ttl, seq_step, volume)| AgentOp::Lease {
                id,
                scope,
                ttl,
                seq_step,
                volume
            }),
        (1u64..5, 0usize..3, 0u64..3).prop_map(|(id, scope, seq_step)| AgentOp::Revoke {
            id,
            scope,
            seq_step
        }),
        Just(AgentOp::Timeout),
        (0usize..3, 0u64..1500).prop_map(|(scope, bytes)| AgentOp::Usage { scope, bytes }),
    ]
}

fn scopes() -> [Scope; 3] {
    [
        Scope::Egress,
        Scope::Peer("a".into()),
        Scope::Peer("b".into()),
    ]
}

/// The model's view of a slot.
#[derive(Clone, Debug)]
struct ModelSlot {
    id: u64,
    active: bool,
    deadline: u64,
    volume: Option<u64>,
    bytes: u64,
}

proptest! {
    #[test]
    fn an_expired_lease_is_never_allowed(ops in prop::collection::vec(agent_op(), 1..80)) {
        let scopes = scopes();
        let mut a = AgentCore::new("n", 0, Floor { rate_bps: 5 });
        let mut now = 0u64;
        let mut seq = 0u64;
        let mut model_seq = 0u64;
        let mut revoked = BTreeSet::new();
        let mut slots: BTreeMap<usize, ModelSlot> = BTreeMap::new();
        for op in ops {
            match op {
                AgentOp::Advance(ms) => now += ms,
                AgentOp::Timeout => {
                    for e in a.handle_timeout(Time(now)) {
                        if let nicwarden_lease::agent::AgentEvent::Expired { lease, .. } = e {
                            prop_assert!(slots.values().any(|s| s.id == lease.0 && s.deadline <= now));
                        }
                    }
                }
                AgentOp::Usage { scope, bytes } => {
                    a.record_usage(&scopes[scope], Usage { bytes, packets: 0, dropped_packets: 0 });
                    if let Some(s) = slots.get_mut(&scope) {
                        s.bytes = s.bytes.max(bytes);
                    }
                }
                AgentOp::Lease { id, scope, ttl, seq_step, volume } => {
                    seq += seq_step;
                    let l = Lease {
                        id: LeaseId(id), node: "n".into(), scope: scopes[scope].clone(), seq,
                        rate_bps: 100, burst_bytes: 10, volume_bytes: volume, ttl_ms: ttl,
                        renew_interval_ms: ttl / 2, floor: Floor { rate_bps: 1 }, used_bytes: 0, issued_at: Time(0),
                    };
                    let expect_ok = seq > model_seq && !revoked.contains(&id);
                    let got = a.handle_directive(Time(now), Directive::Lease(l));
                    prop_assert_eq!(got.is_ok(), expect_ok, "{:?}", got);
                    if expect_ok {
                        model_seq = seq;
                        let bytes = match slots.get(&scope) { Some(s) if s.id == id => s.bytes, _ => 0 };
                        slots.insert(scope, ModelSlot { id, active: true, deadline: now + ttl, volume, bytes });
                    }
                }
                AgentOp::Revoke { id, scope, seq_step } => {
                    seq += seq_step;
                    let r = Revocation {
                        lease_id: LeaseId(id), node: "n".into(), scope: scopes[scope].clone(), seq,
                        floor: Floor { rate_bps: 2 }, reason: "test".into(), issued_at: Time(0),
                    };
                    let expect_ok = seq > model_seq;
                    let got = a.handle_directive(Time(now), Directive::Revoke(r));
                    prop_assert_eq!(got.is_ok(), expect_ok, "{:?}", got);
                    if expect_ok {
                        model_seq = seq;
                        revoked.insert(id);
                        let mut hit = false;
                        for s in slots.values_mut().filter(|s| s.id == id) {
                            s.active = false;
                            hit = true;
                        }
                        if !hit && !slots.contains_key(&scope) {
                            slots.insert(scope, ModelSlot { id, active: false, deadline: 0, volume: None, bytes: 0 });
                        }
                    }
                }
            }
            prop_assert_eq!(a.last_seq(), model_seq);
            // Check the decision now and one millisecond later.
            for t in [now, now + 1] {
                for (i, scope) in scopes.iter().enumerate() {
                    let d = a.decision_for(Time(t), scope);
                    let model_allow = slots.get(&i).is_some_and(|s| {
                        s.active && t < s.deadline && !revoked.contains(&s.id) && s.volume.is_none_or(|v| s.bytes < v)
                    });
                    prop_assert_eq!(d.enforce.is_allow(), model_allow, "scope {} at {}: {:?} model {:?}", scope, t, d, slots.get(&i));
                    if let Enforce::Allow { .. } = d.enforce {
                        let s = &slots[&i];
                        prop_assert!(t < s.deadline);
                        prop_assert_eq!(d.deadline_in_ms, Some(s.deadline - t));
                    }
                }
            }
        }
    }
}

// ---- ledger: sequence numbers only grow; revocation is final; allocations stay valid ----

#[derive(Clone, Debug)]
enum LedgerOp {
    Advance(u64),
    Grant {
        node: usize,
        scope: usize,
        want: u64,
        ttl: u64,
    },
    Renew {
        lease: u64,
    },
    Revoke {
        lease: u64,
    },
    Amend {
        lease: u64,
        want: u64,
    },
    Resync {
        node: usize,
    },
    RemoveNode {
        node: usize,
    },
    AddNode {
        node: usize,
    },
    SetQuota {
        group_cap: u64,
        algo: Algorithm,
    },
    Restore,
}

fn ledger_op() -> impl Strategy<Value = LedgerOp> {
    prop_oneof![
        3 => (0u64..8_000).prop_map(LedgerOp::Advance),
        4 => (0usize..3, 0usize..3, 1u64..200, 1_000u64..6_000)
            .prop_map(|(node, scope, want, ttl)| LedgerOp::Grant { node, scope, want, ttl }),
        3 => (1u64..12).prop_map(|lease| LedgerOp::Renew { lease }),
        1 => (1u64..12).prop_map(|lease| LedgerOp::Revoke { lease }),
        1 => (1u64..12, 1u64..200).prop_map(|(lease, want)| LedgerOp::Amend { lease, want }),
        1 => (0usize..3).prop_map(|node| LedgerOp::Resync { node }),
        1 => (0usize..3).prop_map(|node| LedgerOp::RemoveNode { node }),
        1 => (0usize..3).prop_map(|node| LedgerOp::AddNode { node }),
        1 => (50u64..400, algorithm()).prop_map(|(group_cap, algo)| LedgerOp::SetQuota { group_cap, algo }),
        1 => Just(LedgerOp::Restore),
    ]
}

/// What the controller shell persists.
#[derive(Default)]
struct Store {
    nodes: BTreeMap<String, NodeRecord>,
    leases: BTreeMap<LeaseId, LeaseRecord>,
    next_lease_id: u64,
    tree: Option<QuotaTree>,
}

impl Store {
    fn persist(&mut self, l: &mut Ledger) {
        let d = l.take_dirty();
        // Persisted as JSON, like the controller does.
        let d: nicwarden_lease::ledger::Dirty =
            serde_json::from_str(&serde_json::to_string(&d).expect("to json")).expect("from json");
        for n in d.nodes {
            self.nodes.insert(n.name.clone(), n);
        }
        for r in d.leases {
            self.leases.insert(r.id, r);
        }
        self.next_lease_id = d.next_lease_id;
        if let Some(t) = d.tree {
            self.tree = Some(t);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn ledger_seqs_grow_and_revocations_are_final(
        fair in any::<bool>(),
        ops in prop::collection::vec(ledger_op(), 1..60),
    ) {
        let names = ["n0", "n1", "n2"];
        let scopes = scopes();
        let algo = if fair { Algorithm::FairShare } else { Algorithm::Static };
        let mut l = Ledger::new(QuotaTree::new(300, algo), LedgerConfig::default());
        for n in names {
            l.add_node(n, "default", 150).expect("add node");
        }
        let mut store = Store::default();
        store.persist(&mut l);
        // Agents receive every directive in order: all must be accepted.
        let mut agents: BTreeMap<&str, AgentCore> =
            names.iter().map(|n| (*n, AgentCore::new(n, 0, Floor::BLOCKED))).collect();
        let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
        let mut finished: BTreeSet<LeaseId> = BTreeSet::new();
        let mut now = Time(1_700_000_000_000);

        for op in ops {
            let effects: Vec<Effect> = match op {
                LedgerOp::Advance(ms) => {
                    now = now.plus_millis(ms);
                    l.handle_timeout(now)
                }
                LedgerOp::Grant { node, scope, want, ttl } => {
                    let terms = LeaseTerms {
                        scope: scopes[scope].clone(), want_bps: want, burst_bytes: 1, volume_bytes: None,
                        ttl_ms: ttl, renew_interval_ms: ttl / 3, floor: Floor::BLOCKED,
                    };
                    l.grant(now, names[node], terms).map(|(_, e)| e).unwrap_or_default()
                }
                LedgerOp::Renew { lease } => {
                    let node = l.lease(LeaseId(lease)).map(|r| r.node.clone()).unwrap_or_default();
                    l.renew(now, &node, LeaseId(lease)).unwrap_or_default()
                }
                LedgerOp::Revoke { lease } => l.revoke(now, LeaseId(lease), "test").unwrap_or_default(),
                LedgerOp::Amend { lease, want } => match l.lease(LeaseId(lease)) {
                    Some(r) => {
                        let terms = LeaseTerms { want_bps: want, floor: Floor::BLOCKED, ..r.terms.clone() };
                        l.amend(now, LeaseId(lease), terms).unwrap_or_default()
                    }
                    None => Vec::new(),
                },
                LedgerOp::Resync { node } => l.resync(now, names[node]),
                LedgerOp::RemoveNode { node } => l.remove_node(now, names[node]).unwrap_or_default(),
                LedgerOp::AddNode { node } => {
                    let _ = l.add_node(names[node], "default", 150);
                    Vec::new()
                }
                LedgerOp::SetQuota { group_cap, algo } => {
                    let mut t = l.tree().clone();
                    t.set_group("default", group_cap, algo).expect("group");
                    l.set_quota(now, t).unwrap_or_default()
                }
                LedgerOp::Restore => {
                    store.persist(&mut l);
                    let tree = store.tree.clone().expect("tree persisted");
                    let r = Ledger::restore(
                        tree, LedgerConfig::default(),
                        store.nodes.values().cloned().collect(),
                        store.leases.values().cloned().collect(),
                        store.next_lease_id,
                    ).expect("restore");
                    prop_assert_eq!(r.leases().collect::<Vec<_>>(), l.leases().collect::<Vec<_>>());
                    prop_assert_eq!(r.nodes().collect::<Vec<_>>(), l.nodes().collect::<Vec<_>>());
                    l = r;
                    Vec::new()
                }
            };
            // The shell persists before sending.
            store.persist(&mut l);
            for e in effects {
                match e {
                    Effect::Send(d) => {
                        let node = d.node().to_string();
                        let prev = last_seq.get(&node).copied().unwrap_or(0);
                        prop_assert!(d.seq() > prev, "seq {} after {} for {}", d.seq(), prev, node);
                        prop_assert!(d.seq() <= store.nodes[&node].last_seq, "seq sent before it was persisted");
                        last_seq.insert(node.clone(), d.seq());
                        match &d {
                            Directive::Lease(lease) => {
                                prop_assert!(!finished.contains(&lease.id), "lease {} re-issued after it ended", lease.id);
                                prop_assert!(lease.rate_bps > 0);
                            }
                            Directive::Revoke(r) => {
                                prop_assert!(finished.insert(r.lease_id), "lease {} revoked twice", r.lease_id);
                            }
                        }
                        let agent = agents.get_mut(node.as_str()).expect("agent");
                        let got = agent.handle_directive(now, d);
                        prop_assert!(got.is_ok(), "agent rejected: {:?}", got);
                    }
                    Effect::Expired { lease, .. } => {
                        prop_assert!(finished.insert(lease), "lease {} ended twice", lease);
                    }
                }
            }
            // Active leases form a valid allocation of the current tree.
            let active: Vec<&LeaseRecord> = l.leases().filter(|r| r.status == LeaseStatus::Active).collect();
            let wants: Vec<Want> = active.iter().map(|r| Want { lease: r.id, node: r.node.clone(), want_bps: r.terms.want_bps }).collect();
            let rates: BTreeMap<LeaseId, u64> = active.iter().map(|r| (r.id, r.rate_bps)).collect();
            assert_within(l.tree(), &wants, &rates);
            for r in &active {
                prop_assert!(r.rate_bps > 0);
                prop_assert!(r.expires_at > now, "active lease {} past expiry", r.id);
                if l.tree().path_is_static(&r.node) {
                    prop_assert_eq!(r.rate_bps, r.terms.want_bps, "static lease {} cut", r.id);
                }
            }
            for id in &finished {
                prop_assert!(l.lease(*id).is_some_and(|r| r.status != LeaseStatus::Active));
            }
        }
    }
}
