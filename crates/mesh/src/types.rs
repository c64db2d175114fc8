//! The mesh's data types: WireGuard public keys, peer entries, removals and the update that
//! carries them from the controller to the agents.
//!
//! These are core types, not wire types: `nicwarden-proto` converts them to its protobuf
//! messages and signs them. They derive serde because the agent persists the peers it holds
//! (as JSON) next to its replay guard. A [`WgKey`] serializes as its base64 text, the form
//! `wg(8)` shows and operators copy around.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ipnet::IpNet;
use nicwarden_lease::{NodeId, Time};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// A WireGuard *public* key (Curve25519, 32 bytes). Never a private key: nothing in this crate
/// holds a secret, so `Debug` and `Display` may show it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WgKey(pub [u8; 32]);

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({self})")
    }
}

/// Parsing a [`WgKey`] from text failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parse WireGuard public key: must be 32 bytes of base64, got {got:?} ({detail})")]
pub struct KeyParseError {
    /// The rejected input (truncated to 64 characters).
    pub got: String,
    /// Why it was rejected.
    pub detail: String,
}

impl FromStr for WgKey {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |detail: String| KeyParseError {
            got: s.chars().take(64).collect(),
            detail,
        };
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| err(format!("not base64: {e}")))?;
        let len = bytes.len();
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| err(format!("decodes to {len} bytes")))?;
        Ok(WgKey(key))
    }
}

impl Serialize for WgKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WgKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One peer a node may form a tunnel with.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerEntry {
    /// The peer's node name.
    pub node: NodeId,
    /// The mesh group (from the quota tree) the entry was published in.
    pub group: String,
    pub public_key: WgKey,
    /// Where the peer's WireGuard socket listens (on the fabric).
    pub endpoint: SocketAddr,
    /// The addresses routed to this peer; never empty, never overlapping another peer's.
    pub allowed_ips: Vec<IpNet>,
    /// Remaining lifetime at issuance. The receiver counts it from receipt on its own clock
    /// (like a lease): its deadline is `receipt + ttl_ms`.
    pub ttl_ms: u64,
}

impl PeerEntry {
    /// Whether `self` and `other` configure the same WireGuard peer (everything but the TTL).
    pub fn same_peer(&self, other: &PeerEntry) -> bool {
        self.node == other.node
            && self.group == other.group
            && self.public_key == other.public_key
            && self.endpoint == other.endpoint
            && self.allowed_ips == other.allowed_ips
    }
}

/// Withdraws a peer. It names the key it withdraws, so a late removal of an old key cannot
/// remove the peer's rotated new key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerRemoval {
    pub node: NodeId,
    pub public_key: WgKey,
    /// Why ("tampered", "no valid lease", "left group g", "removed", ...).
    pub reason: String,
}

/// One message from the controller to one or more agents (signed by `nicwarden-proto`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshUpdate {
    /// One controller-wide sequence number, strictly increasing with every update.
    pub seq: u64,
    /// A snapshot: after it the receiver holds exactly its accepted entries.
    pub full: bool,
    pub entries: Vec<PeerEntry>,
    pub removals: Vec<PeerRemoval>,
    /// Controller wall-clock time of issuance; informational only.
    pub issued_at: Time,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_parse(input: &str, expect: Result<[u8; 32], &str>) {
        let got = input.parse::<WgKey>();
        match (got, expect) {
            (Ok(k), Ok(bytes)) => assert_eq!(k.0, bytes, "{input}"),
            (Err(e), Err(fragment)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("must be 32 bytes of base64") && msg.contains(fragment),
                    "{input}: {msg}"
                );
            }
            (got, expect) => panic!("{input}: got {got:?}, expected {expect:?}"),
        }
    }

    #[test]
    fn key_parse() {
        let mut seq = [0u8; 32];
        for (i, b) in seq.iter_mut().enumerate() {
            *b = i as u8;
        }
        check_parse("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", Ok([0; 32]));
        check_parse(
            "//////////////////////////////////////////8=",
            Ok([255; 32]),
        );
        check_parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", Ok(seq));
        check_parse(" AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n", Ok(seq));
        check_parse("", Err("decodes to 0 bytes"));
        check_parse("AAAA", Err("decodes to 3 bytes"));
        check_parse(
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            Err("decodes to 35 bytes"),
        );
        check_parse(
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            Err("not base64"),
        );
        check_parse("not a key at all!", Err("not base64"));
        check_parse(
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA-_",
            Err("not base64"),
        );
    }

    #[test]
    fn key_display_round_trips_and_debug_shows_base64() {
        for bytes in [[0u8; 32], [255; 32], [7; 32]] {
            let k = WgKey(bytes);
            let text = k.to_string();
            assert_eq!(text.len(), 44);
            assert_eq!(text.parse::<WgKey>(), Ok(k));
            assert_eq!(format!("{k:?}"), format!("WgKey({text})"));
        }
    }

    #[test]
    fn serde_uses_base64_text() {
        let k = WgKey([0; 32]);
        let json = serde_json::to_string(&k).expect("serialize");
        assert_eq!(json, "\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"");
        assert_eq!(serde_json::from_str::<WgKey>(&json).expect("parse"), k);
        let err = serde_json::from_str::<WgKey>("\"AAAA\"").expect_err("short key");
        assert!(err.to_string().contains("32 bytes"), "{err}");

        let entry = PeerEntry {
            node: "n1".into(),
            group: "g".into(),
            public_key: k,
            endpoint: "198.18.0.1:51820".parse().expect("addr"),
            allowed_ips: vec!["10.1.0.0/24".parse().expect("net")],
            ttl_ms: 5,
        };
        let update = MeshUpdate {
            seq: 3,
            full: true,
            entries: vec![entry.clone()],
            removals: vec![PeerRemoval {
                node: "n2".into(),
                public_key: WgKey([1; 32]),
                reason: "removed".into(),
            }],
            issued_at: Time(9),
        };
        let json = serde_json::to_string(&update).expect("serialize");
        assert!(json.contains("\"10.1.0.0/24\""), "{json}");
        assert!(json.contains("\"198.18.0.1:51820\""), "{json}");
        assert_eq!(
            serde_json::from_str::<MeshUpdate>(&json).expect("parse"),
            update
        );
    }

    #[test]
    fn same_peer_ignores_only_ttl() {
        let a = PeerEntry {
            node: "n1".into(),
            group: "g".into(),
            public_key: WgKey([0; 32]),
            endpoint: "198.18.0.1:51820".parse().expect("addr"),
            allowed_ips: vec!["10.1.0.0/24".parse().expect("net")],
            ttl_ms: 5,
        };
        let variants: Vec<(PeerEntry, bool)> = vec![
            (
                PeerEntry {
                    ttl_ms: 99,
                    ..a.clone()
                },
                true,
            ),
            (
                PeerEntry {
                    group: "h".into(),
                    ..a.clone()
                },
                false,
            ),
            (
                PeerEntry {
                    public_key: WgKey([1; 32]),
                    ..a.clone()
                },
                false,
            ),
            (
                PeerEntry {
                    endpoint: "198.18.0.1:51821".parse().expect("addr"),
                    ..a.clone()
                },
                false,
            ),
            (
                PeerEntry {
                    allowed_ips: vec![],
                    ..a.clone()
                },
                false,
            ),
            (
                PeerEntry {
                    node: "n2".into(),
                    ..a.clone()
                },
                false,
            ),
        ];
        for (b, same) in variants {
            assert_eq!(a.same_peer(&b), same, "{b:?}");
        }
    }
}
