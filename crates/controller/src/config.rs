//! Controller configuration: a TOML file, overridable from the command line, validated
//! before any port is bound.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything the controller needs to start.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// Data directory: SQLite store, CA, lease-signing key, operator token.
    pub data_dir: PathBuf,
    /// gRPC (mutual TLS) address agents connect to.
    pub agent_listen: SocketAddr,
    /// Operator HTTP API, `/metrics` and `/openapi.json`.
    pub api_listen: SocketAddr,
    /// Names (DNS or IP) the controller's TLS certificate is valid for; agents dial one of them.
    pub server_names: Vec<String>,
    /// Fabric capacity in bits/s used when the quota tree is first created.
    pub fabric_capacity_bps: u64,
    /// Allocation algorithm of the fabric root when first created: `static` or `fair_share`.
    pub fabric_algorithm: String,
    /// Extra time past a lease's TTL before the controller frees its capacity, ms.
    pub expiry_grace_ms: u64,
    /// Validity of node certificates, days.
    pub node_cert_days: u32,
    /// Seconds of 1-second telemetry kept in memory per (node, scope). Memory is fixed per
    /// series: 21 bytes x this (3600: 74 KiB).
    pub telemetry_history_secs: usize,
    /// Hours of per-minute telemetry kept in `<data_dir>/telemetry.db`.
    pub telemetry_minute_retention_hours: u64,
    /// A node whose agent has not reported for this long is shown as stale, ms.
    pub telemetry_stale_after_ms: u64,
    /// Ask every node's agent for a new WireGuard key when its key is this old, seconds
    /// (0: only when the operator asks, `nicwarden node rotate-key`).
    pub mesh_key_rotation_secs: u64,
    /// The agents' link-probe interval the verifier expects, ms (a port is judged missing
    /// after `topology_missing_after_rounds` rounds without its neighbour).
    pub topology_probe_interval_ms: u64,
    pub topology_missing_after_rounds: u32,
    /// Byte conservation: allowed difference per window, bytes plus a share of the bytes sent.
    pub topology_byte_tolerance_bytes: u64,
    pub topology_byte_tolerance_ratio: f64,
    /// Finding kinds whose culprit nodes lose their leases automatically (default: none,
    /// report only): `missing_link`, `unexpected_link`, `miswired`, `unauthenticated`,
    /// `unknown_neighbor`, `rtt_exceeded`, `flapping`, `byte_mismatch`.
    pub topology_revoke: Vec<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            data_dir: PathBuf::from("/var/lib/nicwarden/controller"),
            agent_listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            fabric_capacity_bps: 100_000_000_000,
            fabric_algorithm: "static".into(),
            expiry_grace_ms: 1000,
            node_cert_days: 365,
            telemetry_history_secs: 3600,
            telemetry_minute_retention_hours: 24,
            telemetry_stale_after_ms: 5000,
            mesh_key_rotation_secs: 86_400,
            topology_probe_interval_ms: 1000,
            topology_missing_after_rounds: 3,
            topology_byte_tolerance_bytes: 64 * 1024,
            topology_byte_tolerance_ratio: 0.001,
            topology_revoke: Vec::new(),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] nicwarden_process::ConfigFileError),
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl ControllerConfig {
    /// The verifier's settings and the revoke policy, checked.
    pub fn topology_config(&self) -> Result<crate::topology::TopologyConfig, ConfigError> {
        let mut revoke = std::collections::BTreeSet::new();
        for k in &self.topology_revoke {
            let kind = nicwarden_topology::FindingKind::ALL
                .into_iter()
                .find(|f| f.as_str() == k)
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "topology_revoke: unknown finding kind `{k}` (one of: {})",
                        nicwarden_topology::FindingKind::ALL
                            .iter()
                            .map(|f| f.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
            revoke.insert(kind);
        }
        if self.topology_probe_interval_ms < 100 {
            return Err(ConfigError::Invalid(
                "topology_probe_interval_ms must be >= 100".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.topology_byte_tolerance_ratio) {
            return Err(ConfigError::Invalid(
                "topology_byte_tolerance_ratio must be in [0, 1)".into(),
            ));
        }
        Ok(crate::topology::TopologyConfig {
            verifier: nicwarden_topology::VerifierConfig {
                probe_interval_ms: self.topology_probe_interval_ms,
                missing_after_rounds: self.topology_missing_after_rounds.max(1),
                byte_tolerance_bytes: self.topology_byte_tolerance_bytes,
                byte_tolerance_ratio: self.topology_byte_tolerance_ratio,
                ..Default::default()
            },
            policy: nicwarden_topology::Policy { revoke },
        })
    }

    /// Reads a TOML file; unknown keys and wrong types are errors naming the key.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        nicwarden_process::read_toml(path).map_err(ConfigError::File)
    }

    /// Checks everything that can be checked before binding a port.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.topology_config()?;
        if self.fabric_capacity_bps == 0 {
            return Err(ConfigError::Invalid(
                "fabric_capacity_bps must be > 0".into(),
            ));
        }
        self.fabric_algorithm
            .parse::<nicwarden_lease::quota::Algorithm>()
            .map_err(|e| ConfigError::Invalid(format!("fabric_algorithm: {e}")))?;
        if self.server_names.is_empty() {
            return Err(ConfigError::Invalid(
                "server_names must name at least one DNS name or IP address".into(),
            ));
        }
        if self.agent_listen == self.api_listen {
            return Err(ConfigError::Invalid(format!(
                "agent_listen and api_listen are both {}",
                self.agent_listen
            )));
        }
        if !(10..=86_400).contains(&self.telemetry_history_secs) {
            return Err(ConfigError::Invalid(format!(
                "telemetry_history_secs must be between 10 and 86400, got {}",
                self.telemetry_history_secs
            )));
        }
        if !(1..=24 * 366).contains(&self.telemetry_minute_retention_hours) {
            return Err(ConfigError::Invalid(format!(
                "telemetry_minute_retention_hours must be between 1 and 8784, got {}",
                self.telemetry_minute_retention_hours
            )));
        }
        if self.telemetry_stale_after_ms < 1000 {
            return Err(ConfigError::Invalid(format!(
                "telemetry_stale_after_ms must be at least 1000 (agents report every second), got {}",
                self.telemetry_stale_after_ms
            )));
        }
        if self.node_cert_days == 0 {
            return Err(ConfigError::Invalid("node_cert_days must be > 0".into()));
        }
        Ok(())
    }
}
