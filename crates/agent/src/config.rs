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
    /// The encrypted node-to-node mesh.
    pub mesh: MeshConfig,
    /// Tamper inputs.
    pub tamper: TamperConfig,
    /// Link probes on the fabric port (interconnect verification).
    pub probe: ProbeConfig,
}

/// `[probe]`: link probes. Every `interval_ms` the agent broadcasts a probe signed with its
/// node key on the fabric interface and answers its neighbours' probes; what it hears goes
/// to the controller, which verifies the signatures. Runs only with a datapath backend (a
/// real fabric interface); the datapath lets probes through whatever the leases say.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    pub enabled: bool,
    /// Probe interval, ms (at least 100).
    pub interval_ms: u64,
    /// At most this many neighbours' probes are answered per interval (the excess is
    /// counted as dropped).
    pub max_answers_per_round: u32,
    /// Byte conservation: the per-peer counters are read at every multiple of this many ms
    /// of the wall clock (the same instants on every node) and reported (0: never).
    pub byte_window_ms: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            enabled: true,
            interval_ms: 1000,
            max_answers_per_round: 64,
            byte_window_ms: 5000,
        }
    }
}

impl ProbeConfig {
    /// Whether the agent runs the prober: enabled, and a datapath backend on a real fabric
    /// interface.
    pub fn runs(&self, datapath: &DatapathConfig) -> bool {
        self.enabled && datapath.enabled()
    }
}

/// Largest tunnel MTU: gotatun reads and encrypts packets in 4096-byte buffers (the
/// encrypted datagram adds 32 bytes of WireGuard header and tag).
pub const MESH_MAX_MTU: u16 = 4000;

/// `[mesh]`: the encrypted node-to-node mesh. The agent runs a WireGuard device whose UDP
/// socket listens on the fabric (`endpoint`) and whose tunnel interface (`iface`) carries
/// the overlay `address`; peers are only those the controller authorizes (signed entries,
/// each expiring with that peer's lease). Quotas stay on the fabric interface, so they
/// count and shape what the fabric carries: the encrypted packets.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    pub enabled: bool,
    /// `gotatun` (userspace WireGuard over TUN, the default) or `kernel` (reports whether the
    /// kernel could host it; the netlink backend is future work).
    pub backend: String,
    /// The tunnel interface.
    pub iface: String,
    /// This node's overlay address with the overlay prefix, e.g. `198.18.128.2/24`: its
    /// peers route the address (as a /32) to it.
    pub address: Option<ipnet::IpNet>,
    /// Fabric `ip:port` where the WireGuard device listens; peers send to it.
    pub endpoint: Option<SocketAddr>,
    /// MTU of the tunnel interface (fabric MTU minus 80 bytes of WireGuard over IPv6, or
    /// 60 over IPv4).
    pub mtu: u16,
    /// The WireGuard private key (0600) [default: <data_dir>/wg.key]; generated at first start.
    pub key_file: Option<PathBuf>,
    /// Let only WireGuard cross the fabric interface: every other IP packet in or out of
    /// it is dropped (nftables table `inet nicwarden_guard`, kept when the agent stops;
    /// `agent --cleanup` removes it). ARP and the management interface are untouched.
    pub encrypted_only: bool,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            enabled: false,
            backend: "gotatun".into(),
            iface: "nwmesh0".into(),
            address: None,
            endpoint: None,
            mtu: 1420,
            key_file: None,
            encrypted_only: false,
        }
    }
}

/// `[tamper]`: where tamper events come from. Any of them makes the agent block the
/// fabric, destroy its WireGuard keys, drop its peers, persist the event and tell the
/// controller, in that order.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TamperConfig {
    /// Unix socket (0600) taking `tamper REASON` lines (`nicwarden agent tamper`)
    /// [default: <data_dir>/tamper.sock].
    pub socket: Option<PathBuf>,
    /// A file to watch, e.g. an enclosure sensor or GPIO value exposed by the kernel: tamper
    /// when it holds anything but `0` (or nothing).
    pub watch: Option<PathBuf>,
    /// How often the watched file is read, ms.
    pub watch_interval_ms: u64,
}

impl Default for TamperConfig {
    fn default() -> Self {
        TamperConfig {
            socket: None,
            watch: None,
            watch_interval_ms: 50,
        }
    }
}

impl AgentConfig {
    pub fn tamper_socket(&self) -> PathBuf {
        self.tamper
            .socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("tamper.sock"))
    }

    pub fn mesh_key_file(&self) -> PathBuf {
        self.mesh
            .key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("wg.key"))
    }
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
            mesh: MeshConfig::default(),
            tamper: TamperConfig::default(),
            probe: ProbeConfig::default(),
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
        if self.mesh.enabled {
            let m = &self.mesh;
            if m.backend != "gotatun" && m.backend != "kernel" {
                return Err(ConfigError::Invalid(format!(
                    "mesh.backend must be `gotatun` or `kernel`, got `{}`",
                    m.backend
                )));
            }
            let Some(addr) = m.address else {
                return Err(ConfigError::Invalid(
                    "mesh.address is required with the mesh enabled (this node's overlay address with its prefix, e.g. 198.18.128.2/24)".into(),
                ));
            };
            if addr.prefix_len() == addr.max_prefix_len() {
                return Err(ConfigError::Invalid(format!(
                    "mesh.address {addr}: give the overlay prefix too (e.g. /24), so the peers' addresses route to the tunnel"
                )));
            }
            if m.endpoint.is_none() {
                return Err(ConfigError::Invalid(
                    "mesh.endpoint is required with the mesh enabled (this node's fabric ip:port, e.g. 198.18.0.2:51820)".into(),
                ));
            }
            if m.iface.is_empty() || m.iface.len() > 15 || m.iface == self.datapath.fabric_iface {
                return Err(ConfigError::Invalid(format!(
                    "mesh.iface `{}` must be a new interface name of 1-15 characters, not the fabric interface",
                    m.iface
                )));
            }
            if m.encrypted_only && self.datapath.backend == "none" {
                return Err(ConfigError::Invalid(
                    "mesh.encrypted_only needs a datapath backend (`ebpf` or `tc`): with `none` nothing is programmed".into(),
                ));
            }
            if m.mtu < 1280 || m.mtu > MESH_MAX_MTU {
                return Err(ConfigError::Invalid(format!(
                    "mesh.mtu {} must be between 1280 and {MESH_MAX_MTU} (gotatun handles packets in 4096-byte buffers, headers included)",
                    m.mtu
                )));
            }
        }
        if self.probe.interval_ms < crate::probe::MIN_INTERVAL_MS
            || self.probe.interval_ms > 3_600_000
        {
            return Err(ConfigError::Invalid(format!(
                "probe.interval_ms must be between {} and 3600000, got {}",
                crate::probe::MIN_INTERVAL_MS,
                self.probe.interval_ms
            )));
        }
        if !(1..=4096).contains(&self.probe.max_answers_per_round) {
            return Err(ConfigError::Invalid(format!(
                "probe.max_answers_per_round must be between 1 and 4096, got {}",
                self.probe.max_answers_per_round
            )));
        }
        if self.tamper.watch_interval_ms < 10 {
            return Err(ConfigError::Invalid(
                "tamper.watch_interval_ms must be >= 10".into(),
            ));
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
