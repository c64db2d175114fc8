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
//! The process is one event loop over [`Event`]; the session task and the status server
//! only send events to it.

pub mod config;
pub mod counters;
pub mod enforce;
pub mod identity;
pub mod status;
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
    let ident = match identity::load(&cfg.data_dir)? {
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
    tokio::spawn(session_task(
        cfg.clone(),
        tls,
        ev_tx.clone(),
        last_seq.clone(),
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
    let clock = Clock {
        start: Instant::now(),
    };
    let held = restore_leases(&mut core, clock.now(), &ident.lease_key, &persisted.leases);
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
            let wake = self
                .core
                .poll_timeout()
                .map(|t| self.clock.instant(t))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev)?,
                    None => return Ok(()),
                },
                _ = tokio::time::sleep_until(wake) => self.on_timer(),
                _ = report.tick() => self.on_report(),
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
        let decisions = self.core.decision(now);
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

    fn handle(&mut self, ev: Event) -> anyhow::Result<()> {
        match ev {
            Event::Connected(tx) => {
                self.to_controller = Some(tx);
                self.connected = true;
                self.last_error = None;
            }
            Event::Disconnected(why) => {
                self.to_controller = None;
                if self.connected {
                    tracing::warn!(reason = %why, "lost the controller: keeping leases until their deadlines");
                }
                self.connected = false;
                self.last_error = Some(why);
            }
            Event::Message(m) => self.on_message(m)?,
            Event::Status(reply) => {
                let now = self.clock.now();
                self.expire(now);
                let _ = reply.send(AgentStatus {
                    node: self.cfg.node.clone(),
                    controller: self.cfg.controller.clone(),
                    connected: self.connected,
                    last_seq: self.core.last_seq(),
                    last_error: self.last_error.clone(),
                    rejected_directives: self.rejected,
                    scopes: self.core.decision(now),
                    datapath: self.dp_status.clone(),
                });
            }
        }
        Ok(())
    }

    fn on_message(&mut self, m: pb::ControllerMessage) -> anyhow::Result<()> {
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
) {
    let mut backoff = Duration::from_millis(100);
    let max = Duration::from_millis(cfg.max_backoff_ms.max(100));
    loop {
        let result = session_once(&cfg, tls.clone(), &ev, &last_seq).await;
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
) -> anyhow::Result<bool> {
    let channel = transport::connect(&cfg.controller, tls).await?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(256);
    out_tx
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                node: cfg.node.clone(),
                last_seq: last_seq.load(std::sync::atomic::Ordering::SeqCst),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
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
