//! Link probes on the wire: the Ethernet payload of a probe or an answer, and what its
//! signature covers.
//!
//! A frame is a raw Ethernet frame with EtherType [`LINK_ETHERTYPE`] (IEEE "local
//! experimental"), sent to the broadcast address, whose payload is one encoded
//! [`SignedLinkFrame`](pb::SignedLinkFrame): the encoded [`LinkProbe`](pb::LinkProbe) or
//! [`LinkAnswer`](pb::LinkAnswer) (the *body*) and a signature by the sender's node key,
//! ECDSA P-256 with SHA-256 in the fixed 64-byte `r || s` form, over
//! [`link_signed_bytes`]`(body)` = [`LINK_SIGNING_PREFIX`] followed by the body bytes.
//!
//! [`decode_frame`] checks the shape (sizes, nonce length, non-empty names) and keeps the exact
//! body bytes, but does **not** check the signature, whatever its length: agents do not
//! verify each other, they report what they heard, and the controller, which holds every
//! node's certificate, judges it (`nicwarden_pki::verify_node_signature` over
//! `link_signed_bytes(body)`).

use crate::{pb, WireError};
use prost::Message;

/// EtherType of link probes and answers (IEEE 802 local experimental 1).
pub const LINK_ETHERTYPE: u16 = 0x88B5;
/// What a link signature covers before the body bytes.
pub const LINK_SIGNING_PREFIX: &[u8] = b"nicwarden-link-v1\0";
/// Largest accepted frame payload (the encoded `SignedLinkFrame`), bytes.
pub const LINK_MAX_FRAME: usize = 1024;
/// Largest accepted node or port name, bytes.
pub const LINK_MAX_STRING: usize = 64;
/// Length of a probe nonce.
pub const LINK_NONCE_LEN: usize = 16;
/// Length of a well-formed signature (fixed `r || s`).
pub const LINK_SIGNATURE_LEN: usize = 64;

/// A decoded frame. `body` is the exact signed body as received (the encoded probe or
/// answer): verify the signature over [`link_signed_bytes`]`(&body)`, never over a
/// re-encoding of the decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkFrame {
    Probe {
        probe: pb::LinkProbe,
        body: Vec<u8>,
        signature: Vec<u8>,
    },
    Answer {
        answer: pb::LinkAnswer,
        body: Vec<u8>,
        signature: Vec<u8>,
    },
}

/// The bytes a link signature covers: [`LINK_SIGNING_PREFIX`] followed by `body`.
pub fn link_signed_bytes(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(LINK_SIGNING_PREFIX.len() + body.len());
    m.extend_from_slice(LINK_SIGNING_PREFIX);
    m.extend_from_slice(body);
    m
}

fn signed_frame(body: pb::signed_link_frame::Body, signature: [u8; 64]) -> Vec<u8> {
    pb::SignedLinkFrame {
        body: Some(body),
        signature: signature.to_vec(),
    }
    .encode_to_vec()
}

/// The frame payload of a probe; `sign` signs the bytes it is given (the node key's
/// `sign_fixed`). The caller keeps the fields within bounds (names ≤ [`LINK_MAX_STRING`]
/// bytes, a [`LINK_NONCE_LEN`]-byte nonce), or receivers refuse the frame.
pub fn encode_probe(probe: &pb::LinkProbe, sign: impl FnOnce(&[u8]) -> [u8; 64]) -> Vec<u8> {
    let body = probe.encode_to_vec();
    let signature = sign(&link_signed_bytes(&body));
    signed_frame(pb::signed_link_frame::Body::Probe(body), signature)
}

/// The frame payload of an answer; as [`encode_probe`].
pub fn encode_answer(answer: &pb::LinkAnswer, sign: impl FnOnce(&[u8]) -> [u8; 64]) -> Vec<u8> {
    let body = answer.encode_to_vec();
    let signature = sign(&link_signed_bytes(&body));
    signed_frame(pb::signed_link_frame::Body::Answer(body), signature)
}

fn field(field: &'static str, reason: impl Into<String>) -> WireError {
    WireError::Field {
        field,
        reason: reason.into(),
    }
}

fn name(name: &'static str, s: &str) -> Result<(), WireError> {
    if s.is_empty() {
        return Err(field(name, "empty"));
    }
    if s.len() > LINK_MAX_STRING {
        return Err(field(
            name,
            format!("{} bytes, at most {LINK_MAX_STRING}", s.len()),
        ));
    }
    Ok(())
}

fn nonce(n: &[u8]) -> Result<(), WireError> {
    if n.len() != LINK_NONCE_LEN {
        return Err(field(
            "nonce",
            format!("{} bytes, expected {LINK_NONCE_LEN}", n.len()),
        ));
    }
    Ok(())
}

/// Decodes a frame payload (the bytes after the Ethernet header) and checks its shape. The
/// signature is kept as received, not checked (see the module doc).
pub fn decode_frame(bytes: &[u8]) -> Result<LinkFrame, WireError> {
    if bytes.len() > LINK_MAX_FRAME {
        return Err(WireError::Decode(format!(
            "link frame of {} bytes, at most {LINK_MAX_FRAME}",
            bytes.len()
        )));
    }
    let frame = pb::SignedLinkFrame::decode(bytes)
        .map_err(|e| WireError::Decode(format!("link frame: {e}")))?;
    match frame.body {
        None => Err(field("body", "missing (neither probe nor answer)")),
        Some(pb::signed_link_frame::Body::Probe(body)) => {
            let probe = pb::LinkProbe::decode(body.as_slice())
                .map_err(|e| WireError::Decode(format!("link probe: {e}")))?;
            name("node", &probe.node)?;
            name("port", &probe.port)?;
            nonce(&probe.nonce)?;
            Ok(LinkFrame::Probe {
                probe,
                body,
                signature: frame.signature,
            })
        }
        Some(pb::signed_link_frame::Body::Answer(body)) => {
            let answer = pb::LinkAnswer::decode(body.as_slice())
                .map_err(|e| WireError::Decode(format!("link answer: {e}")))?;
            name("node", &answer.node)?;
            name("port", &answer.port)?;
            name("to_node", &answer.to_node)?;
            name("to_port", &answer.to_port)?;
            nonce(&answer.nonce)?;
            Ok(LinkFrame::Answer {
                answer,
                body,
                signature: frame.signature,
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn probe() -> pb::LinkProbe {
        pb::LinkProbe {
            node: "node1".into(),
            port: "fab0".into(),
            nonce: vec![7; 16],
            sent_unix_ms: 1_700_000_000_000,
        }
    }

    fn answer() -> pb::LinkAnswer {
        pb::LinkAnswer {
            node: "node2".into(),
            port: "fab0".into(),
            to_node: "node1".into(),
            to_port: "fab0".into(),
            nonce: vec![7; 16],
        }
    }

    /// A "signature" that is a function of the signed bytes, so tests see what was signed.
    fn fake_sign(m: &[u8]) -> [u8; 64] {
        let mut s = [0u8; 64];
        for (i, b) in m.iter().enumerate() {
            s[i % 64] ^= b.wrapping_add(i as u8);
        }
        s
    }

    #[test]
    fn probe_round_trip_signs_prefix_and_exact_body() {
        let mut signed = Vec::new();
        let bytes = encode_probe(&probe(), |m| {
            signed = m.to_vec();
            fake_sign(m)
        });
        assert!(bytes.len() < LINK_MAX_FRAME);
        let LinkFrame::Probe {
            probe: p,
            body,
            signature,
        } = decode_frame(&bytes).unwrap()
        else {
            panic!("not a probe");
        };
        assert_eq!(p, probe());
        assert_eq!(body, probe().encode_to_vec());
        assert!(signed.starts_with(b"nicwarden-link-v1\0"));
        assert_eq!(signed, link_signed_bytes(&body));
        assert_eq!(signature, fake_sign(&signed).to_vec());
    }

    #[test]
    fn answer_round_trip() {
        let bytes = encode_answer(&answer(), fake_sign);
        let LinkFrame::Answer {
            answer: a,
            body,
            signature,
        } = decode_frame(&bytes).unwrap()
        else {
            panic!("not an answer");
        };
        assert_eq!(a, answer());
        assert_eq!(signature, fake_sign(&link_signed_bytes(&body)).to_vec());
    }

    #[test]
    fn signatures_are_not_checked_here() {
        // Unsigned or badly signed frames decode: the controller judges them.
        let mut f =
            pb::SignedLinkFrame::decode(encode_answer(&answer(), fake_sign).as_slice()).unwrap();
        f.signature.clear();
        assert!(matches!(
            decode_frame(&f.encode_to_vec()),
            Ok(LinkFrame::Answer { signature, .. }) if signature.is_empty()
        ));
    }

    #[track_caller]
    fn refused(bytes: &[u8], want: &str) {
        let err = decode_frame(bytes).unwrap_err().to_string();
        assert!(err.contains(want), "{err} (wanted {want:?})");
    }

    #[test]
    fn malformed_frames_are_refused() {
        let sig = |p: pb::LinkProbe| encode_probe(&p, fake_sign);
        let ans = |a: pb::LinkAnswer| encode_answer(&a, fake_sign);
        refused(&[0xff; 10], "decode message: link frame");
        refused(&[], "field `body`: missing");
        refused(&vec![0u8; LINK_MAX_FRAME + 1], "at most 1024");
        let mut p = probe();
        p.nonce = vec![1; 15];
        refused(&sig(p), "field `nonce`: 15 bytes, expected 16");
        let mut p = probe();
        p.nonce.clear();
        refused(&sig(p), "field `nonce`: 0 bytes");
        let mut p = probe();
        p.node = "n".repeat(65);
        refused(&sig(p), "field `node`: 65 bytes, at most 64");
        let mut p = probe();
        p.node = "n".repeat(64);
        assert!(decode_frame(&sig(p)).is_ok());
        let mut p = probe();
        p.port.clear();
        refused(&sig(p), "field `port`: empty");
        let mut a = answer();
        a.to_node.clear();
        refused(&ans(a), "field `to_node`: empty");
        let mut a = answer();
        a.to_port = "p".repeat(100);
        refused(&ans(a), "field `to_port`: 100 bytes");
        let mut a = answer();
        a.nonce = vec![0; 32];
        refused(&ans(a), "field `nonce`: 32 bytes");
        // A body that is not a probe.
        let f = pb::SignedLinkFrame {
            body: Some(pb::signed_link_frame::Body::Probe(vec![0xff, 0xff])),
            signature: vec![],
        };
        refused(&f.encode_to_vec(), "decode message: link probe");
        // A frame too large, however valid its content.
        let mut p = probe();
        p.port = "p".repeat(64);
        let f = pb::SignedLinkFrame {
            body: Some(pb::signed_link_frame::Body::Probe(p.encode_to_vec())),
            signature: vec![1; 1000],
        };
        refused(&f.encode_to_vec(), "at most 1024");
    }
}
