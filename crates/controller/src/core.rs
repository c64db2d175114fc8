//! The controller's state: the lease ledger behind one lock, its persistence, enrollment,
//! and the fan-out of signed directives to connected agents.
//!
//! Every mutation follows the same order: change the ledger, persist what changed in one
//! store transaction, append to the audit log, and only then sign and push directives. A
//! crash at any point therefore never lets a directive reach an agent that the store does
//! not know about, so nothing is double-granted and sequence numbers never go back.

use crate::api_types::*;
use crate::live::Live;
use crate::mesh::{self, MeshRecord, MeshState, TamperRecord, KEY_MESH_SEQ, PREFIX_MESH};
use crate::metrics::{Metrics, ResultLabel, StateLabel};
use nicwarden_lease::ledger::{
    Effect, ErrorKind, LeaseRecord, LeaseStatus, LeaseTerms, Ledger, LedgerConfig, LedgerError,
    NodeRecord,
};
use nicwarden_lease::quota::{Algorithm, QuotaTree};
use nicwarden_lease::{Directive, Floor, LeaseId, Scope, Time, Usage};
use nicwarden_pki::{ControllerIdentity, JoinToken};
use nicwarden_proto::pb;
use nicwarden_store::{AuditLog, Op, SqliteStore, Store, StoreError, Txn};
use nicwarden_telemetry::{ScopeState, Severity, Telemetry, Terms};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, Notify};

/// How long additions to the mesh wait so that one plan covers a burst of grants.
pub const MESH_COALESCE: std::time::Duration = std::time::Duration::from_millis(50);

const KEY_TREE: &str = "/tree";
const KEY_NEXT_LEASE: &str = "/meta/next_lease_id";
const PREFIX_NODES: &str = "/nodes/";
const PREFIX_LEASES: &str = "/leases/";
const PREFIX_TOKENS: &str = "/tokens/";
const PREFIX_ENROLL: &str = "/enroll/";

fn values<T>(kvs: Vec<(String, T)>) -> Vec<T> {
    kvs.into_iter().map(|(_, v)| v).collect()
}

fn lease_key(id: LeaseId) -> String {
    format!("{PREFIX_LEASES}{:020}", id.0)
}

/// Wall-clock milliseconds since the Unix epoch (the controller's records outlive restarts,
/// so they use wall time; agents never use it to compute deadlines).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An error at the API edge: a status class and a message for the operator.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ApiErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    Invalid,
    NotFound,
    Conflict,
    Forbidden,
    Unauthenticated,
    Internal,
}

impl ApiError {
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Invalid, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::NotFound, m)
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        let kind = match e.kind() {
            ErrorKind::Invalid => ApiErrorKind::Invalid,
            ErrorKind::NotFound => ApiErrorKind::NotFound,
            ErrorKind::Conflict => ApiErrorKind::Conflict,
            ErrorKind::Forbidden => ApiErrorKind::Forbidden,
            ErrorKind::Corrupt => ApiErrorKind::Internal,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::new(ApiErrorKind::Internal, e.to_string())
    }
}

/// A one-time join token as stored (only the hash of its secret).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub node: String,
    pub secret_hash: String,
    pub expires_at_unix_ms: u64,
    pub used_at_unix_ms: Option<u64>,
}

/// The certificate a node enrolled with; only this certificate may open its session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollmentRecord {
    pub node: String,
    pub cert_fingerprint: String,
    pub serial: String,
    pub enrolled_at_unix_ms: u64,
    /// The certificate itself (DER, hex): its public key verifies the node's signed link
    /// probes. Absent in records written before interconnect verification: such a node's
    /// probes count as from an unknown identity until it re-enrolls.
    #[serde(default)]
    pub cert_der_hex: Option<String>,
}

/// A connected agent's outbound queue.
struct Session {
    id: u64,
    tx: mpsc::Sender<Result<pb::ControllerMessage, tonic::Status>>,
}

struct Inner {
    ledger: Ledger,
    enrollments: HashMap<String, EnrollmentRecord>,
    sessions: HashMap<String, Session>,
    next_session: u64,
    mesh: MeshState,
}

/// The controller: shared by the gRPC service, the operator API and the expiry timer.
pub struct Controller {
    inner: Mutex<Inner>,
    store: Arc<SqliteStore>,
    identity: Arc<ControllerIdentity>,
    pub metrics: Metrics,
    /// Telemetry, events and their subscribers.
    pub live: Live,
    /// Woken when the ledger's next timeout may have moved earlier.
    pub timer: Notify,
    /// Woken when the mesh has entries to add or refresh (planned [`MESH_COALESCE`] later).
    pub mesh_wake: Notify,
    node_cert_days: u32,
    /// Ask each node for a new WireGuard key this often (0: only on operator request).
    mesh_rotation_ms: u64,
    /// The declared topology and the verifier (its own lock, taken after the ledger's).
    pub(crate) topo: Mutex<crate::topology::TopoState>,
}

fn persist_err(op: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ApiErrorKind::Internal, format!("{op}: persist: {e}"))
}

/// What [`Controller::open`] needs besides the store, the identity and telemetry.
pub struct Settings {
    /// The quota tree's root when the store has none yet.
    pub fabric_capacity_bps: u64,
    pub fabric_algorithm: Algorithm,
    pub ledger: LedgerConfig,
    pub node_cert_days: u32,
    /// Ask each node for a new WireGuard key this often (0: only on operator request).
    pub mesh_rotation_ms: u64,
    pub topology: crate::topology::TopologyConfig,
}

impl Controller {
    /// Loads (or creates) the ledger from the store.
    pub fn open(
        store: Arc<SqliteStore>,
        identity: Arc<ControllerIdentity>,
        settings: Settings,
        live: Live,
    ) -> Result<Self, anyhow::Error> {
        let Settings {
            fabric_capacity_bps,
            fabric_algorithm,
            ledger: ledger_config,
            node_cert_days,
            mesh_rotation_ms,
            topology: topology_cfg,
        } = settings;
        use nicwarden_store::StoreExt;
        let tree: Option<QuotaTree> = store.get_json(KEY_TREE)?;
        let ledger = match tree {
            None => {
                let tree = QuotaTree::new(fabric_capacity_bps, fabric_algorithm);
                store.put_json(KEY_TREE, &tree)?;
                Ledger::new(tree, ledger_config)
            }
            Some(tree) => {
                let nodes: Vec<NodeRecord> = values(store.range_json(PREFIX_NODES)?);
                let leases: Vec<LeaseRecord> = values(store.range_json(PREFIX_LEASES)?);
                let next: u64 = store.get_json(KEY_NEXT_LEASE)?.unwrap_or(1);
                Ledger::restore(tree, ledger_config, nodes, leases, next)?
            }
        };
        let enrollments: Vec<EnrollmentRecord> = values(store.range_json(PREFIX_ENROLL)?);
        let mesh_records: Vec<MeshRecord> = values(store.range_json(PREFIX_MESH)?);
        let mesh_seq: u64 = store.get_json(KEY_MESH_SEQ)?.unwrap_or(1);
        let topo = crate::topology::TopoState::load(&store, topology_cfg)?;
        let ctl = Controller {
            inner: Mutex::new(Inner {
                ledger,
                enrollments: enrollments
                    .into_iter()
                    .map(|e| (e.node.clone(), e))
                    .collect(),
                sessions: HashMap::new(),
                next_session: 1,
                mesh: MeshState::new(mesh_records, mesh_seq),
            }),
            store,
            identity,
            metrics: Metrics::new(),
            live,
            timer: Notify::new(),
            mesh_wake: Notify::new(),
            topo: Mutex::new(topo),
            node_cert_days,
            mesh_rotation_ms,
        };
        {
            let inner = ctl.lock();
            ctl.update_lease_gauges(&inner);
            // The charts' leased-rate lines start from what is active now.
            let now = now_ms();
            let mut tele = ctl.live.telemetry();
            for l in inner.ledger.leases().filter(|l| l.status.is_active()) {
                note_lease(&mut tele, now, l);
            }
        }
        Ok(ctl)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic while holding it; the ledger is still consistent
        // with the store (we persist before acting), so carry on with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn identity(&self) -> &ControllerIdentity {
        &self.identity
    }

    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// The certificate (DER) a node enrolled with, if recorded.
    pub(crate) fn node_cert(&self, node: &str) -> Option<Vec<u8>> {
        let inner = self.lock();
        inner
            .enrollments
            .get(node)
            .and_then(|e| e.cert_der_hex.as_deref())
            .and_then(|h| hex::decode(h).ok())
    }

    /// Whether `node` is a (not removed) node of this controller.
    pub(crate) fn has_node(&self, node: &str) -> bool {
        let inner = self.lock();
        inner.ledger.node(node).is_some_and(|n| !n.removed)
    }

    /// Revokes every active lease of `node` (an automatic policy); returns how many.
    pub(crate) fn revoke_node(&self, node: &str, reason: &str) -> usize {
        let ids: Vec<LeaseId> = {
            let inner = self.lock();
            inner.ledger.active_leases_of(node).map(|l| l.id).collect()
        };
        let mut n = 0;
        for id in ids {
            match self.revoke(id, reason) {
                Ok(_) => n += 1,
                Err(e) => {
                    tracing::error!(%node, lease = %id, error = %e, "automatic revocation failed")
                }
            }
        }
        n
    }

    /// Appends an action the controller took by itself to the audit log.
    pub fn audit_controller(&self, action: &str, detail: serde_json::Value) {
        self.audit("controller", action, detail)
    }

    /// Appends an operator action to the audit log.
    pub fn audit_operator(&self, action: &str, detail: serde_json::Value) {
        self.audit("operator", action, detail)
    }

    fn audit(&self, actor: &str, action: &str, detail: serde_json::Value) {
        if let Err(e) = self.store.append(now_ms(), actor, action, detail) {
            tracing::error!(error = %e, action, "audit log append failed");
        }
    }

    /// Persists what the ledger changed, plus `extra` ops, in one transaction.
    fn persist(&self, inner: &mut Inner, op: &str, extra: Vec<Op>) -> Result<(), ApiError> {
        let dirty = inner.ledger.take_dirty();
        if dirty.is_empty() && extra.is_empty() {
            return Ok(());
        }
        let mut txn = Txn::new();
        for n in &dirty.nodes {
            let v = serde_json::to_vec(n).map_err(|e| persist_err(op, e))?;
            txn = txn.then(Op::Put(format!("{PREFIX_NODES}{}", n.name), v));
        }
        for l in &dirty.leases {
            let v = serde_json::to_vec(l).map_err(|e| persist_err(op, e))?;
            txn = txn.then(Op::Put(lease_key(l.id), v));
        }
        if let Some(tree) = &dirty.tree {
            let v = serde_json::to_vec(tree).map_err(|e| persist_err(op, e))?;
            txn = txn.then(Op::Put(KEY_TREE.into(), v));
        }
        let v = serde_json::to_vec(&dirty.next_lease_id).map_err(|e| persist_err(op, e))?;
        txn = txn.then(Op::Put(KEY_NEXT_LEASE.into(), v));
        for o in extra {
            txn = txn.then(o);
        }
        self.store.txn(txn).map_err(|e| persist_err(op, e))?;
        Ok(())
    }

    /// Signs and pushes directives to connected agents; records expirations.
    fn dispatch(&self, inner: &mut Inner, effects: Vec<Effect>) {
        let now = now_ms();
        let removal = effects.iter().any(|e| {
            matches!(
                e,
                Effect::Send(Directive::Revoke(_)) | Effect::Expired { .. }
            )
        });
        for eff in effects {
            match eff {
                Effect::Send(d) => {
                    let node = d.node().to_string();
                    {
                        let mut tele = self.live.telemetry();
                        match &d {
                            Directive::Lease(l) => {
                                if let Some(rec) = inner.ledger.lease(l.id) {
                                    note_lease(&mut tele, now, rec);
                                }
                            }
                            Directive::Revoke(r) => note_floor(
                                &mut tele,
                                now,
                                &r.node,
                                &r.scope.to_string(),
                                r.floor.rate_bps,
                            ),
                        }
                    }
                    let signed =
                        nicwarden_proto::sign_directive(&d, |m| self.identity.lease_key.sign(m));
                    let msg = pb::ControllerMessage {
                        msg: Some(pb::controller_message::Msg::Directive(signed)),
                    };
                    if let Some(s) = inner.sessions.get(&node) {
                        match s.tx.try_send(Ok(msg)) {
                            Ok(()) => {
                                self.metrics.directives_sent.inc();
                            }
                            Err(e) => {
                                // The agent is not reading: drop its session; it will
                                // reconnect and be resynchronised.
                                tracing::warn!(%node, error = %e, "agent queue full or closed; dropping session");
                                inner.sessions.remove(&node);
                                self.metrics
                                    .agents_connected
                                    .set(inner.sessions.len() as i64);
                            }
                        }
                    }
                    if let Directive::Revoke(r) = &d {
                        tracing::info!(node = %r.node, lease = %r.lease_id, seq = r.seq, reason = %r.reason, "lease revoked");
                    }
                }
                Effect::Expired { lease, node } => {
                    self.metrics.lease_expirations.inc();
                    tracing::warn!(%node, %lease, "lease expired without renewal");
                    let rec = inner.ledger.lease(lease);
                    let scope = rec.map(|r| r.terms.scope.to_string());
                    if let Some(r) = rec {
                        note_floor(
                            &mut self.live.telemetry(),
                            now,
                            &node,
                            &r.terms.scope.to_string(),
                            r.terms.floor.rate_bps,
                        );
                    }
                    self.live.event(
                        "lease.expired",
                        Severity::Warning,
                        Some(&node),
                        Some(lease.0),
                        scope.as_deref(),
                        format!(
                            "lease {lease} of {node} {} expired: not renewed before its deadline; the node is at its floor",
                            scope.as_deref().unwrap_or("?")
                        ),
                    );
                    self.audit(
                        "controller",
                        "lease.expired",
                        serde_json::json!({"lease": lease.0, "node": node}),
                    );
                }
            }
        }
        self.update_lease_gauges(inner);
        self.timer.notify_one();
        // A revocation or a lapse may take a node out of its peers' sets: planned at once,
        // in the same lock. Grants and renewals only add or refresh: coalesced.
        if removal {
            self.mesh_sync(inner);
        } else {
            self.mesh_wake.notify_one();
        }
    }

    fn update_lease_gauges(&self, inner: &Inner) {
        let (mut a, mut r, mut e) = (0i64, 0i64, 0i64);
        for l in inner.ledger.leases() {
            match l.status {
                LeaseStatus::Active => a += 1,
                LeaseStatus::Revoked { .. } => r += 1,
                LeaseStatus::Expired { .. } => e += 1,
            }
        }
        for (state, v) in [("active", a), ("revoked", r), ("expired", e)] {
            self.metrics
                .leases
                .get_or_create(&StateLabel { state })
                .set(v);
        }
    }

    /// Runs the ledger's expiry for `now`; returns when the next timeout is due.
    pub fn tick(&self) -> Option<Time> {
        let mut inner = self.lock();
        let effects = inner.ledger.handle_timeout(Time(now_ms()));
        if !effects.is_empty() {
            if let Err(e) = self.persist(&mut inner, "expire leases", vec![]) {
                tracing::error!(error = %e, "persisting expirations failed");
            }
            self.dispatch(&mut inner, effects);
        }
        inner.ledger.poll_timeout()
    }

    /// Applies one ledger operation at the current time: persist what changed, then
    /// dispatch its effects. Nothing is sent if persisting fails.
    fn mutate<R>(
        &self,
        op: &str,
        f: impl FnOnce(&mut Ledger, Time) -> Result<(R, Vec<Effect>), LedgerError>,
    ) -> Result<R, ApiError> {
        let mut inner = self.lock();
        let (r, effects) = f(&mut inner.ledger, Time(now_ms()))?;
        self.persist(&mut inner, op, vec![])?;
        self.dispatch(&mut inner, effects);
        Ok(r)
    }

    // ---- nodes -------------------------------------------------------------------------

    fn new_token(&self, node: &str, ttl_s: u64) -> (JoinToken, TokenRecord) {
        let token = JoinToken::generate(self.identity.ca_fingerprint());
        let rec = TokenRecord {
            id: token.id.clone(),
            node: node.to_string(),
            secret_hash: token.secret_hash(),
            expires_at_unix_ms: now_ms().saturating_add(ttl_s.saturating_mul(1000)),
            used_at_unix_ms: None,
        };
        (token, rec)
    }

    fn token_op(rec: &TokenRecord) -> Result<Op, ApiError> {
        let v = serde_json::to_vec(rec).map_err(|e| persist_err("store token", e))?;
        Ok(Op::Put(format!("{PREFIX_TOKENS}{}", rec.id), v))
    }

    pub fn add_node(&self, req: AddNodeRequest) -> Result<AddNodeResponse, ApiError> {
        nicwarden_pki::validate_node_name(&req.name)
            .map_err(|e| ApiError::invalid(format!("add node: {e}")))?;
        let ttl_s = req.token_ttl_s.unwrap_or(3600);
        if ttl_s == 0 || ttl_s > 7 * 24 * 3600 {
            return Err(ApiError::invalid(
                "add node: token_ttl_s must be between 1 and 604800 (7 days)",
            ));
        }
        let mut inner = self.lock();
        let group = req.group.unwrap_or_else(|| "default".into());
        let capacity = match req.capacity_bps {
            Some(0) => return Err(ApiError::invalid("add node: capacity_bps must be > 0")),
            Some(c) => c,
            None => inner
                .ledger
                .tree()
                .groups
                .get(&group)
                .map(|g| g.capacity_bps)
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "add node {}: group `{group}` does not exist (create it with `nicwarden quota set {group} --capacity RATE`)",
                        req.name
                    ))
                })?,
        };
        inner.ledger.add_node(&req.name, &group, capacity)?;
        let (token, rec) = self.new_token(&req.name, ttl_s);
        let op = Self::token_op(&rec)?;
        self.persist(&mut inner, "add node", vec![op])?;
        drop(inner);
        self.audit(
            "operator",
            "node.add",
            serde_json::json!({"node": req.name, "group": group, "capacity_bps": capacity}),
        );
        self.live.telemetry().mark_changed(&req.name);
        self.live.event(
            "node.added",
            Severity::Info,
            Some(&req.name),
            None,
            None,
            format!(
                "node {} added to group {group}; waiting for its agent to enroll",
                req.name
            ),
        );
        Ok(AddNodeResponse {
            name: req.name,
            join_token: token.encode(),
            token_expires_at_unix_ms: rec.expires_at_unix_ms,
        })
    }

    /// A fresh one-time token for an existing node (re-enrollment with a new key).
    pub fn node_token(&self, name: &str, ttl_s: Option<u64>) -> Result<AddNodeResponse, ApiError> {
        let inner = self.lock();
        match inner.ledger.node(name) {
            Some(n) if !n.removed => {}
            _ => {
                return Err(ApiError::not_found(format!(
                    "node token: node {name} not found"
                )))
            }
        }
        drop(inner);
        let (token, rec) = self.new_token(name, ttl_s.unwrap_or(3600));
        self.store.txn(Txn::new().then(Self::token_op(&rec)?))?;
        self.audit("operator", "node.token", serde_json::json!({"node": name}));
        Ok(AddNodeResponse {
            name: name.to_string(),
            join_token: token.encode(),
            token_expires_at_unix_ms: rec.expires_at_unix_ms,
        })
    }

    fn node_view(&self, inner: &Inner, rec: &NodeRecord) -> NodeView {
        let q = inner.ledger.tree().nodes.get(&rec.name);
        let enr = inner.enrollments.get(&rec.name);
        NodeView {
            name: rec.name.clone(),
            group: q.map(|q| q.group.clone()).unwrap_or_default(),
            capacity_bps: q.map(|q| q.capacity_bps).unwrap_or(0),
            enrolled: enr.is_some(),
            connected: inner.sessions.contains_key(&rec.name),
            cert_fingerprint: enr.map(|e| e.cert_fingerprint.clone()),
            enrolled_at_unix_ms: enr.map(|e| e.enrolled_at_unix_ms),
            last_seq: rec.last_seq,
            active_leases: inner
                .ledger
                .leases()
                .filter(|l| l.node == rec.name && l.status.is_active())
                .count(),
            record: rec.clone(),
            mesh: self.mesh_view(inner, &rec.name),
        }
    }

    pub fn list_nodes(&self) -> Vec<NodeView> {
        let inner = self.lock();
        inner
            .ledger
            .nodes()
            .filter(|n| !n.removed)
            .map(|n| self.node_view(&inner, n))
            .collect()
    }

    pub fn get_node(&self, name: &str) -> Result<NodeView, ApiError> {
        let inner = self.lock();
        match inner.ledger.node(name) {
            Some(n) if !n.removed => Ok(self.node_view(&inner, n)),
            _ => Err(ApiError::not_found(format!("node {name} not found"))),
        }
    }

    pub fn remove_node(&self, name: &str) -> Result<NodeView, ApiError> {
        let mut inner = self.lock();
        let effects = inner.ledger.remove_node(Time(now_ms()), name)?;
        let view = inner
            .ledger
            .node(name)
            .map(|n| self.node_view(&inner, n))
            .ok_or_else(|| ApiError::not_found(format!("node {name} not found")))?;
        inner.enrollments.remove(name);
        self.persist(
            &mut inner,
            "remove node",
            vec![Op::Delete(format!("{PREFIX_ENROLL}{name}"))],
        )?;
        // Push the revocations before cutting the session, then close it: its certificate
        // is no longer accepted.
        self.dispatch(&mut inner, effects);
        inner.sessions.remove(name);
        self.metrics
            .agents_connected
            .set(inner.sessions.len() as i64);
        drop(inner);
        self.audit("operator", "node.remove", serde_json::json!({"node": name}));
        let scopes: Vec<String> = {
            let mut tele = self.live.telemetry();
            let s = tele.scopes(name).into_iter().map(str::to_string).collect();
            tele.remove_node(name);
            s
        };
        if let Err(e) = self.live.db().delete_node(name) {
            tracing::warn!(node = %name, error = %e, "deleting the node's telemetry history failed");
        }
        self.metrics.forget_node(name, &scopes);
        self.live.event(
            "node.removed",
            Severity::Warning,
            Some(name),
            None,
            None,
            format!("node {name} removed: its leases are revoked and its certificate refused"),
        );
        Ok(view)
    }

    // ---- enrollment ---------------------------------------------------------------------

    /// Exchanges a one-time token and a CSR for a node certificate.
    pub fn enroll(
        &self,
        node: &str,
        token: &str,
        csr_pem: &str,
    ) -> Result<pb::EnrollResponse, ApiError> {
        let res = self.enroll_inner(node, token, csr_pem);
        let result = if res.is_ok() { "ok" } else { "refused" };
        self.metrics
            .enrollments
            .get_or_create(&ResultLabel { result })
            .inc();
        match &res {
            Ok(_) => {
                self.audit("agent", "node.enroll", serde_json::json!({"node": node}));
                self.live.event(
                    "node.enrolled",
                    Severity::Info,
                    Some(node),
                    None,
                    None,
                    format!("node {node} enrolled: certificate issued"),
                );
            }
            Err(e) => {
                tracing::warn!(%node, error = %e, "enrollment refused");
                self.live.event(
                    "node.enroll_refused",
                    Severity::Warning,
                    Some(node).filter(|n| nicwarden_pki::validate_node_name(n).is_ok()),
                    None,
                    None,
                    format!("enrollment as {node} refused: {e}"),
                );
                self.audit(
                    "agent",
                    "node.enroll.refused",
                    serde_json::json!({"node": node, "error": e.message}),
                );
            }
        }
        res
    }

    fn enroll_inner(
        &self,
        node: &str,
        token: &str,
        csr_pem: &str,
    ) -> Result<pb::EnrollResponse, ApiError> {
        let forbidden = |m: String| ApiError::new(ApiErrorKind::Forbidden, m);
        let token =
            JoinToken::parse(token).map_err(|e| ApiError::invalid(format!("enroll: {e}")))?;
        let key = format!("{PREFIX_TOKENS}{}", token.id);
        let kv = self
            .store
            .get(&key)?
            .ok_or_else(|| forbidden("enroll: unknown join token".into()))?;
        let rec: TokenRecord = serde_json::from_slice(&kv.value).map_err(|e| {
            ApiError::new(ApiErrorKind::Internal, format!("enroll: token record: {e}"))
        })?;
        if !nicwarden_pki::token_secret_matches(&rec.secret_hash, &token.secret) {
            return Err(forbidden("enroll: unknown join token".into()));
        }
        if rec.used_at_unix_ms.is_some() {
            return Err(forbidden("enroll: join token was already used".into()));
        }
        let now = now_ms();
        if now >= rec.expires_at_unix_ms {
            return Err(forbidden("enroll: join token has expired; ask the operator for a new one (`nicwarden node token NAME`)".into()));
        }
        if rec.node != node {
            return Err(forbidden(format!(
                "enroll: join token is for node {}, not {node}",
                rec.node
            )));
        }
        {
            let inner = self.lock();
            match inner.ledger.node(node) {
                Some(n) if !n.removed => {}
                _ => return Err(forbidden(format!("enroll: node {node} was removed"))),
            }
        }
        let (cert_pem, serial) = self
            .identity
            .issue_node_cert(node, csr_pem, self.node_cert_days)
            .map_err(|e| ApiError::invalid(format!("enroll: {e}")))?;
        let der = {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
                ApiError::new(
                    ApiErrorKind::Internal,
                    format!("enroll: issued certificate: {e}"),
                )
            })?
        };
        let (_, fingerprint) = nicwarden_pki::node_identity_from_cert(&der)
            .map_err(|e| ApiError::new(ApiErrorKind::Internal, format!("enroll: {e}")))?;
        let enr = EnrollmentRecord {
            node: node.to_string(),
            cert_fingerprint: fingerprint,
            serial,
            enrolled_at_unix_ms: now,
            cert_der_hex: Some(hex::encode(der.as_ref())),
        };
        let used = TokenRecord {
            used_at_unix_ms: Some(now),
            ..rec
        };
        // Compare-and-swap on the token's revision: two concurrent enrollments with the
        // same token cannot both succeed.
        let resp = self.store.txn(
            Txn::new()
                .when(nicwarden_store::Compare::ModRevision(
                    key.clone(),
                    kv.mod_revision,
                ))
                .then(Self::token_op(&used)?)
                .then(Op::Put(
                    format!("{PREFIX_ENROLL}{node}"),
                    serde_json::to_vec(&enr).map_err(|e| persist_err("enroll", e))?,
                )),
        )?;
        if !resp.succeeded {
            return Err(forbidden("enroll: join token was already used".into()));
        }
        let mut inner = self.lock();
        inner.enrollments.insert(node.to_string(), enr);
        if let Some(rec) = inner
            .mesh
            .records
            .get(node)
            .filter(|r| r.tampered.is_some())
        {
            // Re-enrolled by the operator's new token: the node may come back, with a new key
            // (its old ones stay retired).
            let rec = MeshRecord {
                tampered: None,
                ..rec.clone()
            };
            let v = serde_json::to_vec(&rec).map_err(|e| persist_err("enroll", e))?;
            self.store
                .txn(Txn::new().then(Op::Put(format!("{PREFIX_MESH}{node}"), v)))
                .map_err(|e| persist_err("enroll", e))?;
            inner.mesh.records.insert(node.to_string(), rec);
        }
        // A re-enrolled node's old session (old certificate) is cut.
        inner.sessions.remove(node);
        Ok(pb::EnrollResponse {
            cert_pem,
            ca_pem: self.identity.ca_cert_pem.clone(),
            lease_public_key: self.identity.lease_key.public_key().to_vec(),
        })
    }

    // ---- sessions -----------------------------------------------------------------------

    /// Checks a session's certificate identity and registers its queue; pushes the node's
    /// active leases re-issued with fresh sequence numbers.
    pub fn connect(
        &self,
        cert_node: &str,
        fingerprint: &str,
        hello: &pb::Hello,
        tx: mpsc::Sender<Result<pb::ControllerMessage, tonic::Status>>,
    ) -> Result<u64, tonic::Status> {
        let mut inner = self.lock();
        let refuse = |m: String| {
            self.metrics.session_refusals.inc();
            tracing::warn!(node = %cert_node, "session refused: {m}");
            self.live.event(
                "agent.refused",
                Severity::Warning,
                Some(cert_node),
                None,
                None,
                format!("session of {cert_node} refused: {m}"),
            );
            Err(tonic::Status::permission_denied(m))
        };
        if hello.node != cert_node {
            return refuse(format!(
                "certificate is for node {cert_node} but the agent says it is {}",
                hello.node
            ));
        }
        if !hello.tamper_reason.is_empty()
            && inner
                .mesh
                .records
                .get(cert_node)
                .is_none_or(|r| r.tampered.is_none())
            && inner
                .enrollments
                .get(cert_node)
                .is_some_and(|e| e.cert_fingerprint == fingerprint)
        {
            // Tampered while it could not tell us: record it now, then refuse the session.
            drop(inner);
            self.tamper(
                cert_node,
                &hello.tamper_reason,
                hello.tamper_detected_unix_ms,
            );
            return Err(tonic::Status::permission_denied(format!(
                "node {cert_node} is tampered ({}): recorded; re-enroll it with a new join token",
                hello.tamper_reason
            )));
        }
        if let Some(t) = inner
            .mesh
            .records
            .get(cert_node)
            .and_then(|r| r.tampered.as_ref())
        {
            let m = format!(
                "node {cert_node} was tampered ({}); only re-enrollment with a new join token (`nicwarden node token {cert_node}`) brings it back",
                t.reason
            );
            return refuse(m);
        }
        match inner.enrollments.get(cert_node) {
            Some(e) if e.cert_fingerprint == fingerprint => {}
            Some(_) => {
                return refuse(format!(
                    "certificate of {cert_node} is not its current one (re-enrolled since)"
                ))
            }
            None => return refuse(format!("node {cert_node} is not enrolled (removed?)")),
        }
        let id = inner.next_session;
        inner.next_session += 1;
        inner
            .sessions
            .insert(cert_node.to_string(), Session { id, tx });
        self.metrics
            .agents_connected
            .set(inner.sessions.len() as i64);
        let (mesh_refused, rotated) = match hello.mesh.as_ref().map(|m| {
            nicwarden_proto::mesh_info_from_pb(m)
                .map_err(|e| ApiError::invalid(format!("mesh identity of {cert_node}: {e}")))
                .and_then(|info| self.set_mesh_identity(&mut inner, cert_node, &info))
        }) {
            Some(Err(e)) => (Some(e.message), false),
            Some(Ok(rotated)) => (None, rotated),
            None => (None, false),
        };
        let effects = inner.ledger.resync(Time(now_ms()), cert_node);
        if let Err(e) = self.persist(&mut inner, "resync", vec![]) {
            inner.sessions.remove(cert_node);
            return Err(tonic::Status::internal(e.message));
        }
        // Its entry reaches its peers with the next (coalesced) plan; a key that changed
        // while it was away is replaced at its peers now, the old one retired.
        self.dispatch(&mut inner, effects);
        if rotated {
            self.mesh_sync(&mut inner);
        }
        if let Some(m) = &mesh_refused {
            let msg = pb::ControllerMessage {
                msg: Some(pb::controller_message::Msg::Error(pb::SessionError {
                    message: m.clone(),
                    lease_id: 0,
                })),
            };
            self.push(&mut inner, cert_node, msg);
        } else if hello.mesh.is_some() {
            self.mesh_snapshot(&mut inner, cert_node);
        }
        drop(inner);
        if let Some(m) = mesh_refused {
            tracing::warn!(node = %cert_node, "mesh identity refused: {m}");
            self.live.event(
                "mesh.identity_refused",
                Severity::Warning,
                Some(cert_node),
                None,
                None,
                m,
            );
        }
        tracing::info!(node = %cert_node, session = id, agent_last_seq = hello.last_seq, "agent connected");
        self.live.telemetry().mark_changed(cert_node);
        self.live.event(
            "agent.connected",
            Severity::Info,
            Some(cert_node),
            None,
            None,
            format!(
                "agent of {cert_node} connected (version {})",
                if hello.agent_version.is_empty() {
                    "unknown"
                } else {
                    &hello.agent_version
                }
            ),
        );
        Ok(id)
    }

    pub fn disconnect(&self, node: &str, session: u64) {
        let mut inner = self.lock();
        if inner.sessions.get(node).map(|s| s.id) == Some(session) {
            inner.sessions.remove(node);
            self.metrics
                .agents_connected
                .set(inner.sessions.len() as i64);
            drop(inner);
            tracing::info!(%node, session, "agent disconnected");
            self.live.telemetry().mark_changed(node);
            self.live.event(
                "agent.disconnected",
                Severity::Warning,
                Some(node),
                None,
                None,
                format!("agent of {node} disconnected; its leases lapse at their deadlines unless it reconnects"),
            );
        }
    }

    /// Drops every session (shutdown): agents see their streams end and reconnect later.
    pub fn close_all_sessions(&self) {
        let mut inner = self.lock();
        inner.sessions.clear();
        self.metrics.agents_connected.set(0);
    }

    /// Whether `session` is still the node's current session.
    pub fn session_current(&self, node: &str, session: u64) -> bool {
        self.lock().sessions.get(node).map(|s| s.id) == Some(session)
    }

    /// An agent renews one of its leases.
    pub fn renew(&self, node: &str, id: LeaseId) -> Result<(), ApiError> {
        self.mutate("renew", |l, now| Ok(((), l.renew(now, node, id)?)))?;
        self.lease_event("lease.renewed", Severity::Info, id, "renewed by its agent");
        Ok(())
    }

    /// The operator renews a lease: it is re-issued now with a fresh deadline, as if its
    /// agent had asked.
    pub fn renew_by_operator(&self, id: LeaseId) -> Result<LeaseView, ApiError> {
        let node = self.get_lease(id)?.record.node;
        self.mutate("renew", |l, now| Ok(((), l.renew(now, &node, id)?)))?;
        self.audit(
            "operator",
            "lease.renew",
            serde_json::json!({"lease": id.0}),
        );
        self.lease_event(
            "lease.renewed",
            Severity::Info,
            id,
            "renewed by the operator",
        );
        self.get_lease(id)
    }

    /// Emits a lease event whose message names the lease, its node and scope.
    fn lease_event(&self, kind: &str, severity: Severity, id: LeaseId, what: &str) {
        let (node, scope, rate) = {
            let inner = self.lock();
            match inner.ledger.lease(id) {
                Some(r) => (r.node.clone(), r.terms.scope.to_string(), r.rate_bps),
                None => return,
            }
        };
        self.live.event(
            kind,
            severity,
            Some(&node),
            Some(id.0),
            Some(&scope),
            format!("lease {id} of {node} {scope} ({}): {what}", fmt_rate(rate)),
        );
    }

    pub fn record_usage(&self, node: &str, report: &pb::UsageReport) {
        let mut inner = self.lock();
        let mut exhausted = Vec::new();
        for s in &report.scopes {
            if s.lease_id == 0 {
                continue;
            }
            let usage = Usage {
                bytes: s.bytes,
                packets: s.packets,
                dropped_packets: s.dropped_packets,
            };
            let id = LeaseId(s.lease_id);
            let was_exhausted = inner.ledger.lease(id).is_some_and(|r| r.volume_exhausted());
            if let Err(e) = inner.ledger.record_usage(node, id, usage) {
                tracing::debug!(%node, error = %e, "usage report ignored");
                continue;
            }
            // The agent's datapath reached the lease's volume (its kernel quota now drops):
            // record the event once, when the reported usage first reaches the volume.
            if let Some(rec) = inner.ledger.lease(id) {
                if !was_exhausted && rec.volume_exhausted() {
                    exhausted.push((id, rec.terms.scope.to_string(), rec.usage.bytes));
                }
            }
        }
        // Usage is not persisted here but by `flush_usage` every few seconds (and with any
        // other change): agents report cumulative counters every second, so a controller
        // that crashes relearns them from the next report, and 1,000 agents do not cost
        // 1,000 fsyncs a second.
        // The granted rate of each scope that telemetry keeps (same order as `tr.scopes`).
        let tr = telemetry_report(report);
        let leased: Vec<u64> = tr
            .scopes
            .iter()
            .map(|s| {
                s.scope
                    .parse::<Scope>()
                    .ok()
                    .and_then(|sc| inner.ledger.active_lease_for(node, &sc))
                    .map_or(0, |r| r.rate_bps)
            })
            .collect();
        drop(inner);
        let now = now_ms();
        let (ingested, rates) = {
            let mut tele = self.live.telemetry();
            let ingested = tele.ingest(now, node, &tr);
            let rates: HashMap<String, f64> = tele
                .latest(node)
                .into_iter()
                .map(|l| (l.scope.clone(), l.rate_bps))
                .collect();
            (ingested, rates)
        };
        self.metrics.telemetry_reports.inc();
        if ingested.refused > 0 {
            tracing::warn!(%node, refused = ingested.refused, "usage report names too many scopes; extra scopes ignored");
        }
        for (s, leased_bps) in tr.scopes.iter().zip(leased) {
            if let Some(rate) = rates.get(&s.scope) {
                self.metrics.observe_scope(node, s, leased_bps, *rate, now);
            }
        }
        for (id, scope, bytes) in exhausted {
            tracing::info!(%node, lease = %id, %scope, bytes, "lease volume exhausted: the node's datapath now drops this scope");
            self.live.event(
                "lease.exhausted",
                Severity::Warning,
                Some(node),
                Some(id.0),
                Some(&scope),
                format!("lease {id} of {node} {scope}: transfer volume spent ({}); the scope is at its floor", fmt_bytes(bytes)),
            );
            self.metrics.volume_exhausted.inc();
            self.audit(
                node,
                "lease.exhausted",
                serde_json::json!({"lease": id.0, "node": node, "scope": scope, "used_bytes": bytes}),
            );
        }
    }

    /// Persists usage recorded since the last flush (see `record_usage`).
    pub fn flush_usage(&self) {
        let mut inner = self.lock();
        if let Err(e) = self.persist(&mut inner, "record usage", vec![]) {
            tracing::error!(error = %e, "persisting usage failed; retrying at the next flush");
        }
    }

    // ---- leases -------------------------------------------------------------------------

    fn terms(req: &GrantRequest) -> Result<LeaseTerms, ApiError> {
        let scope: Scope = match &req.scope {
            None => Scope::Egress,
            Some(s) => s.parse().map_err(ApiError::invalid)?,
        };
        if req.rate_bps == 0 {
            return Err(ApiError::invalid("rate must be > 0"));
        }
        let secs = |v: f64, what: &str| -> Result<u64, ApiError> {
            if !v.is_finite() || v <= 0.0 || v > 366.0 * 86400.0 {
                return Err(ApiError::invalid(format!(
                    "{what} must be a positive number of seconds (at most a year), got {v}"
                )));
            }
            Ok((v * 1000.0).round() as u64)
        };
        let ttl_ms = secs(req.ttl_s.unwrap_or(30.0), "ttl_s")?;
        let renew_interval_ms = match req.renew_s {
            Some(r) => secs(r, "renew_s")?,
            None => (ttl_ms / 3).max(1),
        };
        let burst_bytes = req
            .burst_bytes
            .unwrap_or_else(|| (req.rate_bps / 8 / 100).max(16 * 1024));
        Ok(LeaseTerms {
            scope,
            want_bps: req.rate_bps,
            burst_bytes,
            volume_bytes: req.volume_bytes,
            ttl_ms,
            renew_interval_ms,
            floor: Floor {
                rate_bps: req.floor_bps.unwrap_or(0),
            },
        })
    }

    fn lease_view(rec: &LeaseRecord, now: u64) -> LeaseView {
        let state = match rec.status {
            LeaseStatus::Active => "active",
            LeaseStatus::Revoked { .. } => "revoked",
            LeaseStatus::Expired { .. } => "expired",
        };
        LeaseView {
            state: state.into(),
            volume_exhausted: rec.volume_exhausted(),
            expires_in_ms: rec
                .status
                .is_active()
                .then(|| Time(now).millis_until(rec.expires_at)),
            record: rec.clone(),
        }
    }

    /// A `peer:NODE` scope must name another node the controller knows.
    fn check_peer(&self, node: &str, scope: &Scope) -> Result<(), ApiError> {
        if let Scope::Peer(p) = scope {
            if p == node {
                return Err(ApiError::invalid(format!(
                    "scope peer:{p}: a node cannot be its own peer"
                )));
            }
            match self.lock().ledger.node(p) {
                Some(n) if !n.removed => {}
                _ => {
                    return Err(ApiError::invalid(format!(
                        "scope peer:{p}: no node {p} (add it first with `nicwarden node add {p}`)"
                    )))
                }
            }
        }
        Ok(())
    }

    pub fn grant(&self, req: GrantRequest) -> Result<LeaseView, ApiError> {
        let started = std::time::Instant::now();
        let terms = Self::terms(&req)?;
        self.check_peer(&req.node, &terms.scope)?;
        let id = self.mutate("grant", |l, now| l.grant(now, &req.node, terms))?;
        let view = self.get_lease(id)?;
        self.metrics
            .grant_duration
            .observe(started.elapsed().as_secs_f64());
        self.audit(
            "operator",
            "lease.grant",
            serde_json::json!({"lease": id.0, "node": req.node, "scope": view.record.terms.scope.to_string(), "rate_bps": view.record.rate_bps}),
        );
        let what = match view.record.terms.volume_bytes {
            Some(v) => format!(
                "granted, {} of volume, {} s per issuance",
                fmt_bytes(v),
                view.record.terms.ttl_ms / 1000
            ),
            None => format!(
                "granted, {} s per issuance",
                view.record.terms.ttl_ms / 1000
            ),
        };
        self.lease_event("lease.granted", Severity::Info, id, &what);
        Ok(view)
    }

    pub fn amend(&self, id: LeaseId, req: GrantRequest) -> Result<LeaseView, ApiError> {
        let terms = Self::terms(&req)?;
        self.check_peer(&req.node, &terms.scope)?;
        let current = self.get_lease(id)?;
        if current.record.node != req.node {
            return Err(ApiError::invalid(format!(
                "change lease {id}: it belongs to node {}, not {}",
                current.record.node, req.node
            )));
        }
        self.mutate("change lease", |l, now| Ok(((), l.amend(now, id, terms)?)))?;
        let view = self.get_lease(id)?;
        self.audit(
            "operator",
            "lease.change",
            serde_json::json!({"lease": id.0}),
        );
        self.lease_event(
            "lease.changed",
            Severity::Info,
            id,
            "terms changed by the operator",
        );
        Ok(view)
    }

    pub fn revoke(&self, id: LeaseId, reason: &str) -> Result<LeaseView, ApiError> {
        self.mutate("revoke", |l, now| Ok(((), l.revoke(now, id, reason)?)))?;
        let view = self.get_lease(id)?;
        self.audit(
            "operator",
            "lease.revoke",
            serde_json::json!({"lease": id.0, "reason": reason}),
        );
        self.lease_event(
            "lease.revoked",
            Severity::Warning,
            id,
            &format!("revoked: {reason}"),
        );
        Ok(view)
    }

    pub fn get_lease(&self, id: LeaseId) -> Result<LeaseView, ApiError> {
        let inner = self.lock();
        inner
            .ledger
            .lease(id)
            .map(|r| Self::lease_view(r, now_ms()))
            .ok_or_else(|| ApiError::not_found(format!("lease {id} not found")))
    }

    pub fn list_leases(
        &self,
        node: Option<&str>,
        state: Option<&str>,
    ) -> Result<Vec<LeaseView>, ApiError> {
        if let Some(s) = state {
            if !["active", "revoked", "expired"].contains(&s) {
                return Err(ApiError::invalid(format!(
                    "state must be active, revoked or expired, got `{s}`"
                )));
            }
        }
        let inner = self.lock();
        let now = now_ms();
        Ok(inner
            .ledger
            .leases()
            .filter(|l| node.is_none_or(|n| l.node == n))
            .map(|l| Self::lease_view(l, now))
            .filter(|v| state.is_none_or(|s| v.state == s))
            .collect())
    }

    // ---- quota --------------------------------------------------------------------------

    pub fn quota(&self) -> QuotaView {
        let inner = self.lock();
        let mut allocated: BTreeMap<String, u64> = BTreeMap::new();
        let tree = inner.ledger.tree();
        for l in inner.ledger.leases().filter(|l| l.status.is_active()) {
            *allocated.entry(l.node.clone()).or_default() += l.rate_bps;
            if let Some(q) = tree.nodes.get(&l.node) {
                *allocated.entry(q.group.clone()).or_default() += l.rate_bps;
            }
            *allocated.entry("fabric".into()).or_default() += l.rate_bps;
        }
        QuotaView {
            tree: tree.clone(),
            allocated_bps: allocated,
        }
    }

    pub fn set_quota(&self, name: &str, req: SetQuotaRequest) -> Result<QuotaView, ApiError> {
        if req.capacity_bps == 0 {
            return Err(ApiError::invalid("capacity must be > 0"));
        }
        let algorithm: Algorithm = match &req.algorithm {
            None => Algorithm::Static,
            Some(a) => a
                .parse()
                .map_err(|e| ApiError::invalid(format!("algorithm: {e}")))?,
        };
        let mut inner = self.lock();
        let mut tree = inner.ledger.tree().clone();
        let res = if name == "fabric" {
            tree.set_fabric(req.capacity_bps, algorithm)
        } else if let Some(n) = tree.nodes.get(name).cloned() {
            let group = req.group.clone().unwrap_or(n.group);
            tree.set_node(name, &group, req.capacity_bps, algorithm)
        } else if req.group.is_some() {
            return Err(ApiError::not_found(format!(
                "set quota: node {name} not found (add it with `nicwarden node add {name}`)"
            )));
        } else {
            tree.set_group(name, req.capacity_bps, algorithm)
        };
        res.map_err(|e| ApiError::invalid(format!("set quota {name}: {e}")))?;
        let effects = inner.ledger.set_quota(Time(now_ms()), tree)?;
        self.persist(&mut inner, "set quota", vec![])?;
        self.dispatch(&mut inner, effects);
        // A node that changed group leaves its old peers' sets now.
        self.mesh_sync(&mut inner);
        drop(inner);
        self.audit(
            "operator",
            "quota.set",
            serde_json::json!({"name": name, "capacity_bps": req.capacity_bps, "algorithm": algorithm.to_string()}),
        );
        self.live.event(
            "quota.set",
            Severity::Info,
            None,
            None,
            None,
            format!(
                "quota of {name} set to {} ({algorithm})",
                fmt_rate(req.capacity_bps)
            ),
        );
        Ok(self.quota())
    }
}

// ---- live telemetry ---------------------------------------------------------------------

/// `200 Mbit/s`-style rate for event messages.
pub fn fmt_rate(bps: u64) -> String {
    let b = bps as f64;
    // Up to three decimals, without trailing zeros: 200 Mbit/s, 1.5 Gbit/s, 12.345 kbit/s.
    let trim = |v: f64, unit: &str| {
        let t = format!("{v:.3}");
        let t = t.trim_end_matches('0').trim_end_matches('.');
        format!("{t} {unit}")
    };
    if b >= 1e9 {
        trim(b / 1e9, "Gbit/s")
    } else if b >= 1e6 {
        trim(b / 1e6, "Mbit/s")
    } else if b >= 1e3 {
        trim(b / 1e3, "kbit/s")
    } else {
        format!("{bps} bit/s")
    }
}

/// `200 MB`-style byte count (decimal units, like the CLI's).
pub fn fmt_bytes(b: u64) -> String {
    let f = b as f64;
    if f >= 1e12 {
        format!("{:.2} TB", f / 1e12)
    } else if f >= 1e9 {
        format!("{:.2} GB", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2} MB", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.2} kB", f / 1e3)
    } else {
        format!("{b} B")
    }
}

/// Records an active lease's terms as the scope's leased rate from `now`.
fn note_lease(tele: &mut Telemetry, now: u64, l: &LeaseRecord) {
    tele.note_terms(
        &l.node,
        &l.terms.scope.to_string(),
        Terms {
            t_ms: now,
            lease_id: Some(l.id.0),
            leased_bps: l.rate_bps,
            floor_bps: l.terms.floor.rate_bps,
            volume_bytes: l.terms.volume_bytes,
        },
    );
}

/// Records that a scope fell to its floor (lease revoked or expired) at `now`.
fn note_floor(tele: &mut Telemetry, now: u64, node: &str, scope: &str, floor_bps: u64) {
    tele.note_terms(
        node,
        scope,
        Terms {
            t_ms: now,
            lease_id: None,
            leased_bps: 0,
            floor_bps,
            volume_bytes: None,
        },
    );
}

/// The wire report as the telemetry core takes it.
fn telemetry_report(r: &pb::UsageReport) -> nicwarden_telemetry::UsageReport {
    nicwarden_telemetry::UsageReport {
        sample_time_ms: (r.sample_time_ms != 0).then_some(r.sample_time_ms),
        scopes: r
            .scopes
            .iter()
            // A scope the lease core cannot parse is not a scope (bounded, clean labels).
            .filter(|s| s.scope.parse::<Scope>().is_ok())
            .map(|s| nicwarden_telemetry::ReportScope {
                scope: s.scope.clone(),
                lease_id: s.lease_id,
                bytes: s.bytes,
                packets: s.packets,
                dropped_packets: s.dropped_packets,
                state: ScopeState::parse(&s.state),
                deadline_in_ms: (s.deadline_in_ms != 0).then_some(s.deadline_in_ms),
            })
            .collect(),
    }
}

/// A node's overall state from its scopes' (see [`NodeNow::state`]).
fn node_state(scopes: &[ScopeNow]) -> &'static str {
    let leased: Vec<&ScopeNow> = scopes
        .iter()
        .filter(|s| s.lease_id.is_some() || s.state != "none")
        .collect();
    if leased.is_empty() {
        return "none";
    }
    let active = leased.iter().filter(|s| s.state == "active").count();
    if active == leased.len() {
        return "active";
    }
    if active > 0 {
        return "partial";
    }
    for st in ["exhausted", "revoked", "expired", "pending"] {
        if leased.iter().any(|s| s.state == st) {
            return st;
        }
    }
    "none"
}

impl Controller {
    fn node_now(&self, inner: &Inner, tele: &Telemetry, rec: &NodeRecord, now: u64) -> NodeNow {
        let name = rec.name.as_str();
        let connected = inner.sessions.contains_key(name);
        let stale = !connected || tele.is_stale(name, now);
        let mut scopes: BTreeMap<String, ScopeNow> = BTreeMap::new();
        for l in inner.ledger.active_leases_of(name) {
            scopes.insert(
                l.terms.scope.to_string(),
                ScopeNow {
                    scope: l.terms.scope.to_string(),
                    lease_id: Some(l.id.0),
                    state: "pending".into(),
                    leased_bps: l.rate_bps,
                    floor_bps: l.terms.floor.rate_bps,
                    rate_bps: 0.0,
                    bytes: l.usage.bytes,
                    packets: l.usage.packets,
                    dropped_packets: l.usage.dropped_packets,
                    volume_bytes: l.terms.volume_bytes,
                    used_bytes: l.usage.bytes,
                    expires_in_ms: Some(Time(now).millis_until(l.expires_at)),
                },
            );
        }
        let last_report = tele.last_report_ms(name);
        for r in tele.latest(name) {
            // A scope missing from the node's latest report is no longer reported (its
            // lease ended and the agent dropped it): only the ledger's view of it counts.
            if last_report.is_some_and(|t| r.reported_at_ms < t) {
                continue;
            }
            let rate = if stale { 0.0 } else { r.rate_bps };
            match scopes.get_mut(&r.scope) {
                // The report is about the lease the ledger holds: the agent's view of its
                // enforcement is the truth of what the datapath does.
                Some(s) if s.lease_id == r.lease_id => {
                    s.state = r.state.as_str().into();
                    s.rate_bps = rate;
                    s.bytes = r.bytes;
                    s.packets = r.packets;
                    s.dropped_packets = r.dropped_packets;
                    s.used_bytes = s.used_bytes.max(r.bytes);
                }
                // A newer lease the agent has not reported yet: still pending.
                Some(_) => {}
                None => {
                    let floor = tele
                        .current_terms(name, &r.scope)
                        .map(|t| t.floor_bps)
                        .unwrap_or(0);
                    scopes.insert(
                        r.scope.clone(),
                        ScopeNow {
                            scope: r.scope.clone(),
                            lease_id: r.lease_id,
                            // The ledger holds no active lease, whatever the agent said.
                            state: match r.state {
                                ScopeState::Active | ScopeState::Pending => "none".into(),
                                s => s.as_str().into(),
                            },
                            leased_bps: 0,
                            floor_bps: floor,
                            rate_bps: rate,
                            bytes: r.bytes,
                            packets: r.packets,
                            dropped_packets: r.dropped_packets,
                            volume_bytes: None,
                            used_bytes: r.bytes,
                            expires_in_ms: None,
                        },
                    );
                }
            }
        }
        let scopes: Vec<ScopeNow> = scopes.into_values().collect();
        let with_volume: Vec<&ScopeNow> =
            scopes.iter().filter(|s| s.volume_bytes.is_some()).collect();
        NodeNow {
            node: name.to_string(),
            group: inner
                .ledger
                .tree()
                .nodes
                .get(name)
                .map(|q| q.group.clone())
                .unwrap_or_default(),
            connected,
            last_report_unix_ms: tele.last_report_ms(name),
            stale,
            // A tampered node is shown as such whatever its (revoked) leases say.
            state: if inner
                .mesh
                .records
                .get(name)
                .is_some_and(|r| r.tampered.is_some())
            {
                "tampered".into()
            } else {
                node_state(&scopes).into()
            },
            leased_bps: scopes
                .iter()
                .filter(|s| s.lease_id.is_some() && s.leased_bps > 0)
                .map(|s| s.leased_bps)
                .sum(),
            floor_bps: scopes.iter().map(|s| s.floor_bps).sum(),
            rate_bps: scopes.iter().map(|s| s.rate_bps).sum(),
            volume_bytes: (!with_volume.is_empty())
                .then(|| with_volume.iter().filter_map(|s| s.volume_bytes).sum()),
            used_bytes: with_volume.iter().map(|s| s.used_bytes).sum(),
            expires_in_ms: scopes.iter().filter_map(|s| s.expires_in_ms).min(),
            scopes,
        }
    }

    /// Every node, now.
    pub fn fleet(&self) -> FleetView {
        let now = now_ms();
        let inner = self.lock();
        let tele = self.live.telemetry();
        FleetView {
            now_unix_ms: now,
            stale_after_ms: tele.config().stale_after_ms,
            nodes: inner
                .ledger
                .nodes()
                .filter(|n| !n.removed)
                .map(|n| self.node_now(&inner, &tele, n, now))
                .collect(),
        }
    }

    /// The nodes that changed since the last tick (or went stale), for the live stream.
    pub fn live_tick(&self) -> Option<String> {
        let now = now_ms();
        let inner = self.lock();
        let mut tele = self.live.telemetry();
        let changed = tele.take_changed(now);
        self.metrics
            .telemetry_series
            .set(tele.series_count() as i64);
        self.metrics
            .telemetry_memory
            .set(tele.memory_bytes() as i64);
        if changed.is_empty() || self.live.subscribers() == 0 {
            return None;
        }
        let nodes: Vec<NodeNow> = changed
            .iter()
            .filter_map(|n| inner.ledger.node(n).filter(|r| !r.removed))
            .map(|r| self.node_now(&inner, &tele, r, now))
            .collect();
        drop(tele);
        drop(inner);
        serde_json::to_string(&serde_json::json!({"t": now, "nodes": nodes})).ok()
    }

    /// A node's time series (see `GET /v1/telemetry/series`).
    pub fn series(
        &self,
        node: &str,
        scope: Option<&str>,
        since_ms: u64,
        until_ms: u64,
        step_ms: u64,
    ) -> Result<SeriesResponse, ApiError> {
        match self.lock().ledger.node(node) {
            Some(n) if !n.removed => {}
            _ => {
                return Err(ApiError::not_found(format!(
                    "series: node {node} not found"
                )))
            }
        }
        let tele = self.live.telemetry();
        let mut out: BTreeMap<String, SeriesView> = BTreeMap::new();
        let entry = |out: &mut BTreeMap<String, SeriesView>, s: &str| -> SeriesView {
            out.remove(s).unwrap_or_else(|| SeriesView {
                scope: s.to_string(),
                ..Default::default()
            })
        };
        if step_ms == 1000 {
            for (sc, pts) in tele.series(node, scope, since_ms, until_ms) {
                let mut v = entry(&mut out, &sc);
                for p in pts {
                    v.t.push(p.t_ms);
                    v.rate_bps.push(p.rate_bps as f64);
                    v.bytes.push(p.bytes);
                    v.packets.push(p.packets as u64);
                    v.dropped_packets.push(p.dropped_packets as u64);
                    v.state.push(p.state.as_str().into());
                }
                out.insert(sc, v);
            }
        } else {
            let rows = self.live.db().query(node, scope, since_ms, until_ms)?;
            for r in rows {
                let mut v = entry(&mut out, &r.scope);
                v.t.push(r.t_ms);
                v.rate_bps.push(r.bytes as f64 * 8.0 / 60.0);
                v.bytes.push(r.bytes);
                v.packets.push(r.packets);
                v.dropped_packets.push(r.dropped_packets);
                v.state.push(r.state.as_str().into());
                v.peak_rate_bps.push(r.peak_rate_bps);
                out.insert(r.scope.clone(), v);
            }
            for sc in tele.scopes(node) {
                if scope.is_none_or(|s| s == sc) && !out.contains_key(sc) {
                    let v = entry(&mut out, sc);
                    out.insert(sc.to_string(), v);
                }
            }
        }
        for v in out.values_mut() {
            v.leased = tele
                .terms(node, &v.scope, since_ms, until_ms)
                .into_iter()
                .map(|t| TermsPoint {
                    t: t.t_ms,
                    leased_bps: t.leased_bps,
                    floor_bps: t.floor_bps,
                    volume_bytes: t.volume_bytes,
                    lease_id: t.lease_id,
                })
                .collect();
        }
        Ok(SeriesResponse {
            node: node.to_string(),
            step_ms,
            series: out.into_values().collect(),
        })
    }
}

// ---- the encrypted mesh ------------------------------------------------------------------

impl Controller {
    fn mesh_view(&self, inner: &Inner, node: &str) -> Option<MeshView> {
        let rec = inner.mesh.records.get(node)?;
        let published = inner.mesh.planner.published(node);
        Some(MeshView {
            public_key: rec.public_key.map(|k| k.to_string()),
            endpoint: rec.endpoint.map(|e| e.to_string()),
            allowed_ips: rec.allowed_ips.iter().map(|n| n.to_string()).collect(),
            key_since_unix_ms: rec.key_since_unix_ms,
            rotations: rec.rotations,
            published: published.is_some(),
            published_until_unix_ms: published.map(|(_, d)| d.0),
            tampered: rec.tampered.clone(),
            rotation_pending: inner.mesh.rotation_requested.contains_key(node),
        })
    }

    /// Makes sure every mesh seq the planner may hand out next is below a persisted mark.
    fn reserve_mesh_seq(&self, inner: &mut Inner) -> Result<(), ApiError> {
        // The planner takes a seq per update; a plan can produce a few per group, so keep a
        // margin of half a block.
        let next = inner.mesh.planner.next_seq();
        if next + mesh::SEQ_BLOCK / 2 <= inner.mesh.seq_reserved {
            return Ok(());
        }
        let mark = next + mesh::SEQ_BLOCK;
        let v = serde_json::to_vec(&mark).map_err(|e| persist_err("reserve mesh seq", e))?;
        self.store
            .txn(Txn::new().then(Op::Put(KEY_MESH_SEQ.into(), v)))
            .map_err(|e| persist_err("reserve mesh seq", e))?;
        inner.mesh.seq_reserved = mark;
        Ok(())
    }

    fn push(&self, inner: &mut Inner, node: &str, msg: pb::ControllerMessage) -> bool {
        let Some(s) = inner.sessions.get(node) else {
            return false;
        };
        match s.tx.try_send(Ok(msg)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%node, error = %e, "agent queue full or closed; dropping session");
                inner.sessions.remove(node);
                self.metrics
                    .agents_connected
                    .set(inner.sessions.len() as i64);
                false
            }
        }
    }

    fn send_mesh(&self, inner: &mut Inner, to: &[String], update: &nicwarden_mesh::MeshUpdate) {
        let signed = nicwarden_proto::sign_mesh_update(update, |m| self.identity.lease_key.sign(m));
        let msg = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::Mesh(signed)),
        };
        for node in to {
            if self.push(inner, node, msg.clone()) {
                self.metrics.mesh_updates_sent.inc();
            }
        }
        for r in &update.removals {
            tracing::info!(node = %r.node, key = %r.public_key, reason = %r.reason, seq = update.seq, recipients = to.len(), "mesh: peer withdrawn");
        }
    }

    /// Diffs the mesh against what was published and pushes the differences (signed once
    /// per update, the same bytes to every recipient). Called after every ledger change and
    /// every second.
    fn mesh_sync(&self, inner: &mut Inner) {
        let members = mesh::members(&inner.ledger, &inner.mesh.records);
        let out = inner.mesh.planner.plan(&members, Time(now_ms()));
        if out.is_empty() {
            return;
        }
        if let Err(e) = self.reserve_mesh_seq(inner) {
            // Nothing is sent under an unreserved seq; peers' entries lapse by themselves.
            tracing::error!(error = %e, "mesh updates not sent");
            return;
        }
        for o in out {
            self.send_mesh(inner, &o.to, &o.update);
        }
        self.metrics.mesh_published.set(
            members
                .keys()
                .filter(|n| inner.mesh.planner.published(n).is_some())
                .count() as i64,
        );
    }

    /// Plans and pushes the mesh now (the coalescing task).
    pub fn mesh_sync_now(&self) {
        let mut inner = self.lock();
        self.mesh_sync(&mut inner);
    }

    /// The whole current peer set of one node (on connect).
    fn mesh_snapshot(&self, inner: &mut Inner, node: &str) {
        let members = mesh::members(&inner.ledger, &inner.mesh.records);
        let Some(update) = inner.mesh.planner.snapshot(node, &members, Time(now_ms())) else {
            return;
        };
        if let Err(e) = self.reserve_mesh_seq(inner) {
            tracing::error!(error = %e, %node, "mesh snapshot not sent");
            return;
        }
        self.send_mesh(inner, &[node.to_string()], &update);
    }

    /// Records a node's reported WireGuard identity (at connect, or after a rotation) and
    /// publishes it to its peers at once.
    fn set_mesh_identity(
        &self,
        inner: &mut Inner,
        node: &str,
        info: &nicwarden_proto::MeshInfo,
    ) -> Result<bool, ApiError> {
        mesh::check_identity(node, info, &inner.mesh.records).map_err(ApiError::invalid)?;
        let mut rec = inner
            .mesh
            .records
            .get(node)
            .cloned()
            .unwrap_or_else(|| MeshRecord::new(node));
        let rotated = rec.public_key.is_some_and(|k| k != info.public_key);
        if rec.public_key == Some(info.public_key)
            && rec.endpoint == Some(info.endpoint)
            && rec.allowed_ips == info.allowed_ips
        {
            return Ok(false);
        }
        if rotated {
            rec.burn_current();
            rec.rotations += 1;
        }
        if rec.public_key != Some(info.public_key) {
            rec.key_since_unix_ms = now_ms();
        }
        rec.public_key = Some(info.public_key);
        rec.endpoint = Some(info.endpoint);
        rec.allowed_ips = info.allowed_ips.clone();
        let v = serde_json::to_vec(&rec).map_err(|e| persist_err("record mesh identity", e))?;
        self.store
            .txn(Txn::new().then(Op::Put(format!("{PREFIX_MESH}{node}"), v)))
            .map_err(|e| persist_err("record mesh identity", e))?;
        inner.mesh.records.insert(node.to_string(), rec);
        Ok(rotated)
    }

    /// An agent reports a new key after a rotation.
    pub fn mesh_key(&self, node: &str, info: &pb::MeshInfo) -> Result<(), ApiError> {
        let info = nicwarden_proto::mesh_info_from_pb(info)
            .map_err(|e| ApiError::invalid(format!("mesh key of {node}: {e}")))?;
        let mut inner = self.lock();
        let rotated = self.set_mesh_identity(&mut inner, node, &info)?;
        let asked = inner.mesh.rotation_requested.remove(node).is_some();
        self.mesh_sync(&mut inner);
        drop(inner);
        if rotated {
            self.metrics.mesh_rotations.inc();
            self.audit(
                "agent",
                "mesh.key_rotated",
                serde_json::json!({"node": node, "public_key": info.public_key.to_string()}),
            );
            self.live.event(
                "mesh.key_rotated",
                Severity::Info,
                Some(node),
                None,
                None,
                format!(
                    "node {node} rotated its WireGuard key{} (new key {}); its peers were sent the new key",
                    if asked { " as asked" } else { "" },
                    info.public_key
                ),
            );
        }
        Ok(())
    }

    /// Asks a connected node's agent for a new WireGuard key.
    pub fn request_rotation(&self, node: &str, reason: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        match inner.ledger.node(node) {
            Some(n) if !n.removed => {}
            _ => {
                return Err(ApiError::not_found(format!(
                    "rotate key: node {node} not found"
                )))
            }
        }
        if inner
            .mesh
            .records
            .get(node)
            .is_some_and(|r| r.tampered.is_some())
        {
            return Err(ApiError::new(
                ApiErrorKind::Conflict,
                format!("rotate key: node {node} is tampered; re-enroll it with a new join token (`nicwarden node token {node}`)"),
            ));
        }
        if inner
            .mesh
            .records
            .get(node)
            .and_then(|r| r.public_key)
            .is_none()
        {
            return Err(ApiError::new(
                ApiErrorKind::Conflict,
                format!(
                    "rotate key: node {node} has no mesh key yet (its agent has not reported one)"
                ),
            ));
        }
        let msg = pb::ControllerMessage {
            msg: Some(pb::controller_message::Msg::RotateKey(pb::RotateKey {
                reason: reason.to_string(),
            })),
        };
        if !self.push(&mut inner, node, msg) {
            return Err(ApiError::new(
                ApiErrorKind::Conflict,
                format!("rotate key: node {node} is not connected; try again when its agent is"),
            ));
        }
        inner
            .mesh
            .rotation_requested
            .insert(node.to_string(), now_ms());
        Ok(())
    }

    /// The 1-second mesh task: entries whose leases lapsed are withdrawn, renewed ones are
    /// refreshed, and the periodic rotation policy asks nodes whose key is old for a new one.
    pub fn mesh_tick(&self) {
        let mut inner = self.lock();
        self.mesh_sync(&mut inner);
        if self.mesh_rotation_ms == 0 {
            return;
        }
        let now = now_ms();
        let due: Vec<String> = inner
            .mesh
            .records
            .values()
            .filter(|r| r.tampered.is_none() && r.public_key.is_some())
            .filter(|r| now.saturating_sub(r.key_since_unix_ms) >= self.mesh_rotation_ms)
            .filter(|r| inner.sessions.contains_key(&r.node))
            .filter(|r| {
                inner
                    .mesh
                    .rotation_requested
                    .get(&r.node)
                    .is_none_or(|t| now.saturating_sub(*t) >= 30_000)
            })
            .map(|r| r.node.clone())
            .collect();
        drop(inner);
        for node in due {
            if let Err(e) = self.request_rotation(&node, "periodic rotation policy") {
                tracing::info!(%node, error = %e, "periodic key rotation not requested");
            }
        }
    }

    /// A node reports it was tampered with. Its leases are revoked, its key is withdrawn
    /// from every peer (pushed at once), its certificate is refused from now on, and it is
    /// marked tampered: only an operator's re-enrollment (new token, new key) brings it back.
    pub fn tamper(&self, node: &str, reason: &str, detected_unix_ms: u64) {
        let t0 = std::time::Instant::now();
        let mut inner = self.lock();
        let now = now_ms();
        let mut rec = inner
            .mesh
            .records
            .get(node)
            .cloned()
            .unwrap_or_else(|| MeshRecord::new(node));
        if rec.tampered.is_some() {
            return;
        }
        rec.tampered = Some(TamperRecord {
            reason: reason.to_string(),
            at_unix_ms: now,
            detected_unix_ms,
        });
        rec.burn_current();
        let mut effects = Vec::new();
        let active: Vec<LeaseId> = inner.ledger.active_leases_of(node).map(|l| l.id).collect();
        for id in active {
            match inner
                .ledger
                .revoke(Time(now), id, &format!("node tampered: {reason}"))
            {
                Ok(e) => effects.extend(e),
                Err(e) => {
                    tracing::error!(%node, lease = %id, error = %e, "revoking a tampered node's lease failed")
                }
            }
        }
        let v = match serde_json::to_vec(&rec) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(%node, error = %e, "tamper record not serialisable");
                return;
            }
        };
        inner.mesh.records.insert(node.to_string(), rec);
        inner.enrollments.remove(node);
        if let Err(e) = self.persist(
            &mut inner,
            "record tamper",
            vec![
                Op::Put(format!("{PREFIX_MESH}{node}"), v),
                Op::Delete(format!("{PREFIX_ENROLL}{node}")),
            ],
        ) {
            // The in-memory state already refuses the node; say loudly that a restart
            // would forget it.
            tracing::error!(%node, error = %e, "persisting the tamper record failed");
        }
        // Its session ends first (nothing more is sent to it); dispatch() then plans the
        // mesh at once: the removal of its key goes out to every peer now.
        inner.sessions.remove(node);
        self.dispatch(&mut inner, effects);
        self.mesh_sync(&mut inner);
        self.metrics
            .agents_connected
            .set(inner.sessions.len() as i64);
        drop(inner);
        self.metrics.tamper_reports.inc();
        tracing::warn!(%node, %reason, handled_us = t0.elapsed().as_micros() as u64, "node tampered: leases revoked, key withdrawn from its peers, certificate refused");
        self.audit(
            "agent",
            "node.tampered",
            serde_json::json!({"node": node, "reason": reason, "detected_unix_ms": detected_unix_ms}),
        );
        self.live.telemetry().mark_changed(node);
        self.live.event(
            "node.tampered",
            Severity::Critical,
            Some(node),
            None,
            None,
            format!("node {node} reported tampering ({reason}): its leases are revoked, its key is withdrawn from every peer and its certificate refused; re-enroll it with a new join token"),
        );
    }
}

impl Controller {
    /// A node's link-probe rounds (interconnect verification): judged by the topology
    /// verifier (see `topology.rs`).
    pub fn probe_report(&self, node: &str, report: &pb::ProbeReport) {
        crate::topology::probe_report(self, node, report);
    }
}
