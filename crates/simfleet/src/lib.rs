//! A simulated fleet of nicwarden agents that speak the real agent protocol, for load
//! tests, benchmarks and dashboard tests.
//!
//! Each simulated node does what `nicwarden agent` does on the wire, with its keys in
//! memory and no datapath: it gets a join token from the operator API (adding the node
//! first if asked), enrolls (a fresh ECDSA key and CSR; the controller's CA pinned by the
//! token; the lease-signing key pinned from the answer), opens its mutual-TLS session with
//! Hello, verifies every signed directive against the pinned key and feeds it to the real
//! agent lease state machine (`nicwarden_lease::agent::AgentCore`: replay guard, a lease
//! replaces its scope's lease, a revocation is final, deadlines on the node's own monotonic
//! clock), renews each held lease every `renew_interval_ms`, reports usage every
//! [`FleetConfig::report_interval`], and reconnects with bounded backoff when its session
//! ends.
//!
//! Usage is deterministic ([`sim`]): each scope offers [`SimScope::rate_bps`]; an active
//! lease lets through `min(offered, leased)` (never past its volume), anything else lets
//! nothing through (fail closed). Counters are exact integers on a millisecond monotonic
//! clock, and each report carries the millisecond at which they were computed
//! (`sample_time_ms`), so a rate the controller derives from two reports is the set rate.
//!
//! One tokio runtime; one task per node; the nodes' report phases are spread evenly over
//! the interval. Starting a thousand nodes needs more than 1,024 file descriptors:
//! [`Fleet::start`] raises the soft `RLIMIT_NOFILE` to the hard limit and says so clearly
//! if even that is too low.
//!
//! With [`FleetConfig::mesh`], each node also takes part in the encrypted mesh as an agent
//! does, without a WireGuard device ([`mesh`]): its Hello carries a random public key, the
//! endpoint `127.0.0.1:51820` and its own overlay host address (node `i`: `198.18.128.0 +
//! i + 1`, a /32); every signed peer-set update is verified against the pinned lease key
//! and applied to the real agent's state machine (`nicwarden_mesh::MeshCore`) on the node's
//! clock; peers expire on that clock; a key rotation the controller asks for is answered
//! with a new random key. [`Fleet::tamper`] makes a node report tampering, as an agent does
//! after blocking its fabric. Every peer removal is recorded with its instant
//! ([`Fleet::key_removed_by`]), for benchmarks.

#![forbid(unsafe_code)]

mod api;
pub mod mesh;
mod node;
pub mod sim;

pub use mesh::KeyRemoval;
pub use nicwarden_mesh::WgKey;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::time::Instant;

use nicwarden_lease::Time;

/// One scope of a simulated node and the traffic it offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimScope {
    /// `egress` or `peer:NODE`.
    pub scope: String,
    /// Simulated offered traffic, bits/s. What flows is `min(this, the leased rate)` while
    /// a lease is active, and nothing otherwise.
    pub rate_bps: u64,
}

/// A simulated node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimNode {
    pub name: String,
    pub scopes: Vec<SimScope>,
}

/// The lease [`Fleet::start`] grants to every scope when [`FleetConfig::grant`] is set.
#[derive(Clone, Debug, PartialEq)]
pub struct GrantTemplate {
    /// Leased rate, bits/s; `None`: the scope's offered rate.
    pub rate_bps: Option<u64>,
    /// Lifetime of each issuance, seconds (renewed every third of it by default).
    pub ttl_s: f64,
    pub volume_bytes: Option<u64>,
}

/// What to simulate, and where the controller is.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// The controller's agent endpoint: `127.0.0.1:7443` or `https://127.0.0.1:7443` (the
    /// host must be one of the controller's server names).
    pub agent_addr: String,
    /// The operator API base: `http://127.0.0.1:7080`.
    pub api_url: String,
    /// The operator token.
    pub token: String,
    pub nodes: Vec<SimNode>,
    /// How often each node reports usage (default 1 s).
    pub report_interval: Duration,
    /// Add each node first (`POST /v1/nodes`; an existing node gets a fresh join token).
    /// Otherwise every node must exist already and gets a fresh token.
    pub add_nodes: bool,
    /// Grant one lease per scope once every session is up (with [`FleetConfig::mesh`], in
    /// waves of `concurrency` grants, each held before the next).
    pub grant: Option<GrantTemplate>,
    /// Enrollments and first connections in flight at once during start (default 32).
    pub concurrency: usize,
    /// Take part in the encrypted mesh (see the crate docs); default off.
    pub mesh: bool,
}

impl FleetConfig {
    /// The defaults: reports every second, nodes added, no grants, 32 at a time.
    pub fn new(
        agent_addr: impl Into<String>,
        api_url: impl Into<String>,
        token: impl Into<String>,
        nodes: Vec<SimNode>,
    ) -> FleetConfig {
        FleetConfig {
            agent_addr: agent_addr.into(),
            api_url: api_url.into(),
            token: token.into(),
            nodes,
            report_interval: Duration::from_secs(1),
            add_nodes: true,
            grant: None,
            concurrency: 32,
            mesh: false,
        }
    }
}

/// `n` nodes named `{prefix}-0001`, `{prefix}-0002`, ..., each with `scopes` scopes offering
/// `rate_bps`: `egress`, then `peer:` the next nodes of the fleet in order (wrapping), as
/// many as there are other nodes.
pub fn numbered_nodes(prefix: &str, n: usize, scopes: usize, rate_bps: u64) -> Vec<SimNode> {
    let name = |i: usize| format!("{prefix}-{:04}", i + 1);
    (0..n)
        .map(|i| {
            let peers = scopes.saturating_sub(1).min(n.saturating_sub(1));
            let mut list = Vec::with_capacity(scopes.min(1) + peers);
            if scopes > 0 {
                list.push(SimScope {
                    scope: "egress".into(),
                    rate_bps,
                });
            }
            for k in 1..=peers {
                list.push(SimScope {
                    scope: format!("peer:{}", name((i + k) % n)),
                    rate_bps,
                });
            }
            SimNode {
                name: name(i),
                scopes: list,
            }
        })
        .collect()
}

/// Counters of a running fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetStats {
    pub nodes: usize,
    /// Nodes whose session is up now.
    pub connected: usize,
    pub reports_sent: u64,
    /// Directives verified and accepted.
    pub directives: u64,
    pub renewals_sent: u64,
    /// Failures since start: sessions lost, reconnections failed, directives rejected,
    /// errors the controller sent, messages dropped on a full queue.
    pub errors: u64,
    pub last_error: Option<String>,
    /// Mesh updates verified and applied.
    pub mesh_updates: u64,
}

/// How far [`Fleet::start_with_progress`] has come (read it from another task).
#[derive(Debug, Default)]
pub struct StartProgress {
    nodes: AtomicUsize,
    added: AtomicUsize,
    enrolled: AtomicUsize,
    connected: AtomicUsize,
    grants: AtomicUsize,
    granted: AtomicUsize,
}

/// A snapshot of [`StartProgress`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub nodes: usize,
    /// Nodes with a join token (added, or existing).
    pub added: usize,
    pub enrolled: usize,
    /// Nodes whose first session is up.
    pub connected: usize,
    /// Leases to grant (0 without [`FleetConfig::grant`]).
    pub grants: usize,
    pub granted: usize,
}

impl StartProgress {
    pub fn snapshot(&self) -> Progress {
        let g = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        Progress {
            nodes: g(&self.nodes),
            added: g(&self.added),
            enrolled: g(&self.enrolled),
            connected: g(&self.connected),
            grants: g(&self.grants),
            granted: g(&self.granted),
        }
    }
}

/// Why the fleet could not start or a call was refused. Each names the operation and,
/// where there is one, the node.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulated fleet config: {0}")]
    Config(String),
    #[error("raise the open-file limit (RLIMIT_NOFILE): {0}")]
    FdLimit(String),
    #[error("node {node}: {op}: {detail}")]
    Node {
        node: String,
        op: String,
        detail: String,
    },
    #[error("node {node}: grant a lease on {scope}: {detail}")]
    Grant {
        node: String,
        scope: String,
        detail: String,
    },
    #[error("wait for the granted leases: {0}")]
    GrantWait(String),
    #[error("set rate: node {0} is not in the fleet")]
    UnknownNode(String),
    #[error("set rate: node {node}: {detail}")]
    UnknownScope { node: String, detail: String },
    #[error("node {0} is not in the fleet")]
    NoSuchNode(String),
}

impl SimError {
    pub(crate) fn node(node: &str, op: impl Into<String>, detail: impl ToString) -> SimError {
        SimError::Node {
            node: node.to_string(),
            op: op.into(),
            detail: detail.to_string(),
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub connected: AtomicUsize,
    pub reports: AtomicU64,
    pub directives: AtomicU64,
    pub renewals: AtomicU64,
    pub errors: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub mesh_updates: AtomicU64,
}

pub(crate) struct NodeSlot {
    pub name: String,
    pub sim: Mutex<sim::NodeSim>,
    /// `Some` when the fleet takes part in the mesh.
    pub mesh: Mutex<Option<mesh::NodeMesh>>,
}

/// What the fleet's tasks share.
pub(crate) struct Shared {
    /// `https://HOST:PORT`.
    pub agent_url: String,
    /// Origin of every node's monotonic clock.
    pub epoch: Instant,
    pub report_interval: Duration,
    pub nodes: Vec<NodeSlot>,
    pub index: HashMap<String, usize>,
    pub stats: Counters,
    pub progress: Arc<StartProgress>,
    /// Woken whenever a node accepts a directive or a mesh update, or expires a peer.
    pub changed: Notify,
    /// Every peer removal of every node's mesh core.
    pub removals: Mutex<mesh::RemovalLog>,
}

/// Node clocks start at 1 s: a report's `sample_time_ms` of 0 would mean "unknown".
const CLOCK_ORIGIN_MS: u64 = 1000;

impl Shared {
    pub fn now(&self) -> Time {
        Time(self.epoch.elapsed().as_millis() as u64 + CLOCK_ORIGIN_MS)
    }

    pub fn instant(&self, t: Time) -> Instant {
        self.epoch + Duration::from_millis(t.0.saturating_sub(CLOCK_ORIGIN_MS))
    }

    pub fn error(&self, node: &str, what: &str) {
        let msg = format!("node {node}: {what}");
        tracing::debug!("{msg}");
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        *self
            .stats
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(msg);
    }

    fn sim(&self, node: &str) -> Option<std::sync::MutexGuard<'_, sim::NodeSim>> {
        let i = *self.index.get(node)?;
        Some(self.nodes[i].sim.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn mesh(&self, node: &str) -> Option<std::sync::MutexGuard<'_, Option<mesh::NodeMesh>>> {
        let i = *self.index.get(node)?;
        Some(self.nodes[i].mesh.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A running simulated fleet. Dropping it without [`Fleet::stop`] tells its tasks to stop
/// but does not wait for them.
pub struct Fleet {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Commands to each node's task, by node index.
    controls: Vec<mpsc::Sender<node::Control>>,
}

/// Longest time [`Fleet::start`] waits for granted leases to reach their nodes.
const GRANT_WAIT: Duration = Duration::from_secs(60);
/// Longest time [`Fleet::stop`] waits for the nodes' tasks.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// Longest time [`Fleet::tamper`] waits for the node to send its report (a node between
/// sessions sends it once its next session is up; reconnection backs off at most 5 s).
const TAMPER_WAIT: Duration = Duration::from_secs(15);

impl Fleet {
    /// Adds/enrolls every node, opens every session, grants if asked; returns once all
    /// sessions are up and every granted lease is held (or the first clear error naming the
    /// node and operation, after stopping what had started).
    pub async fn start(cfg: FleetConfig) -> Result<Fleet, SimError> {
        Self::start_with_progress(cfg, Arc::new(StartProgress::default())).await
    }

    /// [`Fleet::start`], counting its progress in `progress` (for a progress line).
    pub async fn start_with_progress(
        cfg: FleetConfig,
        progress: Arc<StartProgress>,
    ) -> Result<Fleet, SimError> {
        let scopes = validate(&cfg)?;
        raise_fd_limit(cfg.nodes.len() + 2 * cfg.concurrency + 64)?;
        let api = Arc::new(api::Api::new(&cfg.api_url, &cfg.token).map_err(SimError::Config)?);
        let mut nodes = Vec::with_capacity(cfg.nodes.len());
        let mut index = HashMap::new();
        for (i, (n, scopes)) in cfg.nodes.iter().zip(scopes).enumerate() {
            let sim = sim::NodeSim::new(&n.name, &scopes)
                .map_err(|e| SimError::Config(format!("node {}: {e}", n.name)))?;
            let mesh = if cfg.mesh {
                Some(
                    mesh::NodeMesh::new(&n.name, i)
                        .map_err(|e| SimError::Config(format!("node {}: {e}", n.name)))?,
                )
            } else {
                None
            };
            index.insert(n.name.clone(), i);
            nodes.push(NodeSlot {
                name: n.name.clone(),
                sim: Mutex::new(sim),
                mesh: Mutex::new(mesh),
            });
        }
        progress.nodes.store(nodes.len(), Ordering::Relaxed);
        let shared = Arc::new(Shared {
            agent_url: agent_url(&cfg.agent_addr),
            epoch: Instant::now(),
            report_interval: cfg.report_interval,
            nodes,
            index,
            stats: Counters::default(),
            progress: progress.clone(),
            changed: Notify::new(),
            removals: Mutex::new(mesh::RemovalLog::new(cfg.nodes.len())),
        });
        let (stop, stop_rx) = watch::channel(false);
        let gate = Arc::new(Semaphore::new(cfg.concurrency));
        let mut tasks = Vec::with_capacity(shared.nodes.len());
        let mut controls = Vec::with_capacity(shared.nodes.len());
        let mut ready = futures::stream::FuturesUnordered::new();
        for i in 0..shared.nodes.len() {
            let (tx, rx) = oneshot::channel();
            ready.push(rx);
            let (control_tx, control) = mpsc::channel(node::CONTROL_QUEUE);
            controls.push(control_tx);
            let start = node::Start {
                api: api.clone(),
                add_node: cfg.add_nodes,
                gate: gate.clone(),
                ready: tx,
                stop: stop_rx.clone(),
                control,
            };
            tasks.push(tokio::spawn(node::run(shared.clone(), i, start)));
        }
        let fleet = Fleet {
            shared,
            stop,
            tasks,
            controls,
        };
        use futures::StreamExt as _;
        while let Some(r) = ready.next().await {
            let r = r.unwrap_or_else(|_| {
                Err(SimError::Config(
                    "a node's task ended before its session was up".into(),
                ))
            });
            if let Err(e) = r {
                fleet.stop().await;
                return Err(e);
            }
        }
        tracing::info!(
            nodes = fleet.shared.nodes.len(),
            "simulated fleet connected"
        );
        if let Some(t) = &cfg.grant {
            if let Err(e) = fleet.grant_all(&cfg, t, &api).await {
                fleet.stop().await;
                return Err(e);
            }
        }
        Ok(fleet)
    }

    /// Grants one lease per scope, then waits until every node holds its leases (in the
    /// mesh: in waves of `concurrency` grants, each held before the next).
    async fn grant_all(
        &self,
        cfg: &FleetConfig,
        t: &GrantTemplate,
        api: &api::Api,
    ) -> Result<(), SimError> {
        use futures::StreamExt as _;
        let wanted: Vec<(&str, &str, u64)> = cfg
            .nodes
            .iter()
            .flat_map(|n| {
                n.scopes.iter().map(move |s| {
                    (
                        n.name.as_str(),
                        s.scope.as_str(),
                        t.rate_bps.unwrap_or(s.rate_bps),
                    )
                })
            })
            .collect();
        let progress = &self.shared.progress;
        progress.grants.store(wanted.len(), Ordering::Relaxed);
        // In the mesh, each grant publishes its node to every member of its group: one update
        // per member. Granting in waves, each held before the next, keeps every node's
        // backlog of updates (and so the controller's queue towards it) bounded.
        let wave = if cfg.mesh {
            cfg.concurrency
        } else {
            wanted.len().max(1)
        };
        for chunk in wanted.chunks(wave) {
            let results: Vec<Result<(&str, &str, u64), SimError>> =
                futures::stream::iter(chunk.iter().map(|&(node, scope, rate)| async move {
                    let r = api.grant(node, scope, rate, t.ttl_s, t.volume_bytes).await;
                    progress.granted.fetch_add(1, Ordering::Relaxed);
                    r.map(|id| (node, scope, id)).map_err(|f| SimError::Grant {
                        node: node.to_string(),
                        scope: scope.to_string(),
                        detail: f.to_string(),
                    })
                }))
                .buffer_unordered(cfg.concurrency)
                .collect()
                .await;
            let granted: Vec<(&str, &str, u64)> = results.into_iter().collect::<Result<_, _>>()?;
            self.wait_held(&granted).await?;
        }
        Ok(())
    }

    /// Waits (at most [`GRANT_WAIT`]) until every node holds the leases granted to it.
    async fn wait_held(&self, granted: &[(&str, &str, u64)]) -> Result<(), SimError> {
        let deadline = Instant::now() + GRANT_WAIT;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let missing = granted
                .iter()
                .filter(|(n, s, id)| self.lease(n, s) != Some(*id))
                .count();
            if missing == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let (n, s, id) = granted
                    .iter()
                    .find(|(n, s, id)| self.lease(n, s) != Some(*id))
                    .copied()
                    .unwrap_or_default();
                return Err(SimError::GrantWait(format!(
                    "{missing} granted leases not held after {} s (first: lease {id} of node {n} on {s}; {})",
                    GRANT_WAIT.as_secs(),
                    self.stats().last_error.unwrap_or_else(|| "no error seen".into())
                )));
            }
        }
    }

    /// Sets the traffic a node offers in one of its scopes, from now on.
    pub fn set_rate(&self, node: &str, scope: &str, rate_bps: u64) -> Result<(), SimError> {
        let now = self.shared.now();
        let mut sim = self
            .shared
            .sim(node)
            .ok_or_else(|| SimError::UnknownNode(node.to_string()))?;
        sim.set_rate(now, scope, rate_bps)
            .map_err(|detail| SimError::UnknownScope {
                node: node.to_string(),
                detail,
            })
    }

    pub fn stats(&self) -> FleetStats {
        let s = &self.shared.stats;
        FleetStats {
            nodes: self.shared.nodes.len(),
            connected: s.connected.load(Ordering::Relaxed),
            reports_sent: s.reports.load(Ordering::Relaxed),
            directives: s.directives.load(Ordering::Relaxed),
            renewals_sent: s.renewals.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            mesh_updates: s.mesh_updates.load(Ordering::Relaxed),
            last_error: s
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// The lease a node holds (active, not lapsed) for a scope, if any.
    pub fn lease(&self, node: &str, scope: &str) -> Option<u64> {
        let now = self.shared.now();
        self.shared.sim(node)?.lease(now, scope)
    }

    /// What the node's next report says about a scope: `active`, `expired`, `revoked`,
    /// `exhausted` or `none`; `None` for an unknown node or scope.
    pub fn scope_state(&self, node: &str, scope: &str) -> Option<String> {
        let now = self.shared.now();
        self.shared.sim(node)?.state(now, scope)
    }

    /// The node names, in configuration order.
    pub fn nodes(&self) -> Vec<String> {
        self.shared.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Re-evaluates `probe` whenever a node accepts a directive or a mesh update or expires
    /// a peer (and at least every 100 ms), until it yields a value or `timeout` passes
    /// (`None`: the probe's answer at the deadline was still `None`).
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut probe: impl FnMut(&Fleet) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(v) = probe(self) {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            let until = deadline.min(Instant::now() + Duration::from_millis(100));
            let _ = tokio::time::timeout_at(until, changed).await;
        }
    }

    /// The names of the mesh peers a node holds now (sorted); `None` for an unknown node or
    /// a fleet without the mesh.
    pub fn mesh_peers(&self, node: &str) -> Option<Vec<String>> {
        let g = self.shared.mesh(node)?;
        let m = g.as_ref()?;
        Some(m.core.peers().map(|h| h.entry.node.clone()).collect())
    }

    /// How many mesh peers a node holds now (cheaper than [`Fleet::mesh_peers`]).
    pub fn mesh_peer_count(&self, node: &str) -> Option<usize> {
        let g = self.shared.mesh(node)?;
        g.as_ref().map(|m| m.core.peers().count())
    }

    /// A node's current WireGuard public key; `None` for an unknown node or a fleet without
    /// the mesh.
    pub fn mesh_key(&self, node: &str) -> Option<WgKey> {
        let g = self.shared.mesh(node)?;
        g.as_ref().map(|m| m.info.public_key)
    }

    /// Every removal of `key` from a node's peer set so far (which node, when, why), in the
    /// order they happened.
    pub fn key_removed_by(&self, key: WgKey) -> Vec<KeyRemoval> {
        self.shared
            .removals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
    }

    /// How many times `key` was removed from a node's peer set so far (cheaper than
    /// [`Fleet::key_removed_by`]).
    pub fn key_removal_count(&self, key: WgKey) -> usize {
        self.shared
            .removals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count(&key)
    }

    /// Makes `node` report tampering on its session (as an agent does after blocking its
    /// fabric): its own mesh is shut down at once, the `tamper` message is queued to the
    /// controller, and the node stops reconnecting. Returns once the message is queued (a
    /// node between sessions sends it on its next session), at most 15 s.
    pub async fn tamper(&self, node: &str, reason: &str) -> Result<(), SimError> {
        let i = *self
            .shared
            .index
            .get(node)
            .ok_or_else(|| SimError::NoSuchNode(node.to_string()))?;
        let (ack, done) = oneshot::channel();
        let cmd = node::Control::Tamper {
            reason: reason.to_string(),
            ack,
        };
        let op = "report tampering";
        self.controls[i].try_send(cmd).map_err(|e| {
            SimError::node(node, op, format!("node task not accepting commands: {e}"))
        })?;
        match tokio::time::timeout(TAMPER_WAIT, done).await {
            Ok(Ok(r)) => r.map_err(|e| SimError::node(node, op, e)),
            Ok(Err(_)) => Err(SimError::node(node, op, "the node's task ended")),
            Err(_) => Err(SimError::node(
                node,
                op,
                format!("not sent within {} s (no session)", TAMPER_WAIT.as_secs()),
            )),
        }
    }

    /// Closes every session and waits for every node's task (at most 10 s; stragglers are
    /// aborted).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut self.tasks);
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(STOP_WAIT, all).await.is_err() {
            tracing::warn!("simulated nodes did not stop within 10 s; aborting them");
            for a in aborts {
                a.abort();
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// `HOST:PORT` -> `https://HOST:PORT`.
fn agent_url(addr: &str) -> String {
    let a = addr.trim().trim_end_matches('/');
    if a.contains("://") {
        a.to_string()
    } else {
        format!("https://{a}")
    }
}

/// Checks the config before anything is sent; returns each node's `(scope, rate)` list.
fn validate(cfg: &FleetConfig) -> Result<Vec<Vec<(String, u64)>>, SimError> {
    let bad = |m: String| Err(SimError::Config(m));
    if cfg.report_interval.is_zero() {
        return bad("report_interval must be > 0".into());
    }
    if cfg.concurrency == 0 {
        return bad("concurrency must be at least 1".into());
    }
    if cfg.mesh && cfg.nodes.len() > mesh::max_mesh_nodes() {
        return bad(format!(
            "{} nodes cannot all have a mesh overlay address: at most {} fit in {}..{}",
            cfg.nodes.len(),
            mesh::max_mesh_nodes(),
            mesh::OVERLAY_BASE,
            mesh::OVERLAY_END
        ));
    }
    nicwarden_agent::transport::parse_controller(&agent_url(&cfg.agent_addr))
        .map_err(|e| SimError::Config(format!("agent_addr: {e:#}")))?;
    if let Some(t) = &cfg.grant {
        if !(t.ttl_s.is_finite() && t.ttl_s > 0.0) {
            return bad(format!("grant ttl_s must be > 0, got {}", t.ttl_s));
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(cfg.nodes.len());
    for n in &cfg.nodes {
        nicwarden_pki::validate_node_name(&n.name)
            .map_err(|e| SimError::Config(format!("node `{}`: {e}", n.name)))?;
        if !seen.insert(n.name.as_str()) {
            return bad(format!("node {} is listed twice", n.name));
        }
        if let Some(t) = &cfg.grant {
            for s in &n.scopes {
                if t.rate_bps.unwrap_or(s.rate_bps) == 0 {
                    return bad(format!(
                        "node {} scope {}: cannot grant a lease of 0 bit/s (set the scope's rate or the grant's rate_bps)",
                        n.name, s.scope
                    ));
                }
            }
        }
        out.push(
            n.scopes
                .iter()
                .map(|s| (s.scope.clone(), s.rate_bps))
                .collect(),
        );
    }
    Ok(out)
}

/// Raises the soft open-file limit to the hard limit; an error if the hard limit is below
/// `need`.
fn raise_fd_limit(need: usize) -> Result<(), SimError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| SimError::FdLimit(format!("getrlimit: {e}")))?;
    // An "unlimited" hard limit is still capped by the kernel (fs.nr_open, 2^20 by default).
    let target = hard.min(1 << 20);
    if soft < target {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            tracing::debug!(error = %e, soft, hard, "could not raise the open-file limit");
        }
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| SimError::FdLimit(format!("getrlimit: {e}")))?;
    if (soft as u128) < need as u128 {
        return Err(SimError::FdLimit(format!(
            "the fleet needs about {need} file descriptors but the limit is {soft} (hard limit {hard}): raise the hard limit (ulimit -Hn, or LimitNOFILE= in a systemd unit) or simulate fewer nodes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_nodes_peer_with_the_next_ones() {
        let nodes = numbered_nodes("sim", 3, 4, 7);
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["sim-0001", "sim-0002", "sim-0003"]);
        let scopes: Vec<&str> = nodes[2].scopes.iter().map(|s| s.scope.as_str()).collect();
        // Only two other nodes: three scopes, not four.
        assert_eq!(scopes, ["egress", "peer:sim-0001", "peer:sim-0002"]);
        assert!(nodes
            .iter()
            .flat_map(|n| &n.scopes)
            .all(|s| s.rate_bps == 7));
        assert_eq!(numbered_nodes("x", 1, 3, 1)[0].scopes.len(), 1);
        assert!(numbered_nodes("x", 2, 0, 1)[0].scopes.is_empty());
    }

    #[test]
    fn config_is_checked_first() {
        let node = |name: &str, scope: &str, rate| SimNode {
            name: name.into(),
            scopes: vec![SimScope {
                scope: scope.into(),
                rate_bps: rate,
            }],
        };
        let check = |nodes: Vec<SimNode>, grant: bool, want: &str| {
            let mut cfg = FleetConfig::new("127.0.0.1:7443", "http://127.0.0.1:7080", "t", nodes);
            if grant {
                cfg.grant = Some(GrantTemplate {
                    rate_bps: None,
                    ttl_s: 30.0,
                    volume_bytes: None,
                });
            }
            let r = validate(&cfg);
            match (r, want) {
                (Ok(_), "") => {}
                (Err(e), w) if !w.is_empty() => assert!(e.to_string().contains(w), "{e}"),
                (r, w) => panic!("want `{w}`, got {r:?}"),
            }
        };
        check(vec![node("a", "egress", 1)], true, "");
        check(
            vec![node("a", "egress", 1), node("a", "egress", 1)],
            false,
            "twice",
        );
        check(vec![node("a b", "egress", 1)], false, "node `a b`");
        check(vec![node("a", "egress", 0)], true, "0 bit/s");
        check(vec![node("a", "egress", 0)], false, "");
    }

    #[test]
    fn agent_urls() {
        assert_eq!(agent_url("127.0.0.1:7443"), "https://127.0.0.1:7443");
        assert_eq!(agent_url("https://h:1/"), "https://h:1");
    }
}
