//! The agent's lease state machine: which scopes may send at what rate, right now.
//!
//! Inputs: verified directives from the controller ([`AgentCore::handle_directive`]), timer
//! expiries ([`AgentCore::handle_timeout`]) and usage counters. Outputs: events, renewals due,
//! and the enforcement [`AgentCore::decision`]. `now` is the agent's *monotonic* clock, so a
//! lease's deadline is `receipt + ttl` regardless of wall-clock changes on the node.
//!
//! Architecture Invariants:
//! - A lease past its deadline is never enforced as Allow, whether or not `handle_timeout`
//!   has run: [`AgentCore::decision`] is computed from `now`.
//! - Accepted sequence numbers strictly grow; a replayed or reordered directive is rejected.
//! - A revocation is final: the revoked lease id is never accepted again.

use crate::{Directive, Floor, Lease, LeaseId, NodeId, Revocation, Scope, Time, Usage};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Longest delay before a renewal request is retried.
pub const RENEW_RETRY_MS: u64 = 1000;

/// What to program into the data plane for one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Enforce {
    /// The lease holds: shape to `rate_bps` with `burst_bytes`; `volume_left` bytes may still
    /// be sent (`None` = unlimited).
    Allow {
        rate_bps: u64,
        burst_bytes: u64,
        volume_left: Option<u64>,
    },
    /// No valid lease: the floor applies (0 = blocked).
    Floor { rate_bps: u64 },
}

impl Enforce {
    pub fn is_allow(&self) -> bool {
        matches!(self, Enforce::Allow { .. })
    }
}

/// State of one scope's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// No lease received yet.
    Pending,
    Active,
    Revoked,
    Expired,
    /// The lease's volume is used up.
    Exhausted,
}

impl fmt::Display for SlotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SlotState::Pending => "pending",
            SlotState::Active => "active",
            SlotState::Revoked => "revoked",
            SlotState::Expired => "expired",
            SlotState::Exhausted => "exhausted",
        })
    }
}

/// The decision for one scope at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeDecision {
    pub scope: Scope,
    pub state: SlotState,
    pub lease: Option<LeaseId>,
    pub enforce: Enforce,
    /// Human-readable why.
    pub reason: String,
    /// Milliseconds until the lease lapses (Active only).
    pub deadline_in_ms: Option<u64>,
    /// Seq of the latest directive accepted for this scope.
    pub seq: Option<u64>,
    pub rate_bps: Option<u64>,
    pub volume_bytes: Option<u64>,
    pub usage: Usage,
}

/// What happened when a directive was accepted or a timer fired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentEvent {
    /// A lease was accepted; `renewed` if it re-issued the lease already active in the scope.
    Accepted {
        lease: LeaseId,
        scope: Scope,
        renewed: bool,
        deadline: Time,
    },
    Revoked {
        lease: LeaseId,
        scope: Scope,
        reason: String,
    },
    Expired {
        lease: LeaseId,
        scope: Scope,
    },
}

/// Why a directive was rejected. Nothing changes on rejection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("reject directive: addressed to node {got}, but this is node {expected}")]
    WrongNode { expected: NodeId, got: NodeId },
    #[error("reject directive: seq {seq} is not greater than the last accepted seq {last_seq} (replayed or reordered)")]
    Replay { seq: u64, last_seq: u64 },
    #[error("reject lease {0}: it was revoked, and a revocation is final")]
    RevokedLease(LeaseId),
    #[error("reject lease: {0}")]
    InvalidTerms(String),
}

#[derive(Clone, Debug)]
enum SlotLease {
    Active {
        lease: Lease,
        deadline: Time,
        renew_at: Time,
    },
    Expired {
        lease: Lease,
    },
    Revoked {
        lease: Option<Lease>,
        revocation: Revocation,
    },
}

#[derive(Clone, Debug)]
struct Slot {
    state: SlotLease,
    /// Seq of the latest directive accepted for this scope.
    seq: u64,
    usage: Usage,
}

impl Slot {
    fn lease_id(&self) -> LeaseId {
        match &self.state {
            SlotLease::Active { lease, .. } | SlotLease::Expired { lease } => lease.id,
            SlotLease::Revoked { revocation, .. } => revocation.lease_id,
        }
    }
}

/// The agent's lease state machine. See the module docs.
#[derive(Clone, Debug)]
pub struct AgentCore {
    node: NodeId,
    last_seq: u64,
    default_floor: Floor,
    slots: BTreeMap<Scope, Slot>,
    revoked: BTreeSet<LeaseId>,
}

impl AgentCore {
    /// `last_seq` is persisted by the shell across restarts (so replays stay rejected);
    /// `default_floor` applies to scopes that never had a lease.
    pub fn new(node: &str, last_seq: u64, default_floor: Floor) -> Self {
        AgentCore {
            node: node.to_string(),
            last_seq,
            default_floor,
            slots: BTreeMap::new(),
            revoked: BTreeSet::new(),
        }
    }

    /// Checks and applies a (signature-verified) directive received at `now`.
    pub fn handle_directive(&mut self, now: Time, d: Directive) -> Result<AgentEvent, Rejection> {
        if d.node() != self.node {
            return Err(Rejection::WrongNode {
                expected: self.node.clone(),
                got: d.node().to_string(),
            });
        }
        if d.seq() <= self.last_seq {
            return Err(Rejection::Replay {
                seq: d.seq(),
                last_seq: self.last_seq,
            });
        }
        match d {
            Directive::Lease(lease) => self.accept_lease(now, lease),
            Directive::Revoke(rev) => Ok(self.accept_revocation(rev)),
        }
    }

    fn accept_lease(&mut self, now: Time, lease: Lease) -> Result<AgentEvent, Rejection> {
        if self.revoked.contains(&lease.id) {
            return Err(Rejection::RevokedLease(lease.id));
        }
        check_terms(&lease).map_err(Rejection::InvalidTerms)?;
        self.last_seq = lease.seq;
        let deadline = now.plus_millis(lease.ttl_ms);
        let renew_at = now.plus_millis(lease.renew_interval_ms);
        let (id, scope, seq) = (lease.id, lease.scope.clone(), lease.seq);
        // Usage only moves up: the controller's record wins over a restarted agent's zero.
        let used_bytes = lease.used_bytes;
        let new_state = SlotLease::Active {
            lease,
            deadline,
            renew_at,
        };
        let renewed = match self.slots.get_mut(&scope) {
            Some(slot) if slot.lease_id() == id => {
                let was_active =
                    matches!(&slot.state, SlotLease::Active { deadline, .. } if *deadline > now);
                slot.state = new_state;
                slot.seq = seq;
                slot.usage.bytes = slot.usage.bytes.max(used_bytes);
                was_active
            }
            _ => {
                // New lease in this scope: it replaces whatever was there; usage starts from
                // what the controller recorded for this lease (0 for a fresh grant).
                self.slots.insert(
                    scope.clone(),
                    Slot {
                        state: new_state,
                        seq,
                        usage: Usage {
                            bytes: used_bytes,
                            ..Usage::default()
                        },
                    },
                );
                false
            }
        };
        Ok(AgentEvent::Accepted {
            lease: id,
            scope,
            renewed,
            deadline,
        })
    }

    fn accept_revocation(&mut self, rev: Revocation) -> AgentEvent {
        self.last_seq = rev.seq;
        self.revoked.insert(rev.lease_id);
        let event = AgentEvent::Revoked {
            lease: rev.lease_id,
            scope: rev.scope.clone(),
            reason: rev.reason.clone(),
        };
        // Revoke the lease wherever it is held (fail closed even if the revocation names
        // another scope than the lease).
        let mut hit = false;
        for slot in self
            .slots
            .values_mut()
            .filter(|s| s.lease_id() == rev.lease_id)
        {
            let lease = match std::mem::replace(
                &mut slot.state,
                SlotLease::Revoked {
                    lease: None,
                    revocation: rev.clone(),
                },
            ) {
                SlotLease::Active { lease, .. } | SlotLease::Expired { lease } => Some(lease),
                SlotLease::Revoked { lease, .. } => lease,
            };
            slot.state = SlotLease::Revoked {
                lease,
                revocation: rev.clone(),
            };
            slot.seq = rev.seq;
            hit = true;
        }
        // A revocation of a lease this agent does not hold is remembered; it shows in its
        // scope unless that scope holds another lease, which stays untouched.
        if !hit && !self.slots.contains_key(&rev.scope) {
            self.slots.insert(
                rev.scope.clone(),
                Slot {
                    seq: rev.seq,
                    state: SlotLease::Revoked {
                        lease: None,
                        revocation: rev,
                    },
                    usage: Usage::default(),
                },
            );
        }
        event
    }

    /// Re-installs a lease this agent had accepted before it restarted (read back from its
    /// own persisted copy, signature already verified by the shell), with the time it has
    /// left: `remaining_ms` from the shell's boot-time clock (receipt + ttl - now). It is
    /// renewed at once. The replay guard is not involved (the lease's seq is at most
    /// `last_seq`); a revoked lease, another node's lease, bad terms, a lease already past
    /// its deadline, or a scope that already holds a lease are refused.
    pub fn restore(
        &mut self,
        now: Time,
        lease: Lease,
        remaining_ms: u64,
    ) -> Result<AgentEvent, Rejection> {
        if lease.node != self.node {
            return Err(Rejection::WrongNode {
                expected: self.node.clone(),
                got: lease.node.clone(),
            });
        }
        if self.revoked.contains(&lease.id) {
            return Err(Rejection::RevokedLease(lease.id));
        }
        check_terms(&lease).map_err(Rejection::InvalidTerms)?;
        if remaining_ms == 0 || remaining_ms > lease.ttl_ms {
            return Err(Rejection::InvalidTerms(format!(
                "lease {}: {remaining_ms} ms left is outside (0, ttl {}]",
                lease.id, lease.ttl_ms
            )));
        }
        if self.slots.contains_key(&lease.scope) {
            return Err(Rejection::InvalidTerms(format!(
                "lease {}: scope {} already holds a lease",
                lease.id, lease.scope
            )));
        }
        let deadline = now.plus_millis(remaining_ms);
        let (id, scope, seq, used) = (lease.id, lease.scope.clone(), lease.seq, lease.used_bytes);
        self.slots.insert(
            scope.clone(),
            Slot {
                state: SlotLease::Active {
                    lease,
                    deadline,
                    renew_at: now,
                },
                seq,
                usage: Usage {
                    bytes: used,
                    ..Usage::default()
                },
            },
        );
        Ok(AgentEvent::Accepted {
            lease: id,
            scope,
            renewed: false,
            deadline,
        })
    }

    /// Active slots whose deadline is `<= now` become Expired.
    pub fn handle_timeout(&mut self, now: Time) -> Vec<AgentEvent> {
        let mut events = Vec::new();
        for (scope, slot) in self.slots.iter_mut() {
            if let SlotLease::Active {
                lease, deadline, ..
            } = &slot.state
            {
                if *deadline <= now {
                    let lease = lease.clone();
                    events.push(AgentEvent::Expired {
                        lease: lease.id,
                        scope: scope.clone(),
                    });
                    slot.state = SlotLease::Expired { lease };
                }
            }
        }
        events
    }

    /// Earliest of the active leases' deadlines and renewal times.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.slots
            .values()
            .filter_map(|s| match &s.state {
                SlotLease::Active {
                    deadline, renew_at, ..
                } => Some((*deadline).min(*renew_at)),
                _ => None,
            })
            .min()
    }

    /// Active (not lapsed) leases whose renewal is due. Each one's next renewal attempt is
    /// pushed to `now + min(renew_interval, 1000 ms)`, so a lost request is retried.
    pub fn due_renewals(&mut self, now: Time) -> Vec<LeaseId> {
        let mut due = Vec::new();
        for slot in self.slots.values_mut() {
            if let SlotLease::Active {
                lease,
                deadline,
                renew_at,
            } = &mut slot.state
            {
                if *renew_at <= now && *deadline > now {
                    due.push(lease.id);
                    *renew_at = now.plus_millis(lease.renew_interval_ms.min(RENEW_RETRY_MS));
                }
            }
        }
        due
    }

    /// Cumulative counters of the scope's current lease. Counters only move up (max per
    /// field), so a counter reset in the data plane cannot refill a volume.
    pub fn record_usage(&mut self, scope: &Scope, usage: Usage) {
        if let Some(slot) = self.slots.get_mut(scope) {
            slot.usage = Usage {
                bytes: slot.usage.bytes.max(usage.bytes),
                packets: slot.usage.packets.max(usage.packets),
                dropped_packets: slot.usage.dropped_packets.max(usage.dropped_packets),
            };
        }
    }

    /// One decision per known scope, always including [`Scope::Egress`]. Computed from `now`:
    /// a lease at or past its deadline is reported Expired at its floor even if
    /// `handle_timeout` has not run.
    pub fn decision(&self, now: Time) -> Vec<ScopeDecision> {
        let mut out = Vec::new();
        if !self.slots.contains_key(&Scope::Egress) {
            out.push(ScopeDecision {
                scope: Scope::Egress,
                state: SlotState::Pending,
                lease: None,
                enforce: Enforce::Floor {
                    rate_bps: self.default_floor.rate_bps,
                },
                reason: "no lease received yet".into(),
                deadline_in_ms: None,
                seq: None,
                rate_bps: None,
                volume_bytes: None,
                usage: Usage::default(),
            });
        }
        for (scope, slot) in &self.slots {
            out.push(slot_decision(now, scope, slot));
        }
        out.sort_by(|a, b| a.scope.cmp(&b.scope));
        out
    }

    /// The decision for one scope (Pending at the default floor if unknown).
    pub fn decision_for(&self, now: Time, scope: &Scope) -> ScopeDecision {
        match self.slots.get(scope) {
            Some(slot) => slot_decision(now, scope, slot),
            None => ScopeDecision {
                scope: scope.clone(),
                state: SlotState::Pending,
                lease: None,
                enforce: Enforce::Floor {
                    rate_bps: self.default_floor.rate_bps,
                },
                reason: "no lease received yet".into(),
                deadline_in_ms: None,
                seq: None,
                rate_bps: None,
                volume_bytes: None,
                usage: Usage::default(),
            },
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// True if `id` was revoked (revocations are final).
    pub fn is_revoked(&self, id: LeaseId) -> bool {
        self.revoked.contains(&id)
    }
}

fn check_terms(l: &Lease) -> Result<(), String> {
    let what = format!("lease {} ({}/{})", l.id, l.node, l.scope);
    if l.rate_bps == 0 {
        return Err(format!("{what}: rate must be > 0"));
    }
    if l.ttl_ms == 0 {
        return Err(format!("{what}: ttl_ms must be > 0"));
    }
    if l.renew_interval_ms == 0 || l.renew_interval_ms >= l.ttl_ms {
        return Err(format!(
            "{what}: renew_interval_ms must be > 0 and < ttl_ms {} (got {})",
            l.ttl_ms, l.renew_interval_ms
        ));
    }
    if l.burst_bytes == 0 {
        return Err(format!("{what}: burst_bytes must be > 0"));
    }
    if l.volume_bytes == Some(0) {
        return Err(format!("{what}: volume_bytes must be > 0 when set"));
    }
    Ok(())
}

fn slot_decision(now: Time, scope: &Scope, slot: &Slot) -> ScopeDecision {
    let base = |state, lease: &Lease, enforce, reason: String, deadline_in_ms| ScopeDecision {
        scope: scope.clone(),
        state,
        lease: Some(lease.id),
        enforce,
        reason,
        deadline_in_ms,
        seq: Some(slot.seq),
        rate_bps: Some(lease.rate_bps),
        volume_bytes: lease.volume_bytes,
        usage: slot.usage,
    };
    match &slot.state {
        SlotLease::Active {
            lease, deadline, ..
        } if *deadline > now => match lease.volume_bytes {
            Some(v) if slot.usage.bytes >= v => base(
                SlotState::Exhausted,
                lease,
                Enforce::Floor {
                    rate_bps: lease.floor.rate_bps,
                },
                format!(
                    "lease {} volume exhausted ({} of {v} bytes used)",
                    lease.id, slot.usage.bytes
                ),
                Some(now.millis_until(*deadline)),
            ),
            v => base(
                SlotState::Active,
                lease,
                Enforce::Allow {
                    rate_bps: lease.rate_bps,
                    burst_bytes: lease.burst_bytes,
                    volume_left: v.map(|v| v.saturating_sub(slot.usage.bytes)),
                },
                format!("lease {} active", lease.id),
                Some(now.millis_until(*deadline)),
            ),
        },
        SlotLease::Active { lease, .. } | SlotLease::Expired { lease } => base(
            SlotState::Expired,
            lease,
            Enforce::Floor {
                rate_bps: lease.floor.rate_bps,
            },
            format!("lease {} expired (no renewal received in time)", lease.id),
            None,
        ),
        SlotLease::Revoked { lease, revocation } => ScopeDecision {
            scope: scope.clone(),
            state: SlotState::Revoked,
            lease: Some(revocation.lease_id),
            enforce: Enforce::Floor {
                rate_bps: revocation.floor.rate_bps,
            },
            reason: format!(
                "lease {} revoked: {}",
                revocation.lease_id, revocation.reason
            ),
            deadline_in_ms: None,
            seq: Some(slot.seq),
            rate_bps: lease.as_ref().map(|l| l.rate_bps),
            volume_bytes: lease.as_ref().and_then(|l| l.volume_bytes),
            usage: slot.usage,
        },
    }
}

#[cfg(test)]
mod tests;
