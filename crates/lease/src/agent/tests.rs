#![allow(clippy::unwrap_used)] // tests may unwrap
use super::*;

const NODE: &str = "n1";

fn lease(id: u64, scope: &str, seq: u64) -> Lease {
    Lease {
        id: LeaseId(id),
        node: NODE.into(),
        scope: scope.parse().expect("scope"),
        seq,
        rate_bps: 1_000,
        burst_bytes: 100,
        volume_bytes: None,
        ttl_ms: 10_000,
        renew_interval_ms: 3_000,
        floor: Floor { rate_bps: 7 },
        used_bytes: 0,
        issued_at: Time(0),
    }
}

fn revoke(id: u64, scope: &str, seq: u64) -> Directive {
    Directive::Revoke(Revocation {
        lease_id: LeaseId(id),
        node: NODE.into(),
        scope: scope.parse().expect("scope"),
        seq,
        floor: Floor { rate_bps: 3 },
        reason: "operator".into(),
        issued_at: Time(0),
    })
}

fn agent() -> AgentCore {
    AgentCore::new(NODE, 0, Floor::BLOCKED)
}

/// Feeds a directive and compares the outcome: "ok" or the rejection message.
fn check(a: &mut AgentCore, now: u64, d: Directive, expected: &str) {
    let got = match a.handle_directive(Time(now), d) {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    assert_eq!(got, expected);
}

fn egress(a: &AgentCore, now: u64) -> ScopeDecision {
    a.decision_for(Time(now), &Scope::Egress)
}

#[test]
fn fresh_agent_is_pending_at_default_floor() {
    let a = AgentCore::new(NODE, 5, Floor { rate_bps: 9 });
    let d = a.decision(Time(0));
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].scope, Scope::Egress);
    assert_eq!(d[0].state, SlotState::Pending);
    assert_eq!(d[0].enforce, Enforce::Floor { rate_bps: 9 });
    assert_eq!((a.last_seq(), a.node()), (5, NODE));
    assert_eq!(a.poll_timeout(), None);
}

#[test]
fn directive_checks() {
    let mut a = agent();
    check(&mut a, 0, Directive::Lease(lease(1, "egress", 1)), "ok");
    check(
        &mut a,
        0,
        Directive::Lease(lease(1, "egress", 1)),
        "reject directive: seq 1 is not greater than the last accepted seq 1 (replayed or reordered)",
    );
    check(
        &mut a,
        0,
        Directive::Lease(Lease {
            node: "n2".into(),
            ..lease(1, "egress", 5)
        }),
        "reject directive: addressed to node n2, but this is node n1",
    );
    check(
        &mut a,
        0,
        Directive::Lease(Lease {
            rate_bps: 0,
            ..lease(1, "egress", 2)
        }),
        "reject lease: lease 1 (n1/egress): rate must be > 0",
    );
    check(
        &mut a,
        0,
        Directive::Lease(Lease { renew_interval_ms: 10_000, ..lease(1, "egress", 2) }),
        "reject lease: lease 1 (n1/egress): renew_interval_ms must be > 0 and < ttl_ms 10000 (got 10000)",
    );
    check(
        &mut a,
        0,
        Directive::Lease(Lease {
            ttl_ms: 0,
            ..lease(1, "egress", 2)
        }),
        "reject lease: lease 1 (n1/egress): ttl_ms must be > 0",
    );
    check(
        &mut a,
        0,
        Directive::Lease(Lease {
            burst_bytes: 0,
            ..lease(1, "egress", 2)
        }),
        "reject lease: lease 1 (n1/egress): burst_bytes must be > 0",
    );
    check(
        &mut a,
        0,
        Directive::Lease(Lease {
            volume_bytes: Some(0),
            ..lease(1, "egress", 2)
        }),
        "reject lease: lease 1 (n1/egress): volume_bytes must be > 0 when set",
    );
    // Rejections changed nothing.
    assert_eq!(a.last_seq(), 1);
    check(&mut a, 0, revoke(1, "egress", 2), "ok");
    check(
        &mut a,
        0,
        Directive::Lease(lease(1, "egress", 3)),
        "reject lease 1: it was revoked, and a revocation is final",
    );
    check(&mut a, 0, Directive::Lease(lease(2, "egress", 3)), "ok");
    assert_eq!(a.last_seq(), 3);
}

#[test]
fn accept_renew_and_expire() {
    let mut a = agent();
    let ev = a
        .handle_directive(Time(100), Directive::Lease(lease(1, "egress", 1)))
        .unwrap();
    assert_eq!(
        ev,
        AgentEvent::Accepted {
            lease: LeaseId(1),
            scope: Scope::Egress,
            renewed: false,
            deadline: Time(10_100)
        }
    );
    assert_eq!(a.poll_timeout(), Some(Time(3_100)));
    let d = egress(&a, 100);
    assert_eq!(d.state, SlotState::Active);
    assert_eq!(
        d.enforce,
        Enforce::Allow {
            rate_bps: 1000,
            burst_bytes: 100,
            volume_left: None
        }
    );
    assert_eq!(
        (d.deadline_in_ms, d.seq, d.lease),
        (Some(10_000), Some(1), Some(LeaseId(1)))
    );

    // Renewal schedule: due at 3100, then retried every 1000 ms until renewed.
    assert!(a.due_renewals(Time(3_099)).is_empty());
    assert_eq!(a.due_renewals(Time(3_100)), [LeaseId(1)]);
    assert!(a.due_renewals(Time(3_100)).is_empty());
    assert_eq!(a.poll_timeout(), Some(Time(4_100)));
    assert_eq!(a.due_renewals(Time(4_100)), [LeaseId(1)]);

    let ev = a
        .handle_directive(Time(4_200), Directive::Lease(lease(1, "egress", 2)))
        .unwrap();
    assert_eq!(
        ev,
        AgentEvent::Accepted {
            lease: LeaseId(1),
            scope: Scope::Egress,
            renewed: true,
            deadline: Time(14_200)
        }
    );
    assert_eq!(a.poll_timeout(), Some(Time(7_200)));

    // Exactly at the deadline the lease is over, even before handle_timeout runs.
    assert!(egress(&a, 14_199).enforce.is_allow());
    let d = egress(&a, 14_200);
    assert_eq!(
        (d.state, d.enforce),
        (SlotState::Expired, Enforce::Floor { rate_bps: 7 })
    );
    assert!(
        a.due_renewals(Time(14_200)).is_empty(),
        "a lapsed lease is not renewed"
    );
    assert!(a.handle_timeout(Time(14_199)).is_empty());
    assert_eq!(
        a.handle_timeout(Time(14_200)),
        [AgentEvent::Expired {
            lease: LeaseId(1),
            scope: Scope::Egress
        }]
    );
    assert_eq!(a.poll_timeout(), None);
    assert_eq!(egress(&a, 14_200).state, SlotState::Expired);

    // A late re-issue of the same lease revives it (not as a renewal).
    let ev = a
        .handle_directive(Time(15_000), Directive::Lease(lease(1, "egress", 3)))
        .unwrap();
    assert!(matches!(ev, AgentEvent::Accepted { renewed: false, .. }));
    assert!(egress(&a, 15_000).enforce.is_allow());
}

#[test]
fn revocation_is_final_and_reaches_floor() {
    let mut a = agent();
    a.handle_directive(Time(0), Directive::Lease(lease(1, "egress", 1)))
        .unwrap();
    a.handle_directive(Time(0), Directive::Lease(lease(2, "peer:n2", 2)))
        .unwrap();
    let ev = a
        .handle_directive(Time(50), revoke(1, "egress", 3))
        .unwrap();
    assert_eq!(
        ev,
        AgentEvent::Revoked {
            lease: LeaseId(1),
            scope: Scope::Egress,
            reason: "operator".into()
        }
    );
    let d = egress(&a, 50);
    assert_eq!(
        (d.state, d.enforce, d.seq),
        (SlotState::Revoked, Enforce::Floor { rate_bps: 3 }, Some(3))
    );
    assert_eq!(d.reason, "lease 1 revoked: operator");
    assert!(a.is_revoked(LeaseId(1)));
    // The other scope is untouched.
    assert!(a
        .decision_for(Time(50), &"peer:n2".parse().unwrap())
        .enforce
        .is_allow());
    check(
        &mut a,
        60,
        Directive::Lease(lease(1, "egress", 9)),
        "reject lease 1: it was revoked, and a revocation is final",
    );
    // A revocation of a lease never seen still lands and is remembered.
    a.handle_directive(Time(70), revoke(5, "peer:n3", 4))
        .unwrap();
    check(
        &mut a,
        70,
        Directive::Lease(lease(5, "peer:n3", 5)),
        "reject lease 5: it was revoked, and a revocation is final",
    );
    assert_eq!(a.decision(Time(70)).len(), 3);
}

#[test]
fn new_lease_replaces_slot_and_resets_usage() {
    let mut a = agent();
    a.handle_directive(
        Time(0),
        Directive::Lease(Lease {
            volume_bytes: Some(1000),
            ..lease(1, "egress", 1)
        }),
    )
    .unwrap();
    let u = |bytes| Usage {
        bytes,
        packets: 1,
        dropped_packets: 0,
    };
    a.record_usage(&Scope::Egress, u(400));
    a.record_usage(&Scope::Egress, u(300)); // counters only move up
    let d = egress(&a, 1);
    assert_eq!(d.usage.bytes, 400);
    assert_eq!(
        d.enforce,
        Enforce::Allow {
            rate_bps: 1000,
            burst_bytes: 100,
            volume_left: Some(600)
        }
    );
    a.record_usage(&Scope::Egress, u(1000));
    let d = egress(&a, 1);
    assert_eq!(
        (d.state, d.enforce),
        (SlotState::Exhausted, Enforce::Floor { rate_bps: 7 })
    );
    // A renewal of the same lease keeps the usage (volume is over the lease's whole life).
    a.handle_directive(
        Time(2),
        Directive::Lease(Lease {
            volume_bytes: Some(1000),
            ..lease(1, "egress", 2)
        }),
    )
    .unwrap();
    assert_eq!(egress(&a, 2).state, SlotState::Exhausted);
    // A new lease in the scope starts from zero.
    a.handle_directive(
        Time(3),
        Directive::Lease(Lease {
            volume_bytes: Some(1000),
            ..lease(2, "egress", 3)
        }),
    )
    .unwrap();
    let d = egress(&a, 3);
    assert_eq!(
        (d.state, d.lease, d.usage.bytes),
        (SlotState::Active, Some(LeaseId(2)), 0)
    );
    // Usage for an unknown scope is ignored.
    a.record_usage(&"peer:x".parse().unwrap(), u(5));
    assert_eq!(a.decision(Time(3)).len(), 1);
}

#[test]
fn slot_state_display_and_serde() {
    let cases = [
        (SlotState::Pending, "pending"),
        (SlotState::Active, "active"),
        (SlotState::Revoked, "revoked"),
        (SlotState::Expired, "expired"),
        (SlotState::Exhausted, "exhausted"),
    ];
    for (s, text) in cases {
        assert_eq!(s.to_string(), text);
        assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{text}\""));
    }
    let e = serde_json::to_value(Enforce::Floor { rate_bps: 1 }).unwrap();
    assert_eq!(e, serde_json::json!({"mode": "floor", "rate_bps": 1}));
}

#[test]
fn restarted_agent_rejects_old_seqs() {
    let mut a = AgentCore::new(NODE, 41, Floor::BLOCKED);
    check(
        &mut a,
        0,
        Directive::Lease(lease(1, "egress", 41)),
        "reject directive: seq 41 is not greater than the last accepted seq 41 (replayed or reordered)",
    );
    check(&mut a, 0, Directive::Lease(lease(1, "egress", 42)), "ok");
}

#[test]
fn restarted_agent_resumes_volume_from_the_controllers_record() {
    // A fresh core (agent restarted) receives its lease re-issued with the usage the
    // controller recorded: the volume stays spent.
    let mut a = AgentCore::new(NODE, 0, Floor::BLOCKED);
    let mut l = lease(1, "egress", 1);
    l.volume_bytes = Some(1000);
    l.used_bytes = 1000;
    a.handle_directive(Time(0), Directive::Lease(l.clone()))
        .unwrap();
    let d = a.decision_for(Time(1), &Scope::Egress);
    assert_eq!(d.state, SlotState::Exhausted);
    assert!(!d.enforce.is_allow());
    // A renewal carrying a lower figure never refills it.
    l.seq = 2;
    l.used_bytes = 10;
    a.handle_directive(Time(2), Directive::Lease(l)).unwrap();
    assert_eq!(
        a.decision_for(Time(3), &Scope::Egress).state,
        SlotState::Exhausted
    );
}

#[test]
fn restored_lease_keeps_its_deadline_and_renews_at_once() {
    // The agent restarted 4 s into a 10 s lease: 6 s are left.
    let mut a = AgentCore::new(NODE, 7, Floor::BLOCKED);
    a.restore(Time(100), lease(3, "egress", 7), 6_000).unwrap();
    let d = egress(&a, 100);
    assert_eq!(
        (d.state, d.deadline_in_ms),
        (SlotState::Active, Some(6_000))
    );
    assert_eq!(a.last_seq(), 7, "restoring does not move the replay guard");
    assert_eq!(a.due_renewals(Time(100)), vec![LeaseId(3)]);
    assert_eq!(egress(&a, 6_100).state, SlotState::Expired);
    // The controller's next issuance (seq 8) is accepted as a renewal of the same lease.
    check(&mut a, 200, Directive::Lease(lease(3, "egress", 8)), "ok");
    assert_eq!(egress(&a, 200).deadline_in_ms, Some(10_000));
}

#[test]
fn restore_refusals() {
    let refused = |a: &mut AgentCore, l: Lease, left: u64| -> String {
        a.restore(Time(0), l, left).unwrap_err().to_string()
    };
    let mut a = agent();
    let mut other = lease(1, "egress", 1);
    other.node = "n2".into();
    assert!(refused(&mut a, other, 5).contains("addressed to node n2"));
    assert!(refused(&mut a, lease(1, "egress", 1), 0).contains("outside (0, ttl 10000]"));
    assert!(refused(&mut a, lease(1, "egress", 1), 10_001).contains("outside"));
    check(&mut a, 0, revoke(2, "egress", 1), "ok");
    assert!(refused(&mut a, lease(2, "peer:b", 1), 5).contains("revoked"));
    a.restore(Time(0), lease(4, "peer:b", 1), 5).unwrap();
    assert!(refused(&mut a, lease(5, "peer:b", 1), 5).contains("already holds a lease"));
}
