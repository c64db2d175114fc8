//! The nicwarden wire protocol: gRPC service and message types (generated from
//! `proto/nicwarden.proto`), conversions to and from the lease core's types, and the
//! signed-directive format.
//!
//! This is the only crate that knows encodings and the signature format. A directive is
//! signed over the exact bytes of its protobuf encoding; [`verify_directive`] checks the
//! signature against the pinned controller key *before* decoding anything, then checks
//! that every field is well formed.

use ed25519_dalek::{Signature, VerifyingKey};
use nicwarden_lease as core;
use prost::Message;

pub mod link;
pub use link::{
    decode_frame, encode_answer, encode_probe, link_signed_bytes, LinkFrame, LINK_ETHERTYPE,
    LINK_SIGNING_PREFIX,
};
pub mod mesh;
pub use mesh::{
    mesh_info_from_pb, mesh_info_to_pb, sign_mesh_update, verify_mesh_update, MeshInfo,
};

/// Generated protobuf and gRPC code.
#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("nicwarden.v1");
}

/// A wire message that cannot be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("verify signed message: signature is {0} bytes, expected 64")]
    SignatureLength(usize),
    #[error("verify signed message: controller public key is not a valid Ed25519 key")]
    BadPublicKey,
    #[error("verify signed message: bad signature (not signed by the pinned controller key)")]
    BadSignature,
    #[error("decode message: {0}")]
    Decode(String),
    #[error("decode message: field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

fn field(field: &'static str, reason: impl Into<String>) -> WireError {
    WireError::Field {
        field,
        reason: reason.into(),
    }
}

fn parse_scope(s: &str) -> Result<core::Scope, WireError> {
    s.parse().map_err(|e: String| field("scope", e))
}

fn floor(rate_bps: u64) -> core::Floor {
    core::Floor { rate_bps }
}

/// Encodes a core directive as protobuf.
pub fn directive_to_pb(d: &core::Directive) -> pb::Directive {
    let kind = match d {
        core::Directive::Lease(l) => pb::directive::Kind::Lease(pb::Lease {
            id: l.id.0,
            node: l.node.clone(),
            scope: l.scope.to_string(),
            seq: l.seq,
            rate_bps: l.rate_bps,
            burst_bytes: l.burst_bytes,
            volume_bytes: l.volume_bytes,
            ttl_ms: l.ttl_ms,
            renew_interval_ms: l.renew_interval_ms,
            floor_bps: l.floor.rate_bps,
            issued_at_unix_ms: l.issued_at.0,
            used_bytes: l.used_bytes,
        }),
        core::Directive::Revoke(r) => pb::directive::Kind::Revocation(pb::Revocation {
            lease_id: r.lease_id.0,
            node: r.node.clone(),
            scope: r.scope.to_string(),
            seq: r.seq,
            floor_bps: r.floor.rate_bps,
            reason: r.reason.clone(),
            issued_at_unix_ms: r.issued_at.0,
        }),
    };
    pb::Directive { kind: Some(kind) }
}

/// Decodes a protobuf directive into the core's type, checking every field.
pub fn directive_from_pb(d: pb::Directive) -> Result<core::Directive, WireError> {
    match d.kind {
        None => Err(field("kind", "missing (neither lease nor revocation)")),
        Some(pb::directive::Kind::Lease(l)) => {
            if l.node.is_empty() {
                return Err(field("node", "empty"));
            }
            if l.seq == 0 {
                return Err(field("seq", "must be > 0"));
            }
            if l.rate_bps == 0 {
                return Err(field("rate_bps", "must be > 0"));
            }
            if l.ttl_ms == 0 {
                return Err(field("ttl_ms", "must be > 0"));
            }
            if l.renew_interval_ms == 0 || l.renew_interval_ms >= l.ttl_ms {
                return Err(field("renew_interval_ms", "must be > 0 and < ttl_ms"));
            }
            Ok(core::Directive::Lease(core::Lease {
                id: core::LeaseId(l.id),
                node: l.node,
                scope: parse_scope(&l.scope)?,
                seq: l.seq,
                rate_bps: l.rate_bps,
                burst_bytes: l.burst_bytes,
                volume_bytes: l.volume_bytes,
                ttl_ms: l.ttl_ms,
                renew_interval_ms: l.renew_interval_ms,
                floor: floor(l.floor_bps),
                used_bytes: l.used_bytes,
                issued_at: core::Time(l.issued_at_unix_ms),
            }))
        }
        Some(pb::directive::Kind::Revocation(r)) => {
            if r.node.is_empty() {
                return Err(field("node", "empty"));
            }
            if r.seq == 0 {
                return Err(field("seq", "must be > 0"));
            }
            Ok(core::Directive::Revoke(core::Revocation {
                lease_id: core::LeaseId(r.lease_id),
                node: r.node,
                scope: parse_scope(&r.scope)?,
                seq: r.seq,
                floor: floor(r.floor_bps),
                reason: r.reason,
                issued_at: core::Time(r.issued_at_unix_ms),
            }))
        }
    }
}

/// Encodes and signs a directive. `sign` is the controller's Ed25519 signing function.
pub fn sign_directive(
    d: &core::Directive,
    sign: impl FnOnce(&[u8]) -> [u8; 64],
) -> pb::SignedDirective {
    let directive = directive_to_pb(d).encode_to_vec();
    let signature = sign(&directive).to_vec();
    pb::SignedDirective {
        directive,
        signature,
    }
}

/// Verifies a signed directive against the pinned controller key, then decodes it.
///
/// The signature is checked over the received bytes before any decoding, with strict
/// Ed25519 verification (no malleable signatures, no weak keys).
pub fn verify_directive(
    sd: &pb::SignedDirective,
    controller_key: &[u8; 32],
) -> Result<core::Directive, WireError> {
    let key = VerifyingKey::from_bytes(controller_key).map_err(|_| WireError::BadPublicKey)?;
    let sig: [u8; 64] = sd
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| WireError::SignatureLength(sd.signature.len()))?;
    key.verify_strict(&sd.directive, &Signature::from_bytes(&sig))
        .map_err(|_| WireError::BadSignature)?;
    let pbd = pb::Directive::decode(sd.directive.as_slice())
        .map_err(|e| WireError::Decode(e.to_string()))?;
    directive_from_pb(pbd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn lease(seq: u64) -> core::Directive {
        core::Directive::Lease(core::Lease {
            id: core::LeaseId(7),
            node: "node1".into(),
            scope: core::Scope::Peer("node2".into()),
            seq,
            rate_bps: 50_000_000,
            burst_bytes: 64_000,
            volume_bytes: Some(10_000_000),
            ttl_ms: 30_000,
            renew_interval_ms: 5_000,
            floor: core::Floor::BLOCKED,
            used_bytes: 1234,
            issued_at: core::Time(1_700_000_000_000),
        })
    }

    fn signed(d: &core::Directive, k: &SigningKey) -> pb::SignedDirective {
        sign_directive(d, |m| k.sign(m).to_bytes())
    }

    #[test]
    fn round_trip_lease_and_revocation() {
        let k = key(1);
        let pk = k.verifying_key().to_bytes();
        let l = lease(3);
        assert_eq!(verify_directive(&signed(&l, &k), &pk), Ok(l));
        let r = core::Directive::Revoke(core::Revocation {
            lease_id: core::LeaseId(7),
            node: "node1".into(),
            scope: core::Scope::Egress,
            seq: 4,
            floor: core::Floor { rate_bps: 1000 },
            reason: "operator".into(),
            issued_at: core::Time(5),
        });
        assert_eq!(verify_directive(&signed(&r, &k), &pk), Ok(r));
    }

    #[test]
    fn rejects_wrong_key() {
        let sd = signed(&lease(1), &key(1));
        let other = key(2).verifying_key().to_bytes();
        assert_eq!(verify_directive(&sd, &other), Err(WireError::BadSignature));
    }

    #[test]
    fn rejects_tampered_bytes() {
        let k = key(1);
        let mut sd = signed(&lease(1), &k);
        // Raise the rate by flipping a byte of the body: the signature no longer matches.
        let last = sd.directive.len() - 1;
        sd.directive[last] ^= 0x01;
        let pk = k.verifying_key().to_bytes();
        assert_eq!(verify_directive(&sd, &pk), Err(WireError::BadSignature));
    }

    #[test]
    fn rejects_short_signature() {
        let k = key(1);
        let mut sd = signed(&lease(1), &k);
        sd.signature.truncate(10);
        let pk = k.verifying_key().to_bytes();
        assert_eq!(
            verify_directive(&sd, &pk),
            Err(WireError::SignatureLength(10))
        );
    }

    #[test]
    fn rejects_signed_garbage_with_clear_error() {
        let k = key(1);
        let pk = k.verifying_key().to_bytes();
        let body = vec![0xff, 0xff, 0xff];
        let sd = pb::SignedDirective {
            signature: k.sign(&body).to_bytes().to_vec(),
            directive: body,
        };
        assert!(matches!(
            verify_directive(&sd, &pk),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn rejects_signed_but_malformed_fields() {
        let k = key(1);
        let pk = k.verifying_key().to_bytes();
        let check = |l: pb::Lease, want: &str| {
            let body = pb::Directive {
                kind: Some(pb::directive::Kind::Lease(l)),
            }
            .encode_to_vec();
            let sd = pb::SignedDirective {
                signature: k.sign(&body).to_bytes().to_vec(),
                directive: body,
            };
            let err = verify_directive(&sd, &pk).expect_err("must be rejected");
            assert!(
                err.to_string().contains(want),
                "{err} should mention {want}"
            );
        };
        let good = match directive_to_pb(&lease(1)).kind {
            Some(pb::directive::Kind::Lease(l)) => l,
            _ => unreachable!(),
        };
        check(
            pb::Lease {
                rate_bps: 0,
                ..good.clone()
            },
            "rate_bps",
        );
        check(
            pb::Lease {
                seq: 0,
                ..good.clone()
            },
            "seq",
        );
        check(
            pb::Lease {
                node: String::new(),
                ..good.clone()
            },
            "node",
        );
        check(
            pb::Lease {
                scope: "everything".into(),
                ..good.clone()
            },
            "scope",
        );
        check(
            pb::Lease {
                renew_interval_ms: 30_000,
                ..good.clone()
            },
            "renew_interval_ms",
        );
        check(pb::Lease { ttl_ms: 0, ..good }, "ttl_ms");
    }
}
