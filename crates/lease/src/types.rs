//! Plain data types shared by the ledger and the agent state machine.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A point in time, in milliseconds since an epoch chosen by the caller.
///
/// The controller passes wall-clock milliseconds since the Unix epoch (its records must
/// survive a restart); the agent passes milliseconds of its *monotonic* clock, so that
/// wall-clock changes on the node can neither extend nor shorten a lease.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Time(pub u64);

impl Time {
    pub fn from_millis(ms: u64) -> Self {
        Time(ms)
    }
    pub fn as_millis(self) -> u64 {
        self.0
    }
    /// `self + ms`, saturating at the far future.
    pub fn plus_millis(self, ms: u64) -> Self {
        Time(self.0.saturating_add(ms))
    }
    /// Milliseconds from `self` until `later` (0 if `later` is not after `self`).
    pub fn millis_until(self, later: Time) -> u64 {
        later.0.saturating_sub(self.0)
    }
}

/// A node's name, as enrolled (also the CN of its certificate).
pub type NodeId = String;

/// Identifies a lease for its whole life (across renewals). Assigned by the ledger, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What traffic a lease covers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "peer")]
pub enum Scope {
    /// All fabric egress of the node.
    Egress,
    /// Fabric egress of the node towards one peer node.
    Peer(NodeId),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Egress => write!(f, "egress"),
            Scope::Peer(p) => write!(f, "peer:{p}"),
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "egress" {
            return Ok(Scope::Egress);
        }
        match s.strip_prefix("peer:") {
            Some(p) if !p.is_empty() => Ok(Scope::Peer(p.to_string())),
            _ => Err(format!("scope must be `egress` or `peer:NODE`, got `{s}`")),
        }
    }
}

/// What a node may send in a scope when it holds no valid lease there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Floor {
    /// Rate in bits/s; 0 means blocked (the default: fail closed).
    pub rate_bps: u64,
}

impl Floor {
    pub const BLOCKED: Floor = Floor { rate_bps: 0 };
    pub fn is_blocked(&self) -> bool {
        self.rate_bps == 0
    }
}

/// The terms of a lease, as issued to the agent (one issuance = one sequence number).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub node: NodeId,
    pub scope: Scope,
    /// Per-node sequence number of this issuance; strictly greater than every earlier
    /// message the controller sent to this node.
    pub seq: u64,
    /// Granted rate in bits/s (> 0).
    pub rate_bps: u64,
    /// Burst in bytes.
    pub burst_bytes: u64,
    /// Transfer volume over the lease's whole life, in bytes; `None` = unlimited.
    pub volume_bytes: Option<u64>,
    /// Lifetime of this issuance in milliseconds, counted by the agent from receipt.
    pub ttl_ms: u64,
    /// How often the agent should renew, in milliseconds (< ttl_ms).
    pub renew_interval_ms: u64,
    /// What applies in this scope once the lease lapses or is revoked.
    pub floor: Floor,
    /// Bytes of the volume already used, as recorded by the controller at issuance, so a
    /// restarted agent (or datapath) resumes counting instead of starting from zero.
    #[serde(default)]
    pub used_bytes: u64,
    /// Controller wall-clock time of issuance (informational for the agent; never used to
    /// compute the agent's deadline).
    pub issued_at: Time,
}

/// A revocation of one lease: final. Signed and sequenced like a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub lease_id: LeaseId,
    pub node: NodeId,
    pub scope: Scope,
    pub seq: u64,
    pub floor: Floor,
    pub reason: String,
    pub issued_at: Time,
}

/// A message from the controller to one agent. Both kinds consume a sequence number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Directive {
    Lease(Lease),
    Revoke(Revocation),
}

impl Directive {
    pub fn node(&self) -> &str {
        match self {
            Directive::Lease(l) => &l.node,
            Directive::Revoke(r) => &r.node,
        }
    }
    pub fn seq(&self) -> u64 {
        match self {
            Directive::Lease(l) => l.seq,
            Directive::Revoke(r) => r.seq,
        }
    }
}

/// Usage counters of one scope, cumulative since the lease was first granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Usage {
    pub bytes: u64,
    pub packets: u64,
    pub dropped_packets: u64,
}
