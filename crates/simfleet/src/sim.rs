//! One simulated node, without I/O: the real agent's lease state machine
//! ([`AgentCore`]) fed with verified directives, and deterministic traffic counters.
//!
//! Time is passed in as the node's monotonic [`Time`] (milliseconds), like the lease core.
//! Traffic is counted exactly in integer arithmetic: a scope that carries `rate` bits/s for
//! `dt` ms adds `(rate * dt + carry) / 8000` bytes and keeps the remainder as `carry`, so
//! between any two reports `delta_bytes * 8 * 1000 / delta_ms` is the rate to within one
//! byte per interval.
//!
//! What the simulated data plane lets through, per scope (fail closed, like the kernel):
//! - an active lease: `min(offered rate, leased rate)`, never beyond the volume left;
//! - anything else (no lease, expired, revoked, exhausted): nothing; the counters stay.

use nicwarden_lease::agent::{AgentCore, Enforce, ScopeDecision, SlotState};
use nicwarden_lease::{Floor, LeaseId, Scope, Time, Usage};
use nicwarden_proto::pb;

/// Bytes per simulated packet (`packets = bytes / 1500`).
pub const PACKET_BYTES: u64 = 1500;

/// One configured scope of a simulated node.
#[derive(Clone, Debug)]
struct ScopeSim {
    scope: Scope,
    /// Offered traffic, bits/s.
    rate_bps: u64,
    /// The lease whose counters `carry` belongs to.
    lease: Option<LeaseId>,
    /// Bit-milliseconds below one byte (< 8000), carried to the next interval.
    carry: u64,
}

/// What a directive did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A lease was accepted (a new one, or a renewal of the held one).
    Lease { id: u64, scope: String },
    /// A revocation was accepted.
    Revoked { id: u64, scope: String },
}

/// The state of one simulated node. See the module docs.
pub struct NodeSim {
    core: AgentCore,
    lease_key: Option<[u8; 32]>,
    scopes: Vec<ScopeSim>,
    /// When the counters were last brought up to date.
    last: Option<Time>,
}

impl NodeSim {
    /// A node named `node` offering `rate_bps` in each of `scopes` (`egress`, `peer:NODE`).
    /// Scopes without a lease are blocked (floor 0).
    pub fn new(node: &str, scopes: &[(String, u64)]) -> Result<NodeSim, String> {
        let mut parsed: Vec<ScopeSim> = Vec::with_capacity(scopes.len());
        for (s, rate_bps) in scopes {
            let scope: Scope = s.parse().map_err(|e: String| format!("scope `{s}`: {e}"))?;
            if parsed.iter().any(|p| p.scope == scope) {
                return Err(format!("scope {scope} is listed twice"));
            }
            if scope == Scope::Peer(node.to_string()) {
                return Err(format!("scope {scope}: a node cannot be its own peer"));
            }
            parsed.push(ScopeSim {
                scope,
                rate_bps: *rate_bps,
                lease: None,
                carry: 0,
            });
        }
        Ok(NodeSim {
            core: AgentCore::new(node, 0, Floor::BLOCKED),
            lease_key: None,
            scopes: parsed,
            last: None,
        })
    }

    /// Pins the controller's lease-signing key (from the enrollment answer).
    pub fn pin_lease_key(&mut self, key: [u8; 32]) {
        self.lease_key = Some(key);
    }

    /// The pinned lease-signing key, once enrolled (it also signs mesh updates).
    pub fn lease_key(&self) -> Option<[u8; 32]> {
        self.lease_key
    }

    /// The highest directive sequence number accepted (for Hello).
    pub fn last_seq(&self) -> u64 {
        self.core.last_seq()
    }

    fn scope_index(&self, scope: &str) -> Option<usize> {
        let scope: Scope = scope.parse().ok()?;
        self.scopes.iter().position(|s| s.scope == scope)
    }

    /// Brings every scope's counters up to `now` under the decisions in force since the
    /// last call (directives are applied only after an `advance` to their arrival, so the
    /// decisions at the start of the interval hold throughout it, until a lease's deadline).
    fn advance(&mut self, now: Time) {
        let Some(last) = self.last else {
            self.last = Some(now);
            return;
        };
        if now <= last {
            return;
        }
        self.last = Some(now);
        for s in &mut self.scopes {
            let d = self.core.decision_for(last, &s.scope);
            if d.lease != s.lease {
                s.lease = d.lease;
                s.carry = 0;
            }
            if d.state != SlotState::Active {
                continue;
            }
            // Active until its deadline, if that comes first.
            let dt = last
                .millis_until(now)
                .min(d.deadline_in_ms.unwrap_or(u64::MAX));
            let Enforce::Allow {
                rate_bps,
                volume_left,
                ..
            } = d.enforce
            else {
                continue;
            };
            let through = s.rate_bps.min(rate_bps);
            let bit_ms = u128::from(through) * u128::from(dt) + u128::from(s.carry);
            let mut bytes = u64::try_from(bit_ms / 8000).unwrap_or(u64::MAX);
            s.carry = (bit_ms % 8000) as u64;
            if let Some(left) = volume_left {
                if bytes >= left {
                    bytes = left;
                    s.carry = 0;
                }
            }
            if bytes > 0 {
                let total = d.usage.bytes.saturating_add(bytes);
                self.core.record_usage(
                    &s.scope,
                    Usage {
                        bytes: total,
                        packets: total / PACKET_BYTES,
                        dropped_packets: 0,
                    },
                );
            }
        }
    }

    /// Verifies a signed directive against the pinned key and applies it at `now`.
    pub fn handle_directive(
        &mut self,
        now: Time,
        sd: &pb::SignedDirective,
    ) -> Result<Applied, String> {
        let key = self
            .lease_key
            .ok_or("directive before enrollment: no lease key pinned")?;
        let d = nicwarden_proto::verify_directive(sd, &key).map_err(|e| e.to_string())?;
        // Traffic up to now ran under the old decisions.
        self.advance(now);
        let applied = match &d {
            nicwarden_lease::Directive::Lease(l) => Applied::Lease {
                id: l.id.0,
                scope: l.scope.to_string(),
            },
            nicwarden_lease::Directive::Revoke(r) => Applied::Revoked {
                id: r.lease_id.0,
                scope: r.scope.to_string(),
            },
        };
        self.core
            .handle_directive(now, d)
            .map_err(|e| e.to_string())?;
        Ok(applied)
    }

    /// Sets the offered rate of a configured scope; traffic up to `now` is counted at the
    /// old rate. `Err` names the configured scopes.
    pub fn set_rate(&mut self, now: Time, scope: &str, rate_bps: u64) -> Result<(), String> {
        let i = self.scope_index(scope).ok_or_else(|| {
            let known: Vec<String> = self.scopes.iter().map(|s| s.scope.to_string()).collect();
            format!(
                "scope `{scope}` is not simulated (configured: {})",
                known.join(", ")
            )
        })?;
        self.advance(now);
        self.scopes[i].rate_bps = rate_bps;
        Ok(())
    }

    /// The offered rate of a configured scope.
    pub fn rate(&self, scope: &str) -> Option<u64> {
        self.scope_index(scope).map(|i| self.scopes[i].rate_bps)
    }

    /// Lapses leases past their deadline and returns the leases whose renewal is due
    /// (each is due again after its renewal interval, or 1 s if the request is lost).
    pub fn renewals(&mut self, now: Time) -> Vec<u64> {
        self.advance(now);
        self.core.handle_timeout(now);
        self.core
            .due_renewals(now)
            .into_iter()
            .map(|id| id.0)
            .collect()
    }

    /// The next deadline or renewal time, if a lease is active.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.core.poll_timeout()
    }

    fn decision(&self, now: Time, i: usize) -> ScopeDecision {
        self.core.decision_for(now, &self.scopes[i].scope)
    }

    /// The lease a configured scope holds and enforces at `now` (active, not lapsed).
    pub fn lease(&self, now: Time, scope: &str) -> Option<u64> {
        let d = self.decision(now, self.scope_index(scope)?);
        (d.state == SlotState::Active).then_some(d.lease?.0)
    }

    /// What the next report says about a scope: `active`, `expired`, `revoked`,
    /// `exhausted`, or `none` (no lease received yet).
    pub fn state(&self, now: Time, scope: &str) -> Option<String> {
        Some(state_name(&self.decision(now, self.scope_index(scope)?)))
    }

    /// The usage report at `now`: one entry per configured scope, `sample_time_ms = now`.
    pub fn report(&mut self, now: Time) -> pb::UsageReport {
        self.advance(now);
        let scopes = (0..self.scopes.len())
            .map(|i| {
                let d = self.decision(now, i);
                pb::ScopeUsage {
                    scope: d.scope.to_string(),
                    lease_id: d.lease.map_or(0, |l| l.0),
                    bytes: d.usage.bytes,
                    packets: d.usage.bytes / PACKET_BYTES,
                    dropped_packets: 0,
                    state: state_name(&d),
                    deadline_in_ms: d.deadline_in_ms.unwrap_or(0),
                }
            })
            .collect();
        pb::UsageReport {
            scopes,
            sample_time_ms: now.0,
        }
    }
}

fn state_name(d: &ScopeDecision) -> String {
    match (d.state, d.lease) {
        (SlotState::Pending, None) => "none".to_string(),
        (state, _) => state.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nicwarden_lease::{Directive, Lease, Revocation};
    use nicwarden_pki::LeaseSigningKey;

    const RATE: u64 = 100_000_000;

    struct Ctl {
        key: LeaseSigningKey,
        seq: u64,
    }

    impl Ctl {
        fn new() -> Ctl {
            Ctl {
                key: LeaseSigningKey::generate(),
                seq: 0,
            }
        }

        fn sign(&self, d: &Directive) -> pb::SignedDirective {
            nicwarden_proto::sign_directive(d, |m| self.key.sign(m))
        }

        fn lease(
            &mut self,
            id: u64,
            scope: &str,
            rate_bps: u64,
            volume: Option<u64>,
        ) -> pb::SignedDirective {
            self.seq += 1;
            self.sign(&Directive::Lease(Lease {
                id: LeaseId(id),
                node: "n1".into(),
                scope: scope.parse().expect("scope"),
                seq: self.seq,
                rate_bps,
                burst_bytes: 16384,
                volume_bytes: volume,
                ttl_ms: 30_000,
                renew_interval_ms: 10_000,
                floor: Floor::BLOCKED,
                used_bytes: 0,
                issued_at: Time(1),
            }))
        }

        fn revoke(&mut self, id: u64, scope: &str) -> pb::SignedDirective {
            self.seq += 1;
            self.sign(&Directive::Revoke(Revocation {
                lease_id: LeaseId(id),
                node: "n1".into(),
                scope: scope.parse().expect("scope"),
                seq: self.seq,
                floor: Floor::BLOCKED,
                reason: "test".into(),
                issued_at: Time(2),
            }))
        }
    }

    fn node(ctl: &Ctl) -> NodeSim {
        let mut n = NodeSim::new("n1", &[("egress".into(), RATE), ("peer:n2".into(), RATE)])
            .expect("valid");
        n.pin_lease_key(ctl.key.public_key());
        n
    }

    fn scope<'a>(r: &'a pb::UsageReport, s: &str) -> &'a pb::ScopeUsage {
        r.scopes
            .iter()
            .find(|u| u.scope == s)
            .expect("scope reported")
    }

    #[test]
    fn without_a_lease_nothing_flows() {
        let ctl = Ctl::new();
        let mut n = node(&ctl);
        n.report(Time(1000));
        let r = n.report(Time(5000));
        assert_eq!(r.sample_time_ms, 5000);
        assert_eq!(r.scopes.len(), 2);
        for u in &r.scopes {
            assert_eq!((u.bytes, u.lease_id, u.state.as_str()), (0, 0, "none"));
        }
    }

    #[test]
    fn an_active_lease_counts_at_the_offered_rate_exactly() {
        let mut ctl = Ctl::new();
        let mut n = node(&ctl);
        let rate = 123_456_789;
        n.set_rate(Time(0), "egress", rate).expect("configured");
        n.handle_directive(Time(1000), &ctl.lease(1, "egress", 1_000_000_000, None))
            .expect("accepted");
        let mut prev = n.report(Time(1000));
        assert_eq!(scope(&prev, "egress").bytes, 0);
        // Odd intervals: the rate derived from sample times stays exact within rounding.
        for dt in [333u64, 1000, 997, 1, 2500, 1001] {
            let t = prev.sample_time_ms + dt;
            let r = n.report(Time(t));
            let db = scope(&r, "egress").bytes - scope(&prev, "egress").bytes;
            let derived = db as u128 * 8 * 1000 / dt as u128;
            let exact = rate as u128;
            assert!(
                derived.abs_diff(exact) <= 8 * 1000 / dt as u128 + 1,
                "dt {dt}: {derived} vs {exact}"
            );
            prev = r;
        }
        // Over the whole run, exact to the byte.
        let total_ms = prev.sample_time_ms - 1000;
        assert_eq!(
            scope(&prev, "egress").bytes,
            (rate as u128 * total_ms as u128 / 8000) as u64
        );
        let e = scope(&prev, "egress");
        assert_eq!((e.lease_id, e.state.as_str()), (1, "active"));
        assert_eq!(e.packets, e.bytes / 1500);
        assert!(e.deadline_in_ms > 0 && e.deadline_in_ms <= 30_000);
        // The other scope has no lease: blocked.
        assert_eq!(scope(&prev, "peer:n2").bytes, 0);
    }

    #[test]
    fn the_lease_rate_caps_the_offered_rate() {
        let mut ctl = Ctl::new();
        let mut n = node(&ctl);
        n.handle_directive(Time(0), &ctl.lease(1, "egress", 8_000_000, None))
            .expect("accepted");
        let r = n.report(Time(1000));
        assert_eq!(scope(&r, "egress").bytes, 1_000_000);
    }

    #[test]
    fn set_rate_counts_the_past_at_the_old_rate() {
        let mut ctl = Ctl::new();
        let mut n = node(&ctl);
        n.handle_directive(Time(0), &ctl.lease(1, "egress", RATE, None))
            .expect("accepted");
        n.set_rate(Time(1000), "egress", 0).expect("configured");
        let a = scope(&n.report(Time(1500)), "egress").bytes;
        assert_eq!(a, RATE / 8);
        let b = scope(&n.report(Time(9000)), "egress").bytes;
        assert_eq!(a, b, "rate 0: no growth");
        assert!(n.set_rate(Time(9000), "peer:n9", 1).is_err());
    }

    #[test]
    fn revocation_and_expiry_stop_the_counters() {
        let mut ctl = Ctl::new();
        let mut n = node(&ctl);
        n.handle_directive(Time(0), &ctl.lease(1, "egress", RATE, None))
            .expect("accepted");
        n.handle_directive(Time(0), &ctl.lease(2, "peer:n2", RATE, None))
            .expect("accepted");
        assert_eq!(n.lease(Time(0), "egress"), Some(1));
        n.handle_directive(Time(1000), &ctl.revoke(1, "egress"))
            .expect("accepted");
        assert_eq!(n.lease(Time(1000), "egress"), None);
        let r = n.report(Time(2000));
        let e = scope(&r, "egress");
        assert_eq!(
            (e.lease_id, e.state.as_str(), e.bytes),
            (1, "revoked", RATE / 8)
        );
        // Renewals: only the active lease, after its interval.
        assert_eq!(n.renewals(Time(9_999)), Vec::<u64>::new());
        assert_eq!(n.renewals(Time(10_000)), vec![2]);
        // peer:n2 lapses at 30 s without a renewal.
        let r = n.report(Time(40_000));
        let p = scope(&r, "peer:n2");
        assert_eq!((p.state.as_str(), p.bytes), ("expired", RATE / 8 * 30));
        assert_eq!(n.lease(Time(40_000), "peer:n2"), None);
        assert_eq!(n.state(Time(40_000), "egress").as_deref(), Some("revoked"));
    }

    #[test]
    fn a_volume_is_never_exceeded() {
        let mut ctl = Ctl::new();
        let mut n = node(&ctl);
        n.handle_directive(Time(0), &ctl.lease(1, "egress", RATE, Some(1_000_000)))
            .expect("accepted");
        let r = n.report(Time(5000));
        let e = scope(&r, "egress");
        assert_eq!((e.bytes, e.state.as_str()), (1_000_000, "exhausted"));
    }

    #[test]
    fn forged_and_replayed_directives_are_rejected() {
        let mut ctl = Ctl::new();
        let mut n = node(&ctl);
        let mut other = Ctl::new();
        let forged = other.lease(1, "egress", RATE, None);
        let err = n.handle_directive(Time(0), &forged).expect_err("forged");
        assert!(err.contains("signature"), "{err}");
        let good = ctl.lease(1, "egress", RATE, None);
        n.handle_directive(Time(0), &good).expect("accepted");
        let err = n.handle_directive(Time(1), &good).expect_err("replay");
        assert!(err.contains("replayed"), "{err}");
        assert_eq!(n.last_seq(), 1);
    }

    #[test]
    fn bad_scopes_are_refused() {
        assert!(NodeSim::new("n1", &[("north".into(), 1)]).is_err());
        assert!(NodeSim::new("n1", &[("egress".into(), 1), ("egress".into(), 2)]).is_err());
        assert!(NodeSim::new("n1", &[("peer:n1".into(), 1)]).is_err());
    }
}
