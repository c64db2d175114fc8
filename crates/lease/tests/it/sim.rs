//! Simulated-time harness: one [`Ledger`] and N [`AgentCore`]s on a simulated clock, with a
//! simulated network (per-agent delay in each direction, links that can be cut). Time steps to
//! the next wake-up: the ledger's and agents' `poll_timeout`s and in-flight deliveries.
//!
//! A monitor checks at every wake-up `t` (and at `t - 1`, with the state as it was then) that
//! each agent enforces Allow exactly when a model says so: it has accepted a lease that was
//! not revoked since, at receipt time `r` with lifetime `ttl`, and `t < r + ttl`.

use nicwarden_lease::agent::{AgentCore, AgentEvent, SlotState};
use nicwarden_lease::ledger::{Effect, LeaseStatus, LeaseTerms, Ledger, LedgerConfig};
use nicwarden_lease::quota::{Algorithm, QuotaTree};
use nicwarden_lease::{Directive, Floor, LeaseId, Scope, Time};
use std::collections::BTreeSet;

/// The controller's wall clock reads `CTRL_EPOCH + sim time`.
const CTRL_EPOCH: u64 = 1_700_000_000_000;

#[derive(Debug)]
enum Msg {
    /// Controller -> agent.
    Directive(usize, Directive),
    /// Agent -> controller: renew this lease.
    Renew(usize, LeaseId),
}

struct InFlight {
    at: u64,
    order: u64,
    msg: Msg,
}

struct SimAgent {
    core: AgentCore,
    name: String,
    /// The agent's monotonic clock reads `sim time + offset`.
    offset: u64,
    /// One-way delay controller -> agent and agent -> controller.
    down_ms: u64,
    up_ms: u64,
    /// Model: (lease, receipt sim time, ttl) of the last accepted issuance, if not revoked.
    holding: Option<(LeaseId, u64, u64)>,
    /// First sim time the monitor saw the agent at its floor, since the last reset.
    first_floor_at: Option<u64>,
    renewals_sent: u64,
}

struct Sim {
    now: u64,
    ledger: Ledger,
    agents: Vec<SimAgent>,
    inflight: Vec<InFlight>,
    order: u64,
    /// Agents whose link to the controller is cut (both directions).
    cut: BTreeSet<usize>,
    /// (lease, controller expiry sim time).
    controller_expiries: Vec<(LeaseId, u64)>,
}

impl Sim {
    fn new(tree: QuotaTree, delays: &[(u64, u64)]) -> Sim {
        let mut ledger = Ledger::new(tree, LedgerConfig::default());
        let mut agents = Vec::new();
        for (i, &(down_ms, up_ms)) in delays.iter().enumerate() {
            let name = format!("node{i}");
            ledger
                .add_node(&name, "default", 1_000_000)
                .expect("add node");
            agents.push(SimAgent {
                core: AgentCore::new(&name, 0, Floor::BLOCKED),
                name,
                offset: 5_000 + 777 * i as u64,
                down_ms,
                up_ms,
                holding: None,
                first_floor_at: None,
                renewals_sent: 0,
            });
        }
        Sim {
            now: 0,
            ledger,
            agents,
            inflight: Vec::new(),
            order: 0,
            cut: BTreeSet::new(),
            controller_expiries: Vec::new(),
        }
    }

    fn ctrl_now(&self) -> Time {
        Time(CTRL_EPOCH + self.now)
    }

    fn agent_now(&self, i: usize, sim: u64) -> Time {
        Time(sim + self.agents[i].offset)
    }

    fn send(&mut self, at: u64, msg: Msg) {
        self.order += 1;
        self.inflight.push(InFlight {
            at,
            order: self.order,
            msg,
        });
    }

    /// What the controller shell does with effects: persist, then send.
    fn dispatch(&mut self, effects: Vec<Effect>) {
        let _persist = self.ledger.take_dirty();
        for e in effects {
            match e {
                Effect::Send(d) => {
                    let i = self
                        .agents
                        .iter()
                        .position(|a| a.name == d.node())
                        .expect("directive for a known agent");
                    let at = self.now + self.agents[i].down_ms;
                    self.send(at, Msg::Directive(i, d));
                }
                Effect::Expired { lease, .. } => self.controller_expiries.push((lease, self.now)),
            }
        }
    }

    fn grant(&mut self, i: usize, ttl_ms: u64, want_bps: u64) -> LeaseId {
        let terms = LeaseTerms {
            scope: Scope::Egress,
            want_bps,
            burst_bytes: 1500,
            volume_bytes: None,
            ttl_ms,
            renew_interval_ms: ttl_ms / 3,
            floor: Floor::BLOCKED,
        };
        let name = self.agents[i].name.clone();
        let (id, effects) = self
            .ledger
            .grant(self.ctrl_now(), &name, terms)
            .expect("grant");
        self.dispatch(effects);
        id
    }

    fn revoke(&mut self, id: LeaseId) {
        let effects = self
            .ledger
            .revoke(self.ctrl_now(), id, "operator")
            .expect("revoke");
        self.dispatch(effects);
    }

    fn next_wakeup(&self) -> Option<u64> {
        let ledger = self
            .ledger
            .poll_timeout()
            .map(|t| t.0.saturating_sub(CTRL_EPOCH));
        let agents = self
            .agents
            .iter()
            .filter_map(|a| a.core.poll_timeout().map(|t| t.0.saturating_sub(a.offset)));
        let net = self.inflight.iter().map(|m| m.at);
        ledger.into_iter().chain(agents).chain(net).min()
    }

    /// Runs every wake-up up to and including `end`, then sets the clock to `end`.
    fn run_until(&mut self, end: u64) {
        while let Some(t) = self.next_wakeup() {
            if t > end {
                break;
            }
            assert!(
                t > self.now || self.now == 0,
                "wake-up {t} is not after now {}",
                self.now
            );
            self.step(t.max(self.now));
        }
        if end > self.now {
            self.monitor(end - 1);
            self.now = end;
            self.monitor(end);
        }
    }

    fn step(&mut self, t: u64) {
        if t > 0 {
            // Nothing happened since the last wake-up: the state is that of time t - 1.
            self.monitor(t - 1);
        }
        self.now = t;

        // Deliver due messages in order.
        self.inflight.sort_by_key(|m| (m.at, m.order));
        let due: Vec<InFlight> = {
            let split = self.inflight.partition_point(|m| m.at <= t);
            self.inflight.drain(..split).collect()
        };
        for m in due {
            match m.msg {
                Msg::Directive(i, d) => {
                    if self.cut.contains(&i) {
                        continue;
                    }
                    let ttl = match &d {
                        Directive::Lease(l) => l.ttl_ms,
                        Directive::Revoke(_) => 0,
                    };
                    let now = self.agent_now(i, t);
                    let a = &mut self.agents[i];
                    match a.core.handle_directive(now, d) {
                        Ok(AgentEvent::Accepted {
                            lease, deadline, ..
                        }) => {
                            assert_eq!(deadline, now.plus_millis(ttl));
                            a.holding = Some((lease, t, ttl));
                        }
                        Ok(AgentEvent::Revoked { lease, .. }) => {
                            if a.holding.is_some_and(|(id, _, _)| id == lease) {
                                a.holding = None;
                            }
                        }
                        Ok(other) => panic!("unexpected event {other:?}"),
                        Err(e) => panic!("agent {i} rejected a directive in order: {e}"),
                    }
                }
                Msg::Renew(i, id) => {
                    if self.cut.contains(&i) {
                        continue;
                    }
                    let name = self.agents[i].name.clone();
                    // A renewal that arrives after the controller's expiry is refused.
                    if let Ok(effects) = self.ledger.renew(self.ctrl_now(), &name, id) {
                        self.dispatch(effects);
                    }
                }
            }
        }

        // Controller timers.
        let effects = self.ledger.handle_timeout(self.ctrl_now());
        for e in &effects {
            if let Effect::Expired { lease, node } = e {
                // Safety: the controller frees capacity only once the agent has stopped.
                let i = self
                    .agents
                    .iter()
                    .position(|a| &a.name == node)
                    .expect("agent");
                let d = self.agents[i]
                    .core
                    .decision_for(self.agent_now(i, t), &Scope::Egress);
                assert!(
                    !d.enforce.is_allow() || d.lease != Some(*lease),
                    "controller expired lease {lease} at {t} while agent {i} still allows it"
                );
            }
        }
        self.dispatch(effects);

        // Agent timers and renewals.
        for i in 0..self.agents.len() {
            let now = self.agent_now(i, t);
            self.agents[i].core.handle_timeout(now);
            let due = self.agents[i].core.due_renewals(now);
            for id in due {
                self.agents[i].renewals_sent += 1;
                if !self.cut.contains(&i) {
                    let at = t + self.agents[i].up_ms;
                    self.send(at, Msg::Renew(i, id));
                }
            }
        }
        self.monitor(t);
    }

    /// Checks every agent's egress decision at sim time `x` against the model.
    fn monitor(&mut self, x: u64) {
        for i in 0..self.agents.len() {
            let now = self.agent_now(i, x);
            let a = &self.agents[i];
            let d = a.core.decision_for(now, &Scope::Egress);
            let model_allow = a.holding.is_some_and(|(_, r, ttl)| x < r + ttl);
            assert_eq!(
                d.enforce.is_allow(),
                model_allow,
                "agent {i} at sim {x}: decision {d:?}, model holding {:?}",
                a.holding
            );
            if !model_allow && a.first_floor_at.is_none() {
                self.agents[i].first_floor_at = Some(x);
            }
        }
    }

    fn reset_first_floor(&mut self) {
        for a in &mut self.agents {
            a.first_floor_at = None;
        }
    }
}

const TTLS: [u64; 5] = [2_000, 3_000, 5_000, 7_000, 11_000];
const DELAYS: [(u64, u64); 5] = [(5, 5), (10, 30), (20, 20), (50, 10), (100, 100)];

fn healthy_sim(algo: Algorithm) -> Sim {
    let mut sim = Sim::new(QuotaTree::new(10_000_000, algo), &DELAYS);
    for (i, ttl) in TTLS.iter().enumerate() {
        sim.grant(i, *ttl, 1_000_000);
    }
    sim
}

#[test]
fn leases_survive_renewals_then_lapse_exactly_at_deadline_when_partitioned() {
    let mut sim = healthy_sim(Algorithm::Static);
    sim.run_until(60_000);
    for (i, a) in sim.agents.iter().enumerate() {
        let d = a
            .core
            .decision_for(sim.agent_now(i, sim.now), &Scope::Egress);
        assert_eq!(d.state, SlotState::Active, "agent {i} healthy");
        // Renewals flowed: about one per renew interval (ttl / 3).
        let expected = 60_000 / (TTLS[i] / 3);
        assert!(
            a.renewals_sent >= expected * 9 / 10,
            "agent {i} sent {} renewals, expected ~{expected}",
            a.renewals_sent
        );
        // The agent never went to its floor while healthy (apart from before its first lease).
        assert!(
            a.first_floor_at.is_none_or(|t| t < DELAYS[i].0),
            "agent {i} floored at {:?}",
            a.first_floor_at
        );
    }
    assert!(sim.controller_expiries.is_empty());

    // Partition the controller away at an odd time.
    sim.run_until(60_123);
    sim.cut = (0..sim.agents.len()).collect();
    sim.reset_first_floor();
    let deadlines: Vec<u64> = sim
        .agents
        .iter()
        .map(|a| {
            let (_, receipt, ttl) = a.holding.expect("holding a lease at partition");
            receipt + ttl
        })
        .collect();
    sim.run_until(60_123 + 20_000);

    for (i, a) in sim.agents.iter().enumerate() {
        // The monitor checked Allow at deadline - 1 and Floor from the deadline on.
        assert!(deadlines[i] > 60_123);
        assert_eq!(
            a.first_floor_at,
            Some(deadlines[i]),
            "agent {i}: floor exactly at its deadline"
        );
        assert_eq!(
            a.core
                .decision_for(sim.agent_now(i, sim.now), &Scope::Egress)
                .state,
            SlotState::Expired
        );
    }
    // The controller expired every lease, each no earlier than its agent's deadline.
    assert_eq!(sim.controller_expiries.len(), 5);
    for (lease, at) in &sim.controller_expiries {
        let i = sim
            .agents
            .iter()
            .position(|a| a.holding.is_some_and(|(id, _, _)| id == *lease))
            .expect("lease of some agent");
        assert!(
            *at >= deadlines[i],
            "controller expired lease {lease} at {at} before agent deadline {}",
            deadlines[i]
        );
        assert!(matches!(
            sim.ledger.lease(*lease).map(|r| &r.status),
            Some(LeaseStatus::Expired { .. })
        ));
    }
}

#[test]
fn revocation_reaches_floor_on_delivery() {
    let mut sim = healthy_sim(Algorithm::Static);
    sim.run_until(10_007);
    sim.reset_first_floor();
    let id = sim.agents[2].holding.expect("holding").0;
    sim.revoke(id);
    let delivery = 10_007 + DELAYS[2].0;
    sim.run_until(30_000);
    // Allow at delivery - 1 (checked by the monitor), floor exactly at delivery.
    assert_eq!(sim.agents[2].first_floor_at, Some(delivery));
    let d = sim.agents[2]
        .core
        .decision_for(sim.agent_now(2, sim.now), &Scope::Egress);
    assert_eq!(d.state, SlotState::Revoked);
    assert!(sim.agents[2].core.is_revoked(id));
    // Everyone else is unaffected.
    for (i, a) in sim.agents.iter().enumerate() {
        if i != 2 {
            assert_eq!(a.first_floor_at, None, "agent {i}");
        }
    }
}

#[test]
fn fair_share_raises_others_when_a_partitioned_node_lapses() {
    // 5 agents want 1 Mbit/s each out of 2.5 Mbit/s: 500 kbit/s each.
    let mut sim = Sim::new(QuotaTree::new(2_500_000, Algorithm::FairShare), &DELAYS);
    for (i, ttl) in TTLS.iter().enumerate() {
        sim.grant(i, *ttl, 1_000_000);
    }
    sim.run_until(20_000);
    let rate = |sim: &Sim, i: usize| {
        sim.agents[i]
            .core
            .decision_for(sim.agent_now(i, sim.now), &Scope::Egress)
            .rate_bps
    };
    for i in 0..5 {
        assert_eq!(rate(&sim, i), Some(500_000), "agent {i}");
    }
    // Cut node0 and node1 off; after they lapse the other three share 2.5 Mbit/s.
    sim.cut = [0, 1].into();
    sim.reset_first_floor();
    sim.run_until(40_000);
    assert_eq!(sim.controller_expiries.len(), 2);
    for i in 2..5 {
        assert_eq!(
            rate(&sim, i),
            Some(833_333 + u64::from(i == 2)),
            "agent {i}"
        );
        assert_eq!(sim.agents[i].first_floor_at, None, "agent {i} stayed up");
    }
}
