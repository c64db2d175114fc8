//! The controller's side of the encrypted mesh: each node's WireGuard identity and tamper
//! state (persisted under `/mesh/<node>`), and the glue that turns the ledger (groups of the
//! quota tree, active leases) into the pure planner's members.
//!
//! What each node may tunnel with is decided by `nicwarden_mesh::Planner`; this module only
//! gathers its inputs. A node takes part when it is in a group, has reported a key, is not
//! tampered, and holds at least one active lease; its entry at its peers expires with the
//! latest of its leases, so a lapsed node drops out of every peer set even if the
//! controller goes silent.

use ipnet::IpNet;
use nicwarden_lease::ledger::Ledger;
use nicwarden_lease::Time;
use nicwarden_mesh::{Member, Planner, WgKey};
use nicwarden_proto::MeshInfo;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

pub const PREFIX_MESH: &str = "/mesh/";
pub const KEY_MESH_SEQ: &str = "/meta/mesh_seq";
/// Mesh sequence numbers are reserved in blocks: one store write per block, and a restart
/// continues above everything that may have been sent.
pub const SEQ_BLOCK: u64 = 10_000;
/// How many retired (rotated or tampered) keys a node record remembers; none may return.
const BURNED_KEEP: usize = 32;

/// Why and when a node was declared tampered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TamperRecord {
    pub reason: String,
    /// Controller time the report arrived.
    pub at_unix_ms: u64,
    /// The node's own clock when it detected the event (informational).
    pub detected_unix_ms: u64,
}

/// A node's mesh identity as the controller records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshRecord {
    pub node: String,
    pub public_key: Option<WgKey>,
    pub endpoint: Option<SocketAddr>,
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    /// When the current key was first seen.
    #[serde(default)]
    pub key_since_unix_ms: u64,
    #[serde(default)]
    pub rotations: u64,
    pub tampered: Option<TamperRecord>,
    /// Keys this node used before (rotated out or exposed by tampering): refused forever.
    #[serde(default)]
    pub burned_keys: Vec<WgKey>,
}

impl MeshRecord {
    pub fn new(node: &str) -> Self {
        MeshRecord {
            node: node.to_string(),
            ..Default::default()
        }
    }

    /// Retires the current key (it may never be used again by this node).
    pub fn burn_current(&mut self) {
        if let Some(k) = self.public_key.take() {
            if !self.burned_keys.contains(&k) {
                self.burned_keys.push(k);
            }
            let excess = self.burned_keys.len().saturating_sub(BURNED_KEEP);
            self.burned_keys.drain(..excess);
        }
    }
}

/// Checks a node's reported identity against every other node's: a key already used (by
/// anyone, now or before) and overlay addresses that overlap another node's are refused,
/// and each allowed address must be one host (a /32 or /128), so no node can claim a range
/// that would capture its peers' traffic.
pub fn check_identity(
    node: &str,
    info: &MeshInfo,
    records: &HashMap<String, MeshRecord>,
) -> Result<(), String> {
    for net in &info.allowed_ips {
        if net.prefix_len() != net.max_prefix_len() {
            return Err(format!(
                "mesh identity of {node}: allowed address {net} must be a single host (/32 or /128)"
            ));
        }
    }
    for (other, rec) in records {
        if rec.burned_keys.contains(&info.public_key) {
            return Err(format!(
                "mesh identity of {node}: WireGuard key {} was retired (rotated out or tampered{}); the agent must generate a new one",
                info.public_key,
                if other == node { "" } else { ", by another node" }
            ));
        }
        if other == node {
            continue;
        }
        if rec.public_key == Some(info.public_key) {
            return Err(format!(
                "mesh identity of {node}: WireGuard key {} is already node {other}'s",
                info.public_key
            ));
        }
        for a in &info.allowed_ips {
            for b in &rec.allowed_ips {
                if a.contains(b) || b.contains(a) {
                    return Err(format!(
                        "mesh identity of {node}: overlay address {a} overlaps node {other}'s {b}"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The planner's view of every node: group from the quota tree, identity and tamper state
/// from the records, lease deadline (latest `issued_at + ttl` of its active leases).
pub fn members(ledger: &Ledger, records: &HashMap<String, MeshRecord>) -> BTreeMap<String, Member> {
    let mut deadlines: HashMap<&str, Time> = HashMap::new();
    for l in ledger.leases().filter(|l| l.status.is_active()) {
        let d = l.issued_at.plus_millis(l.terms.ttl_ms);
        let e = deadlines.entry(l.node.as_str()).or_insert(d);
        if d > *e {
            *e = d;
        }
    }
    let tree = ledger.tree();
    ledger
        .nodes()
        .filter(|n| !n.removed)
        .map(|n| {
            let rec = records.get(&n.name);
            let member = Member {
                node: n.name.clone(),
                group: tree.nodes.get(&n.name).map(|q| q.group.clone()),
                public_key: rec.and_then(|r| r.public_key),
                endpoint: rec.and_then(|r| r.endpoint),
                allowed_ips: rec.map(|r| r.allowed_ips.clone()).unwrap_or_default(),
                tampered: rec.is_some_and(|r| r.tampered.is_some()),
                lease_deadline: deadlines.get(n.name.as_str()).copied(),
            };
            (n.name.clone(), member)
        })
        .collect()
}

/// The mesh part of the controller's state (inside the ledger's lock).
pub struct MeshState {
    pub planner: Planner,
    pub records: HashMap<String, MeshRecord>,
    /// Every seq below this may have been used; persisted before any seq >= it is sent.
    pub seq_reserved: u64,
    /// Nodes asked to rotate their key, and when (a request is repeated after 30 s).
    pub rotation_requested: HashMap<String, u64>,
}

impl MeshState {
    pub fn new(records: Vec<MeshRecord>, seq_reserved: u64) -> Self {
        MeshState {
            planner: Planner::new(seq_reserved.max(1)),
            records: records.into_iter().map(|r| (r.node.clone(), r)).collect(),
            seq_reserved: seq_reserved.max(1),
            rotation_requested: HashMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(key: u8, ip: &str) -> MeshInfo {
        MeshInfo {
            public_key: WgKey([key; 32]),
            endpoint: "198.18.0.2:51820".parse().expect("addr"),
            allowed_ips: vec![ip.parse().expect("net")],
        }
    }

    fn rec(node: &str, key: u8, ip: &str) -> MeshRecord {
        MeshRecord {
            public_key: Some(WgKey([key; 32])),
            allowed_ips: vec![ip.parse().expect("net")],
            ..MeshRecord::new(node)
        }
    }

    #[test]
    fn identity_checks() {
        let mut records = HashMap::new();
        records.insert("a".to_string(), rec("a", 1, "198.18.128.1/32"));
        assert!(check_identity("b", &info(2, "198.18.128.2/32"), &records).is_ok());
        // Re-reporting one's own identity is fine.
        assert!(check_identity("a", &info(1, "198.18.128.1/32"), &records).is_ok());
        let e = check_identity("b", &info(1, "198.18.128.2/32"), &records).expect_err("refused");
        assert!(e.contains("already node a's"), "{e}");
        let e = check_identity("b", &info(2, "198.18.128.1/32"), &records).expect_err("refused");
        assert!(e.contains("overlaps node a's"), "{e}");
        let e = check_identity("b", &info(2, "198.18.128.0/24"), &records).expect_err("refused");
        assert!(e.contains("single host"), "{e}");
        records
            .get_mut("a")
            .map(|r| r.burn_current())
            .expect("record");
        let e = check_identity("a", &info(1, "198.18.128.1/32"), &records).expect_err("refused");
        assert!(e.contains("retired"), "{e}");
    }

    #[test]
    fn burned_keys_are_bounded() {
        let mut r = MeshRecord::new("a");
        for k in 0..40u8 {
            r.public_key = Some(WgKey([k; 32]));
            r.burn_current();
        }
        assert_eq!(r.burned_keys.len(), BURNED_KEEP);
        assert_eq!(r.burned_keys.last(), Some(&WgKey([39; 32])));
        assert!(r.public_key.is_none());
    }
}
