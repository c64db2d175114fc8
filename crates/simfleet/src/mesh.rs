//! A simulated node's part in the encrypted mesh, without a WireGuard device: a random
//! public key, a fixed endpoint and one overlay host address, and the real agent's peer-set
//! state machine ([`MeshCore`]) fed with verified updates on the node's own clock.
//!
//! Every peer a node's core removes is recorded in a fleet-wide [`RemovalLog`] with the
//! instant it happened, so a benchmark can tell when each node dropped a key.

use ipnet::{IpNet, Ipv4Net};
use nicwarden_lease::Time;
use nicwarden_mesh::{MeshCore, MeshDiff, RemoveCause, WgKey};
use nicwarden_proto::{pb, MeshInfo};
use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use tokio::time::Instant;

/// Where every simulated node says its WireGuard socket listens (nothing listens there).
pub const SIM_ENDPOINT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 51820);
/// Node `i` of the fleet has the overlay address `OVERLAY_BASE + i + 1` (a /32).
pub const OVERLAY_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 0);
/// Every overlay address is below this one (the end of 198.18.0.0/15).
pub const OVERLAY_END: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 255);

/// The most nodes a mesh fleet can address.
pub fn max_mesh_nodes() -> usize {
    (u32::from(OVERLAY_END) - u32::from(OVERLAY_BASE) - 1) as usize
}

/// The overlay host address of node `i`, or `None` if `i` is past [`max_mesh_nodes`].
pub fn overlay_addr(i: usize) -> Option<Ipv4Addr> {
    let off = u32::try_from(i).ok()?.checked_add(1)?;
    let a = u32::from(OVERLAY_BASE).checked_add(off)?;
    (a < u32::from(OVERLAY_END)).then(|| Ipv4Addr::from(a))
}

/// A fresh random WireGuard public key (no private half: nothing is ever encrypted).
pub fn random_key() -> WgKey {
    WgKey(rand::random::<[u8; 32]>())
}

/// One node's mesh state.
pub(crate) struct NodeMesh {
    pub core: MeshCore,
    pub info: MeshInfo,
}

impl NodeMesh {
    /// Node `i`, named `node`, with a fresh random key.
    pub fn new(node: &str, i: usize) -> Result<NodeMesh, String> {
        let addr = overlay_addr(i).ok_or_else(|| {
            format!(
                "node #{} has no overlay address: at most {} mesh nodes fit in {OVERLAY_BASE}..{OVERLAY_END}",
                i + 1,
                max_mesh_nodes()
            )
        })?;
        Ok(NodeMesh {
            core: MeshCore::new(node.to_string()),
            info: MeshInfo {
                public_key: random_key(),
                endpoint: SIM_ENDPOINT,
                allowed_ips: vec![IpNet::V4(Ipv4Net::from(addr))],
            },
        })
    }

    pub fn info_pb(&self) -> pb::MeshInfo {
        nicwarden_proto::mesh_info_to_pb(&self.info)
    }

    /// A new random key (the old one is retired by the controller).
    pub fn rotate(&mut self) -> pb::MeshInfo {
        let old = self.info.public_key;
        while self.info.public_key == old {
            self.info.public_key = random_key();
        }
        self.info_pb()
    }
}

/// One removal of a peer's key by one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRemoval {
    /// The node that removed the peer.
    pub node: String,
    /// When its core removed it (the fleet's tokio clock).
    pub at: Instant,
    /// `expired`, `withdrawn: REASON`, `replaced`, `not in snapshot`, `tampered`.
    pub cause: String,
}

fn cause_name(c: &RemoveCause) -> String {
    match c {
        RemoveCause::Expired => "expired".into(),
        RemoveCause::Withdrawn(r) => format!("withdrawn: {r}"),
        RemoveCause::Replaced => "replaced".into(),
        RemoveCause::NotInSnapshot => "not in snapshot".into(),
        RemoveCause::Tampered => "tampered".into(),
    }
}

/// Every key removal of the fleet, by removed key. Bounded: at most `max_keys` keys are
/// kept (the oldest key first seen is forgotten first), and at most `max_per_key` removals
/// of one key (the oldest go first).
pub(crate) struct RemovalLog {
    by_key: HashMap<WgKey, Vec<KeyRemoval>>,
    order: VecDeque<WgKey>,
    max_keys: usize,
    max_per_key: usize,
}

impl RemovalLog {
    pub fn new(nodes: usize) -> RemovalLog {
        RemovalLog {
            by_key: HashMap::new(),
            order: VecDeque::new(),
            max_keys: 16 * nodes + 1024,
            max_per_key: 4 * nodes + 16,
        }
    }

    pub fn record(&mut self, node: &str, at: Instant, diff: &MeshDiff) {
        for r in &diff.removed {
            let list = match self.by_key.get_mut(&r.public_key) {
                Some(l) => l,
                None => {
                    if self.order.len() >= self.max_keys {
                        if let Some(old) = self.order.pop_front() {
                            self.by_key.remove(&old);
                        }
                    }
                    self.order.push_back(r.public_key);
                    self.by_key.entry(r.public_key).or_default()
                }
            };
            if list.len() >= self.max_per_key {
                list.remove(0);
            }
            list.push(KeyRemoval {
                node: node.to_string(),
                at,
                cause: cause_name(&r.cause),
            });
        }
    }

    pub fn count(&self, key: &WgKey) -> usize {
        self.by_key.get(key).map_or(0, Vec::len)
    }

    pub fn get(&self, key: &WgKey) -> Vec<KeyRemoval> {
        self.by_key.get(key).cloned().unwrap_or_default()
    }
}

/// Applies a verified update or a timer expiry result: records the removals.
pub(crate) fn note(log: &std::sync::Mutex<RemovalLog>, node: &str, diff: &MeshDiff) {
    if diff.removed.is_empty() {
        return;
    }
    let now = Instant::now();
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .record(node, now, diff);
}

/// Verifies a signed update with the pinned lease key and applies it at `now`.
pub(crate) fn apply(
    mesh: &mut NodeMesh,
    lease_key: Option<[u8; 32]>,
    su: &pb::SignedMeshUpdate,
    now: Time,
) -> Result<MeshDiff, String> {
    let key = lease_key.ok_or("mesh update before enrollment: no lease key pinned")?;
    let u = nicwarden_proto::verify_mesh_update(su, &key).map_err(|e| e.to_string())?;
    mesh.core.apply(u, now).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nicwarden_mesh::Removed;

    #[test]
    fn overlay_addresses() {
        assert_eq!(overlay_addr(0), Some(Ipv4Addr::new(198, 18, 128, 1)));
        assert_eq!(overlay_addr(255), Some(Ipv4Addr::new(198, 18, 129, 0)));
        let last = max_mesh_nodes() - 1;
        assert_eq!(overlay_addr(last), Some(Ipv4Addr::new(198, 19, 255, 254)));
        assert_eq!(overlay_addr(last + 1), None);
        assert!(NodeMesh::new("n", last + 1)
            .err()
            .is_some_and(|e| e.contains("at most")));
        let m = NodeMesh::new("n", 2).expect("fits");
        assert_eq!(
            m.info.allowed_ips,
            vec!["198.18.128.3/32".parse::<IpNet>().expect("net")]
        );
    }

    #[test]
    fn rotation_changes_the_key() {
        let mut m = NodeMesh::new("n", 0).expect("fits");
        let old = m.info.public_key;
        let pbi = m.rotate();
        assert_ne!(m.info.public_key, old);
        assert_eq!(pbi.public_key, m.info.public_key.0.to_vec());
    }

    #[test]
    fn removal_log_is_bounded() {
        let mut log = RemovalLog::new(1);
        assert_eq!((log.max_keys, log.max_per_key), (1040, 20));
        let t = Instant::now();
        let diff = |k: u8| MeshDiff {
            removed: vec![Removed {
                node: "p".into(),
                public_key: WgKey([k; 32]),
                cause: RemoveCause::Withdrawn("tampered".into()),
            }],
            ..MeshDiff::default()
        };
        for _ in 0..25 {
            log.record("a", t, &diff(1));
        }
        let got = log.get(&WgKey([1; 32]));
        assert_eq!(got.len(), 20);
        assert_eq!(got[0].cause, "withdrawn: tampered");
        log.max_keys = 2;
        log.record("a", t, &diff(2));
        log.record("a", t, &diff(3));
        assert!(log.get(&WgKey([1; 32])).is_empty());
        assert_eq!(log.get(&WgKey([3; 32])).len(), 1);
    }
}
