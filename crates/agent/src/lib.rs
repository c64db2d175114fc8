//! The nicwarden agent: one per node.
//!
//! It enrolls with the controller ([`identity`]), holds a long-lived session over mutual TLS
//! ([`transport`]), verifies every signed directive against the controller key pinned at
//! enrollment, feeds it to the pure lease state machine (`nicwarden_lease::agent`), persists
//! the replay guard, renews before the deadline, reports usage every second
//! ([`counters`]), programs the decisions into the kernel through the `nicwarden_datapath`
//! backend chosen in `[datapath]` ([`enforce`] maps one to the other), and exposes its
//! decision per scope on a local status endpoint ([`status`]). Without a valid lease the
//! floor applies: it never fails open. When the agent stops or dies, the kernel keeps the
//! last state it was given (nothing is torn down on exit).
//!
//! With `[mesh]` enabled it also runs this node's end of the encrypted mesh ([`mesh`]):
//! a WireGuard device whose peers are only those the controller authorized, in signed
//! entries that expire on the agent's own clock. A tamper event ([`tamper`]: a Unix socket,
//! a watched sensor file) blocks the fabric, destroys the WireGuard keys, drops every peer,
//! persists the event and tells the controller, in that order.
//!
//! On a node with a datapath it also runs link probes on the fabric port ([`probe`]): signed
//! probes and answers between neighbours, whose raw answers it reports to the controller.
//!
//! The process is one event loop over [`Event`]; the session task, the status server and
//! the tamper inputs only send events to it.

pub mod config;
pub mod counters;
pub mod enforce;
pub mod identity;
pub mod mesh;
pub mod probe;
pub mod status;
pub mod tamper;
pub mod transport;

pub use config::AgentConfig;

use anyhow::Context;
use nicwarden_datapath::Datapath;
use nicwarden_lease::agent::{AgentCore, AgentEvent};
use nicwarden_lease::{Floor, Time};
use nicwarden_proto::pb;
use status::AgentStatus;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::StreamExt;

/// Everything the agent's loop reacts to.
enum Event {
    /// A session is up; directives and errors will follow; `tx` sends to the controller.
    Connected(mpsc::Sender<pb::AgentMessage>),
    /// The session ended (or could not be opened).
    Disconnected(String),
    Message(pb::ControllerMessage),
    Status(oneshot::Sender<AgentStatus>),
    Tamper(tamper::TamperRequest),
    /// A finished round of link probes, from the prober's thread.
    Probe(pb::ProbeReport),
}

/// What the session task says in its Hello, kept current by the loop.
#[derive(Clone, Debug, Default)]
struct HelloExtras {
    mesh: Option<pb::MeshInfo>,
    tamper: Option<(String, u64)>,
}

type SharedHello = Arc<std::sync::Mutex<HelloExtras>>;

fn set_hello(h: &SharedHello, f: impl FnOnce(&mut HelloExtras)) {
    let mut g = h.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut g);
}

/// The tamper state of this node (from an event now, or the record found at start).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TamperStatus {
    pub reason: String,
    pub source: String,
    pub detected_unix_ms: u64,
    /// From the event to the fabric blocked in the kernel (this run only).
    pub blocked_after_us: Option<u64>,
    /// From the event to the WireGuard keys destroyed and peers dropped (this run only).
    pub keys_destroyed_after_us: Option<u64>,
    /// Whether the controller has been told in this run (it is told again at every connect).
    pub reported: bool,
}

/// Time until the wall clock next crosses a multiple of `window_ms` (a few ms after it, so
/// the boundary has passed when the timer fires).
fn next_window(window_ms: u64) -> Duration {
    let w = window_ms.max(1);
    let now = unix_ms();
    Duration::from_millis(w - now % w + 2)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The agent's clock: monotonic milliseconds since start. Wall-clock changes on the node
/// cannot move lease deadlines.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
}

impl Clock {
    fn now(&self) -> Time {
        Time(self.start.elapsed().as_millis() as u64)
    }
    fn instant(&self, t: Time) -> Instant {
        self.start + Duration::from_millis(t.0)
    }
}

/// Runs the agent until Ctrl-C / SIGTERM.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    nicwarden_pki::validate_node_name(&cfg.node)?;
    let counters = counters::CounterSpec::parse(&cfg.counters).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create data directory {}", cfg.data_dir.display()))?;
    let _lock = nicwarden_process::lock_data_dir(&cfg.data_dir, "agent")?;
    // Before enrolling: a node that cannot enforce should not take a certificate.
    let datapath = open_datapath(&cfg.datapath, &cfg.node)?;
    let mut tamper_rec = tamper::load(&cfg.data_dir)?;
    let ident = match identity::load(&cfg.data_dir)? {
        Some(i) if tamper_rec.is_some() && cfg.join_token.is_some() => {
            // Tampered, and the operator gave a join token: re-enroll (new certificate, new
            // WireGuard key). If the token is refused, stay tampered on the old identity.
            let token = cfg.join_token.as_deref().unwrap_or_default();
            match identity::enroll(&cfg.data_dir, &cfg.node, &cfg.controller, token).await {
                Ok(new) => {
                    tamper::clear(&cfg.data_dir)?;
                    nicwarden_wg::StaticKey::wipe(&cfg.mesh_key_file())?;
                    let _ = std::fs::remove_file(cfg.data_dir.join("mesh.json"));
                    tracing::warn!("re-enrolled after tampering: new certificate; a new WireGuard key will be generated");
                    tamper_rec = None;
                    new
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "re-enrollment after tampering refused: staying tampered (fabric blocked, no mesh)");
                    i
                }
            }
        }
        Some(i) => i,
        None => {
            let token = cfg.join_token.as_deref().with_context(|| {
                format!(
                    "node {} is not enrolled yet ({} holds no certificate): pass the join token from `nicwarden node add {}` with --token",
                    cfg.node,
                    cfg.data_dir.display(),
                    cfg.node
                )
            })?;
            identity::enroll(&cfg.data_dir, &cfg.node, &cfg.controller, token).await?
        }
    };
    let tls = nicwarden_pki::agent_client_config(&ident.ca_pem, &ident.cert_pem, &ident.key)?;
    let persisted = identity::load_state(&cfg.data_dir)?;
    let status_listener = tokio::net::TcpListener::bind(cfg.status_listen)
        .await
        .with_context(|| format!("bind status endpoint {}", cfg.status_listen))?;

    let (ev_tx, ev_rx) = mpsc::channel::<Event>(1024);
    let last_seq = Arc::new(std::sync::atomic::AtomicU64::new(persisted.last_seq));
    let clock = Clock {
        start: Instant::now(),
    };
    // Tamper inputs first: an event during the rest of the start-up is not lost.
    let (tamper_tx, mut tamper_rx) = mpsc::channel::<tamper::TamperRequest>(16);
    let _tamper_socket = tamper::serve_socket(cfg.tamper_socket(), tamper_tx.clone())?;
    if let Some(w) = &cfg.tamper.watch {
        tamper::watch_file(
            w.clone(),
            Duration::from_millis(cfg.tamper.watch_interval_ms),
            tamper_tx.clone(),
        );
    }
    {
        let ev = ev_tx.clone();
        tokio::spawn(async move {
            while let Some(r) = tamper_rx.recv().await {
                if ev.send(Event::Tamper(r)).await.is_err() {
                    return;
                }
            }
        });
    }
    let hello: SharedHello = Arc::default();
    // The fabric guard goes in before the tunnel carries anything: from here on, nothing
    // but WireGuard crosses the fabric interface.
    let guard = match (
        cfg.mesh.enabled && cfg.mesh.encrypted_only,
        cfg.mesh.endpoint,
    ) {
        (true, Some(ep)) => {
            let spec = nicwarden_datapath::GuardSpec {
                iface: cfg.datapath.fabric_iface.clone(),
                port: ep.port(),
            };
            let mut g = nicwarden_datapath::FabricGuard::new();
            tokio::task::block_in_place(|| g.ensure(&spec)).with_context(|| {
                format!(
                    "install the fabric guard (only WireGuard on {}, mesh.encrypted_only)",
                    spec.iface
                )
            })?;
            tracing::info!(iface = %spec.iface, port = spec.port, "fabric guard: only WireGuard crosses the fabric interface");
            Some((g, spec))
        }
        _ => None,
    };
    let mesh = match (&tamper_rec, cfg.mesh.enabled) {
        (None, true) => {
            let m = mesh::MeshShell::start(&cfg, clock.now()).await?;
            set_hello(&hello, |h| h.mesh = m.info());
            Some(m)
        }
        _ => None,
    };
    if let Some(t) = &tamper_rec {
        tracing::error!(reason = %t.reason, "this node was tampered with: fabric blocked, no mesh; re-enroll with a new join token (`nicwarden node token {}`)", cfg.node);
        set_hello(&hello, |h| {
            h.tamper = Some((t.reason.clone(), t.detected_unix_ms))
        });
    }
    tokio::spawn(session_task(
        cfg.clone(),
        tls,
        ev_tx.clone(),
        last_seq.clone(),
        hello.clone(),
    ));
    let status_tx = ev_tx.clone();
    let app = axum::Router::new().route(
        "/status",
        axum::routing::get(move || {
            let tx = status_tx.clone();
            async move {
                let (otx, orx) = oneshot::channel();
                if tx.send(Event::Status(otx)).await.is_err() {
                    return Err((
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "agent stopping",
                    ));
                }
                orx.await.map(axum::Json).map_err(|_| {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "agent stopping",
                    )
                })
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(status_listener, app).await {
            tracing::error!(error = %e, "status endpoint failed");
        }
    });
    tracing::info!(node = %cfg.node, controller = %cfg.controller, status = %cfg.status_listen, last_seq = persisted.last_seq, "agent started: scopes without a lease are at their floor");
    let mut core = AgentCore::new(
        &cfg.node,
        persisted.last_seq,
        Floor {
            rate_bps: cfg.default_floor_bps,
        },
    );
    let held = restore_leases(&mut core, clock.now(), &ident.lease_key, &persisted.leases);
    let (prober, probe_error) = start_prober(&cfg, &ident.key, tamper_rec.is_some(), &ev_tx);
    let cfg_iface = cfg.datapath.fabric_iface.clone();
    let mut lp = Loop {
        cfg,
        core,
        ident_key: ident.lease_key,
        clock,
        held,
        to_controller: None,
        connected: false,
        last_error: None,
        rejected: 0,
        counters: counters.build(),
        last_seq,
        dp_status: datapath.as_ref().map(|d| enforce::DatapathStatus {
            backend: d.name().to_string(),
            fabric_iface: cfg_iface.clone(),
            ..Default::default()
        }),
        datapath,
        enforcer: enforce::Enforcer::default(),
        last_desired: None,
        last_reconcile: Instant::now(),
        mesh,
        guard,
        guard_status: None,
        peer_bytes_unavailable: false,
        hello,
        prober,
        probe_error,
        tampered: tamper_rec.map(|t| TamperStatus {
            reason: t.reason,
            source: t.source,
            detected_unix_ms: t.detected_unix_ms,
            blocked_after_us: None,
            keys_destroyed_after_us: None,
            reported: false,
        }),
    };
    // Fail closed from the first moment: until leases arrive every scope is at its floor.
    // If the kernel refuses this first state, stop with its reason rather than run a node
    // that enforces nothing (later failures are retried: the last state stays in force).
    lp.enforce(lp.clock.now());
    if let Some(err) = lp.dp_status.as_ref().and_then(|s| s.last_error.clone()) {
        anyhow::bail!(
            "cannot enforce on {} with the `{}` datapath: {err}",
            lp.cfg.datapath.fabric_iface,
            lp.cfg.datapath.backend
        );
    }
    tokio::select! {
        r = lp.run(ev_rx) => r,
        _ = nicwarden_process::shutdown_signal() => {
            tracing::info!("agent stopping");
            Ok(())
        }
    }
}

struct Loop {
    cfg: AgentConfig,
    core: AgentCore,
    ident_key: [u8; 32],
    clock: Clock,
    to_controller: Option<mpsc::Sender<pb::AgentMessage>>,
    connected: bool,
    last_error: Option<String>,
    rejected: u64,
    counters: Box<dyn counters::UsageSource>,
    last_seq: Arc<std::sync::atomic::AtomicU64>,
    datapath: Option<Box<dyn Datapath>>,
    dp_status: Option<enforce::DatapathStatus>,
    enforcer: enforce::Enforcer,
    /// The desired state last applied successfully (None: apply at the next chance).
    last_desired: Option<nicwarden_datapath::DesiredState>,
    last_reconcile: Instant,
    /// The leases held, as signed by the controller (persisted with the replay guard).
    held: BTreeMap<u64, identity::HeldLease>,
    mesh: Option<mesh::MeshShell>,
    /// `mesh.encrypted_only`: the nftables guard and what it lets through.
    guard: Option<(
        nicwarden_datapath::FabricGuard<nicwarden_datapath::RealNft>,
        nicwarden_datapath::GuardSpec,
    )>,
    guard_status: Option<mesh::GuardStatus>,
    /// The datapath said it has no per-peer counters (logged once).
    peer_bytes_unavailable: bool,
    hello: SharedHello,
    /// Link probes on the fabric port (its own thread; stops when dropped).
    prober: Option<probe::Prober>,
    /// Why the prober is not running, when it should be.
    probe_error: Option<String>,
    /// Set by a tamper event (or the record found at start): the fabric stays blocked.
    tampered: Option<TamperStatus>,
}

/// Re-installs the leases persisted before a restart that still have time left (their
/// signatures verified again); returns the ones restored.
fn restore_leases(
    core: &mut AgentCore,
    now: Time,
    key: &[u8; 32],
    leases: &[identity::HeldLease],
) -> BTreeMap<u64, identity::HeldLease> {
    let mut held = BTreeMap::new();
    let boot_now = match identity::boot_ms() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot restore held leases; waiting for the controller");
            return held;
        }
    };
    for h in leases {
        let signed = match (hex::decode(&h.directive_hex), hex::decode(&h.signature_hex)) {
            (Ok(directive), Ok(signature)) => pb::SignedDirective {
                directive,
                signature,
            },
            _ => {
                tracing::warn!(
                    lease = h.lease_id,
                    "held lease is not readable; not restored"
                );
                continue;
            }
        };
        let lease = match nicwarden_proto::verify_directive(&signed, key) {
            Ok(nicwarden_lease::Directive::Lease(l)) => l,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(lease = h.lease_id, error = %e, "held lease fails verification; not restored");
                continue;
            }
        };
        let left = (h.received_boot_ms + lease.ttl_ms).saturating_sub(boot_now);
        if left == 0 {
            tracing::info!(
                lease = h.lease_id,
                "held lease lapsed while the agent was down"
            );
            continue;
        }
        match core.restore(now, lease, left) {
            Ok(_) => {
                tracing::info!(lease = h.lease_id, scope = %h.scope, left_ms = left, "restored a lease held before the restart");
                held.insert(h.lease_id, h.clone());
            }
            Err(e) => tracing::warn!(lease = h.lease_id, error = %e, "held lease not restored"),
        }
    }
    held
}

/// Starts the link prober on the fabric interface when `[probe]` and the datapath say so
/// (not on a tampered node). Its rounds reach the loop as [`Event::Probe`], dropped when the
/// loop's queue is full. A prober that cannot start is reported, not fatal: leases do not
/// depend on it.
fn start_prober(
    cfg: &AgentConfig,
    key: &nicwarden_pki::NodeKey,
    tampered: bool,
    ev: &mpsc::Sender<Event>,
) -> (Option<probe::Prober>, Option<String>) {
    if !cfg.probe.runs(&cfg.datapath) || tampered {
        return (None, None);
    }
    let started = nicwarden_pki::NodeKey::from_pem(&key.to_pem())
        .map_err(|e| e.to_string())
        .and_then(|key| {
            let tx = ev.clone();
            probe::Prober::start(
                probe::ProberConfig {
                    node: cfg.node.clone(),
                    iface: cfg.datapath.fabric_iface.clone(),
                    interval: Duration::from_millis(cfg.probe.interval_ms),
                    max_answers_per_round: cfg.probe.max_answers_per_round,
                },
                key,
                move |r| {
                    if tx.try_send(Event::Probe(r)).is_err() {
                        tracing::debug!("agent loop busy; probe round dropped");
                    }
                },
            )
            .map_err(|e| e.to_string())
        });
    match started {
        Ok(p) => (Some(p), None),
        Err(e) => {
            tracing::error!(error = %e, "link probes not started");
            (None, Some(e))
        }
    }
}

/// A full reconcile (kernel read back and compared) at least this often, even when the
/// decisions did not change: repairs drift such as a rule deleted behind the agent's back.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// The datapath backend named in the config, checked usable before anything starts.
pub fn open_datapath(
    cfg: &config::DatapathConfig,
    node: &str,
) -> anyhow::Result<Option<Box<dyn Datapath>>> {
    if cfg.enabled() {
        // Resolved in this process's network namespace (sysfs may be the host's).
        nix::net::if_::if_nametoindex(cfg.fabric_iface.as_str()).map_err(|e| {
            anyhow::anyhow!(
                "fabric interface {} not found in this network namespace ({e}): set --fabric-iface / [datapath] fabric_iface",
                cfg.fabric_iface
            )
        })?;
    }
    match cfg.backend.as_str() {
        "none" => Ok(None),
        "tc" => {
            nicwarden_datapath::LinuxDatapath::check_available()
                .context("datapath backend `tc`")?;
            Ok(Some(Box::new(nicwarden_datapath::LinuxDatapath::new(
                &cfg.fabric_iface,
            ))))
        }
        "ebpf" => {
            nicwarden_datapath::EbpfDatapath::check_available().context(
                "datapath backend `ebpf` (choose `--datapath tc` where the kernel refuses BPF, or `none` off a real node)",
            )?;
            Ok(Some(Box::new(nicwarden_datapath::EbpfDatapath::new(
                &cfg.fabric_iface,
                &cfg.pin_dir(node),
            ))))
        }
        other => {
            anyhow::bail!("unknown datapath backend `{other}` (expected `ebpf`, `tc` or `none`)")
        }
    }
}

/// `nicwarden agent --cleanup`: removes everything the configured backend installed on
/// the fabric interface. The agent itself never does this on exit (it would fail open).
pub fn cleanup(cfg: &AgentConfig) -> anyhow::Result<()> {
    if cfg.mesh.encrypted_only {
        nicwarden_datapath::FabricGuard::new()
            .remove()
            .context("remove the fabric guard (table inet nicwarden_guard)")?;
    }
    match open_datapath(&cfg.datapath, &cfg.node)? {
        None => {
            tracing::info!("datapath backend `none`: nothing to remove");
            Ok(())
        }
        Some(mut dp) => {
            dp.remove().with_context(|| {
                format!(
                    "remove {} state from {}",
                    dp.name(),
                    cfg.datapath.fabric_iface
                )
            })?;
            Ok(())
        }
    }
}

impl Loop {
    async fn run(&mut self, mut rx: mpsc::Receiver<Event>) -> anyhow::Result<()> {
        let report_every = Duration::from_millis(self.cfg.report_interval_ms);
        let mut report = tokio::time::interval(report_every);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = [
                self.core.poll_timeout(),
                self.mesh.as_ref().and_then(|m| m.poll_timeout()),
            ]
            .into_iter()
            .flatten()
            .min();
            let wake = next
                .map(|t| self.clock.instant(t))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev).await?,
                    None => return Ok(()),
                },
                _ = tokio::time::sleep_until(wake) => {
                    self.on_timer();
                    if let Some(m) = self.mesh.as_mut() {
                        m.on_timer(self.clock.now()).await;
                    }
                }
                _ = report.tick() => self.on_report(),
                _ = tokio::time::sleep(next_window(self.cfg.probe.byte_window_ms)), if self.cfg.probe.byte_window_ms > 0 && self.datapath.is_some() => self.on_byte_window(),
            }
        }
    }

    fn send(&mut self, msg: pb::agent_message::Msg) {
        if let Some(tx) = &self.to_controller {
            if tx.try_send(pb::AgentMessage { msg: Some(msg) }).is_err() {
                tracing::debug!("controller queue full or closed; message dropped");
            }
        }
    }

    fn on_timer(&mut self) {
        let now = self.clock.now();
        self.expire(now);
        for id in self.core.due_renewals(now) {
            if self.connected {
                tracing::debug!(lease = %id, "renewing");
                self.send(pb::agent_message::Msg::Renew(pb::RenewRequest {
                    lease_id: id.0,
                }));
            }
        }
    }

    fn on_report(&mut self) {
        let now = self.clock.now();
        // Expire first, so a report never shows a lapsed lease as active.
        self.expire(now);
        if self.datapath.is_some() {
            self.sample_kernel(now);
        } else {
            let decisions = self.core.decision(now);
            for (scope, _id, usage) in self.counters.sample(now, &decisions) {
                self.core.record_usage(&scope, usage);
            }
        }
        // Usage may have spent a volume (exhausted: floor), and drift is repaired here.
        self.enforce(now);
        self.check_guard();
        if !self.connected {
            return;
        }
        // A scope without a lease has no usage of its own, but its kernel class counts what
        // the floor dropped: report that, so the operator sees a node pushing at a closed
        // fabric.
        let kernel_drops = |scope: &str| -> u64 {
            self.dp_status
                .as_ref()
                .and_then(|st| st.scopes.iter().find(|k| k.scope == scope))
                .map(|k| k.drops)
                .unwrap_or(0)
        };
        let scopes = self
            .core
            .decision(now)
            .into_iter()
            .map(|d| pb::ScopeUsage {
                scope: d.scope.to_string(),
                lease_id: d.lease.map(|l| l.0).unwrap_or(0),
                bytes: d.usage.bytes,
                packets: d.usage.packets,
                dropped_packets: if d.lease.is_none() {
                    kernel_drops(&d.scope.to_string())
                } else {
                    d.usage.dropped_packets
                },
                state: d.state.to_string(),
                deadline_in_ms: d.deadline_in_ms.unwrap_or(0),
            })
            .collect();
        self.send(pb::agent_message::Msg::Usage(pb::UsageReport {
            scopes,
            sample_time_ms: now.0,
        }));
    }

    /// Keeps the held-lease set in step with an accepted directive: a lease replaces what
    /// its scope held; a revocation drops the lease.
    fn hold(
        &mut self,
        ev: &AgentEvent,
        lease: Option<(nicwarden_lease::LeaseId, String)>,
        sd: &pb::SignedDirective,
        received_boot_ms: u64,
    ) {
        match (ev, lease) {
            (AgentEvent::Accepted { .. }, Some((id, scope))) => {
                self.held.retain(|k, h| *k != id.0 && h.scope != scope);
                self.held.insert(
                    id.0,
                    identity::HeldLease {
                        lease_id: id.0,
                        scope,
                        directive_hex: hex::encode(&sd.directive),
                        signature_hex: hex::encode(&sd.signature),
                        received_boot_ms,
                    },
                );
            }
            (AgentEvent::Revoked { lease, .. }, _) => {
                self.held.remove(&lease.0);
            }
            _ => {}
        }
    }

    /// Byte conservation: reads the per-peer counters at a window boundary and reports them.
    fn on_byte_window(&mut self) {
        let window = self.cfg.probe.byte_window_ms;
        // The boundary just crossed (the timer fires at it, give or take scheduling).
        let end = unix_ms() / window * window;
        let Some(dp) = self.datapath.as_mut() else {
            return;
        };
        match tokio::task::block_in_place(|| dp.peer_counters()) {
            Ok(peers) => {
                if !self.connected || peers.is_empty() {
                    return;
                }
                self.send(pb::agent_message::Msg::PeerBytes(pb::PeerBytesReport {
                    window_end_unix_ms: end,
                    window_ms: window,
                    peers: peers
                        .into_iter()
                        .map(|p| pb::PeerBytes {
                            node: p.node,
                            tx_bytes: p.tx_bytes,
                            rx_bytes: p.rx_bytes,
                            rx_dropped_bytes: p.rx_dropped_bytes,
                        })
                        .collect(),
                }));
            }
            Err(e) => {
                if !self.peer_bytes_unavailable {
                    tracing::warn!(error = %e, "per-peer byte counters unavailable: no byte conservation for this node");
                    self.peer_bytes_unavailable = true;
                }
            }
        }
    }

    /// Re-installs the fabric guard if it went missing (every report tick: one `nft list`),
    /// and reads what it dropped.
    fn check_guard(&mut self) {
        let Some((g, spec)) = self.guard.as_mut() else {
            return;
        };
        let result = tokio::task::block_in_place(|| {
            let changed = g.ensure(spec)?;
            g.counters().map(|c| (changed, c))
        });
        let st = self.guard_status.get_or_insert_with(|| mesh::GuardStatus {
            iface: spec.iface.clone(),
            port: spec.port,
            ..Default::default()
        });
        match result {
            Ok((changed, c)) => {
                if changed {
                    tracing::warn!(iface = %spec.iface, "fabric guard was missing or different: re-installed");
                    st.repairs += 1;
                }
                st.counters = c.unwrap_or_default();
                st.last_error = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "fabric guard check failed");
                st.last_error = Some(e.to_string());
            }
        }
    }

    /// Moves lapsed leases to their floor, logs each one, and programs the floor at once.
    fn expire(&mut self, now: Time) {
        let events = self.core.handle_timeout(now);
        for ev in &events {
            self.log_event(ev);
        }
        if !events.is_empty() {
            self.enforce(now);
        }
    }

    /// Brings the kernel to the current decisions. Cheap when nothing changed: the kernel
    /// is only read back every [`RECONCILE_EVERY`]. A failure is logged, shown on
    /// `/status`, and retried at the next report tick.
    fn enforce(&mut self, now: Time) {
        let Some(dp) = self.datapath.as_mut() else {
            return;
        };
        let mut decisions = self.core.decision(now);
        if self.tampered.is_some() {
            // Tampered: everything at a floor of 0, whatever the leases or configured floor.
            for d in &mut decisions {
                d.lease = None;
                d.enforce = nicwarden_lease::agent::Enforce::Floor { rate_bps: 0 };
            }
        }
        let (desired, unresolved) = self.enforcer.desired(&self.cfg.datapath, &decisions);
        if self.last_desired.as_ref() == Some(&desired)
            && self.last_reconcile.elapsed() < RECONCILE_EVERY
        {
            return;
        }
        let result = tokio::task::block_in_place(|| dp.reconcile(&desired));
        self.last_reconcile = Instant::now();
        let status = self.dp_status.get_or_insert_with(Default::default);
        if unresolved != status.unresolved_peers {
            for peer in &unresolved {
                tracing::warn!(%peer, "lease for peer:{peer} but no fabric address configured in [datapath.peers]: its traffic is enforced under egress");
            }
            status.unresolved_peers = unresolved;
        }
        match result {
            Ok(changes) => {
                if !changes.is_empty() {
                    status.changes_applied += 1;
                    for c in &changes {
                        tracing::info!(change = %c, "datapath");
                    }
                }
                status.last_error = None;
                self.last_desired = Some(desired);
            }
            Err(e) => {
                tracing::error!(error = %e, "datapath reconcile failed; retrying at the next tick");
                status.last_error = Some(format!("reconcile: {e}"));
                self.last_desired = None;
            }
        }
    }

    /// Reads the kernel counters into per-lease usage.
    fn sample_kernel(&mut self, now: Time) {
        let Some(dp) = self.datapath.as_mut() else {
            return;
        };
        let result = tokio::task::block_in_place(|| dp.counters());
        let status = self.dp_status.get_or_insert_with(Default::default);
        match result {
            Ok(counters) => {
                let (usage, kernel) = self.enforcer.usage(now, &counters);
                for (scope, _id, u) in usage {
                    self.core.record_usage(&scope, u);
                }
                status.scopes = kernel;
            }
            Err(e) => {
                tracing::error!(error = %e, "reading datapath counters failed");
                status.last_error = Some(format!("counters: {e}"));
            }
        }
    }

    fn log_event(&self, ev: &AgentEvent) {
        match ev {
            AgentEvent::Accepted {
                lease,
                scope,
                renewed,
                ..
            } => {
                if *renewed {
                    tracing::debug!(%lease, %scope, "lease renewed");
                } else {
                    tracing::info!(%lease, %scope, "lease accepted: active");
                }
            }
            AgentEvent::Revoked {
                lease,
                scope,
                reason,
            } => tracing::warn!(%lease, %scope, %reason, "lease revoked: scope at its floor"),
            AgentEvent::Expired { lease, scope } => tracing::warn!(
                %lease, %scope,
                "lease expired (no renewal before the deadline): scope at its floor"
            ),
        }
    }

    /// The tamper response, in this order: fabric blocked, keys destroyed and peers
    /// dropped, event persisted, controller told. Nothing here waits on the network.
    async fn on_tamper(&mut self, req: tamper::TamperRequest) -> anyhow::Result<()> {
        let t0 = std::time::Instant::now();
        if let Some(t) = &self.tampered {
            if let Some(reply) = req.reply {
                let _ = reply.send(format!(
                    "ok already tampered ({}); fabric blocked, keys destroyed",
                    t.reason
                ));
            }
            return Ok(());
        }
        let now = self.clock.now();
        let detected = unix_ms();
        self.tampered = Some(TamperStatus {
            reason: req.reason.clone(),
            source: req.source.clone(),
            detected_unix_ms: detected,
            blocked_after_us: None,
            keys_destroyed_after_us: None,
            reported: false,
        });
        // 1. Block the fabric (force a reconcile even if the last one was recent).
        self.last_desired = None;
        self.enforce(now);
        let blocked_us = t0.elapsed().as_micros() as u64;
        let block_error = self.dp_status.as_ref().and_then(|s| s.last_error.clone());
        // 2. Destroy the keys, drop the peers.
        let mesh_note = match self.mesh.as_mut() {
            Some(m) => m.destroy(&req.reason, now).await,
            None => "no mesh".to_string(),
        };
        let keys_us = t0.elapsed().as_micros() as u64;
        // A tampered node stops vouching for links (its identity is about to be retired).
        if let Some(p) = self.prober.take() {
            tokio::task::block_in_place(|| drop(p));
        }
        // 3. Persist.
        let rec = tamper::TamperRecord {
            reason: req.reason.clone(),
            source: req.source.clone(),
            detected_unix_ms: detected,
        };
        let saved = tamper::save(&self.cfg.data_dir, &rec);
        set_hello(&self.hello, |h| {
            h.mesh = None;
            h.tamper = Some((req.reason.clone(), detected));
        });
        // 4. Tell the controller (now if connected; every later Hello carries it too).
        let told = self.connected;
        self.send(pb::agent_message::Msg::Tamper(pb::TamperReport {
            reason: req.reason.clone(),
            detected_unix_ms: detected,
        }));
        if let Some(t) = self.tampered.as_mut() {
            t.blocked_after_us = Some(blocked_us);
            t.keys_destroyed_after_us = Some(keys_us);
            t.reported = told;
        }
        tracing::error!(reason = %req.reason, source = %req.source, blocked_after_us = blocked_us, keys_destroyed_after_us = keys_us, "TAMPER: fabric blocked, {mesh_note}");
        let outcome = match (&block_error, &saved) {
            (None, Ok(())) => format!(
                "ok fabric blocked in {blocked_us} us; {mesh_note} in {keys_us} us; recorded; controller {}",
                if told { "told" } else { "told at its next connection" }
            ),
            (Some(e), _) => format!("error blocking the fabric failed ({e}); {mesh_note}"),
            (None, Err(e)) => format!("error fabric blocked, {mesh_note}, but the record was not saved: {e:#}"),
        };
        if let Some(reply) = req.reply {
            let _ = reply.send(outcome);
        }
        Ok(())
    }

    async fn handle(&mut self, ev: Event) -> anyhow::Result<()> {
        match ev {
            Event::Tamper(req) => self.on_tamper(req).await?,
            Event::Connected(tx) => {
                self.to_controller = Some(tx);
                self.connected = true;
                self.last_error = None;
                if let Some(t) = self.tampered.as_mut() {
                    t.reported = true;
                }
            }
            Event::Disconnected(why) => {
                self.to_controller = None;
                if self.connected {
                    tracing::warn!(reason = %why, "lost the controller: keeping leases until their deadlines");
                }
                self.connected = false;
                self.last_error = Some(why);
            }
            Event::Message(m) => self.on_message(m).await?,
            // Probes are about now: a round heard while disconnected is dropped.
            Event::Probe(report) => self.send(pb::agent_message::Msg::ProbeReport(report)),
            Event::Status(reply) => {
                let now = self.clock.now();
                self.expire(now);
                let mesh = match &self.mesh {
                    Some(m) => {
                        let mut st = m.status(now).await;
                        st.guard = self.guard_status.clone();
                        Some(st)
                    }
                    None => None,
                };
                let _ = reply.send(AgentStatus {
                    node: self.cfg.node.clone(),
                    controller: self.cfg.controller.clone(),
                    connected: self.connected,
                    last_seq: self.core.last_seq(),
                    last_error: self.last_error.clone(),
                    rejected_directives: self.rejected,
                    scopes: self.core.decision(now),
                    datapath: self.dp_status.clone(),
                    mesh,
                    tampered: self.tampered.clone(),
                    probe: match (&self.prober, &self.probe_error) {
                        (Some(p), _) => Some(p.status()),
                        (None, Some(e)) => Some(probe::ProbeStatus {
                            iface: self.cfg.datapath.fabric_iface.clone(),
                            interval_ms: self.cfg.probe.interval_ms,
                            last_error: Some(e.clone()),
                            ..Default::default()
                        }),
                        (None, None) => None,
                    },
                });
            }
        }
        Ok(())
    }

    async fn on_message(&mut self, m: pb::ControllerMessage) -> anyhow::Result<()> {
        match m.msg {
            Some(pb::controller_message::Msg::Directive(sd)) => {
                let now = self.clock.now();
                let d = match nicwarden_proto::verify_directive(&sd, &self.ident_key) {
                    Ok(d) => d,
                    Err(e) => {
                        self.rejected += 1;
                        tracing::error!(error = %e, "directive rejected");
                        return Ok(());
                    }
                };
                let received_boot_ms = identity::boot_ms().unwrap_or(0);
                let lease = match &d {
                    nicwarden_lease::Directive::Lease(l) => Some((l.id, l.scope.to_string())),
                    nicwarden_lease::Directive::Revoke(_) => None,
                };
                match self.core.handle_directive(now, d) {
                    Ok(ev) => {
                        self.log_event(&ev);
                        self.hold(&ev, lease, &sd, received_boot_ms);
                        let seq = self.core.last_seq();
                        self.last_seq
                            .store(seq, std::sync::atomic::Ordering::SeqCst);
                        // If the replay guard cannot be persisted, a restart could accept a
                        // replayed lease: stop rather than carry on unguarded.
                        identity::save_state(
                            &self.cfg.data_dir,
                            &identity::PersistedState {
                                last_seq: seq,
                                leases: self.held.values().cloned().collect(),
                            },
                        )
                        .context("persist the replay guard")?;
                        self.enforce(now);
                    }
                    Err(e) => {
                        self.rejected += 1;
                        tracing::error!(error = %e, "directive rejected");
                    }
                }
            }
            Some(pb::controller_message::Msg::Mesh(su)) => {
                let now = self.clock.now();
                match self.mesh.as_mut() {
                    Some(m) => m.on_update(&su, &self.ident_key, now).await,
                    None => tracing::debug!("mesh update ignored: the mesh is not enabled here"),
                }
            }
            Some(pb::controller_message::Msg::RotateKey(r)) => match self.mesh.as_mut() {
                Some(m) => match m.rotate().await {
                    Ok(info) => {
                        tracing::info!(reason = %r.reason, "WireGuard key rotated at the controller's request");
                        set_hello(&self.hello, |h| h.mesh = Some(info.clone()));
                        self.send(pb::agent_message::Msg::MeshKey(info));
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "key rotation failed"),
                },
                None => tracing::warn!("key rotation asked, but the mesh is not enabled here"),
            },
            Some(pb::controller_message::Msg::Error(e)) => {
                tracing::warn!(lease = e.lease_id, message = %e.message, "controller reported an error");
            }
            None => tracing::warn!("empty message from the controller; ignored"),
        }
        Ok(())
    }
}

/// Keeps a session open, reconnecting with exponential backoff (with jitter), and forwards
/// what arrives to the loop.
async fn session_task(
    cfg: AgentConfig,
    tls: rustls::ClientConfig,
    ev: mpsc::Sender<Event>,
    last_seq: Arc<std::sync::atomic::AtomicU64>,
    hello: SharedHello,
) {
    let mut backoff = Duration::from_millis(100);
    let max = Duration::from_millis(cfg.max_backoff_ms.max(100));
    loop {
        let result = session_once(&cfg, tls.clone(), &ev, &last_seq, &hello).await;
        let why = match result {
            Ok(true) => {
                backoff = Duration::from_millis(100);
                "session closed by the controller".to_string()
            }
            Ok(false) => "session closed".to_string(),
            Err(e) => format!("{e:#}"),
        };
        tracing::info!(reason = %why, retry_in_ms = backoff.as_millis() as u64, "not connected to the controller");
        if ev.send(Event::Disconnected(why)).await.is_err() {
            return;
        }
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(max);
    }
}

/// One session; `Ok(true)` if it was established before it ended.
async fn session_once(
    cfg: &AgentConfig,
    tls: rustls::ClientConfig,
    ev: &mpsc::Sender<Event>,
    last_seq: &std::sync::atomic::AtomicU64,
    hello: &SharedHello,
) -> anyhow::Result<bool> {
    let extras = hello.lock().map(|h| h.clone()).unwrap_or_default();
    let channel = transport::connect(&cfg.controller, tls).await?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(256);
    out_tx
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                node: cfg.node.clone(),
                last_seq: last_seq.load(std::sync::atomic::Ordering::SeqCst),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                mesh: extras.mesh,
                tamper_reason: extras
                    .tamper
                    .as_ref()
                    .map(|t| t.0.clone())
                    .unwrap_or_default(),
                tamper_detected_unix_ms: extras.tamper.map(|t| t.1).unwrap_or(0),
            })),
        })
        .await
        .context("queue Hello")?;
    let resp = client
        .session(tokio_stream::wrappers::ReceiverStream::new(out_rx))
        .await
        .map_err(|s| anyhow::anyhow!("session refused: {}", s.message()))?;
    let mut inbound = resp.into_inner();
    tracing::info!(controller = %cfg.controller, "connected to the controller");
    if ev.send(Event::Connected(out_tx)).await.is_err() {
        return Ok(true);
    }
    while let Some(m) = inbound.next().await {
        match m {
            Ok(m) => {
                if ev.send(Event::Message(m)).await.is_err() {
                    return Ok(true);
                }
            }
            Err(s) => anyhow::bail!("session ended: {}", s.message()),
        }
    }
    Ok(true)
}
