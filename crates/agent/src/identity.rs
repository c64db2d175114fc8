//! The agent's files in its data directory, and enrollment.
//!
//! | file | what | mode |
//! |---|---|---|
//! | `node.key` | the node's private key (never leaves the node) | 0600 |
//! | `node.pem` | its certificate, issued by the controller's CA | 0644 |
//! | `ca.pem` | the controller's CA (pinned at enrollment) | 0644 |
//! | `controller-lease.pub` | the controller's Ed25519 lease key, hex (pinned at enrollment) | 0644 |
//! | `state.json` | the last accepted directive sequence number | 0600 |

use crate::transport;
use anyhow::{bail, Context};
use nicwarden_pki::{JoinToken, NodeKey};
use nicwarden_proto::pb;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What an enrolled agent holds.
pub struct Identity {
    pub key: NodeKey,
    pub cert_pem: String,
    pub ca_pem: String,
    pub lease_key: [u8; 32],
}

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    (
        dir.join("node.key"),
        dir.join("node.pem"),
        dir.join("ca.pem"),
        dir.join("controller-lease.pub"),
    )
}

/// Loads the identity if the agent has enrolled before.
pub fn load(dir: &Path) -> anyhow::Result<Option<Identity>> {
    let (key_p, cert_p, ca_p, pub_p) = paths(dir);
    if !cert_p.exists() {
        return Ok(None);
    }
    let key =
        NodeKey::load(&key_p).with_context(|| format!("load node key {}", key_p.display()))?;
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
    let cert_pem = read(&cert_p)?;
    let ca_pem = read(&ca_p)?;
    let hexkey = read(&pub_p)?;
    let lease_key: [u8; 32] = hex::decode(hexkey.trim())
        .ok()
        .and_then(|v| v.try_into().ok())
        .with_context(|| format!("{}: not a 32-byte hex Ed25519 key", pub_p.display()))?;
    Ok(Some(Identity {
        key,
        cert_pem,
        ca_pem,
        lease_key,
    }))
}

/// Enrolls with the controller using a one-time join token and stores the identity.
pub async fn enroll(
    dir: &Path,
    node: &str,
    controller: &str,
    token: &str,
) -> anyhow::Result<Identity> {
    let token = JoinToken::parse(token).context("join token")?;
    let key = NodeKey::generate()?;
    let csr_pem = key.csr_pem(node)?;
    let tls = nicwarden_pki::enrollment_client_config(token.ca_fingerprint)?;
    let channel = transport::connect(controller, tls)
        .await
        .with_context(|| format!("enroll: connect to controller {controller}"))?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let resp = client
        .enroll(pb::EnrollRequest {
            node: node.to_string(),
            token: token.encode(),
            csr_pem,
        })
        .await
        .map_err(|s| anyhow::anyhow!("enroll: controller refused: {}", s.message()))?
        .into_inner();
    let lease_key: [u8; 32] = resp
        .lease_public_key
        .as_slice()
        .try_into()
        .context("enroll: controller sent a lease key that is not 32 bytes")?;
    // The CA we were given must be the one the token pinned.
    let ca_der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(resp.ca_pem.as_bytes())
            .context("enroll: controller sent an unreadable CA certificate")?
    };
    let fp: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(&ca_der).into()
    };
    if fp != token.ca_fingerprint {
        bail!("enroll: the controller's CA does not match the fingerprint in the join token");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let (key_p, cert_p, ca_p, pub_p) = paths(dir);
    key.save(&key_p)?;
    nicwarden_pki::write_public(&ca_p, resp.ca_pem.as_bytes())?;
    nicwarden_pki::write_public(&pub_p, format!("{}\n", hex::encode(lease_key)).as_bytes())?;
    // The certificate last: its presence marks a completed enrollment.
    nicwarden_pki::write_public(&cert_p, resp.cert_pem.as_bytes())?;
    tracing::info!(%node, "enrolled with the controller");
    Ok(Identity {
        key,
        cert_pem: resp.cert_pem,
        ca_pem: resp.ca_pem,
        lease_key,
    })
}

/// What the agent persists before it acts on a directive: the replay guard, and the leases
/// it holds (as the controller signed them), so a restarted agent enforces them again at
/// once instead of falling to the floor until the controller re-sends them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PersistedState {
    pub last_seq: u64,
    #[serde(default)]
    pub leases: Vec<HeldLease>,
}

/// A lease as received: the signed directive, re-verified on restore, and when it arrived on
/// the boot-time clock (`CLOCK_BOOTTIME`, which keeps counting across process restarts, not
/// across reboots: a lease never outlives a reboot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLease {
    pub lease_id: u64,
    pub scope: String,
    pub directive_hex: String,
    pub signature_hex: String,
    pub received_boot_ms: u64,
}

/// Milliseconds on `CLOCK_BOOTTIME`.
pub fn boot_ms() -> anyhow::Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .context("read CLOCK_BOOTTIME")?;
    Ok(t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
}

pub fn load_state(dir: &Path) -> anyhow::Result<PersistedState> {
    let p = dir.join("state.json");
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| {
            format!(
                "{} is corrupt; refusing to start (it guards against replayed leases). Inspect it, or remove it only if the controller's node record is also reset",
                p.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PersistedState::default()),
        Err(e) => Err(e).with_context(|| format!("read {}", p.display())),
    }
}

pub fn save_state(dir: &Path, st: &PersistedState) -> anyhow::Result<()> {
    let p = dir.join("state.json");
    let b = serde_json::to_vec(st).context("encode agent state")?;
    nicwarden_pki::write_private(&p, &b).with_context(|| format!("write {}", p.display()))?;
    Ok(())
}
