//! Interconnect verification in the controller: the declared topology (stored, versioned),
//! the pure verifier (`nicwarden_topology::Verifier`) fed with the agents' probe rounds, and
//! what its findings become: events, metrics, and, where the policy says so, revoked leases.
//!
//! Agents report what their link probes heard, raw: each neighbour's answer with its
//! signature. Only here is an answer trusted, and only if it is signed by the enrollment
//! certificate of the node it names, answers this very node and port, and echoes the nonce
//! of this round, a nonce the port never used before. Everything else is reported as what
//! it is (unsigned, badly signed, replayed, unknown identity) and never counts as a link.
//!
//! Storage: `/topology/current` (the applied topology with its source text and version) and
//! `/topology/versions/<version>` (every version ever applied).

use crate::core::{now_ms, ApiError, ApiErrorKind, Controller};
use nicwarden_lease::Time;
use nicwarden_proto::pb;
use nicwarden_store::{Op, SqliteStore, Store, StoreExt, Txn};
use nicwarden_telemetry::Severity as EventSeverity;
use nicwarden_topology::{
    Answer, ByteSample, Change, Endpoint, Finding, FindingKind, Heard, Policy, PortRound, Severity,
    Topology, Verifier, VerifierConfig,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};

pub const KEY_TOPOLOGY: &str = "/topology/current";
pub const PREFIX_TOPOLOGY_VERSIONS: &str = "/topology/versions/";
/// Nonces remembered per port: a prober reusing one is replaying.
const NONCES_KEPT: usize = 64;

/// `topology_*` keys of the controller config.
#[derive(Clone, Debug, Default)]
pub struct TopologyConfig {
    pub verifier: VerifierConfig,
    pub policy: Policy,
}

/// An applied topology as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopologyRecord {
    pub version: u64,
    pub applied_at_unix_ms: u64,
    pub fingerprint: String,
    /// The file as the operator wrote it.
    pub source: String,
    pub topology: Topology,
}

/// One port's latest probing round, for the status view.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PortView {
    pub node: String,
    pub port: String,
    pub last_round_unix_ms: u64,
    /// What it heard: `node2:fab0 (312 us)`, `switch leaf1:p1`, `unsigned (claims node5:fab0)`.
    pub heard: Vec<String>,
}

/// The last comparison of one direction between two nodes, for the status view.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BytePair {
    pub from: String,
    pub to: String,
    pub window_start_unix_ms: u64,
    pub window_end_unix_ms: u64,
    pub sent: u64,
    pub received: u64,
    pub dropped: u64,
}

/// A node's cumulative counters per peer: (sent to, received from, dropped from).
type Cumulative = HashMap<String, (u64, u64, u64)>;

/// One side of a window: what a node counted for a peer between two of its samples.
#[derive(Default)]
struct Windows {
    /// Each reporter's previous sample: window end, and cumulative (tx, rx, dropped) per peer.
    last: HashMap<String, (u64, Cumulative)>,
    /// (start, end, from, to) -> bytes `from` sent to `to`.
    sent: BTreeMap<(u64, u64, String, String), u64>,
    /// (start, end, from, to) -> (bytes `to` received from `from`, bytes it dropped).
    received: BTreeMap<(u64, u64, String, String), (u64, u64)>,
}

pub struct TopoState {
    windows: Windows,
    pairs: BTreeMap<(String, String), BytePair>,
    pub current: Option<TopologyRecord>,
    pub verifier: Verifier,
    pub policy: Policy,
    nonces: HashMap<(String, String), VecDeque<Vec<u8>>>,
    ports: BTreeMap<(String, String), PortView>,
}

impl TopoState {
    pub fn load(store: &SqliteStore, cfg: TopologyConfig) -> anyhow::Result<TopoState> {
        let current: Option<TopologyRecord> = store.get_json(KEY_TOPOLOGY)?;
        let mut verifier = Verifier::new(cfg.verifier);
        verifier.set_topology(current.as_ref().map(|r| r.topology.clone()), Time(now_ms()));
        Ok(TopoState {
            windows: Windows::default(),
            pairs: BTreeMap::new(),
            current,
            verifier,
            policy: cfg.policy,
            nonces: HashMap::new(),
            ports: BTreeMap::new(),
        })
    }
}

/// `PUT /v1/topology`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyTopologyRequest {
    /// The topology file (TOML).
    pub toml: String,
    /// Validate only; store nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// A declared link as shown.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LinkView {
    pub a: String,
    pub b: String,
    pub rtt_max_us: u64,
}

/// An applied (or, for a dry run, validated) topology.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TopologyView {
    /// 0 for a dry run.
    pub version: u64,
    pub applied_at_unix_ms: u64,
    pub fingerprint: String,
    /// False when the file declares what is already applied (no new version).
    pub changed: bool,
    pub dry_run: bool,
    pub note: Option<String>,
    pub nodes: BTreeMap<String, Vec<String>>,
    pub switches: BTreeMap<String, Vec<String>>,
    pub links: Vec<LinkView>,
    pub source: String,
}

/// `GET /v1/topology/status`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopologyStatus {
    pub version: Option<u64>,
    pub fingerprint: Option<String>,
    pub now_unix_ms: u64,
    pub findings: Vec<Finding>,
    pub ports: Vec<PortView>,
    /// Byte conservation: the last window compared per direction.
    pub byte_pairs: Vec<BytePair>,
    /// Finding kinds whose culprits lose their leases automatically.
    pub revoke_policy: Vec<String>,
}

/// One entry of `GET /v1/topology/versions`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionView {
    pub version: u64,
    pub applied_at_unix_ms: u64,
    pub fingerprint: String,
    pub note: Option<String>,
    pub links: usize,
}

fn view(rec: &TopologyRecord, changed: bool, dry_run: bool) -> TopologyView {
    let t = &rec.topology;
    TopologyView {
        version: rec.version,
        applied_at_unix_ms: rec.applied_at_unix_ms,
        fingerprint: rec.fingerprint.clone(),
        changed,
        dry_run,
        note: t.version_note.clone(),
        nodes: t
            .nodes
            .iter()
            .map(|(k, d)| (k.clone(), d.ports.clone()))
            .collect(),
        switches: t
            .switches
            .iter()
            .map(|(k, d)| (k.clone(), d.ports.clone()))
            .collect(),
        links: t
            .links
            .iter()
            .map(|l| LinkView {
                a: l.a.to_string(),
                b: l.b.to_string(),
                rtt_max_us: l.rtt_max_us,
            })
            .collect(),
        source: rec.source.clone(),
    }
}

fn lock(ctl: &Controller) -> std::sync::MutexGuard<'_, TopoState> {
    ctl.topo.lock().unwrap_or_else(|p| p.into_inner())
}

fn event_severity(s: Severity) -> EventSeverity {
    match s {
        Severity::Info => EventSeverity::Info,
        Severity::Warning => EventSeverity::Warning,
        Severity::Critical => EventSeverity::Critical,
    }
}

/// Validates and (unless a dry run) stores a new version.
pub fn apply(ctl: &Controller, req: ApplyTopologyRequest) -> Result<TopologyView, ApiError> {
    let topology = nicwarden_topology::parse(&req.toml)
        .map_err(|e| ApiError::invalid(format!("topology: {e}")))?;
    let unknown: Vec<&String> = topology.nodes.keys().filter(|n| !ctl.has_node(n)).collect();
    if !unknown.is_empty() {
        return Err(ApiError::invalid(format!(
            "topology: {} not {} of this controller (add with `nicwarden node add NAME`): {}",
            if unknown.len() == 1 {
                "this node is"
            } else {
                "these nodes are"
            },
            if unknown.len() == 1 {
                "a node"
            } else {
                "nodes"
            },
            unknown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let fingerprint = topology.fingerprint();
    let now = now_ms();
    let mut st = lock(ctl);
    let current = st.current.clone();
    let unchanged = current
        .as_ref()
        .is_some_and(|c| c.fingerprint == fingerprint);
    let rec = TopologyRecord {
        version: if req.dry_run {
            0
        } else if unchanged {
            current.as_ref().map(|c| c.version).unwrap_or(0)
        } else {
            current.as_ref().map(|c| c.version).unwrap_or(0) + 1
        },
        applied_at_unix_ms: if unchanged {
            current
                .as_ref()
                .map(|c| c.applied_at_unix_ms)
                .unwrap_or(now)
        } else {
            now
        },
        fingerprint,
        source: req.toml.clone(),
        topology,
    };
    if req.dry_run {
        return Ok(view(&rec, !unchanged, true));
    }
    if unchanged {
        return Ok(view(current.as_ref().unwrap_or(&rec), false, false));
    }
    let v = serde_json::to_vec(&rec)
        .map_err(|e| ApiError::new(ApiErrorKind::Internal, format!("store topology: {e}")))?;
    ctl.store()
        .txn(
            Txn::new()
                .then(Op::Put(KEY_TOPOLOGY.into(), v.clone()))
                .then(Op::Put(
                    format!("{PREFIX_TOPOLOGY_VERSIONS}{:010}", rec.version),
                    v,
                )),
        )
        .map_err(|e| ApiError::new(ApiErrorKind::Internal, format!("store topology: {e}")))?;
    let changes = st
        .verifier
        .set_topology(Some(rec.topology.clone()), Time(now));
    st.current = Some(rec.clone());
    let out = view(&rec, true, false);
    drop(st);
    ctl.audit_operator(
        "topology.apply",
        serde_json::json!({"version": rec.version, "fingerprint": rec.fingerprint, "links": rec.topology.links.len()}),
    );
    ctl.live.event(
        "topology.applied",
        EventSeverity::Info,
        None,
        None,
        None,
        format!(
            "topology version {} applied: {} nodes, {} switches, {} links (fingerprint {})",
            rec.version,
            rec.topology.nodes.len(),
            rec.topology.switches.len(),
            rec.topology.links.len(),
            rec.fingerprint
        ),
    );
    handle_changes(ctl, changes);
    Ok(out)
}

pub fn current(ctl: &Controller) -> Result<TopologyView, ApiError> {
    lock(ctl)
        .current
        .as_ref()
        .map(|r| view(r, false, false))
        .ok_or_else(|| {
            ApiError::not_found("no topology applied yet: `nicwarden topology apply FILE`")
        })
}

pub fn versions(ctl: &Controller) -> Result<Vec<VersionView>, ApiError> {
    let recs: Vec<(String, TopologyRecord)> = ctl
        .store()
        .range_json(PREFIX_TOPOLOGY_VERSIONS)
        .map_err(|e| {
            ApiError::new(
                ApiErrorKind::Internal,
                format!("read topology versions: {e}"),
            )
        })?;
    Ok(recs
        .into_iter()
        .map(|(_, r)| VersionView {
            version: r.version,
            applied_at_unix_ms: r.applied_at_unix_ms,
            fingerprint: r.fingerprint.clone(),
            note: r.topology.version_note.clone(),
            links: r.topology.links.len(),
        })
        .collect())
}

pub fn version(ctl: &Controller, v: u64) -> Result<TopologyView, ApiError> {
    let rec: Option<TopologyRecord> = ctl
        .store()
        .get_json(&format!("{PREFIX_TOPOLOGY_VERSIONS}{v:010}"))
        .map_err(|e| {
            ApiError::new(
                ApiErrorKind::Internal,
                format!("read topology version: {e}"),
            )
        })?;
    rec.map(|r| view(&r, false, false))
        .ok_or_else(|| ApiError::not_found(format!("topology version {v} not found")))
}

pub fn status(ctl: &Controller) -> TopologyStatus {
    let st = lock(ctl);
    TopologyStatus {
        version: st.current.as_ref().map(|c| c.version),
        fingerprint: st.current.as_ref().map(|c| c.fingerprint.clone()),
        now_unix_ms: now_ms(),
        findings: st.verifier.findings().cloned().collect(),
        ports: st.ports.values().cloned().collect(),
        byte_pairs: st.pairs.values().cloned().collect(),
        revoke_policy: st
            .policy
            .revoke
            .iter()
            .map(|k| k.as_str().to_string())
            .collect(),
    }
}

/// Judges one answer a prober reported (see the module docs).
fn judge(
    ctl: &Controller,
    node: &str,
    round: &pb::ProbeRound,
    fresh_nonce: bool,
    h: &pb::HeardFrame,
) -> Heard {
    if !h.switch_chassis.is_empty() {
        return Heard::Switch(Endpoint::new(&h.switch_chassis, &h.switch_port));
    }
    let Ok(answer) = pb::LinkAnswer::decode(h.answer.as_slice()) else {
        return Heard::BadSignature { claimed: None };
    };
    let claimed = (nicwarden_topology::valid_name(&answer.node)
        && nicwarden_topology::valid_name(&answer.port))
    .then(|| Endpoint::new(&answer.node, &answer.port));
    if h.signature.is_empty() {
        return Heard::Unsigned { claimed };
    }
    let Some(cert) = claimed.as_ref().and_then(|c| ctl.node_cert(&c.device)) else {
        return Heard::UnknownIdentity { claimed };
    };
    let signed = nicwarden_proto::link::link_signed_bytes(&h.answer);
    if nicwarden_pki::verify_node_signature(&cert, &signed, &h.signature).is_err() {
        return Heard::BadSignature { claimed };
    }
    if !fresh_nonce
        || answer.to_node != node
        || answer.to_port != round.port
        || answer.nonce != round.nonce
    {
        return Heard::Replayed { claimed };
    }
    match claimed {
        Some(c) => Heard::Node(c),
        None => Heard::BadSignature { claimed: None },
    }
}

/// A node's probe rounds: each answer judged, each round fed to the verifier.
pub fn probe_report(ctl: &Controller, node: &str, report: &pb::ProbeReport) {
    let now = now_ms();
    let mut changes = Vec::new();
    for round in report.rounds.iter().take(64) {
        if !nicwarden_topology::valid_name(&round.port) {
            continue;
        }
        let key = (node.to_string(), round.port.clone());
        let fresh = {
            let mut st = lock(ctl);
            let seen = st.nonces.entry(key.clone()).or_default();
            let fresh = round.nonce.len() == 16 && !seen.contains(&round.nonce);
            if fresh {
                seen.push_back(round.nonce.clone());
                if seen.len() > NONCES_KEPT {
                    seen.pop_front();
                }
            }
            fresh
        };
        // Signature checks outside the topology lock (node_cert takes the ledger's).
        let heard: Vec<Answer> = round
            .heard
            .iter()
            .take(256)
            .map(|h| Answer {
                heard: judge(ctl, node, round, fresh, h),
                rtt_us: (h.rtt_us > 0).then_some(h.rtt_us),
            })
            .collect();
        let pv = PortView {
            node: node.to_string(),
            port: round.port.clone(),
            last_round_unix_ms: now,
            heard: heard
                .iter()
                .map(|a| match (&a.heard, a.rtt_us) {
                    (Heard::Node(e), Some(r)) => format!("{e} ({r} us)"),
                    (Heard::Switch(e), _) => format!("switch {e}"),
                    (h, _) => match h.claimed() {
                        Some(c) => format!("{} (claims {c})", h.label()),
                        None => h.label().to_string(),
                    },
                })
                .collect(),
        };
        let mut st = lock(ctl);
        st.ports.insert(key, pv);
        changes.extend(st.verifier.round(PortRound {
            node: node.to_string(),
            port: round.port.clone(),
            at: Time(now),
            heard,
        }));
    }
    handle_changes(ctl, changes);
}

/// A node's per-peer counters at a window boundary. Differences between two consecutive
/// samples of a node give what it sent to and received from each peer in that window; once
/// both ends of a direction have reported the same window, the verifier compares them.
pub fn peer_bytes(ctl: &Controller, node: &str, r: &pb::PeerBytesReport) {
    if r.window_ms == 0 || !r.window_end_unix_ms.is_multiple_of(r.window_ms) {
        tracing::info!(%node, "peer byte report off the window grid; ignored");
        return;
    }
    let end = r.window_end_unix_ms;
    let now: Cumulative = r
        .peers
        .iter()
        .take(1024)
        .filter(|p| nicwarden_topology::valid_name(&p.node) && p.node != node)
        .map(|p| (p.node.clone(), (p.tx_bytes, p.rx_bytes, p.rx_dropped_bytes)))
        .collect();
    let mut samples = Vec::new();
    {
        let mut st = lock(ctl);
        let w = &mut st.windows;
        let prev = w.last.insert(node.to_string(), (end, now.clone()));
        if let Some((start, before)) = prev.filter(|(s, _)| *s < end) {
            for (peer, (tx, rx, dr)) in &now {
                let Some((tx0, rx0, dr0)) = before.get(peer) else {
                    continue;
                };
                // A counter that went back (reinstalled datapath) starts a new baseline.
                if tx < tx0 || rx < rx0 || dr < dr0 {
                    continue;
                }
                w.sent
                    .insert((start, end, node.to_string(), peer.clone()), tx - tx0);
                w.received.insert(
                    (start, end, peer.clone(), node.to_string()),
                    (rx - rx0, dr - dr0),
                );
            }
        }
        // Directions whose two ends both reported this window.
        let ready: Vec<(u64, u64, String, String)> = w
            .sent
            .keys()
            .filter(|k| w.received.contains_key(*k))
            .cloned()
            .collect();
        for k in ready {
            let (Some(sent), Some((received, dropped))) =
                (w.sent.remove(&k), w.received.remove(&k))
            else {
                continue;
            };
            samples.push(ByteSample {
                from: k.2.clone(),
                to: k.3.clone(),
                window_start: Time(k.0),
                window_end: Time(k.1),
                sent,
                received,
                dropped_at_receiver: dropped,
            });
        }
        // Windows one end never reported are forgotten after a while (bounded memory).
        let horizon = end.saturating_sub(r.window_ms.saturating_mul(10));
        w.sent.retain(|k, _| k.1 >= horizon);
        w.received.retain(|k, _| k.1 >= horizon);
        for s in &samples {
            st.pairs.insert(
                (s.from.clone(), s.to.clone()),
                BytePair {
                    from: s.from.clone(),
                    to: s.to.clone(),
                    window_start_unix_ms: s.window_start.0,
                    window_end_unix_ms: s.window_end.0,
                    sent: s.sent,
                    received: s.received,
                    dropped: s.dropped_at_receiver,
                },
            );
        }
    }
    let mut changes = Vec::new();
    {
        let mut st = lock(ctl);
        for s in samples {
            changes.extend(st.verifier.bytes(s, Time(now_ms())));
        }
    }
    handle_changes(ctl, changes);
}

/// The 1-second task: time-based findings (ports that went silent, flaps ageing out).
pub fn tick(ctl: &Controller) {
    let changes = lock(ctl).verifier.tick(Time(now_ms()));
    handle_changes(ctl, changes);
}

/// Findings become events, metrics and (per the policy) revocations.
fn handle_changes(ctl: &Controller, changes: Vec<Change>) {
    if changes.is_empty() {
        return;
    }
    let (actions, counts) = {
        let st = lock(ctl);
        let actions = st.verifier.policy_actions(&changes, &st.policy);
        let mut counts: BTreeMap<(FindingKind, Severity), i64> = BTreeMap::new();
        for f in st.verifier.findings() {
            *counts.entry((f.kind, f.severity)).or_default() += 1;
        }
        (actions, counts)
    };
    ctl.metrics.set_topology_findings(&counts);
    for c in &changes {
        let (kind, sev, text) = match c {
            Change::Raised(f) => (
                "topology.finding",
                event_severity(f.severity),
                format!("{} {}: {}", f.kind.as_str(), f.subject, f.detail),
            ),
            Change::Updated(f) => (
                "topology.finding_updated",
                event_severity(f.severity),
                format!("{} {}: {}", f.kind.as_str(), f.subject, f.detail),
            ),
            Change::Cleared(f) => (
                "topology.finding_cleared",
                EventSeverity::Info,
                format!("{} {} cleared", f.kind.as_str(), f.subject),
            ),
        };
        let f = c.finding();
        tracing::info!(finding = %f.id, "{text}");
        ctl.live.event(
            kind,
            sev,
            f.culprits.first().map(|s| s.as_str()),
            None,
            None,
            text,
        );
    }
    for a in actions {
        let n = ctl.revoke_node(&a.node, &format!("topology: {}", a.reason));
        ctl.audit_controller(
            "topology.revoke",
            serde_json::json!({"node": a.node, "finding": a.finding_id, "reason": a.reason, "leases": n}),
        );
        tracing::warn!(node = %a.node, finding = %a.finding_id, leases = n, "topology policy: leases revoked");
    }
}
