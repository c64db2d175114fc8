//! Agent configuration: a TOML file, overridable from the command line, validated before
//! anything starts.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This node's name (must match the name its join token was made for).
    pub node: String,
    /// Data directory: node key (0600), certificate, pinned CA and controller key, lease state.
    pub data_dir: PathBuf,
    /// Controller gRPC endpoint, `https://HOST:PORT`; HOST must be one of the controller's
    /// `server_names`.
    pub controller: String,
    /// One-time join token, needed only for the first start (enrollment).
    pub join_token: Option<String>,
    /// Local status endpoint (`nicwarden agent status`).
    pub status_listen: SocketAddr,
    /// Floor applied to scopes that never had a lease, bits/s (0 = blocked).
    pub default_floor_bps: u64,
    /// Usage report interval, ms.
    pub report_interval_ms: u64,
    /// Longest wait between reconnect attempts, ms.
    pub max_backoff_ms: u64,
    /// Counter source until the datapath exists: `none` (all zero) or
    /// `simulated:RATE_BPS` (pretend traffic is offered at RATE in every allowed scope,
    /// capped by the decision: used for tests and demos of volume and floors).
    pub counters: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node: String::new(),
            data_dir: PathBuf::from("/var/lib/nicwarden/agent"),
            controller: "https://127.0.0.1:7443".into(),
            join_token: None,
            status_listen: SocketAddr::from(([127, 0, 0, 1], 7090)),
            default_floor_bps: 0,
            report_interval_ms: 1000,
            max_backoff_ms: 5000,
            counters: "none".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] nicwarden_process::ConfigFileError),
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl AgentConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        nicwarden_process::read_toml(path).map_err(ConfigError::File)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.is_empty() {
            return Err(ConfigError::Invalid(
                "node name is required (--node)".into(),
            ));
        }
        crate::transport::parse_controller(&self.controller)
            .map_err(|e| ConfigError::Invalid(format!("{e:#}")))?;
        if self.report_interval_ms < 100 {
            return Err(ConfigError::Invalid(
                "report_interval_ms must be >= 100".into(),
            ));
        }
        crate::counters::CounterSpec::parse(&self.counters).map_err(ConfigError::Invalid)?;
        Ok(())
    }
}
