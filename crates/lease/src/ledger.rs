//! The controller's lease ledger: a deterministic state machine over nodes, leases and the
//! quota tree.
//!
//! Inputs come in as method calls carrying `now` (controller wall-clock milliseconds); outputs
//! leave as [`Effect`]s (directives to send, expiries to log) and as [`Dirty`] records (what to
//! persist). The shell must persist [`Ledger::take_dirty`] atomically *before* sending any
//! effect, and must call [`Ledger::handle_timeout`] once [`Ledger::poll_timeout`] has passed.
//!
//! Architecture Invariants:
//! - Sequence numbers per node only grow: every issuance or revocation takes
//!   `node.last_seq + 1`, across removal, re-adding and restore.
//! - A revocation is final: a revoked or expired lease is never issued again.
//! - The active leases' granted rates are always an allocation of the quota tree: no tree node
//!   is oversubscribed, no lease gets more than it wants, and no rate is 0.
//! - A failed operation changes nothing.

use crate::quota::{self, QuotaError, QuotaTree, Want};
use crate::{Directive, Floor, Lease, LeaseId, NodeId, Revocation, Scope, Time, Usage};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Tunables of the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerConfig {
    /// The controller considers a lease lapsed at `issued_at + ttl + grace`: the agent counts
    /// its ttl from receipt, which is after issue. Must cover the delivery delay.
    pub expiry_grace_ms: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            expiry_grace_ms: 1000,
        }
    }
}

/// Minimum lease lifetime accepted by [`LeaseTerms::validate`].
pub const MIN_TTL_MS: u64 = 1000;

/// What an operator asks for when granting (or amending) a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTerms {
    pub scope: Scope,
    /// Wanted rate in bits/s; the granted rate may be lower under FairShare.
    pub want_bps: u64,
    pub burst_bytes: u64,
    /// Volume over the lease's whole life, in bytes; `None` = unlimited.
    pub volume_bytes: Option<u64>,
    pub ttl_ms: u64,
    pub renew_interval_ms: u64,
    pub floor: Floor,
}

impl LeaseTerms {
    /// want_bps > 0, ttl_ms >= 1000, 0 < renew_interval_ms < ttl_ms, burst_bytes > 0,
    /// volume not `Some(0)`, floor rate <= want.
    pub fn validate(&self) -> Result<(), LedgerError> {
        let bad = |m: String| Err(LedgerError::InvalidTerms(m));
        if self.want_bps == 0 {
            return bad("invalid lease terms: rate must be > 0".into());
        }
        if self.ttl_ms < MIN_TTL_MS {
            return bad(format!(
                "invalid lease terms: ttl_ms must be >= {MIN_TTL_MS} (got {})",
                self.ttl_ms
            ));
        }
        if self.renew_interval_ms == 0 || self.renew_interval_ms >= self.ttl_ms {
            return bad(format!(
                "invalid lease terms: renew_interval_ms must be > 0 and < ttl_ms {} (got {})",
                self.ttl_ms, self.renew_interval_ms
            ));
        }
        if self.burst_bytes == 0 {
            return bad("invalid lease terms: burst_bytes must be > 0".into());
        }
        if self.volume_bytes == Some(0) {
            return bad(
                "invalid lease terms: volume_bytes must be > 0 when set (omit it for unlimited)"
                    .into(),
            );
        }
        if self.floor.rate_bps > self.want_bps {
            return bad(format!(
                "invalid lease terms: floor rate {} bit/s exceeds the wanted rate {} bit/s",
                self.floor.rate_bps, self.want_bps
            ));
        }
        Ok(())
    }
}

/// Life-cycle state of a lease. Revoked and Expired are final.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LeaseStatus {
    Active,
    Revoked { at: Time, reason: String },
    Expired { at: Time },
}

impl LeaseStatus {
    pub fn is_active(&self) -> bool {
        matches!(self, LeaseStatus::Active)
    }
}

impl fmt::Display for LeaseStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseStatus::Active => f.write_str("active"),
            LeaseStatus::Revoked { at, reason } => write!(f, "revoked at {} ({reason})", at.0),
            LeaseStatus::Expired { at } => write!(f, "expired at {}", at.0),
        }
    }
}

/// The controller's record of one lease (persisted as JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub id: LeaseId,
    pub node: NodeId,
    pub terms: LeaseTerms,
    /// Granted rate in bits/s.
    pub rate_bps: u64,
    /// Sequence number of the latest issuance (or of the revocation).
    pub seq: u64,
    pub granted_at: Time,
    /// Time of the latest issuance.
    pub issued_at: Time,
    /// When the controller considers the lease lapsed: `issued_at + ttl + grace`.
    pub expires_at: Time,
    pub status: LeaseStatus,
    pub usage: Usage,
    pub renewals: u64,
}

impl LeaseRecord {
    /// The lease as issued (latest issuance).
    pub fn to_lease(&self) -> Lease {
        Lease {
            id: self.id,
            node: self.node.clone(),
            scope: self.terms.scope.clone(),
            seq: self.seq,
            rate_bps: self.rate_bps,
            burst_bytes: self.terms.burst_bytes,
            volume_bytes: self.terms.volume_bytes,
            ttl_ms: self.terms.ttl_ms,
            renew_interval_ms: self.terms.renew_interval_ms,
            floor: self.terms.floor,
            used_bytes: self.usage.bytes,
            issued_at: self.issued_at,
        }
    }

    /// True if the lease has a volume and the reported usage reached it.
    pub fn volume_exhausted(&self) -> bool {
        self.terms
            .volume_bytes
            .is_some_and(|v| self.usage.bytes >= v)
    }
}

/// The controller's record of one node (persisted as JSON). Kept after removal so that its
/// sequence numbers continue if it is re-added.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: NodeId,
    /// Last sequence number used in a directive to this node.
    pub last_seq: u64,
    pub removed: bool,
}

/// An output of the ledger for the shell.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Sign and send this directive to its node (after persisting [`Ledger::take_dirty`]).
    Send(Directive),
    /// The lease lapsed without renewal (for logs and metrics; nothing to send).
    Expired { lease: LeaseId, node: NodeId },
}

/// Records changed since the last [`Ledger::take_dirty`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Dirty {
    pub nodes: Vec<NodeRecord>,
    pub leases: Vec<LeaseRecord>,
    pub next_lease_id: u64,
    /// `Some` if the quota tree changed.
    pub tree: Option<QuotaTree>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.leases.is_empty() && self.tree.is_none()
    }
}

/// Coarse class of a [`LedgerError`], for the server edge to map to a status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input (HTTP 422).
    Invalid,
    /// No such node or lease (HTTP 404).
    NotFound,
    /// The request is valid but clashes with current state (HTTP 409).
    Conflict,
    /// The caller may not act on this object (HTTP 403).
    Forbidden,
    /// Persisted state is inconsistent (restore only; HTTP 500 / refuse to start).
    Corrupt,
}

/// Errors of ledger operations. Each message names the operation and the object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// Lease terms are invalid (422).
    #[error("{0}")]
    InvalidTerms(String),
    /// The quota tree (or a node's quota) is invalid (422).
    #[error("{op}: {source}")]
    InvalidQuota {
        op: String,
        #[source]
        source: QuotaError,
    },
    /// No such node or lease (404).
    #[error("{op}: {what} not found")]
    NotFound { op: String, what: String },
    /// Clashes with an existing object (409).
    #[error("{op}: {detail}")]
    Conflict { op: String, detail: String },
    /// Not enough capacity (409).
    #[error("{op}: {level} would be oversubscribed (capacity {capacity_bps} bit/s, already allocated {allocated_bps}, asked {asked_bps})")]
    Oversubscribed {
        op: String,
        /// "fabric", "group NAME" or "node NAME".
        level: String,
        capacity_bps: u64,
        allocated_bps: u64,
        asked_bps: u64,
    },
    /// The change would cut an existing lease below its want where Static allocation promises
    /// it in full, or to 0 (409).
    #[error("{op}: lease {lease} ({node}/{scope}) would be cut to {rate_bps} bit/s, below its {want_bps} bit/s{}", if *static_path { " guaranteed by static allocation" } else { "" })]
    WouldCut {
        op: String,
        lease: LeaseId,
        node: NodeId,
        scope: Scope,
        want_bps: u64,
        rate_bps: u64,
        static_path: bool,
    },
    /// The lease is revoked or expired (409).
    #[error("{op}: lease {lease} is {status}, not active")]
    NotActive {
        op: String,
        lease: LeaseId,
        status: String,
    },
    /// A node acted on another node's lease (403).
    #[error("{op}: lease {lease} belongs to node {owner}, not {node}")]
    WrongNode {
        op: String,
        lease: LeaseId,
        owner: NodeId,
        node: NodeId,
    },
    /// Persisted records are inconsistent.
    #[error("restore ledger: {0}")]
    Corrupt(String),
}

impl LedgerError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            LedgerError::InvalidTerms(_) | LedgerError::InvalidQuota { .. } => ErrorKind::Invalid,
            LedgerError::NotFound { .. } => ErrorKind::NotFound,
            LedgerError::Conflict { .. }
            | LedgerError::Oversubscribed { .. }
            | LedgerError::WouldCut { .. }
            | LedgerError::NotActive { .. } => ErrorKind::Conflict,
            LedgerError::WrongNode { .. } => ErrorKind::Forbidden,
            LedgerError::Corrupt(_) => ErrorKind::Corrupt,
        }
    }
}

/// Statistics for the shell to export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LedgerStats {
    pub nodes: u64,
    pub active_leases: u64,
    pub granted_bps: u64,
}

/// The controller's lease ledger. See the module docs.
#[derive(Clone, Debug)]
pub struct Ledger {
    config: LedgerConfig,
    tree: QuotaTree,
    nodes: BTreeMap<NodeId, NodeRecord>,
    leases: BTreeMap<LeaseId, LeaseRecord>,
    /// Active lease per (node, scope).
    active: BTreeMap<(NodeId, Scope), LeaseId>,
    next_lease_id: u64,
    dirty_nodes: BTreeSet<NodeId>,
    dirty_leases: BTreeSet<LeaseId>,
    dirty_tree: bool,
}

impl Ledger {
    pub fn new(tree: QuotaTree, config: LedgerConfig) -> Self {
        Ledger {
            config,
            tree,
            nodes: BTreeMap::new(),
            leases: BTreeMap::new(),
            active: BTreeMap::new(),
            next_lease_id: 1,
            dirty_nodes: BTreeSet::new(),
            dirty_leases: BTreeSet::new(),
            dirty_tree: false,
        }
    }

    /// Rebuilds a ledger from persisted records, checking their consistency. Granted rates are
    /// kept as persisted (no re-allocation, no effects).
    pub fn restore(
        tree: QuotaTree,
        config: LedgerConfig,
        nodes: Vec<NodeRecord>,
        leases: Vec<LeaseRecord>,
        next_lease_id: u64,
    ) -> Result<Self, LedgerError> {
        tree.validate()
            .map_err(|e| LedgerError::Corrupt(format!("quota tree: {e}")))?;
        let mut l = Ledger::new(tree, config);
        l.next_lease_id = next_lease_id.max(1);
        for n in nodes {
            if quota::validate_name("node", &n.name).is_err() {
                return Err(LedgerError::Corrupt(format!(
                    "node name `{}` is invalid",
                    n.name
                )));
            }
            if !n.removed && !l.tree.nodes.contains_key(&n.name) {
                return Err(LedgerError::Corrupt(format!(
                    "node {} is not in the quota tree",
                    n.name
                )));
            }
            if let Some(old) = l.nodes.insert(n.name.clone(), n) {
                return Err(LedgerError::Corrupt(format!(
                    "node {} appears twice",
                    old.name
                )));
            }
        }
        for r in leases {
            let corrupt = |m: String| LedgerError::Corrupt(format!("lease {}: {m}", r.id));
            let Some(node) = l.nodes.get(&r.node) else {
                return Err(corrupt(format!("node {} is unknown", r.node)));
            };
            if r.seq > node.last_seq {
                return Err(corrupt(format!(
                    "seq {} is beyond node {}'s last seq {}",
                    r.seq, r.node, node.last_seq
                )));
            }
            if r.id.0 >= l.next_lease_id {
                return Err(corrupt(format!(
                    "id is not below the next lease id {}",
                    l.next_lease_id
                )));
            }
            if r.status.is_active() {
                if node.removed {
                    return Err(corrupt(format!("active on removed node {}", r.node)));
                }
                if let Some(other) = l
                    .active
                    .insert((r.node.clone(), r.terms.scope.clone()), r.id)
                {
                    return Err(corrupt(format!(
                        "lease {other} is also active for {}/{}",
                        r.node, r.terms.scope
                    )));
                }
            }
            if let Some(old) = l.leases.insert(r.id, r) {
                return Err(LedgerError::Corrupt(format!(
                    "lease {} appears twice",
                    old.id
                )));
            }
        }
        Ok(l)
    }

    /// Enrolls a node (in `group`, with the group's algorithm for dividing among its leases).
    /// A removed node may be re-added; its sequence numbers continue.
    pub fn add_node(
        &mut self,
        name: &str,
        group: &str,
        capacity_bps: u64,
    ) -> Result<(), LedgerError> {
        let op = || format!("add node {name}");
        if self.nodes.get(name).is_some_and(|n| !n.removed) {
            return Err(LedgerError::Conflict {
                op: op(),
                detail: format!("node {name} already exists"),
            });
        }
        let algorithm = self
            .tree
            .groups
            .get(group)
            .map(|g| g.algorithm)
            .unwrap_or_default();
        let mut tree = self.tree.clone();
        tree.set_node(name, group, capacity_bps, algorithm)
            .map_err(|source| LedgerError::InvalidQuota { op: op(), source })?;
        self.tree = tree;
        self.dirty_tree = true;
        let rec = self
            .nodes
            .entry(name.to_string())
            .or_insert_with(|| NodeRecord {
                name: name.to_string(),
                last_seq: 0,
                removed: false,
            });
        rec.removed = false;
        self.dirty_nodes.insert(name.to_string());
        Ok(())
    }

    /// Revokes all the node's active leases (reason "node removed"), marks it removed and
    /// removes it from the quota tree. Other leases may be raised (and re-issued).
    pub fn remove_node(&mut self, now: Time, name: &str) -> Result<Vec<Effect>, LedgerError> {
        let op = format!("remove node {name}");
        self.live_node(&op, name)?;
        let ids: Vec<LeaseId> = self
            .active
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, id)| *id)
            .collect();
        let mut effects = Vec::new();
        for id in ids {
            effects.push(self.do_revoke(now, id, "node removed"));
        }
        if let Some(rec) = self.nodes.get_mut(name) {
            rec.removed = true;
        }
        self.dirty_nodes.insert(name.to_string());
        // The node is in the tree (checked by `live_node`); ignore the impossible error.
        let _ = self.tree.remove_node(name);
        self.dirty_tree = true;
        effects.extend(self.reallocate_accept(now));
        Ok(effects)
    }

    /// Grants a lease. Refused (nothing changes) if the terms are invalid, the node already
    /// holds an active lease in the scope, or capacity does not allow it: under Static on the
    /// whole path the full want must fit without cutting any lease; under FairShare other
    /// leases may be cut (and are re-issued) but no lease may get 0.
    pub fn grant(
        &mut self,
        now: Time,
        node: &str,
        terms: LeaseTerms,
    ) -> Result<(LeaseId, Vec<Effect>), LedgerError> {
        let op = format!("grant lease for {node}/{}", terms.scope);
        terms.validate().map_err(|e| in_op(&op, e))?;
        self.live_node(&op, node)?;
        if let Some(existing) = self.active.get(&(node.to_string(), terms.scope.clone())) {
            return Err(LedgerError::Conflict {
                op,
                detail: format!("lease {existing} is already active for this scope"),
            });
        }
        // Static on the whole path: the full want must fit next to what is granted.
        if self.tree.path_is_static(node) && !self.fits(node, terms.want_bps, None) {
            return Err(self.oversubscribed(&op, node, terms.want_bps, None));
        }
        let id = LeaseId(self.next_lease_id);
        let mut wants = self.active_wants(None);
        wants.push(Want {
            lease: id,
            node: node.to_string(),
            want_bps: terms.want_bps,
        });
        let alloc = self.allocate(&op, &self.tree, &wants)?;
        let rate = alloc.get(&id).copied().unwrap_or(0);
        if rate == 0 || (rate < terms.want_bps && self.tree.path_is_static(node)) {
            return Err(self.oversubscribed(&op, node, terms.want_bps, None));
        }
        self.check_cuts(&op, &self.tree, &alloc, None)?;

        // Commit.
        self.next_lease_id += 1;
        let seq = self.next_seq(node);
        let rec = LeaseRecord {
            id,
            node: node.to_string(),
            rate_bps: rate,
            seq,
            granted_at: now,
            issued_at: now,
            expires_at: now
                .plus_millis(terms.ttl_ms)
                .plus_millis(self.config.expiry_grace_ms),
            status: LeaseStatus::Active,
            usage: Usage::default(),
            renewals: 0,
            terms,
        };
        let mut effects = vec![Effect::Send(Directive::Lease(rec.to_lease()))];
        self.active
            .insert((rec.node.clone(), rec.terms.scope.clone()), id);
        self.leases.insert(id, rec);
        self.dirty_leases.insert(id);
        effects.extend(self.apply(now, &alloc, Some(id)));
        Ok((id, effects))
    }

    /// Changes the terms of an active lease (the scope must stay) and re-issues it. Same
    /// capacity rules as [`Ledger::grant`]; the lease keeps its place (id) in Static order.
    pub fn amend(
        &mut self,
        now: Time,
        id: LeaseId,
        terms: LeaseTerms,
    ) -> Result<Vec<Effect>, LedgerError> {
        let op = format!("amend lease {id}");
        let rec = self.active_lease(&op, id)?;
        let node = rec.node.clone();
        let op = format!("amend lease {id} ({node}/{})", rec.terms.scope);
        if rec.terms.scope != terms.scope {
            return Err(LedgerError::InvalidTerms(format!(
                "{op}: the scope cannot change (asked {}); revoke and grant instead",
                terms.scope
            )));
        }
        terms.validate().map_err(|e| in_op(&op, e))?;
        if self.tree.path_is_static(&node) && !self.fits(&node, terms.want_bps, Some(id)) {
            return Err(self.oversubscribed(&op, &node, terms.want_bps, Some(id)));
        }
        let wants = self.active_wants(Some((id, terms.want_bps)));
        let alloc = self.allocate(&op, &self.tree, &wants)?;
        let rate = alloc.get(&id).copied().unwrap_or(0);
        if rate == 0 || (rate < terms.want_bps && self.tree.path_is_static(&node)) {
            return Err(self.oversubscribed(&op, &node, terms.want_bps, Some(id)));
        }
        self.check_cuts(&op, &self.tree, &alloc, Some(id))?;

        // Commit.
        let seq = self.next_seq(&node);
        let grace = self.config.expiry_grace_ms;
        let mut effects = Vec::new();
        if let Some(rec) = self.leases.get_mut(&id) {
            rec.terms = terms;
            rec.rate_bps = rate;
            reissue(rec, now, seq, grace);
            effects.push(Effect::Send(Directive::Lease(rec.to_lease())));
        }
        self.dirty_leases.insert(id);
        effects.extend(self.apply(now, &alloc, Some(id)));
        Ok(effects)
    }

    /// Renews an active lease at the request of its own node: re-issues it with a fresh seq,
    /// `issued_at = now`, `expires_at = now + ttl + grace`. A lease whose `expires_at` has
    /// passed is not renewed (the shell's next `handle_timeout` expires it).
    pub fn renew(
        &mut self,
        now: Time,
        node: &str,
        id: LeaseId,
    ) -> Result<Vec<Effect>, LedgerError> {
        let op = format!("renew lease {id} for {node}");
        let rec = self.active_lease(&op, id)?;
        if rec.node != node {
            return Err(LedgerError::WrongNode {
                op,
                lease: id,
                owner: rec.node.clone(),
                node: node.to_string(),
            });
        }
        if rec.expires_at <= now {
            return Err(LedgerError::NotActive {
                op,
                lease: id,
                status: format!("lapsed at {}", rec.expires_at.0),
            });
        }
        let seq = self.next_seq(node);
        let grace = self.config.expiry_grace_ms;
        let mut effects = Vec::new();
        if let Some(rec) = self.leases.get_mut(&id) {
            reissue(rec, now, seq, grace);
            rec.renewals += 1;
            effects.push(Effect::Send(Directive::Lease(rec.to_lease())));
        }
        self.dirty_leases.insert(id);
        Ok(effects)
    }

    /// The node's agent (re)connected: re-issue every active (not lapsed) lease of the node
    /// with fresh seqs, like [`Ledger::renew`].
    pub fn resync(&mut self, now: Time, node: &str) -> Vec<Effect> {
        let ids: Vec<LeaseId> = self
            .active
            .iter()
            .filter(|((n, _), _)| n == node)
            .map(|(_, id)| *id)
            .collect();
        let mut effects = Vec::new();
        for id in ids {
            if let Ok(mut e) = self.renew(now, node, id) {
                effects.append(&mut e);
            }
        }
        effects
    }

    /// Revokes an active lease (final) and sends the revocation with a fresh seq. Other leases
    /// may be raised (and re-issued).
    pub fn revoke(
        &mut self,
        now: Time,
        id: LeaseId,
        reason: &str,
    ) -> Result<Vec<Effect>, LedgerError> {
        let op = format!("revoke lease {id}");
        self.active_lease(&op, id)?;
        let mut effects = vec![self.do_revoke(now, id, reason)];
        effects.extend(self.reallocate_accept(now));
        Ok(effects)
    }

    /// Records usage reported by the lease's node. Counters only move up (max per field).
    /// Accepted for leases in any state (final reports may arrive after revocation).
    pub fn record_usage(
        &mut self,
        node: &str,
        id: LeaseId,
        usage: Usage,
    ) -> Result<(), LedgerError> {
        let op = format!("record usage of lease {id} from {node}");
        let rec = self
            .leases
            .get_mut(&id)
            .ok_or_else(|| LedgerError::NotFound {
                op: op.clone(),
                what: format!("lease {id}"),
            })?;
        if rec.node != node {
            return Err(LedgerError::WrongNode {
                op,
                lease: id,
                owner: rec.node.clone(),
                node: node.to_string(),
            });
        }
        let merged = Usage {
            bytes: rec.usage.bytes.max(usage.bytes),
            packets: rec.usage.packets.max(usage.packets),
            dropped_packets: rec.usage.dropped_packets.max(usage.dropped_packets),
        };
        if merged != rec.usage {
            rec.usage = merged;
            self.dirty_leases.insert(id);
        }
        Ok(())
    }

    /// Replaces the quota tree. Validates it (every enrolled node must be in it), re-allocates,
    /// and refuses (changing nothing) if an active lease would be cut below its want on an
    /// all-Static path, or to 0. Leases whose granted rate changes are re-issued.
    pub fn set_quota(&mut self, now: Time, tree: QuotaTree) -> Result<Vec<Effect>, LedgerError> {
        let op = "set quota".to_string();
        tree.validate()
            .map_err(|source| LedgerError::InvalidQuota {
                op: op.clone(),
                source,
            })?;
        if let Some(n) = self
            .nodes
            .values()
            .find(|n| !n.removed && !tree.nodes.contains_key(&n.name))
        {
            return Err(LedgerError::InvalidQuota {
                op,
                source: QuotaError::NotFound {
                    op: "check quota tree against enrolled nodes".into(),
                    what: format!("enrolled node {}", n.name),
                },
            });
        }
        let wants = self.active_wants(None);
        let alloc = self.allocate(&op, &tree, &wants)?;
        self.check_cuts(&op, &tree, &alloc, None)?;
        self.tree = tree;
        self.dirty_tree = true;
        Ok(self.apply(now, &alloc, None))
    }

    /// Expires active leases with `expires_at <= now` ([`Effect::Expired`]), then re-allocates
    /// (FairShare may raise others: they are re-issued).
    pub fn handle_timeout(&mut self, now: Time) -> Vec<Effect> {
        let due: Vec<LeaseId> = self
            .leases
            .values()
            .filter(|r| r.status.is_active() && r.expires_at <= now)
            .map(|r| r.id)
            .collect();
        if due.is_empty() {
            return Vec::new();
        }
        let mut effects = Vec::new();
        for id in due {
            if let Some(rec) = self.leases.get_mut(&id) {
                rec.status = LeaseStatus::Expired { at: now };
                self.active
                    .remove(&(rec.node.clone(), rec.terms.scope.clone()));
                self.dirty_leases.insert(id);
                effects.push(Effect::Expired {
                    lease: id,
                    node: rec.node.clone(),
                });
            }
        }
        effects.extend(self.reallocate_accept(now));
        effects
    }

    /// Earliest `expires_at` of an active lease.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.active
            .values()
            .filter_map(|id| self.leases.get(id))
            .map(|r| r.expires_at)
            .min()
    }

    /// Records changed since the last call. Persist them atomically before sending effects.
    pub fn take_dirty(&mut self) -> Dirty {
        let nodes = std::mem::take(&mut self.dirty_nodes)
            .into_iter()
            .filter_map(|n| self.nodes.get(&n).cloned())
            .collect();
        let leases = std::mem::take(&mut self.dirty_leases)
            .into_iter()
            .filter_map(|id| self.leases.get(&id).cloned())
            .collect();
        let tree = std::mem::take(&mut self.dirty_tree).then(|| self.tree.clone());
        Dirty {
            nodes,
            leases,
            next_lease_id: self.next_lease_id,
            tree,
        }
    }

    pub fn lease(&self, id: LeaseId) -> Option<&LeaseRecord> {
        self.leases.get(&id)
    }

    /// All lease records (any state), by id.
    pub fn leases(&self) -> impl Iterator<Item = &LeaseRecord> {
        self.leases.values()
    }

    /// The active lease of a node in a scope.
    pub fn active_lease_for(&self, node: &str, scope: &Scope) -> Option<&LeaseRecord> {
        self.active
            .get(&(node.to_string(), scope.clone()))
            .and_then(|id| self.leases.get(id))
    }

    /// The active leases of a node, by scope (egress first).
    pub fn active_leases_of<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a LeaseRecord> + 'a {
        // `Scope::Egress` is the smallest scope, so the range starts at the node's first.
        self.active
            .range((node.to_string(), Scope::Egress)..)
            .take_while(move |((n, _), _)| n == node)
            .filter_map(|(_, id)| self.leases.get(id))
    }

    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.get(name)
    }

    /// All node records (including removed ones), by name.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    pub fn tree(&self) -> &QuotaTree {
        &self.tree
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// The id the next grant will get.
    pub fn next_lease_id(&self) -> u64 {
        self.next_lease_id
    }

    pub fn stats(&self) -> LedgerStats {
        let active = self.active.values().filter_map(|id| self.leases.get(id));
        let (count, bps) = active.fold((0u64, 0u64), |(c, b), r| {
            (c + 1, b.saturating_add(r.rate_bps))
        });
        LedgerStats {
            nodes: self.nodes.values().filter(|n| !n.removed).count() as u64,
            active_leases: count,
            granted_bps: bps,
        }
    }

    // ---- internals ----

    fn live_node(&self, op: &str, name: &str) -> Result<(), LedgerError> {
        match self.nodes.get(name) {
            Some(n) if !n.removed && self.tree.nodes.contains_key(name) => Ok(()),
            _ => Err(LedgerError::NotFound {
                op: op.to_string(),
                what: format!("node {name}"),
            }),
        }
    }

    fn active_lease(&self, op: &str, id: LeaseId) -> Result<&LeaseRecord, LedgerError> {
        let rec = self.leases.get(&id).ok_or_else(|| LedgerError::NotFound {
            op: op.to_string(),
            what: format!("lease {id}"),
        })?;
        if !rec.status.is_active() {
            return Err(LedgerError::NotActive {
                op: op.to_string(),
                lease: id,
                status: rec.status.to_string(),
            });
        }
        Ok(rec)
    }

    fn next_seq(&mut self, node: &str) -> u64 {
        match self.nodes.get_mut(node) {
            Some(n) => {
                n.last_seq += 1;
                self.dirty_nodes.insert(node.to_string());
                n.last_seq
            }
            // Unreachable: callers check the node exists. Never hand out a seq of 0.
            None => u64::MAX,
        }
    }

    /// Wants of all active leases, with one want optionally overridden.
    fn active_wants(&self, override_want: Option<(LeaseId, u64)>) -> Vec<Want> {
        self.active
            .values()
            .filter_map(|id| self.leases.get(id))
            .map(|r| Want {
                lease: r.id,
                node: r.node.clone(),
                want_bps: match override_want {
                    Some((id, w)) if id == r.id => w,
                    _ => r.terms.want_bps,
                },
            })
            .collect()
    }

    fn allocate(
        &self,
        op: &str,
        tree: &QuotaTree,
        wants: &[Want],
    ) -> Result<BTreeMap<LeaseId, u64>, LedgerError> {
        quota::allocate(tree, wants).map_err(|source| LedgerError::InvalidQuota {
            op: op.to_string(),
            source,
        })
    }

    /// Refuses if an active lease (other than `except`) would get 0, or less than its want on
    /// an all-Static path.
    fn check_cuts(
        &self,
        op: &str,
        tree: &QuotaTree,
        alloc: &BTreeMap<LeaseId, u64>,
        except: Option<LeaseId>,
    ) -> Result<(), LedgerError> {
        for id in self.active.values() {
            if Some(*id) == except {
                continue;
            }
            let Some(r) = self.leases.get(id) else {
                continue;
            };
            let rate = alloc.get(id).copied().unwrap_or(0);
            let static_path = tree.path_is_static(&r.node);
            if rate == 0 || (rate < r.terms.want_bps && static_path) {
                return Err(LedgerError::WouldCut {
                    op: op.to_string(),
                    lease: r.id,
                    node: r.node.clone(),
                    scope: r.terms.scope.clone(),
                    want_bps: r.terms.want_bps,
                    rate_bps: rate,
                    static_path: static_path && rate > 0,
                });
            }
        }
        Ok(())
    }

    /// Builds the Oversubscribed error for asking `asked` more on `node` (with `exclude`'s
    /// current rate given back), naming the first level where it does not fit given the
    /// current granted rates, or else the level with the least room.
    fn oversubscribed(
        &self,
        op: &str,
        node: &str,
        asked: u64,
        exclude: Option<LeaseId>,
    ) -> LedgerError {
        let levels = self.levels(node, exclude);
        let pick = levels
            .iter()
            .find(|(_, cap, used)| used.saturating_add(asked) > *cap)
            .or_else(|| {
                levels
                    .iter()
                    .min_by_key(|(_, cap, used)| cap.saturating_sub(*used))
            })
            .cloned()
            .unwrap_or_default();
        LedgerError::Oversubscribed {
            op: op.to_string(),
            level: pick.0,
            capacity_bps: pick.1,
            allocated_bps: pick.2,
            asked_bps: asked,
        }
    }

    /// True if `asked` more fits on `node`, its group and the fabric next to the current
    /// granted rates (with `exclude`'s rate given back).
    fn fits(&self, node: &str, asked: u64, exclude: Option<LeaseId>) -> bool {
        self.levels(node, exclude)
            .iter()
            .all(|(_, cap, used)| used.saturating_add(asked) <= *cap)
    }

    /// (name, capacity, granted) of the node, its group and the fabric.
    fn levels(&self, node: &str, exclude: Option<LeaseId>) -> [(String, u64, u64); 3] {
        let group = self
            .tree
            .nodes
            .get(node)
            .map(|q| q.group.clone())
            .unwrap_or_default();
        let (mut on_node, mut on_group, mut on_fabric) = (0u64, 0u64, 0u64);
        for r in self.active.values().filter_map(|id| self.leases.get(id)) {
            if Some(r.id) == exclude {
                continue;
            }
            on_fabric = on_fabric.saturating_add(r.rate_bps);
            if r.node == node {
                on_node = on_node.saturating_add(r.rate_bps);
            }
            if self
                .tree
                .nodes
                .get(&r.node)
                .is_some_and(|q| q.group == group)
            {
                on_group = on_group.saturating_add(r.rate_bps);
            }
        }
        let node_cap = self.tree.nodes.get(node).map_or(0, |q| q.capacity_bps);
        let group_cap = self.tree.groups.get(&group).map_or(0, |g| g.capacity_bps);
        [
            (format!("node {node}"), node_cap, on_node),
            (format!("group {group}"), group_cap, on_group),
            (
                "fabric".to_string(),
                self.tree.fabric.capacity_bps,
                on_fabric,
            ),
        ]
    }

    /// Applies an allocation: every active lease (other than `skip`) whose rate changes is
    /// re-issued.
    fn apply(
        &mut self,
        now: Time,
        alloc: &BTreeMap<LeaseId, u64>,
        skip: Option<LeaseId>,
    ) -> Vec<Effect> {
        let ids: Vec<LeaseId> = self.active.values().copied().collect();
        let mut effects = Vec::new();
        for id in ids {
            if Some(id) == skip {
                continue;
            }
            let Some(&rate) = alloc.get(&id) else {
                continue;
            };
            let (node, old) = match self.leases.get(&id) {
                Some(r) => (r.node.clone(), r.rate_bps),
                None => continue,
            };
            if rate == old {
                continue;
            }
            let seq = self.next_seq(&node);
            let grace = self.config.expiry_grace_ms;
            if let Some(rec) = self.leases.get_mut(&id) {
                rec.rate_bps = rate;
                reissue(rec, now, seq, grace);
                effects.push(Effect::Send(Directive::Lease(rec.to_lease())));
            }
            self.dirty_leases.insert(id);
        }
        effects
    }

    /// Re-allocates after capacity was freed. Rates cannot drop when leases go away, but if
    /// one ever would reach 0 the lease is revoked ("quota exhausted") rather than issued at 0.
    fn reallocate_accept(&mut self, now: Time) -> Vec<Effect> {
        let mut effects = Vec::new();
        // Each round either applies or revokes at least one lease; bounded by the lease count.
        for _ in 0..=self.active.len() {
            let wants = self.active_wants(None);
            let Ok(alloc) = quota::allocate(&self.tree, &wants) else {
                // Unreachable: active leases' nodes are in the tree.
                return effects;
            };
            let starved: Vec<LeaseId> = alloc
                .iter()
                .filter(|(_, &r)| r == 0)
                .map(|(id, _)| *id)
                .collect();
            if starved.is_empty() {
                effects.extend(self.apply(now, &alloc, None));
                return effects;
            }
            for id in starved {
                effects.push(self.do_revoke(now, id, "quota exhausted"));
            }
        }
        effects
    }

    /// Marks an active lease revoked and returns the revocation to send. Does not re-allocate.
    fn do_revoke(&mut self, now: Time, id: LeaseId, reason: &str) -> Effect {
        let node = self
            .leases
            .get(&id)
            .map(|r| r.node.clone())
            .unwrap_or_default();
        let seq = self.next_seq(&node);
        let mut rev = None;
        if let Some(rec) = self.leases.get_mut(&id) {
            rec.status = LeaseStatus::Revoked {
                at: now,
                reason: reason.to_string(),
            };
            rec.seq = seq;
            self.active
                .remove(&(rec.node.clone(), rec.terms.scope.clone()));
            rev = Some(Revocation {
                lease_id: id,
                node: rec.node.clone(),
                scope: rec.terms.scope.clone(),
                seq,
                floor: rec.terms.floor,
                reason: reason.to_string(),
                issued_at: now,
            });
        }
        self.dirty_leases.insert(id);
        Effect::Send(Directive::Revoke(rev.unwrap_or(Revocation {
            lease_id: id,
            node,
            scope: Scope::Egress,
            seq,
            floor: Floor::BLOCKED,
            reason: reason.to_string(),
            issued_at: now,
        })))
    }
}

fn reissue(rec: &mut LeaseRecord, now: Time, seq: u64, grace_ms: u64) {
    rec.seq = seq;
    rec.issued_at = now;
    rec.expires_at = now.plus_millis(rec.terms.ttl_ms).plus_millis(grace_ms);
}

/// Prefixes an InvalidTerms message with the operation.
fn in_op(op: &str, e: LedgerError) -> LedgerError {
    match e {
        LedgerError::InvalidTerms(m) => LedgerError::InvalidTerms(format!("{op}: {m}")),
        other => other,
    }
}

#[cfg(test)]
mod tests;
