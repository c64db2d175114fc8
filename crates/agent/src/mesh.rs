//! The agent's side of the encrypted mesh: the WireGuard device and key, the peer set
//! (`nicwarden_mesh::MeshCore`, pure) and the glue between them.
//!
//! Only verified updates reach the core; every diff it returns is applied to the device in
//! order (removals first). Peers expire on the agent's own clock whether or not the
//! controller is reachable. The peer set and the replay guard are persisted (`mesh.json`,
//! deadlines on `CLOCK_BOOTTIME`) so a restarted agent resumes its tunnels at once; the
//! WireGuard device itself lives in this process (userspace), so encrypted traffic pauses
//! while the agent restarts — it never falls back to plaintext.

use crate::config::AgentConfig;
use crate::identity;
use anyhow::Context;
use nicwarden_lease::Time;
use nicwarden_mesh::{Held, MeshCore, MeshDiff, MeshError, MeshUpdate, RemoveCause, WgKey};
use nicwarden_proto::pb;
use nicwarden_wg::{DeviceConfig, PeerConfig, StaticKey, WgBackend};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const STATE_FILE: &str = "mesh.json";

/// What survives a restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MeshPersisted {
    pub last_seq: u64,
    pub peers: Vec<PersistedPeer>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedPeer {
    pub held: Held,
    /// Deadline on `CLOCK_BOOTTIME` (ms).
    pub deadline_boot_ms: u64,
}

pub fn load_state(dir: &Path) -> anyhow::Result<MeshPersisted> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("read mesh state {}: not valid JSON", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MeshPersisted::default()),
        Err(e) => Err(e).with_context(|| format!("read mesh state {}", path.display())),
    }
}

fn save_state(dir: &Path, st: &MeshPersisted) -> anyhow::Result<()> {
    let path = dir.join(STATE_FILE);
    let body = serde_json::to_vec(st).context("encode mesh state")?;
    nicwarden_pki::write_private(&path, &body)
        .with_context(|| format!("write mesh state {}", path.display()))
}

/// One peer as `/status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub node: String,
    pub group: String,
    pub public_key: String,
    pub endpoint: String,
    pub allowed_ips: Vec<String>,
    pub expires_in_ms: u64,
    /// Since the last completed handshake (none yet: absent).
    pub last_handshake_ms_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The fabric guard (`mesh.encrypted_only`) as `/status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GuardStatus {
    pub iface: String,
    pub port: u16,
    /// Plaintext packets dropped on the fabric interface since the guard was installed.
    #[serde(flatten)]
    pub counters: nicwarden_datapath::GuardCounters,
    /// Times it was found missing (removed behind the agent's back) and re-installed.
    pub repairs: u64,
    pub last_error: Option<String>,
}

/// The mesh part of `/status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MeshStatus {
    pub backend: String,
    pub iface: String,
    pub address: String,
    pub endpoint: String,
    /// This node's WireGuard public key (absent once destroyed by a tamper event).
    pub public_key: Option<String>,
    pub last_seq: u64,
    pub peers: Vec<PeerStatus>,
    /// Updates refused (bad signature, replay) and entries rejected since start.
    pub rejected_updates: u64,
    pub rejected_entries: u64,
    pub rotations: u64,
    pub last_error: Option<String>,
    /// `mesh.encrypted_only`: the guard and what it dropped.
    #[serde(default)]
    pub guard: Option<GuardStatus>,
}

pub struct MeshShell {
    pub core: MeshCore,
    backend: Option<Box<dyn WgBackend>>,
    key: Option<StaticKey>,
    key_path: PathBuf,
    data_dir: PathBuf,
    cfg: crate::config::MeshConfig,
    pub rejected_updates: u64,
    pub rejected_entries: u64,
    pub rotations: u64,
    pub last_error: Option<String>,
}

fn peer_config(e: &nicwarden_mesh::PeerEntry) -> PeerConfig {
    PeerConfig {
        public_key: e.public_key.0,
        endpoint: e.endpoint,
        allowed_ips: e.allowed_ips.clone(),
        keepalive_secs: None,
    }
}

impl MeshShell {
    /// Opens the device with this node's key (generated and saved 0600 at first start) and
    /// re-installs the persisted peers that still have time left.
    pub async fn start(cfg: &AgentConfig, now: Time) -> anyhow::Result<MeshShell> {
        let m = &cfg.mesh;
        let backend: nicwarden_wg::Backend = m.backend.parse().map_err(anyhow::Error::msg)?;
        if backend == nicwarden_wg::Backend::Kernel {
            nicwarden_wg::kernel_backend_status().context("mesh backend `kernel`")?;
        }
        let key_path = cfg.mesh_key_file();
        let key = if key_path.exists() {
            StaticKey::load(&key_path)?
        } else {
            let k = StaticKey::generate();
            k.save(&key_path)?;
            tracing::info!(path = %key_path.display(), public_key = %WgKey(k.public()), "generated this node's WireGuard key");
            k
        };
        let (Some(address), Some(endpoint)) = (m.address, m.endpoint) else {
            anyhow::bail!("mesh.address and mesh.endpoint are required with the mesh enabled");
        };
        let dev = DeviceConfig {
            iface: m.iface.clone(),
            address,
            listen: endpoint,
            mtu: m.mtu,
        };
        let device = nicwarden_wg::GotatunBackend::start(&dev, &key)
            .await
            .with_context(|| format!("start the WireGuard device {} (gotatun)", m.iface))?;
        let persisted = load_state(&cfg.data_dir)?;
        let boot_now = identity::boot_ms().unwrap_or(0);
        let held: Vec<Held> = persisted
            .peers
            .into_iter()
            .filter_map(|p| {
                let left = p.deadline_boot_ms.saturating_sub(boot_now);
                (left > 0 && boot_now > 0).then(|| Held {
                    deadline: now.plus_millis(left),
                    ..p.held
                })
            })
            .collect();
        let core = MeshCore::restore(cfg.node.clone(), persisted.last_seq, held, None);
        let shell = MeshShell {
            core,
            backend: Some(Box::new(device)),
            key: Some(key),
            key_path,
            data_dir: cfg.data_dir.clone(),
            cfg: m.clone(),
            rejected_updates: 0,
            rejected_entries: 0,
            rotations: 0,
            last_error: None,
        };
        for h in shell.core.peers() {
            if let Some(b) = &shell.backend {
                b.upsert_peer(&peer_config(&h.entry))
                    .await
                    .with_context(|| format!("restore mesh peer {}", h.entry.node))?;
                // The peer still holds a session with our previous process: start a new one.
                let _ = b.initiate_handshake(&h.entry.public_key.0).await;
                tracing::info!(peer = %h.entry.node, "mesh peer restored from before the restart");
            }
        }
        Ok(shell)
    }

    /// This node's identity for the controller (None once destroyed).
    pub fn info(&self) -> Option<pb::MeshInfo> {
        let key = self.key.as_ref()?;
        let (address, endpoint) = (self.cfg.address?, self.cfg.endpoint?);
        let host = ipnet::IpNet::new(address.addr(), address.max_prefix_len()).ok()?;
        Some(nicwarden_proto::mesh_info_to_pb(
            &nicwarden_proto::MeshInfo {
                public_key: WgKey(key.public()),
                endpoint,
                allowed_ips: vec![host],
            },
        ))
    }

    fn persist(&self, now: Time) {
        let boot_now = match identity::boot_ms() {
            Ok(b) => b,
            Err(_) => return,
        };
        let st = MeshPersisted {
            last_seq: self.core.last_seq(),
            peers: self
                .core
                .peers()
                .map(|h| PersistedPeer {
                    held: h.clone(),
                    deadline_boot_ms: boot_now + now.millis_until(h.deadline),
                })
                .collect(),
        };
        if let Err(e) = save_state(&self.data_dir, &st) {
            tracing::warn!(error = %e, "persisting the mesh state failed");
        }
    }

    async fn apply_diff(&mut self, diff: &MeshDiff, now: Time) {
        let Some(b) = &self.backend else {
            return;
        };
        for r in &diff.removed {
            match b.remove_peer(&r.public_key.0).await {
                Ok(_) => {
                    let why = match &r.cause {
                        RemoveCause::Expired => "its entry expired (no valid lease)".to_string(),
                        RemoveCause::Withdrawn(w) => format!("withdrawn by the controller: {w}"),
                        RemoveCause::Replaced => "its key was rotated".to_string(),
                        RemoveCause::NotInSnapshot => {
                            "not in the controller's current set".to_string()
                        }
                        RemoveCause::Tampered => "this node was tampered with".to_string(),
                    };
                    tracing::info!(peer = %r.node, key = %r.public_key, "mesh peer removed: {why}");
                }
                Err(e) => {
                    tracing::error!(peer = %r.node, error = %e, "removing a mesh peer failed");
                    self.last_error = Some(format!("remove peer {}: {e}", r.node));
                }
            }
        }
        for e in &diff.upserted {
            match b.upsert_peer(&peer_config(e)).await {
                Ok(()) => {
                    tracing::info!(peer = %e.node, key = %e.public_key, endpoint = %e.endpoint, "mesh peer installed");
                    // A new or re-keyed peer: handshake now rather than at the retry timers.
                    if let Err(err) = b.initiate_handshake(&e.public_key.0).await {
                        tracing::debug!(peer = %e.node, error = %err, "handshake initiation failed; the timers will retry");
                    }
                }
                Err(err) => {
                    tracing::error!(peer = %e.node, error = %err, "installing a mesh peer failed");
                    self.last_error = Some(format!("install peer {}: {err}", e.node));
                }
            }
        }
        for r in &diff.rejected {
            self.rejected_entries += 1;
            tracing::warn!(peer = %r.node, reason = %r.reason, "mesh entry rejected");
        }
        if !diff.upserted.is_empty() || !diff.removed.is_empty() {
            self.persist(now);
        }
    }

    /// Verifies and applies one signed update from the controller.
    pub async fn on_update(
        &mut self,
        su: &pb::SignedMeshUpdate,
        controller_key: &[u8; 32],
        now: Time,
    ) {
        let update: MeshUpdate = match nicwarden_proto::verify_mesh_update(su, controller_key) {
            Ok(u) => u,
            Err(e) => {
                self.rejected_updates += 1;
                tracing::error!(error = %e, "mesh update rejected");
                return;
            }
        };
        let seq = update.seq;
        match self.core.apply(update, now) {
            Ok(diff) => {
                self.apply_diff(&diff, now).await;
                self.persist(now);
            }
            Err(e @ MeshError::Replay { .. }) | Err(e @ MeshError::Tampered(_)) => {
                self.rejected_updates += 1;
                tracing::warn!(seq, error = %e, "mesh update refused");
            }
        }
    }

    /// Removes the peers whose entries expired.
    pub async fn on_timer(&mut self, now: Time) {
        let diff = self.core.poll(now);
        if !diff.is_empty() {
            self.apply_diff(&diff, now).await;
        }
    }

    pub fn poll_timeout(&self) -> Option<Time> {
        self.core.poll_timeout()
    }

    /// A new key pair: saved (0600, atomically replacing the old file), installed in the
    /// device (sessions re-handshake with it), and returned for the controller, which sends
    /// it to every peer. The old key is zeroized when dropped.
    pub async fn rotate(&mut self) -> anyhow::Result<pb::MeshInfo> {
        let Some(b) = &self.backend else {
            anyhow::bail!("rotate the WireGuard key: the mesh is shut down (tampered)");
        };
        let new = StaticKey::generate();
        new.save(&self.key_path)?;
        b.set_key(&new)
            .await
            .context("install the new WireGuard key")?;
        self.key = Some(new);
        self.rotations += 1;
        let info = self
            .info()
            .context("rotate the WireGuard key: no identity")?;
        tracing::info!(public_key = %WgKey(self.key.as_ref().map(|k| k.public()).unwrap_or([0; 32])), "WireGuard key rotated");
        Ok(info)
    }

    /// Tamper response: every peer dropped, every session key and the private key destroyed
    /// (the device drops its state; our copy is zeroized on drop; the key file overwritten
    /// and removed). Returns what was done, for the record.
    pub async fn destroy(&mut self, reason: &str, now: Time) -> String {
        let diff = self.core.tamper(reason);
        let peers = diff.removed.len();
        let mut notes = Vec::new();
        if let Some(b) = self.backend.take() {
            if let Err(e) = b.shutdown().await {
                notes.push(format!("device shutdown: {e}"));
            }
        }
        self.key = None;
        if let Err(e) = StaticKey::wipe(&self.key_path) {
            notes.push(format!("key file: {e}"));
        }
        self.persist(now);
        if notes.is_empty() {
            format!("{peers} peers dropped, WireGuard keys destroyed")
        } else {
            format!("{peers} peers dropped; errors: {}", notes.join("; "))
        }
    }

    pub async fn status(&self, now: Time) -> MeshStatus {
        let stats = match &self.backend {
            Some(b) => b.peers().await.unwrap_or_default(),
            None => Vec::new(),
        };
        MeshStatus {
            backend: self.cfg.backend.clone(),
            iface: self.cfg.iface.clone(),
            address: self.cfg.address.map(|a| a.to_string()).unwrap_or_default(),
            endpoint: self.cfg.endpoint.map(|a| a.to_string()).unwrap_or_default(),
            public_key: self.key.as_ref().map(|k| WgKey(k.public()).to_string()),
            last_seq: self.core.last_seq(),
            peers: self
                .core
                .peers()
                .map(|h| {
                    let s = stats.iter().find(|s| s.public_key == h.entry.public_key.0);
                    PeerStatus {
                        node: h.entry.node.clone(),
                        group: h.entry.group.clone(),
                        public_key: h.entry.public_key.to_string(),
                        endpoint: h.entry.endpoint.to_string(),
                        allowed_ips: h.entry.allowed_ips.iter().map(|n| n.to_string()).collect(),
                        expires_in_ms: now.millis_until(h.deadline),
                        last_handshake_ms_ago: s
                            .and_then(|s| s.last_handshake)
                            .map(|d| d.as_millis() as u64),
                        rx_bytes: s.map(|s| s.rx_bytes).unwrap_or(0),
                        tx_bytes: s.map(|s| s.tx_bytes).unwrap_or(0),
                    }
                })
                .collect(),
            rejected_updates: self.rejected_updates,
            rejected_entries: self.rejected_entries,
            rotations: self.rotations,
            last_error: self.last_error.clone(),
            guard: None,
        }
    }
}
