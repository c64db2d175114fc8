//! The task of one simulated node: enrollment (keys in memory), the mutual-TLS session,
//! directives, renewals, usage reports, the mesh (when the fleet takes part), commands
//! from the [`Fleet`](crate::Fleet) (tamper), and reconnection with bounded backoff.

use crate::api::Api;
use crate::mesh::{self, NodeMesh};
use crate::sim::{Applied, NodeSim};
use crate::{NodeSlot, Shared, SimError};
use nicwarden_agent::transport;
use nicwarden_pki::{JoinToken, NodeKey};
use nicwarden_proto::pb;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::{Instant, Interval};
use tokio_stream::StreamExt;

/// First delay before reconnecting; doubled after each failed attempt.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Attempts at the first session before `Fleet::start` gives up on the node.
const FIRST_SESSION_ATTEMPTS: u32 = 3;
/// Longest time one enrollment may take.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages queued towards the controller per session.
const QUEUE: usize = 64;
/// Commands queued towards one node's task.
pub(crate) const CONTROL_QUEUE: usize = 8;

/// A command from the fleet to one node's task.
pub(crate) enum Control {
    /// Report tampering on the session (the answer says whether it was queued).
    Tamper {
        reason: String,
        ack: oneshot::Sender<Result<(), String>>,
    },
}

/// What the node's task needs to start.
pub(crate) struct Start {
    pub api: Arc<Api>,
    pub add_node: bool,
    /// Bounds the enrollments and first connections in flight.
    pub gate: Arc<Semaphore>,
    /// Told once the first session is up, or why the node could not get there.
    pub ready: oneshot::Sender<Result<(), SimError>>,
    pub stop: watch::Receiver<bool>,
    pub control: mpsc::Receiver<Control>,
}

/// An open session: messages to the controller go into `tx`.
struct Session {
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::ControllerMessage>,
    // Held for the session's life (the connection it runs on).
    _client: pb::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
}

/// Why a session loop returned.
enum End {
    Stopped,
    Lost(String),
    /// The node reported tampering and the controller ended the session: stay away.
    Tampered,
}

/// Why a session could not be opened.
enum OpenError {
    Failed(String),
    /// The controller refused the session because the node is tampered (reported by the
    /// node, or declared by the operator): it will never accept this certificate again.
    Tampered(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Failed(m) | OpenError::Tampered(m) => f.write_str(m),
        }
    }
}

/// Resolves once the fleet is told to stop (or dropped).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

fn lock(sim: &std::sync::Mutex<NodeSim>) -> std::sync::MutexGuard<'_, NodeSim> {
    // A panic while holding the lock cannot leave a NodeSim half-updated in a way that
    // matters to a simulation; keep going with its state.
    sim.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_mesh(slot: &NodeSlot) -> std::sync::MutexGuard<'_, Option<NodeMesh>> {
    slot.mesh.lock().unwrap_or_else(|p| p.into_inner())
}

/// The node's whole life: started by `Fleet::start`, ends when the fleet stops.
pub(crate) async fn run(shared: Arc<Shared>, idx: usize, start: Start) {
    let Start {
        api,
        add_node,
        gate,
        ready,
        mut stop,
        mut control,
    } = start;
    let name = shared.nodes[idx].name.clone();
    let first = async {
        let _permit = gate
            .acquire()
            .await
            .map_err(|_| SimError::node(&name, "wait for a start slot", "fleet stopping"))?;
        let token = api
            .join_token(&name, add_node)
            .await
            .map_err(|(op, f)| SimError::node(&name, op, f))?;
        shared.progress.added.fetch_add(1, Ordering::Relaxed);
        let tls = tokio::time::timeout(ENROLL_TIMEOUT, enroll(&shared, idx, &token))
            .await
            .map_err(|_| SimError::node(&name, "enroll", "no answer within 30 s"))?
            .map_err(|e| SimError::node(&name, "enroll", e))?;
        shared.progress.enrolled.fetch_add(1, Ordering::Relaxed);
        let mut backoff = MIN_BACKOFF;
        let mut attempt = 1;
        loop {
            match open_session(&shared, idx, &tls).await {
                Ok(s) => return Ok((tls, s)),
                Err(e) if attempt >= FIRST_SESSION_ATTEMPTS => {
                    return Err(SimError::node(
                        &name,
                        "open the session",
                        format!("{e} ({attempt} attempts)"),
                    ))
                }
                Err(_) => {
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
            }
        }
    };
    let (tls, session) = tokio::select! {
        _ = stopped(&mut stop) => return,
        r = first => match r {
            Ok(v) => v,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        },
    };
    let mut ready = Some(ready);
    let mut session = Some(session);
    let mut report = report_timer(&shared, idx);
    let mut backoff = MIN_BACKOFF;
    loop {
        let s = match session.take() {
            Some(s) => s,
            None => {
                let r = tokio::select! {
                    _ = stopped(&mut stop) => break,
                    r = open_session(&shared, idx, &tls) => r,
                };
                match r {
                    Ok(s) => s,
                    Err(OpenError::Tampered(e)) => {
                        // Declared tampered by the operator while we were away: refused
                        // for good. Do not spin on refusals.
                        tracing::info!(node = %name, "session refused, node tampered; not reconnecting: {e}");
                        break;
                    }
                    Err(e) => {
                        shared.error(&name, &format!("reconnect: {e}"));
                        tokio::select! {
                            _ = stopped(&mut stop) => break,
                            _ = tokio::time::sleep(jittered(backoff)) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
        };
        shared.stats.connected.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = ready.take() {
            shared.progress.connected.fetch_add(1, Ordering::Relaxed);
            let _ = r.send(Ok(()));
        }
        let end = drive(&shared, idx, s, &mut report, &mut stop, &mut control).await;
        shared.stats.connected.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Stopped => break,
            End::Tampered => {
                tracing::info!(node = %name, "tampered: session ended, not reconnecting");
                break;
            }
            End::Lost(why) => {
                shared.error(&name, &why);
                backoff = MIN_BACKOFF;
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    _ = tokio::time::sleep(jittered(backoff)) => {}
                }
            }
        }
    }
    tracing::debug!(node = %name, "simulated node stopped");
}

/// `d` plus up to half of it again, so reconnecting nodes do not move in lockstep.
fn jittered(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    d + Duration::from_millis(rand::random::<u64>() % (ms / 2 + 1))
}

/// The node's report timer. Nodes' phases are spread evenly over the interval (node `i`
/// of `n` reports at `epoch + i/n * interval + k * interval`), so a thousand nodes do not
/// report at the same instant; a late tick is skipped, keeping the phase. (Tokio's timers
/// are one hierarchical wheel per runtime, so a timer per node costs little.)
fn report_timer(shared: &Shared, idx: usize) -> Interval {
    let every = shared.report_interval;
    let n = shared.nodes.len().max(1) as u128;
    let phase = Duration::from_nanos((every.as_nanos() * idx as u128 / n) as u64);
    let mut first = shared.epoch + phase;
    let now = Instant::now();
    if first < now {
        let behind = (now - first).as_nanos();
        let periods = behind / every.as_nanos().max(1) + 1;
        first += Duration::from_nanos((every.as_nanos() * periods) as u64);
    }
    let mut t = tokio::time::interval_at(first, every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    t
}

/// Enrolls with a join token (a fresh key, a CSR, the controller's CA pinned by the token),
/// pins the lease key, and returns the session's TLS config. Nothing touches the disk.
async fn enroll(shared: &Shared, idx: usize, token: &str) -> Result<rustls::ClientConfig, String> {
    let node = &shared.nodes[idx].name;
    let token = JoinToken::parse(token).map_err(|e| format!("join token: {e}"))?;
    let key = NodeKey::generate().map_err(|e| e.to_string())?;
    let csr_pem = key.csr_pem(node).map_err(|e| e.to_string())?;
    let tls =
        nicwarden_pki::enrollment_client_config(token.ca_fingerprint).map_err(|e| e.to_string())?;
    let channel = transport::connect(&shared.agent_url, tls)
        .await
        .map_err(|e| format!("connect to {}: {e:#}", shared.agent_url))?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let resp = client
        .enroll(pb::EnrollRequest {
            node: node.clone(),
            token: token.encode(),
            csr_pem,
        })
        .await
        .map_err(|s| format!("controller refused: {}", s.message()))?
        .into_inner();
    let lease_key: [u8; 32] = resp
        .lease_public_key
        .as_slice()
        .try_into()
        .map_err(|_| "the controller sent a lease key that is not 32 bytes".to_string())?;
    // The CA we were given must be the one the token pinned.
    let ca_der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(resp.ca_pem.as_bytes())
            .map_err(|e| format!("the controller sent an unreadable CA certificate: {e}"))?
    };
    let fp: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(&ca_der).into()
    };
    if fp != token.ca_fingerprint {
        return Err("the controller's CA does not match the fingerprint in the join token".into());
    }
    lock(&shared.nodes[idx].sim).pin_lease_key(lease_key);
    nicwarden_pki::agent_client_config(&resp.ca_pem, &resp.cert_pem, &key)
        .map_err(|e| e.to_string())
}

/// Connects with the node's certificate and sends Hello; up once the controller accepts.
async fn open_session(
    shared: &Shared,
    idx: usize,
    tls: &rustls::ClientConfig,
) -> Result<Session, OpenError> {
    let node = &shared.nodes[idx].name;
    let channel = transport::connect(&shared.agent_url, tls.clone())
        .await
        .map_err(|e| OpenError::Failed(format!("connect to {}: {e:#}", shared.agent_url)))?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(QUEUE);
    let last_seq = lock(&shared.nodes[idx].sim).last_seq();
    // A node whose mesh is shut down (tampered) no longer offers an identity.
    let mesh = lock_mesh(&shared.nodes[idx])
        .as_ref()
        .filter(|m| m.core.tampered().is_none())
        .map(NodeMesh::info_pb);
    tx.try_send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            node: node.clone(),
            last_seq,
            agent_version: concat!("simfleet/", env!("CARGO_PKG_VERSION")).to_string(),
            mesh,
            ..Default::default()
        })),
    })
    .map_err(|_| OpenError::Failed("queue Hello".to_string()))?;
    let resp = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            let m = format!("session refused: {}", s.message());
            if s.code() == tonic::Code::PermissionDenied && s.message().contains("tampered") {
                OpenError::Tampered(m)
            } else {
                OpenError::Failed(m)
            }
        })?;
    Ok(Session {
        tx,
        inbound: resp.into_inner(),
        _client: client,
    })
}

/// Runs one session until it ends or the fleet stops.
async fn drive(
    shared: &Shared,
    idx: usize,
    mut s: Session,
    report: &mut Interval,
    stop: &mut watch::Receiver<bool>,
    control: &mut mpsc::Receiver<Control>,
) -> End {
    let slot = &shared.nodes[idx];
    let send = |tx: &mpsc::Sender<pb::AgentMessage>, msg: pb::agent_message::Msg| -> bool {
        match tx.try_send(pb::AgentMessage { msg: Some(msg) }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                shared.error(&slot.name, "queue to the controller full: message dropped");
                false
            }
            // The session is going away; its end is reported by the inbound stream.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    };
    let mut tampered = false;
    loop {
        let lease_wake = lock(&slot.sim).poll_timeout();
        let mesh_wake = lock_mesh(slot).as_ref().and_then(|m| m.core.poll_timeout());
        let wake = [lease_wake, mesh_wake]
            .into_iter()
            .flatten()
            .min()
            .map(|t| shared.instant(t))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = stopped(stop) => return End::Stopped,
            m = s.inbound.next() => match m {
                Some(Ok(m)) => {
                    if let Some(reply) = on_message(shared, idx, m) {
                        send(&s.tx, reply);
                    }
                }
                Some(Err(st)) => return ended(tampered, format!("session ended: {}", st.message())),
                None => return ended(tampered, "session closed by the controller".into()),
            },
            Some(c) = control.recv() => match c {
                Control::Tamper { reason, ack } => {
                    // As an agent does: its fabric is blocked (nothing to do here), its whole
                    // mesh dropped and refused from now on, then the report goes out.
                    if let Some(m) = lock_mesh(slot).as_mut() {
                        let diff = m.core.tamper(&reason);
                        mesh::note(&shared.removals, &slot.name, &diff);
                    }
                    let detected_unix_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let msg = pb::agent_message::Msg::Tamper(pb::TamperReport {
                        reason,
                        detected_unix_ms,
                    });
                    let r = if send(&s.tx, msg) {
                        tampered = true;
                        Ok(())
                    } else {
                        Err("the session's queue to the controller is full or closed".to_string())
                    };
                    let _ = ack.send(r);
                    shared.changed.notify_waiters();
                }
            },
            _ = report.tick() => {
                let r = lock(&slot.sim).report(shared.now());
                if send(&s.tx, pb::agent_message::Msg::Usage(r)) {
                    shared.stats.reports.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = shared.now();
                if let Some(m) = lock_mesh(slot).as_mut() {
                    let diff = m.core.poll(now);
                    if !diff.removed.is_empty() {
                        mesh::note(&shared.removals, &slot.name, &diff);
                        shared.changed.notify_waiters();
                    }
                }
                let due = lock(&slot.sim).renewals(now);
                for id in due {
                    let msg = pb::agent_message::Msg::Renew(pb::RenewRequest { lease_id: id });
                    if send(&s.tx, msg) {
                        shared.stats.renewals.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// How a session that ended because of `why` ended: a node that reported tampering expects
/// the controller to end it.
fn ended(tampered: bool, why: String) -> End {
    if tampered {
        End::Tampered
    } else {
        End::Lost(why)
    }
}

/// Handles one message from the controller; returns the answer to send, if any.
fn on_message(
    shared: &Shared,
    idx: usize,
    m: pb::ControllerMessage,
) -> Option<pb::agent_message::Msg> {
    let slot = &shared.nodes[idx];
    let name = &slot.name;
    match m.msg {
        Some(pb::controller_message::Msg::Directive(sd)) => {
            let r = lock(&shared.nodes[idx].sim).handle_directive(shared.now(), &sd);
            match r {
                Ok(applied) => {
                    shared.stats.directives.fetch_add(1, Ordering::Relaxed);
                    match applied {
                        Applied::Lease { id, scope } => {
                            tracing::debug!(node = %name, lease = id, %scope, "lease accepted")
                        }
                        Applied::Revoked { id, scope } => {
                            tracing::debug!(node = %name, lease = id, %scope, "lease revoked")
                        }
                    }
                    shared.changed.notify_waiters();
                }
                Err(e) => shared.error(name, &format!("directive rejected: {e}")),
            }
        }
        Some(pb::controller_message::Msg::Mesh(su)) => {
            let lease_key = lock(&slot.sim).lease_key();
            let now = shared.now();
            let mut g = lock_mesh(slot);
            // A fleet outside the mesh ignores mesh updates, as an agent without it does.
            let m = g.as_mut()?;
            if m.core.tampered().is_some() {
                // Refused, as an agent refuses it; expected: the controller clears a
                // tampered node's set (an empty snapshot) as it handles the report.
                tracing::debug!(node = %name, "mesh update after tampering: ignored");
                return None;
            }
            match mesh::apply(m, lease_key, &su, now) {
                Ok(diff) => {
                    drop(g);
                    shared.stats.mesh_updates.fetch_add(1, Ordering::Relaxed);
                    mesh::note(&shared.removals, name, &diff);
                    if let Some(r) = diff.rejected.first() {
                        shared.error(
                            name,
                            &format!(
                                "mesh update: {} entries refused (first: node {}: {})",
                                diff.rejected.len(),
                                r.node,
                                r.reason
                            ),
                        );
                    }
                    tracing::debug!(node = %name, upserted = diff.upserted.len(), removed = diff.removed.len(), "mesh update applied");
                    shared.changed.notify_waiters();
                }
                Err(e) => {
                    drop(g);
                    shared.error(name, &format!("mesh update rejected: {e}"));
                }
            }
        }
        Some(pb::controller_message::Msg::RotateKey(r)) => {
            let mut g = lock_mesh(slot);
            let m = g.as_mut().filter(|m| m.core.tampered().is_none())?;
            let info = m.rotate();
            tracing::debug!(node = %name, reason = %r.reason, key = %m.info.public_key, "mesh key rotated");
            return Some(pb::agent_message::Msg::MeshKey(info));
        }
        Some(pb::controller_message::Msg::Error(e)) => shared.error(
            name,
            &format!("controller error (lease {}): {}", e.lease_id, e.message),
        ),
        None => shared.error(name, "empty message from the controller"),
    }
    None
}
