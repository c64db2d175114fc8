//! Property: after any sequence of membership changes, plans, reconnect snapshots, agent
//! restarts and time steps, replaying every update into one `MeshCore` per recipient leaves
//! each node that receives (in a group, not tampered) holding exactly the eligible members of
//! its group, with their current key, endpoint and allowed IPs, none outliving its lease; and
//! every other node holding nothing. No agent ever refuses an update or rejects an entry.

use nicwarden_lease::{NodeId, Time};
use nicwarden_mesh::{Held, Member, MeshCore, MeshUpdate, Planner, WgKey};
use proptest::prelude::*;
use std::collections::BTreeMap;

const NODES: usize = 5;
const GROUPS: u8 = 2;

#[derive(Clone, Debug)]
enum Op {
    Advance(u64),
    Group(usize, Option<u8>),
    /// Key version; `None` = not reported.
    Key(usize, Option<u8>),
    Endpoint(usize, Option<u16>),
    /// 0 = none, 1..=3 = one of the node's own address sets.
    Ips(usize, u8),
    Tamper(usize, bool),
    /// The node's leases now end `ttl` ms from now.
    Renew(usize, u64),
    Lapse(usize),
    /// Remove the node from the membership, or add it back.
    Present(usize, bool),
    Plan,
    /// The node reconnects and gets a snapshot.
    Snapshot(usize),
    /// The agent restarts from its persisted state.
    Restart(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NODES;
    prop_oneof![
        3 => (0u64..3000).prop_map(Op::Advance),
        2 => (n.clone(), proptest::option::of(0..GROUPS)).prop_map(|(i, g)| Op::Group(i, g)),
        1 => (n.clone(), proptest::option::weighted(0.9, 0..3u8)).prop_map(|(i, k)| Op::Key(i, k)),
        1 => (n.clone(), proptest::option::weighted(0.9, 1..3u16))
            .prop_map(|(i, p)| Op::Endpoint(i, p)),
        1 => (n.clone(), 0..4u8).prop_map(|(i, v)| Op::Ips(i, v)),
        1 => (n.clone(), proptest::bool::weighted(0.3)).prop_map(|(i, t)| Op::Tamper(i, t)),
        4 => (n.clone(), 1u64..8000).prop_map(|(i, ttl)| Op::Renew(i, ttl)),
        1 => n.clone().prop_map(Op::Lapse),
        1 => (n.clone(), proptest::bool::weighted(0.7)).prop_map(|(i, p)| Op::Present(i, p)),
        4 => Just(Op::Plan),
        1 => n.clone().prop_map(Op::Snapshot),
        1 => n.prop_map(Op::Restart),
    ]
}

fn name(i: usize) -> NodeId {
    format!("n{i}")
}

/// Node `i`'s addresses: its own, so nodes never overlap one another.
fn ips(i: usize, variant: u8) -> Vec<ipnet::IpNet> {
    let nets: Vec<String> = match variant {
        0 => vec![],
        1 => vec![format!("10.{i}.1.0/24")],
        2 => vec![format!("10.{i}.2.0/24"), format!("fd00:{i}::/64")],
        _ => vec![format!("10.{i}.0.0/16")],
    };
    nets.iter().filter_map(|s| s.parse().ok()).collect()
}

fn eligible(m: &Member, now: Time) -> bool {
    m.group.is_some()
        && m.public_key.is_some()
        && m.endpoint.is_some()
        && !m.allowed_ips.is_empty()
        && !m.tampered
        && m.lease_deadline.is_some_and(|d| d > now)
}

struct World {
    now: Time,
    planner: Planner,
    /// Every node's member record; `present` says whether it is in the membership.
    all: Vec<(bool, Member)>,
    agents: Vec<MeshCore>,
}

impl World {
    fn new(groups: &[Option<u8>]) -> World {
        let all = groups
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let m = Member {
                    node: name(i),
                    group: g.map(|g| format!("g{g}")),
                    public_key: Some(key(i, 0)),
                    endpoint: Some(endpoint(i, 1)),
                    allowed_ips: ips(i, 1),
                    tampered: false,
                    lease_deadline: None,
                };
                (true, m)
            })
            .collect();
        World {
            now: Time(1_000_000),
            planner: Planner::new(1),
            all,
            agents: (0..groups.len()).map(|i| MeshCore::new(name(i))).collect(),
        }
    }

    fn members(&self) -> BTreeMap<NodeId, Member> {
        self.all
            .iter()
            .filter(|(present, _)| *present)
            .map(|(_, m)| (m.node.clone(), m.clone()))
            .collect()
    }

    fn deliver(&mut self, to: &str, update: &MeshUpdate) {
        let i = self.index(to);
        let diff = self.agents[i]
            .apply(update.clone(), self.now)
            .unwrap_or_else(|e| panic!("{to} refused {update:?}: {e}"));
        assert!(
            diff.rejected.is_empty(),
            "{to} rejected {:?} of {update:?}",
            diff.rejected
        );
    }

    fn index(&self, node: &str) -> usize {
        self.all
            .iter()
            .position(|(_, m)| m.node == node)
            .unwrap_or_else(|| panic!("unknown node {node}"))
    }

    fn step(&mut self, op: &Op) {
        let now = self.now;
        match *op {
            Op::Advance(ms) => self.now = now.plus_millis(ms),
            Op::Group(i, g) => self.all[i].1.group = g.map(|g| format!("g{g}")),
            Op::Key(i, v) => self.all[i].1.public_key = v.map(|v| key(i, v)),
            Op::Endpoint(i, p) => self.all[i].1.endpoint = p.map(|p| endpoint(i, p)),
            Op::Ips(i, v) => self.all[i].1.allowed_ips = ips(i, v),
            Op::Tamper(i, t) => self.all[i].1.tampered = t,
            Op::Renew(i, ttl) => self.all[i].1.lease_deadline = Some(now.plus_millis(ttl)),
            Op::Lapse(i) => self.all[i].1.lease_deadline = None,
            Op::Present(i, p) => self.all[i].0 = p,
            Op::Plan => {
                let members = self.members();
                for out in self.planner.plan(&members, now) {
                    assert!(!out.to.is_empty());
                    for to in &out.to {
                        assert!(members.contains_key(to), "update to non-member {to}");
                        self.deliver(to, &out.update);
                    }
                }
                self.check();
            }
            Op::Snapshot(i) => {
                let members = self.members();
                let snap = self.planner.snapshot(&name(i), &members, now);
                assert_eq!(snap.is_some(), self.all[i].0, "snapshot for n{i}");
                if let Some(update) = snap {
                    self.deliver(&name(i), &update);
                }
            }
            Op::Restart(i) => {
                let a = &self.agents[i];
                let held: Vec<&Held> = a.peers().collect();
                let json = serde_json::to_string(&held).expect("persist");
                let held: Vec<Held> = serde_json::from_str(&json).expect("load");
                self.agents[i] = MeshCore::restore(
                    name(i),
                    a.last_seq(),
                    held,
                    a.tampered().map(str::to_string),
                );
            }
        }
    }

    /// The property, right after a plan was delivered.
    fn check(&mut self) {
        let now = self.now;
        let members = self.members();
        for (i, agent) in self.agents.iter_mut().enumerate() {
            let Some(me) = members.get(&name(i)) else {
                continue; // not a member: nobody talks to it
            };
            agent.poll(now);
            let held: BTreeMap<&str, &Held> =
                agent.peers().map(|h| (h.entry.node.as_str(), h)).collect();
            let group = if me.tampered {
                None
            } else {
                me.group.as_deref()
            };
            let expected: BTreeMap<&str, &Member> = members
                .values()
                .filter(|m| m.node != me.node && eligible(m, now))
                .filter(|m| group.is_some() && m.group.as_deref() == group)
                .map(|m| (m.node.as_str(), m))
                .collect();
            assert_eq!(
                held.keys().collect::<Vec<_>>(),
                expected.keys().collect::<Vec<_>>(),
                "peers of {} at {now:?}",
                me.node
            );
            for (node, m) in expected {
                let h = held[node];
                assert_eq!(
                    Some(h.entry.public_key),
                    m.public_key,
                    "{node}'s key at {}",
                    me.node
                );
                assert_eq!(Some(h.entry.endpoint), m.endpoint, "{node}'s endpoint");
                assert_eq!(h.entry.allowed_ips, m.allowed_ips, "{node}'s allowed IPs");
                assert_eq!(Some(&h.entry.group), m.group.as_ref(), "{node}'s group");
                assert!(h.deadline > now, "{node} held past its deadline");
                assert!(
                    m.lease_deadline.is_some_and(|d| h.deadline <= d),
                    "{node} held until {:?}, beyond its lease {:?}",
                    h.deadline,
                    m.lease_deadline
                );
            }
        }
    }
}

fn key(i: usize, version: u8) -> WgKey {
    let mut k = [0u8; 32];
    k[0] = i as u8;
    k[1] = version;
    WgKey(k)
}

fn endpoint(i: usize, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([198, 18, 0, i as u8 + 1], 51820 + port))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn agents_converge_on_the_eligible_members_of_their_group(
        groups in proptest::collection::vec(proptest::option::weighted(0.8, 0..GROUPS), NODES),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mut world = World::new(&groups);
        for op in &ops {
            world.step(op);
        }
        world.step(&Op::Plan);
    }
}

/// The property test's harness can fail: a recipient that misses one update is caught.
#[test]
#[should_panic(expected = "peers of")]
fn a_lost_update_is_detected() {
    let mut world = World::new(&[Some(0), Some(0)]);
    world.step(&Op::Renew(0, 5000));
    world.step(&Op::Renew(1, 5000));
    world.step(&Op::Plan);
    // n1's leases lapse; the withdrawal sent to n0 is lost, so n0 still holds n1.
    world.step(&Op::Lapse(1));
    let members = world.members();
    let _lost = world.planner.plan(&members, world.now);
    world.check();
}
