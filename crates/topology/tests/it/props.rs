//! Property tests of the verifier.
//!
//! - Every port hearing exactly what the declaration says, with RTTs within bounds, never
//!   raises a finding, whoever probes, on any valid topology.
//! - Over any sequence of inputs: the changes returned, folded, are exactly the finding set;
//!   a finding keeps its `first_seen`; `first_seen <= last_seen <= now`; ids are
//!   `kind:subject`; culprits are sorted and unique; and the same inputs give the same
//!   outputs.

use nicwarden_lease::Time;
use nicwarden_topology::{
    Answer, ByteSample, Change, Device, Endpoint, Finding, Heard, Link, PortRound, Topology,
    Verifier, VerifierConfig,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

const NODES: usize = 6;
const SWITCHES: usize = 2;
const NODE_PORTS: usize = 2;
const SWITCH_PORTS: usize = 4;

fn node_port(i: usize) -> Endpoint {
    Endpoint::new(
        format!("n{}", i / NODE_PORTS),
        format!("fab{}", i % NODE_PORTS),
    )
}

/// A valid topology from a plan: for each node port, 0 = no link, 1 = the next free port of
/// a switch, 2 = the next unlinked node port of another node; plus per-link bounds.
fn topology(plan: &[(u8, usize)], rtts: &[u64]) -> Topology {
    let mut t = Topology::default();
    for n in 0..NODES {
        t.nodes.insert(
            format!("n{n}"),
            Device {
                ports: (0..NODE_PORTS).map(|p| format!("fab{p}")).collect(),
            },
        );
    }
    for s in 0..SWITCHES {
        t.switches.insert(
            format!("s{s}"),
            Device {
                ports: (0..SWITCH_PORTS).map(|p| format!("p{p}")).collect(),
            },
        );
    }
    let mut used = [false; NODES * NODE_PORTS];
    let mut next_switch_port = [0usize; SWITCHES];
    for (i, (choice, pick)) in plan.iter().enumerate().take(NODES * NODE_PORTS) {
        if used[i] {
            continue;
        }
        let rtt = rtts.get(t.links.len()).copied().unwrap_or(2000);
        let me = node_port(i);
        match choice {
            1 => {
                let s = pick % SWITCHES;
                if next_switch_port[s] < SWITCH_PORTS {
                    used[i] = true;
                    t.links.push(Link {
                        a: me,
                        b: Endpoint::new(format!("s{s}"), format!("p{}", next_switch_port[s])),
                        rtt_max_us: rtt,
                    });
                    next_switch_port[s] += 1;
                }
            }
            2 => {
                let free: Vec<usize> = (0..NODES * NODE_PORTS)
                    .filter(|j| !used[*j] && j / NODE_PORTS != i / NODE_PORTS)
                    .collect();
                if !free.is_empty() {
                    let j = free[pick % free.len()];
                    used[i] = true;
                    used[j] = true;
                    let (a, b) = (me, node_port(j));
                    let (a, b) = if a <= b { (a, b) } else { (b, a) };
                    t.links.push(Link {
                        a,
                        b,
                        rtt_max_us: rtt,
                    });
                }
            }
            _ => {}
        }
    }
    t
}

fn plan() -> impl Strategy<Value = Vec<(u8, usize)>> {
    prop::collection::vec((0u8..3, 0usize..100), NODES * NODE_PORTS)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn perfect_observations_raise_nothing(
        plan in plan(),
        rtts in prop::collection::vec(2u64..5000, NODES * NODE_PORTS),
        probing in prop::collection::vec(any::<bool>(), NODES * NODE_PORTS),
        rounds in 1u64..8,
    ) {
        let t = topology(&plan, &rtts);
        prop_assert_eq!(t.validate(), Ok(()));
        let mut v = Verifier::new(VerifierConfig::default());
        prop_assert_eq!(v.set_topology(Some(t.clone()), Time(0)), vec![]);
        for r in 1..=rounds {
            for (i, probes) in probing.iter().enumerate() {
                if !probes {
                    continue;
                }
                let me = node_port(i);
                let own = t.link_of(&me).map_or(0, |l| l.rtt_max_us);
                let heard = t
                    .expected_neighbors(&me)
                    .into_iter()
                    .map(|e| {
                        if t.is_switch(&e.device) {
                            Answer { heard: Heard::Switch(e), rtt_us: Some(own) }
                        } else {
                            // Within the bound of the path (own bound alone suffices).
                            Answer { heard: Heard::Node(e), rtt_us: Some(own / 2) }
                        }
                    })
                    .collect();
                let changes = v.round(PortRound {
                    node: me.device.clone(),
                    port: me.port.clone(),
                    at: Time(r * 1000),
                    heard,
                });
                prop_assert_eq!(changes, vec![]);
            }
            prop_assert_eq!(v.tick(Time(r * 1000 + 999)), vec![]);
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Port, answers (index into a small universe, rtt), time step.
    Round(usize, Vec<(usize, Option<u64>)>, u64),
    Tick(u64),
    Bytes(usize, usize, u64, u64, u64),
    /// Toggle between the plan's topology and none.
    Topology(bool),
}

fn universe() -> Vec<Heard> {
    let mut u = Vec::new();
    for i in 0..NODES * NODE_PORTS {
        u.push(Heard::Node(node_port(i)));
    }
    for s in 0..SWITCHES {
        for p in 0..SWITCH_PORTS {
            u.push(Heard::Switch(Endpoint::new(
                format!("s{s}"),
                format!("p{p}"),
            )));
        }
    }
    let claim = Some(node_port(1));
    u.push(Heard::Unsigned {
        claimed: claim.clone(),
    });
    u.push(Heard::BadSignature { claimed: None });
    u.push(Heard::Replayed {
        claimed: claim.clone(),
    });
    u.push(Heard::UnknownIdentity { claimed: claim });
    u.push(Heard::Node(Endpoint::new("rogue", "eth0")));
    u
}

fn op() -> impl Strategy<Value = Op> {
    let n = universe().len();
    prop_oneof![
        8 => (
            0..NODES * NODE_PORTS,
            prop::collection::vec((0..n, prop::option::of(0u64..6000)), 0..5),
            0u64..1500,
        )
            .prop_map(|(p, a, dt)| Op::Round(p, a, dt)),
        2 => (0u64..70_000).prop_map(Op::Tick),
        2 => (0..NODES, 0..NODES, 0u64..200_000, 0u64..200_000, 0u64..100_000)
            .prop_map(|(a, b, s, r, d)| Op::Bytes(a, b, s, r, d)),
        1 => any::<bool>().prop_map(Op::Topology),
    ]
}

fn apply(v: &mut Verifier, t: &Topology, now: &mut u64, op: &Op) -> Vec<Change> {
    let u = universe();
    match op {
        Op::Round(p, answers, dt) => {
            *now += dt;
            let me = node_port(*p);
            v.round(PortRound {
                node: me.device,
                port: me.port,
                at: Time(*now),
                heard: answers
                    .iter()
                    .map(|(i, rtt_us)| Answer {
                        heard: u[*i].clone(),
                        rtt_us: *rtt_us,
                    })
                    .collect(),
            })
        }
        Op::Tick(dt) => {
            *now += dt;
            v.tick(Time(*now))
        }
        Op::Bytes(a, b, sent, received, dropped) => v.bytes(
            ByteSample {
                from: format!("n{a}"),
                to: format!("n{b}"),
                window_start: Time(now.saturating_sub(1000)),
                window_end: Time(*now),
                sent: *sent,
                received: *received,
                dropped_at_receiver: *dropped,
            },
            Time(*now),
        ),
        Op::Topology(on) => v.set_topology(on.then(|| t.clone()), Time(*now)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn changes_fold_to_findings_and_are_deterministic(
        plan in plan(),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let t = topology(&plan, &[]);
        let mut v = Verifier::new(VerifierConfig::default());
        let mut twin = Verifier::new(VerifierConfig::default());
        v.set_topology(Some(t.clone()), Time(0));
        twin.set_topology(Some(t.clone()), Time(0));
        let (mut now, mut twin_now) = (0u64, 0u64);
        let mut folded: BTreeMap<String, Finding> = BTreeMap::new();
        for op in &ops {
            let changes = apply(&mut v, &t, &mut now, op);
            prop_assert_eq!(&changes, &apply(&mut twin, &t, &mut twin_now, op));
            let ids: Vec<&str> = changes.iter().map(|c| c.finding().id.as_str()).collect();
            let mut sorted = ids.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(&ids, &sorted, "changes sorted by id, one per id");
            for c in changes {
                match c {
                    Change::Raised(f) => {
                        prop_assert!(!folded.contains_key(&f.id), "raised twice: {}", f.id);
                        prop_assert_eq!(f.first_seen, f.last_seen);
                        folded.insert(f.id.clone(), f);
                    }
                    Change::Updated(f) => {
                        let old = folded.get(&f.id);
                        prop_assert!(old.is_some(), "updated unknown {}", f.id);
                        prop_assert_eq!(old.map(|o| o.first_seen), Some(f.first_seen));
                        prop_assert_ne!(old, Some(&f));
                        folded.insert(f.id.clone(), f);
                    }
                    Change::Cleared(f) => {
                        prop_assert!(folded.remove(&f.id).is_some(), "cleared unknown {}", f.id);
                    }
                }
            }
            // Findings match the fold, except for last_seen, which moves silently.
            let held: Vec<&Finding> = v.findings().collect();
            prop_assert_eq!(held.len(), folded.len());
            for f in held {
                let g = folded.get(&f.id);
                prop_assert!(g.is_some());
                if let Some(g) = g {
                    prop_assert_eq!(Finding { last_seen: f.last_seen, ..g.clone() }, f.clone());
                }
                prop_assert!(f.first_seen <= f.last_seen && f.last_seen <= v.now());
                prop_assert_eq!(&f.id, &format!("{}:{}", f.kind, f.subject));
                let mut c = f.culprits.clone();
                c.sort();
                c.dedup();
                prop_assert_eq!(&c, &f.culprits);
                prop_assert_eq!(f.severity, f.kind.default_severity());
            }
        }
    }
}
