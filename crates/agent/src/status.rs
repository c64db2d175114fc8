//! What the agent exposes on its local status endpoint (`GET /status`), and what
//! `nicwarden agent status` prints.

use nicwarden_lease::agent::ScopeDecision;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub controller: String,
    /// True while the session stream with the controller is up.
    pub connected: bool,
    /// Highest directive sequence number accepted (persisted).
    pub last_seq: u64,
    /// Why the agent is not connected, if it is not (last error).
    pub last_error: Option<String>,
    /// Directives rejected since start (bad signature, replay, wrong node...).
    pub rejected_directives: u64,
    /// The decision per scope: what the datapath would enforce now.
    pub scopes: Vec<ScopeDecision>,
    /// The kernel side (absent with datapath backend `none`).
    #[serde(default)]
    pub datapath: Option<crate::enforce::DatapathStatus>,
    /// The mesh (absent when not enabled, and after tampering).
    #[serde(default)]
    pub mesh: Option<crate::mesh::MeshStatus>,
    /// Set once this node was tampered with: the fabric is blocked until re-enrollment.
    #[serde(default)]
    pub tampered: Option<crate::TamperStatus>,
    /// Link probes on the fabric port (absent when not running).
    #[serde(default)]
    pub probe: Option<crate::probe::ProbeStatus>,
}
