#![allow(clippy::unwrap_used)] // tests may unwrap
use super::*;
use crate::quota::Algorithm::{self, FairShare, Static};

const T0: Time = Time(1_000_000);

fn terms(scope: &str, want: u64) -> LeaseTerms {
    LeaseTerms {
        scope: scope.parse().expect("scope"),
        want_bps: want,
        burst_bytes: 10_000,
        volume_bytes: None,
        ttl_ms: 10_000,
        renew_interval_ms: 3_000,
        floor: Floor::BLOCKED,
    }
}

/// Fabric 100 (algo), group `default` 100 (algo), nodes n1, n2 (cap 100) in `default`.
fn ledger(algo: Algorithm) -> Ledger {
    let mut l = Ledger::new(QuotaTree::new(100, algo), LedgerConfig::default());
    l.add_node("n1", "default", 100).unwrap();
    l.add_node("n2", "default", 100).unwrap();
    l
}

fn sent(effects: &[Effect]) -> Vec<(String, LeaseId, u64, u64)> {
    // (kind, lease, seq, rate) per directive
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send(Directive::Lease(l)) => {
                Some(("lease".to_string(), l.id, l.seq, l.rate_bps))
            }
            Effect::Send(Directive::Revoke(r)) => {
                Some(("revoke".to_string(), r.lease_id, r.seq, 0))
            }
            Effect::Expired { .. } => None,
        })
        .collect()
}

fn check_terms(t: LeaseTerms, expected: &str) {
    match t.validate() {
        Ok(()) => assert_eq!("ok", expected),
        Err(e) => assert_eq!(e.to_string(), expected),
    }
}

#[test]
fn terms_validation() {
    let ok = terms("egress", 100);
    check_terms(ok.clone(), "ok");
    check_terms(
        LeaseTerms {
            want_bps: 0,
            ..ok.clone()
        },
        "invalid lease terms: rate must be > 0",
    );
    check_terms(
        LeaseTerms {
            ttl_ms: 999,
            ..ok.clone()
        },
        "invalid lease terms: ttl_ms must be >= 1000 (got 999)",
    );
    check_terms(
        LeaseTerms {
            ttl_ms: 1000,
            renew_interval_ms: 999,
            ..ok.clone()
        },
        "ok",
    );
    check_terms(
        LeaseTerms {
            renew_interval_ms: 0,
            ..ok.clone()
        },
        "invalid lease terms: renew_interval_ms must be > 0 and < ttl_ms 10000 (got 0)",
    );
    check_terms(
        LeaseTerms {
            renew_interval_ms: 10_000,
            ..ok.clone()
        },
        "invalid lease terms: renew_interval_ms must be > 0 and < ttl_ms 10000 (got 10000)",
    );
    check_terms(
        LeaseTerms {
            burst_bytes: 0,
            ..ok.clone()
        },
        "invalid lease terms: burst_bytes must be > 0",
    );
    check_terms(
        LeaseTerms {
            volume_bytes: Some(0),
            ..ok.clone()
        },
        "invalid lease terms: volume_bytes must be > 0 when set (omit it for unlimited)",
    );
    check_terms(
        LeaseTerms {
            volume_bytes: Some(1),
            ..ok.clone()
        },
        "ok",
    );
    check_terms(
        LeaseTerms {
            floor: Floor { rate_bps: 101 },
            ..ok.clone()
        },
        "invalid lease terms: floor rate 101 bit/s exceeds the wanted rate 100 bit/s",
    );
    check_terms(
        LeaseTerms {
            floor: Floor { rate_bps: 100 },
            ..ok
        },
        "ok",
    );
}

/// Runs a grant and compares the error message (or "ok").
fn check_grant(l: &mut Ledger, node: &str, t: LeaseTerms, expected: &str) {
    let before = l.clone().take_dirty();
    match l.grant(T0, node, t) {
        Ok(_) => assert_eq!("ok", expected),
        Err(e) => {
            assert_eq!(e.to_string(), expected);
            // A failed grant changes nothing.
            assert_eq!(l.clone().take_dirty(), before);
        }
    }
}

#[test]
fn grant_errors() {
    let mut l = ledger(Static);
    check_grant(&mut l, "n1", terms("egress", 60), "ok");
    check_grant(
        &mut l,
        "n1",
        terms("egress", 10),
        "grant lease for n1/egress: lease 1 is already active for this scope",
    );
    check_grant(
        &mut l,
        "n9",
        terms("egress", 10),
        "grant lease for n9/egress: node n9 not found",
    );
    check_grant(
        &mut l,
        "n1",
        terms("peer:n2", 0),
        "grant lease for n1/peer:n2: invalid lease terms: rate must be > 0",
    );
    check_grant(
        &mut l,
        "n2",
        terms("egress", 50),
        "grant lease for n2/egress: group default would be oversubscribed (capacity 100 bit/s, already allocated 60, asked 50)",
    );
    check_grant(
        &mut l,
        "n1",
        terms("peer:n2", 50),
        "grant lease for n1/peer:n2: node n1 would be oversubscribed (capacity 100 bit/s, already allocated 60, asked 50)",
    );
    check_grant(&mut l, "n2", terms("egress", 40), "ok");
    check_grant(
        &mut l,
        "n2",
        terms("peer:n1", 1),
        "grant lease for n2/peer:n1: group default would be oversubscribed (capacity 100 bit/s, already allocated 100, asked 1)",
    );
}

#[test]
fn grant_static_names_tightest_level() {
    let mut t = QuotaTree::new(1000, Static);
    t.set_group("pod-a", 100, Static).unwrap();
    let mut l = Ledger::new(t, LedgerConfig::default());
    l.add_node("node1", "pod-a", 60).unwrap();
    l.add_node("node2", "pod-a", 100).unwrap();
    check_grant(&mut l, "node1", terms("egress", 50), "ok");
    check_grant(
        &mut l,
        "node1",
        terms("peer:node2", 20),
        "grant lease for node1/peer:node2: node node1 would be oversubscribed (capacity 60 bit/s, already allocated 50, asked 20)",
    );
    check_grant(&mut l, "node2", terms("egress", 30), "ok");
    check_grant(
        &mut l,
        "node2",
        terms("peer:node1", 30),
        "grant lease for node2/peer:node1: group pod-a would be oversubscribed (capacity 100 bit/s, already allocated 80, asked 30)",
    );
}

#[test]
fn grant_static_never_cuts_earlier_leases() {
    // Static everywhere: n1 (first lease) is ordered before n2 in the group, so a second
    // lease on n1 would fit by taking n2's capacity. It must be refused.
    let mut l = ledger(Static);
    l.grant(T0, "n1", terms("egress", 50)).unwrap();
    l.grant(T0, "n2", terms("egress", 50)).unwrap();
    let err = l.grant(T0, "n1", terms("peer:n2", 10)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(
        err.to_string(),
        "grant lease for n1/peer:n2: group default would be oversubscribed (capacity 100 bit/s, already allocated 100, asked 10)"
    );
}

#[test]
fn grant_fair_share_reissues_cut_leases() {
    let mut l = ledger(FairShare);
    let (a, e) = l.grant(T0, "n1", terms("egress", 100)).unwrap();
    assert_eq!(sent(&e), [("lease".into(), a, 1, 100)]);
    let (b, e) = l
        .grant(T0.plus_millis(5), "n2", terms("egress", 100))
        .unwrap();
    // The new lease first, then the cut one, each with its node's next seq.
    assert_eq!(
        sent(&e),
        [("lease".into(), b, 1, 50), ("lease".into(), a, 2, 50)]
    );
    assert_eq!(l.lease(a).unwrap().issued_at, T0.plus_millis(5));
    assert_eq!(
        l.lease(a).unwrap().expires_at,
        T0.plus_millis(5 + 10_000 + 1000)
    );
    // Revoking b raises a back.
    let e = l.revoke(T0.plus_millis(6), b, "operator").unwrap();
    assert_eq!(
        sent(&e),
        [("revoke".into(), b, 2, 0), ("lease".into(), a, 3, 100)]
    );
}

#[test]
fn grant_refuses_zero_rate() {
    let mut l = Ledger::new(QuotaTree::new(2, FairShare), LedgerConfig::default());
    for n in ["a", "b", "c"] {
        l.add_node(n, "default", 2).unwrap();
    }
    l.grant(T0, "a", terms("egress", 2)).unwrap();
    l.grant(T0, "b", terms("egress", 2)).unwrap();
    let err = l.grant(T0, "c", terms("egress", 2)).unwrap_err();
    assert!(matches!(err, LedgerError::Oversubscribed { .. }), "{err}");
}

#[test]
fn renew_rules() {
    let mut l = ledger(Static);
    let (id, _) = l.grant(T0, "n1", terms("egress", 10)).unwrap();
    let t1 = T0.plus_millis(3000);
    let e = l.renew(t1, "n1", id).unwrap();
    assert_eq!(sent(&e), [("lease".into(), id, 2, 10)]);
    let r = l.lease(id).unwrap();
    assert_eq!(
        (r.issued_at, r.expires_at, r.renewals, r.granted_at),
        (t1, t1.plus_millis(11_000), 1, T0)
    );

    let check = |l: &mut Ledger, now: Time, node: &str, id: LeaseId, expected: &str| {
        let got = match l.renew(now, node, id) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expected);
    };
    check(
        &mut l,
        t1,
        "n2",
        id,
        "renew lease 1 for n2: lease 1 belongs to node n1, not n2",
    );
    check(
        &mut l,
        t1,
        "n1",
        LeaseId(9),
        "renew lease 9 for n1: lease 9 not found",
    );
    check(
        &mut l,
        t1.plus_millis(11_000),
        "n1",
        id,
        "renew lease 1 for n1: lease 1 is lapsed at 1014000, not active",
    );
    check(&mut l, t1.plus_millis(10_999), "n1", id, "ok");
    l.revoke(t1.plus_millis(11_000), id, "done").unwrap();
    check(
        &mut l,
        t1.plus_millis(11_001),
        "n1",
        id,
        "renew lease 1 for n1: lease 1 is revoked at 1014000 (done), not active",
    );
}

#[test]
fn revoke_is_final() {
    let mut l = ledger(Static);
    let (id, _) = l.grant(T0, "n1", terms("egress", 10)).unwrap();
    let e = l.revoke(T0, id, "operator").unwrap();
    match &e[..] {
        [Effect::Send(Directive::Revoke(r))] => {
            assert_eq!(
                (r.lease_id, r.seq, r.reason.as_str(), &r.scope),
                (id, 2, "operator", &Scope::Egress)
            );
        }
        other => panic!("unexpected effects {other:?}"),
    }
    let err = l.revoke(T0, id, "again").unwrap_err();
    assert_eq!(
        err.to_string(),
        "revoke lease 1: lease 1 is revoked at 1000000 (operator), not active"
    );
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(l.amend(T0, id, terms("egress", 5)).is_err());
    assert!(l.resync(T0, "n1").is_empty());
    // The scope is free again: a new lease gets a new id.
    let (id2, _) = l.grant(T0, "n1", terms("egress", 10)).unwrap();
    assert_eq!(id2, LeaseId(2));
}

#[test]
fn expiry_and_poll_timeout() {
    let mut l = ledger(FairShare);
    assert_eq!(l.poll_timeout(), None);
    let (a, _) = l.grant(T0, "n1", terms("egress", 100)).unwrap();
    let (b, _) = l
        .grant(T0, "n2", TermsExt::ttl(terms("egress", 100), 20_000))
        .unwrap();
    let a_exp = T0.plus_millis(11_000);
    assert_eq!(l.poll_timeout(), Some(a_exp));
    assert!(l.handle_timeout(a_exp.plus_millis(0).minus(1)).is_empty());
    let e = l.handle_timeout(a_exp);
    assert_eq!(
        e[0],
        Effect::Expired {
            lease: a,
            node: "n1".into()
        }
    );
    // b is raised to the full 100 and re-issued.
    assert_eq!(sent(&e), [("lease".into(), b, 2, 100)]);
    assert_eq!(
        l.lease(a).unwrap().status,
        LeaseStatus::Expired { at: a_exp }
    );
    assert_eq!(l.poll_timeout(), Some(a_exp.plus_millis(21_000)));
    assert!(l.renew(a_exp, "n1", a).is_err());
}

trait TermsExt {
    fn ttl(self, ttl: u64) -> Self;
}
impl TermsExt for LeaseTerms {
    fn ttl(mut self, ttl: u64) -> Self {
        self.ttl_ms = ttl;
        self
    }
}
trait TimeExt {
    fn minus(self, ms: u64) -> Self;
}
impl TimeExt for Time {
    fn minus(self, ms: u64) -> Self {
        Time(self.0 - ms)
    }
}

#[test]
fn amend_changes_terms_and_reissues() {
    let mut l = ledger(Static);
    let (a, _) = l.grant(T0, "n1", terms("egress", 40)).unwrap();
    let (b, _) = l.grant(T0, "n2", terms("egress", 40)).unwrap();
    let e = l.amend(T0.plus_millis(1), a, terms("egress", 60)).unwrap();
    assert_eq!(sent(&e), [("lease".into(), a, 2, 60)]);
    assert_eq!(l.lease(a).unwrap().terms.want_bps, 60);
    let err = l.amend(T0, a, terms("egress", 61)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "amend lease 1 (n1/egress): group default would be oversubscribed (capacity 100 bit/s, already allocated 40, asked 61)"
    );
    let err = l.amend(T0, b, terms("peer:n1", 10)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "amend lease 2 (n2/egress): the scope cannot change (asked peer:n1); revoke and grant instead"
    );
    assert_eq!(err.kind(), ErrorKind::Invalid);
    let err = l.amend(T0, b, terms("egress", 0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "amend lease 2 (n2/egress): invalid lease terms: rate must be > 0"
    );
    assert_eq!(
        l.amend(T0, LeaseId(7), terms("egress", 1))
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn set_quota_static_refuses_cuts() {
    let mut l = ledger(Static);
    let (a, _) = l.grant(T0, "n1", terms("egress", 50)).unwrap();
    let (b, _) = l.grant(T0, "n2", terms("egress", 50)).unwrap();
    let before = l.clone().take_dirty();
    let mut smaller = l.tree().clone();
    smaller.set_group("default", 80, Static).unwrap();
    let err = l.set_quota(T0, smaller).unwrap_err();
    assert_eq!(
        err.to_string(),
        "set quota: lease 2 (n2/egress) would be cut to 30 bit/s, below its 50 bit/s guaranteed by static allocation"
    );
    assert_eq!(l.clone().take_dirty(), before);
    // The same cut under fair share is applied and both leases are re-issued.
    let mut fair = l.tree().clone();
    fair.set_group("default", 80, FairShare).unwrap();
    let e = l.set_quota(T0, fair.clone()).unwrap();
    assert_eq!(
        sent(&e),
        [("lease".into(), a, 2, 40), ("lease".into(), b, 2, 40)]
    );
    assert_eq!(l.take_dirty().tree, Some(fair));
    // Unknown enrolled node in the new tree.
    let err = l.set_quota(T0, QuotaTree::new(100, Static)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "set quota: check quota tree against enrolled nodes: enrolled node n1 does not exist"
    );
    let mut bad = l.tree().clone();
    bad.nodes.get_mut("n1").unwrap().group = "nope".into();
    assert_eq!(l.set_quota(T0, bad).unwrap_err().kind(), ErrorKind::Invalid);
}

#[test]
fn remove_and_readd_node_keeps_seq() {
    let mut l = ledger(FairShare);
    let (a, _) = l.grant(T0, "n1", terms("egress", 100)).unwrap();
    let (b, _) = l.grant(T0, "n1", terms("peer:n2", 100)).unwrap();
    let (c, _) = l.grant(T0, "n2", terms("egress", 100)).unwrap();
    let n1_seq = l.node("n1").unwrap().last_seq;
    let e = l.remove_node(T0, "n1").unwrap();
    let s = sent(&e);
    assert_eq!(s[0], ("revoke".into(), a, n1_seq + 1, 0));
    assert_eq!(s[1], ("revoke".into(), b, n1_seq + 2, 0));
    assert_eq!(s[2].1, c);
    assert_eq!(s[2].3, 100);
    assert_eq!(
        l.lease(a).unwrap().status,
        LeaseStatus::Revoked {
            at: T0,
            reason: "node removed".into()
        }
    );
    assert!(l.node("n1").unwrap().removed);
    assert!(!l.tree().nodes.contains_key("n1"));
    assert_eq!(
        l.grant(T0, "n1", terms("egress", 1)).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        l.remove_node(T0, "n1").unwrap_err().to_string(),
        "remove node n1: node n1 not found"
    );
    assert_eq!(
        l.add_node("n2", "default", 10).unwrap_err().to_string(),
        "add node n2: node n2 already exists"
    );
    l.add_node("n1", "default", 100).unwrap();
    let (d, e) = l.grant(T0, "n1", terms("egress", 10)).unwrap();
    assert_eq!(
        e[0],
        Effect::Send(Directive::Lease(l.lease(d).unwrap().to_lease()))
    );
    assert_eq!(l.lease(d).unwrap().seq, n1_seq + 3);
    assert_eq!(
        l.add_node("bad name", "default", 10).unwrap_err().to_string(),
        "add node bad name: set quota of node bad name: node name `bad name` is invalid: it must be 1 to 63 characters of A-Z a-z 0-9 . _ -"
    );
    assert_eq!(
        l.add_node("n3", "nope", 10).unwrap_err().to_string(),
        "add node n3: set quota of node n3: group nope does not exist"
    );
}

#[test]
fn resync_reissues_all_active_leases() {
    let mut l = ledger(Static);
    let (a, _) = l.grant(T0, "n1", terms("egress", 10)).unwrap();
    let (b, _) = l.grant(T0, "n1", terms("peer:n2", 10)).unwrap();
    l.grant(T0, "n2", terms("egress", 10)).unwrap();
    let e = l.resync(T0.plus_millis(100), "n1");
    assert_eq!(
        sent(&e),
        [("lease".into(), a, 3, 10), ("lease".into(), b, 4, 10)]
    );
    assert!(l.resync(T0, "nobody").is_empty());
}

#[test]
fn usage_only_moves_up() {
    let mut l = ledger(Static);
    let (a, _) = l
        .grant(
            T0,
            "n1",
            LeaseTerms {
                volume_bytes: Some(1000),
                ..terms("egress", 10)
            },
        )
        .unwrap();
    l.take_dirty();
    let u = |bytes, packets| Usage {
        bytes,
        packets,
        dropped_packets: 0,
    };
    l.record_usage("n1", a, u(500, 10)).unwrap();
    l.record_usage("n1", a, u(400, 20)).unwrap();
    assert_eq!(l.lease(a).unwrap().usage, u(500, 20));
    assert!(!l.lease(a).unwrap().volume_exhausted());
    l.record_usage("n1", a, u(1000, 20)).unwrap();
    assert!(l.lease(a).unwrap().volume_exhausted());
    assert_eq!(l.take_dirty().leases.len(), 1);
    assert_eq!(
        l.record_usage("n2", a, u(1, 1)).unwrap_err().to_string(),
        "record usage of lease 1 from n2: lease 1 belongs to node n1, not n2"
    );
    assert_eq!(
        l.record_usage("n1", LeaseId(5), u(1, 1))
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn take_dirty_and_restore_round_trip() {
    let mut l = ledger(FairShare);
    let (a, _) = l.grant(T0, "n1", terms("egress", 100)).unwrap();
    let (b, _) = l.grant(T0, "n2", terms("egress", 100)).unwrap();
    l.revoke(T0, b, "x").unwrap();
    l.renew(T0.plus_millis(1), "n1", a).unwrap();
    let d = l.take_dirty();
    assert_eq!(d.nodes.len(), 2);
    assert_eq!(d.leases.len(), 2);
    assert_eq!(d.next_lease_id, 3);
    assert!(d.tree.is_some());
    assert!(l.take_dirty().is_empty());

    // Persist as JSON, restore, and compare.
    let json = serde_json::to_string(&d).unwrap();
    let back: Dirty = serde_json::from_str(&json).unwrap();
    assert_eq!(back, d);
    let tree = back.tree.clone().unwrap();
    let mut r = Ledger::restore(
        tree,
        LedgerConfig::default(),
        back.nodes,
        back.leases,
        back.next_lease_id,
    )
    .unwrap();
    assert_eq!(
        r.leases().cloned().collect::<Vec<_>>(),
        l.leases().cloned().collect::<Vec<_>>()
    );
    assert_eq!(
        r.nodes().cloned().collect::<Vec<_>>(),
        l.nodes().cloned().collect::<Vec<_>>()
    );
    assert_eq!(r.poll_timeout(), l.poll_timeout());
    // Sequence numbers continue after restore.
    let last = r.node("n1").unwrap().last_seq;
    let e = r.renew(T0.plus_millis(2), "n1", a).unwrap();
    assert_eq!(sent(&e)[0].2, last + 1);
    let (c, _) = r.grant(T0, "n2", terms("egress", 10)).unwrap();
    assert_eq!(c, LeaseId(3));
    // The status serializes with a `state` tag.
    let rec = serde_json::to_value(r.lease(b).unwrap()).unwrap();
    assert_eq!(rec["status"]["state"], "revoked");
}

#[test]
fn restore_rejects_inconsistent_records() {
    let mut l = ledger(Static);
    let (a, _) = l.grant(T0, "n1", terms("egress", 10)).unwrap();
    let d = l.take_dirty();
    let tree = d.tree.clone().unwrap();
    let check = |nodes: Vec<NodeRecord>, leases: Vec<LeaseRecord>, next: u64, expected: &str| {
        let got = match Ledger::restore(tree.clone(), LedgerConfig::default(), nodes, leases, next)
        {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expected);
    };
    check(d.nodes.clone(), d.leases.clone(), 2, "ok");
    check(
        d.nodes.clone(),
        d.leases.clone(),
        1,
        "restore ledger: lease 1: id is not below the next lease id 1",
    );
    let mut low = d.nodes.clone();
    low[0].last_seq = 0;
    check(
        low,
        d.leases.clone(),
        2,
        "restore ledger: lease 1: seq 1 is beyond node n1's last seq 0",
    );
    check(
        vec![d.nodes[1].clone()],
        d.leases.clone(),
        2,
        "restore ledger: lease 1: node n1 is unknown",
    );
    let mut dup = d.leases[0].clone();
    dup.id = LeaseId(5);
    check(
        d.nodes.clone(),
        vec![d.leases[0].clone(), dup],
        9,
        "restore ledger: lease 5: lease 1 is also active for n1/egress",
    );
    let _ = a;
}
