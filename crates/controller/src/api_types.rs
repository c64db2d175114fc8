//! JSON bodies of the operator API (`/v1/...`), shared by the server and the CLI.
//!
//! The OpenAPI document (`openapi.json`, served at `/openapi.json`) describes these; a test
//! checks that every route in the document is served.

use nicwarden_lease::ledger::{LeaseRecord, NodeRecord};
use nicwarden_lease::quota::QuotaTree;
use serde::{Deserialize, Serialize};

/// `POST /v1/nodes`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddNodeRequest {
    pub name: String,
    /// Quota group the node belongs to (default `default`).
    #[serde(default)]
    pub group: Option<String>,
    /// Node capacity in bits/s (default: the group's capacity).
    #[serde(default)]
    pub capacity_bps: Option<u64>,
    /// How long the join token stays valid, in seconds (default 3600).
    #[serde(default)]
    pub token_ttl_s: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddNodeResponse {
    pub name: String,
    /// One-time join token: give it to the agent (`nicwarden agent --token ...`).
    pub join_token: String,
    pub token_expires_at_unix_ms: u64,
}

/// What the controller knows about a node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub group: String,
    pub capacity_bps: u64,
    pub enrolled: bool,
    pub connected: bool,
    pub cert_fingerprint: Option<String>,
    pub enrolled_at_unix_ms: Option<u64>,
    pub last_seq: u64,
    pub active_leases: usize,
    pub record: NodeRecord,
    /// Its WireGuard identity and tamper state; absent until its agent reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshView>,
}

/// `POST /v1/leases`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub node: String,
    /// `egress` (all fabric egress, the default) or `peer:NODE`.
    #[serde(default)]
    pub scope: Option<String>,
    pub rate_bps: u64,
    /// Burst in bytes (default: 10 ms at the rate, at least 16 KiB).
    #[serde(default)]
    pub burst_bytes: Option<u64>,
    #[serde(default)]
    pub volume_bytes: Option<u64>,
    /// Lifetime of each issuance, seconds (default 30).
    #[serde(default)]
    pub ttl_s: Option<f64>,
    /// Renewal interval, seconds (default ttl/3).
    #[serde(default)]
    pub renew_s: Option<f64>,
    /// Floor rate in bits/s once the lease lapses (default 0: blocked).
    #[serde(default)]
    pub floor_bps: Option<u64>,
}

/// `PUT /v1/leases/{id}`: change the terms of an active lease.
pub type AmendRequest = GrantRequest;

/// `POST /v1/leases/{id}/revoke`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// A lease as the operator sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseView {
    #[serde(flatten)]
    pub record: LeaseRecord,
    /// `active`, `revoked` or `expired`.
    pub state: String,
    pub volume_exhausted: bool,
    /// Milliseconds until the controller considers the lease lapsed (active leases only).
    pub expires_in_ms: Option<u64>,
}

/// `PUT /v1/quota/{name}`: set the fabric root (`fabric`), a group, or a node's quota.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetQuotaRequest {
    pub capacity_bps: u64,
    /// `static` (default) or `fair_share`.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// For a node: its group (default: unchanged, or `default`).
    #[serde(default)]
    pub group: Option<String>,
}

/// `GET /v1/quota`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuotaView {
    pub tree: QuotaTree,
    /// Granted rate per group and node, bits/s.
    pub allocated_bps: std::collections::BTreeMap<String, u64>,
}

/// Every error body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// A scope of a node, now: the ledger's terms joined with the agent's latest report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ScopeNow {
    pub scope: String,
    pub lease_id: Option<u64>,
    /// `active`, `pending` (granted, not yet reported by the agent), `revoked`, `expired`,
    /// `exhausted` or `none` (no lease: the floor applies).
    pub state: String,
    pub leased_bps: u64,
    pub floor_bps: u64,
    /// Measured over the agent's last report interval (0 when the node is stale).
    pub rate_bps: f64,
    /// Cumulative counters of the current lease, as the agent reported them.
    pub bytes: u64,
    pub packets: u64,
    pub dropped_packets: u64,
    pub volume_bytes: Option<u64>,
    pub used_bytes: u64,
    pub expires_in_ms: Option<u64>,
}

/// A node, now (`GET /v1/telemetry/fleet`, and the live `tick` events).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeNow {
    pub node: String,
    pub group: String,
    pub connected: bool,
    pub last_report_unix_ms: Option<u64>,
    /// Not connected, or no report within `stale_after_ms`.
    pub stale: bool,
    /// `tampered`, `none`, `active`, `partial`, or the state of its non-active scopes.
    pub state: String,
    pub leased_bps: u64,
    pub floor_bps: u64,
    pub rate_bps: f64,
    pub volume_bytes: Option<u64>,
    pub used_bytes: u64,
    pub expires_in_ms: Option<u64>,
    pub scopes: Vec<ScopeNow>,
}

/// `GET /v1/telemetry/fleet`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetView {
    pub now_unix_ms: u64,
    pub stale_after_ms: u64,
    pub nodes: Vec<NodeNow>,
}

/// One lease-terms change in a series (a step function).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TermsPoint {
    pub t: u64,
    pub leased_bps: u64,
    pub floor_bps: u64,
    pub volume_bytes: Option<u64>,
    pub lease_id: Option<u64>,
}

/// One scope's time series, in columns.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SeriesView {
    pub scope: String,
    /// Start of each interval, unix ms, ascending.
    pub t: Vec<u64>,
    /// Measured over the interval (per minute: the mean).
    pub rate_bps: Vec<f64>,
    pub bytes: Vec<u64>,
    pub packets: Vec<u64>,
    pub dropped_packets: Vec<u64>,
    /// The scope's state at the end of each interval.
    pub state: Vec<String>,
    /// Per minute only: the highest 1-second rate within the minute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peak_rate_bps: Vec<f64>,
    pub leased: Vec<TermsPoint>,
}

/// `GET /v1/telemetry/series`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeriesResponse {
    pub node: String,
    pub step_ms: u64,
    pub series: Vec<SeriesView>,
}

/// `GET /v1/events`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventsResponse {
    pub events: Vec<nicwarden_telemetry::Event>,
    /// The newest event id: resume the stream from here.
    pub last_id: u64,
    /// The id of this controller run's first event. Ids keep growing across restarts; a
    /// client whose last id is below this one missed a restart (earlier events are in the
    /// audit log only).
    pub first_id: u64,
    /// Some events after `since_id` were already dropped from the in-memory log (the
    /// audit log keeps the durable record).
    pub gap: bool,
}

/// A node's place in the mesh as the operator API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MeshView {
    /// WireGuard public key (base64); absent until the agent reported one, and after tampering.
    pub public_key: Option<String>,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub key_since_unix_ms: u64,
    pub rotations: u64,
    /// Whether its entry is currently published to its group's peers.
    pub published: bool,
    /// When its published entry lapses at its peers (controller wall clock).
    pub published_until_unix_ms: Option<u64>,
    pub tampered: Option<crate::mesh::TamperRecord>,
    pub rotation_pending: bool,
}
