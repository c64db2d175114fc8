//! Agent configuration: a TOML file, overridable from the command line, validated before
//! anything starts.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    /// Counter source with datapath backend `none`: `none` (all zero) or
    /// `simulated:RATE_BPS` (pretend traffic is offered at RATE in every allowed scope,
    /// capped by the decision: used for tests and demos of volume and floors).
    pub counters: String,
    /// Kernel enforcement on the fabric interface.
    pub datapath: DatapathConfig,
}

/// `[datapath]`: how leases become kernel state.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatapathConfig {
    /// `ebpf` (the default): a tc-attached eBPF program on `fabric_iface` looks each packet's
    /// scope up in a map, counts it, enforces volumes exactly and floors, and steers it to
    /// the scope's HTB class for shaping; its maps are pinned under `bpf_pin_dir`, so an
    /// agent restart resumes the counters. `tc`: HTB shaping with u32 filters plus
    /// nftables volume quotas. `none`: decisions are computed and reported but nothing is
    /// programmed (usage comes from `counters`; for running an agent off a real node).
    pub backend: String,
    /// Where the `ebpf` backend pins its maps and program [default:
    /// /sys/fs/bpf/nicwarden/<node>].
    pub bpf_pin_dir: Option<PathBuf>,
    /// The fabric interface to enforce on. The management interface (towards the
    /// controller) must be another one: it is never touched.
    pub fabric_iface: String,
    /// Fabric addresses of the peers, for `peer:NODE` scopes:
    /// `node2 = ["198.18.0.2/32"]`.
    pub peers: BTreeMap<String, Vec<Ipv4Net>>,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            backend: "ebpf".into(),
            bpf_pin_dir: None,
            fabric_iface: "fab0".into(),
            peers: BTreeMap::new(),
        }
    }
}

impl DatapathConfig {
    pub fn peer_prefixes(&self, node: &str) -> Option<Vec<Ipv4Net>> {
        self.peers.get(node).cloned()
    }

    pub fn enabled(&self) -> bool {
        self.backend != "none"
    }

    /// The `ebpf` backend's pin directory for `node`.
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        self.bpf_pin_dir
            .clone()
            .unwrap_or_else(|| nicwarden_datapath::EbpfDatapath::default_pin_dir(node))
    }
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
            datapath: DatapathConfig::default(),
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
        match self.datapath.backend.as_str() {
            "none" => {}
            b @ ("tc" | "ebpf") => {
                if self.counters != "none" {
                    return Err(ConfigError::Invalid(format!(
                        "counters = `{}` cannot be used with datapath backend `{b}`: usage then comes from the kernel (use backend `none` for simulated counters)",
                        self.counters
                    )));
                }
            }
            other => {
                return Err(ConfigError::Invalid(format!(
                    "datapath backend must be `ebpf`, `tc` or `none`, got `{other}`"
                )))
            }
        }
        let iface = &self.datapath.fabric_iface;
        if iface.is_empty()
            || iface.len() > 15
            || !iface
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::Invalid(format!(
                "datapath.fabric_iface `{iface}` is not a valid interface name (1-15 of [A-Za-z0-9-_.])"
            )));
        }
        let mut seen: Vec<(&str, Ipv4Net)> = Vec::new();
        for (peer, nets) in &self.datapath.peers {
            nicwarden_pki::validate_node_name(peer).map_err(|e| {
                ConfigError::Invalid(format!("datapath.peers: bad node name `{peer}`: {e}"))
            })?;
            if peer == &self.node {
                return Err(ConfigError::Invalid(format!(
                    "datapath.peers: `{peer}` is this node itself"
                )));
            }
            for n in nets {
                if let Some((other, on)) = seen
                    .iter()
                    .find(|(_, o)| o.contains(&n.network()) || n.contains(&o.network()))
                {
                    return Err(ConfigError::Invalid(format!(
                        "datapath.peers: {n} of `{peer}` overlaps {on} of `{other}`: a packet must belong to one peer scope"
                    )));
                }
                seen.push((peer, *n));
            }
        }
        Ok(())
    }
}
