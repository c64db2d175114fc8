//! Mesh messages on the wire: peer-set updates (signed), the agent's WireGuard identity,
//! tamper reports.
//!
//! A [`SignedMeshUpdate`](pb::SignedMeshUpdate) is signed with the same Ed25519 key as
//! lease directives, over a domain-separation prefix followed by the encoded update, so a
//! signature made for one kind of message can never be accepted as the other.

use crate::{pb, WireError};
use ed25519_dalek::{Signature, VerifyingKey};
use ipnet::IpNet;
use nicwarden_lease::Time;
use nicwarden_mesh::{MeshUpdate, PeerEntry, PeerRemoval, WgKey};
use prost::Message;
use std::net::SocketAddr;

/// What a mesh-update signature covers before the encoded update.
pub const MESH_SIGNING_PREFIX: &[u8] = b"nicwarden-mesh-update-v1\0";

fn field(field: &'static str, reason: impl Into<String>) -> WireError {
    WireError::Field {
        field,
        reason: reason.into(),
    }
}

fn signed_bytes(update: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(MESH_SIGNING_PREFIX.len() + update.len());
    m.extend_from_slice(MESH_SIGNING_PREFIX);
    m.extend_from_slice(update);
    m
}

/// A node's WireGuard identity as its agent reports it (`Hello.mesh`, `mesh_key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshInfo {
    pub public_key: WgKey,
    pub endpoint: SocketAddr,
    pub allowed_ips: Vec<IpNet>,
}

pub fn mesh_info_to_pb(m: &MeshInfo) -> pb::MeshInfo {
    pb::MeshInfo {
        public_key: m.public_key.0.to_vec(),
        endpoint: m.endpoint.to_string(),
        allowed_ips: m.allowed_ips.iter().map(|n| n.to_string()).collect(),
    }
}

fn key_from(bytes: &[u8], name: &'static str) -> Result<WgKey, WireError> {
    let k: [u8; 32] = bytes
        .try_into()
        .map_err(|_| field(name, format!("must be 32 bytes, got {}", bytes.len())))?;
    Ok(WgKey(k))
}

fn endpoint_from(s: &str) -> Result<SocketAddr, WireError> {
    s.parse()
        .map_err(|e| field("endpoint", format!("`{s}` is not ip:port ({e})")))
}

fn nets_from(v: &[String]) -> Result<Vec<IpNet>, WireError> {
    if v.is_empty() {
        return Err(field("allowed_ips", "empty"));
    }
    v.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map_err(|e| field("allowed_ips", format!("`{s}` is not a prefix ({e})")))
        })
        .collect()
}

/// Decodes and checks an agent's mesh identity.
pub fn mesh_info_from_pb(m: &pb::MeshInfo) -> Result<MeshInfo, WireError> {
    Ok(MeshInfo {
        public_key: key_from(&m.public_key, "public_key")?,
        endpoint: endpoint_from(&m.endpoint)?,
        allowed_ips: nets_from(&m.allowed_ips)?,
    })
}

pub fn mesh_update_to_pb(u: &MeshUpdate) -> pb::MeshUpdate {
    pb::MeshUpdate {
        seq: u.seq,
        full: u.full,
        entries: u
            .entries
            .iter()
            .map(|e| pb::PeerEntry {
                node: e.node.clone(),
                group: e.group.clone(),
                public_key: e.public_key.0.to_vec(),
                endpoint: e.endpoint.to_string(),
                allowed_ips: e.allowed_ips.iter().map(|n| n.to_string()).collect(),
                ttl_ms: e.ttl_ms,
            })
            .collect(),
        removals: u
            .removals
            .iter()
            .map(|r| pb::PeerRemoval {
                node: r.node.clone(),
                public_key: r.public_key.0.to_vec(),
                reason: r.reason.clone(),
            })
            .collect(),
        issued_at_unix_ms: u.issued_at.0,
    }
}

/// Decodes a protobuf mesh update, checking every field.
pub fn mesh_update_from_pb(u: pb::MeshUpdate) -> Result<MeshUpdate, WireError> {
    if u.seq == 0 {
        return Err(field("seq", "must be > 0"));
    }
    let mut entries = Vec::with_capacity(u.entries.len());
    for e in u.entries {
        if e.node.is_empty() {
            return Err(field("node", "empty"));
        }
        entries.push(PeerEntry {
            public_key: key_from(&e.public_key, "public_key")?,
            endpoint: endpoint_from(&e.endpoint)?,
            allowed_ips: nets_from(&e.allowed_ips)?,
            node: e.node,
            group: e.group,
            ttl_ms: e.ttl_ms,
        });
    }
    let mut removals = Vec::with_capacity(u.removals.len());
    for r in u.removals {
        if r.node.is_empty() {
            return Err(field("node", "empty"));
        }
        removals.push(PeerRemoval {
            public_key: key_from(&r.public_key, "public_key")?,
            node: r.node,
            reason: r.reason,
        });
    }
    Ok(MeshUpdate {
        seq: u.seq,
        full: u.full,
        entries,
        removals,
        issued_at: Time(u.issued_at_unix_ms),
    })
}

/// Encodes and signs a mesh update once; the result can be sent to every recipient.
pub fn sign_mesh_update(
    u: &MeshUpdate,
    sign: impl FnOnce(&[u8]) -> [u8; 64],
) -> pb::SignedMeshUpdate {
    let update = mesh_update_to_pb(u).encode_to_vec();
    let signature = sign(&signed_bytes(&update)).to_vec();
    pb::SignedMeshUpdate { update, signature }
}

/// Verifies a signed mesh update against the pinned controller key (strict Ed25519, before
/// any decoding), then decodes and checks it.
pub fn verify_mesh_update(
    su: &pb::SignedMeshUpdate,
    controller_key: &[u8; 32],
) -> Result<MeshUpdate, WireError> {
    let key = VerifyingKey::from_bytes(controller_key).map_err(|_| WireError::BadPublicKey)?;
    let sig: [u8; 64] = su
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| WireError::SignatureLength(su.signature.len()))?;
    key.verify_strict(&signed_bytes(&su.update), &Signature::from_bytes(&sig))
        .map_err(|_| WireError::BadSignature)?;
    let pbu = pb::MeshUpdate::decode(su.update.as_slice())
        .map_err(|e| WireError::Decode(e.to_string()))?;
    mesh_update_from_pb(pbu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn update() -> MeshUpdate {
        MeshUpdate {
            seq: 9,
            full: true,
            entries: vec![PeerEntry {
                node: "node2".into(),
                group: "pod-a".into(),
                public_key: WgKey([7; 32]),
                endpoint: "198.18.0.3:51820".parse().expect("addr"),
                allowed_ips: vec!["198.18.128.3/32".parse().expect("net")],
                ttl_ms: 30_000,
            }],
            removals: vec![PeerRemoval {
                node: "node3".into(),
                public_key: WgKey([8; 32]),
                reason: "tampered".into(),
            }],
            issued_at: Time(1234),
        }
    }

    #[test]
    fn signed_update_round_trips() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let su = sign_mesh_update(&update(), |m| k.sign(m).to_bytes());
        assert_eq!(
            verify_mesh_update(&su, &k.verifying_key().to_bytes()),
            Ok(update())
        );
    }

    #[test]
    fn rejects_other_key_and_tampered_bytes() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes();
        let mut su = sign_mesh_update(&update(), |m| k.sign(m).to_bytes());
        assert_eq!(
            verify_mesh_update(&su, &other),
            Err(WireError::BadSignature)
        );
        let last = su.update.len() - 1;
        su.update[last] ^= 1;
        assert_eq!(
            verify_mesh_update(&su, &k.verifying_key().to_bytes()),
            Err(WireError::BadSignature)
        );
    }

    #[test]
    fn a_directive_signature_is_not_a_mesh_signature() {
        // The same bytes signed without the prefix (as a directive would be) must not verify.
        let k = SigningKey::from_bytes(&[1; 32]);
        let update = mesh_update_to_pb(&super::tests::update()).encode_to_vec();
        let su = pb::SignedMeshUpdate {
            signature: k.sign(&update).to_bytes().to_vec(),
            update,
        };
        assert_eq!(
            verify_mesh_update(&su, &k.verifying_key().to_bytes()),
            Err(WireError::BadSignature)
        );
    }

    #[test]
    fn rejects_malformed_fields() {
        let mut u = mesh_update_to_pb(&update());
        u.entries[0].public_key = vec![1; 31];
        assert!(matches!(
            mesh_update_from_pb(u),
            Err(WireError::Field {
                field: "public_key",
                ..
            })
        ));
        let mut u = mesh_update_to_pb(&update());
        u.entries[0].endpoint = "nowhere".into();
        assert!(matches!(
            mesh_update_from_pb(u),
            Err(WireError::Field {
                field: "endpoint",
                ..
            })
        ));
        let mut u = mesh_update_to_pb(&update());
        u.entries[0].allowed_ips.clear();
        assert!(matches!(
            mesh_update_from_pb(u),
            Err(WireError::Field {
                field: "allowed_ips",
                ..
            })
        ));
        let mut u = mesh_update_to_pb(&update());
        u.seq = 0;
        assert!(matches!(
            mesh_update_from_pb(u),
            Err(WireError::Field { field: "seq", .. })
        ));
        let info = pb::MeshInfo {
            public_key: vec![1; 32],
            endpoint: "198.18.0.2:51820".into(),
            allowed_ips: vec!["198.18.128.2/32".into()],
        };
        assert!(mesh_info_from_pb(&info).is_ok());
        let bad = pb::MeshInfo {
            allowed_ips: vec!["x".into()],
            ..info
        };
        assert!(matches!(
            mesh_info_from_pb(&bad),
            Err(WireError::Field {
                field: "allowed_ips",
                ..
            })
        ));
    }
}
