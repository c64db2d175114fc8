//! One-time join tokens.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::PkiError;

const PREFIX: &str = "nwjt1";

/// A one-time join token. Printed form: `nwjt1.<id>.<secret>.<ca-sha256-hex>`, where `id` is 8
/// random bytes in lowercase hex, `secret` is 32 random bytes in unpadded base64url, and the last
/// part pins the controller's CA certificate.
///
/// The controller stores only `id` and [`JoinToken::secret_hash`]. `Debug` never prints the
/// secret.
#[derive(Clone)]
pub struct JoinToken {
    pub id: String,
    pub secret: Zeroizing<String>,
    pub ca_fingerprint: [u8; 32],
}

impl JoinToken {
    /// A fresh token for a controller whose CA has fingerprint `ca_fingerprint`.
    pub fn generate(ca_fingerprint: [u8; 32]) -> Self {
        let mut id = [0u8; 8];
        let mut secret = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut id);
        rand::rngs::OsRng.fill_bytes(&mut secret[..]);
        JoinToken {
            id: hex::encode(id),
            secret: Zeroizing::new(URL_SAFE_NO_PAD.encode(&secret[..])),
            ca_fingerprint,
        }
    }

    /// Parses the printed form. Surrounding whitespace is ignored.
    pub fn parse(s: &str) -> Result<Self, PkiError> {
        let bad = |reason: String| PkiError::InvalidToken { reason };
        let s = s.trim();
        let parts: Vec<&str> = s.split('.').collect();
        if parts.first() != Some(&PREFIX) {
            return Err(bad(format!(
                "does not start with \"{PREFIX}.\" (is this a nicwarden join token?)"
            )));
        }
        if parts.len() != 4 {
            return Err(bad(format!(
                "expected 4 dot-separated parts ({PREFIX}.<id>.<secret>.<ca-sha256>), found {}",
                parts.len()
            )));
        }
        let (id, secret, ca) = (parts[1], parts[2], parts[3]);
        if id.len() != 16 || !is_lower_hex(id) {
            return Err(bad("id is not 16 lowercase hex digits".into()));
        }
        let mut raw = Zeroizing::new(Vec::new());
        match URL_SAFE_NO_PAD.decode_vec(secret, &mut raw) {
            Ok(()) if raw.len() == 32 => {}
            Ok(()) => return Err(bad("secret does not decode to 32 bytes".into())),
            Err(_) => return Err(bad("secret is not unpadded base64url".into())),
        }
        if ca.len() != 64 || !is_lower_hex(ca) {
            return Err(bad(
                "CA fingerprint is not 64 lowercase hex digits (sha256)".into(),
            ));
        }
        let mut ca_fingerprint = [0u8; 32];
        hex::decode_to_slice(ca, &mut ca_fingerprint)
            .map_err(|e| bad(format!("CA fingerprint is not hex: {e}")))?;
        Ok(JoinToken {
            id: id.to_owned(),
            secret: Zeroizing::new(secret.to_owned()),
            ca_fingerprint,
        })
    }

    /// The printed form, to show the operator once.
    pub fn encode(&self) -> String {
        format!(
            "{PREFIX}.{}.{}.{}",
            self.id,
            &*self.secret,
            hex::encode(self.ca_fingerprint)
        )
    }

    /// Lowercase hex sha256 of the secret: what the controller stores.
    pub fn secret_hash(&self) -> String {
        secret_hash(&self.secret)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("ca_fingerprint", &hex::encode(self.ca_fingerprint))
            .finish()
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `presented_secret` hashes to `stored_hash_hex`, compared in constant time. A malformed
/// stored hash never matches.
pub fn token_secret_matches(stored_hash_hex: &str, presented_secret: &str) -> bool {
    let mut stored = [0u8; 32];
    if hex::decode_to_slice(stored_hash_hex, &mut stored).is_err() {
        return false;
    }
    let mut presented: [u8; 32] = Sha256::digest(presented_secret.as_bytes()).into();
    let eq = bool::from(stored.ct_eq(&presented));
    presented.zeroize();
    eq
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: [u8; 32] = [0xab; 32];

    #[test]
    fn encode_parse_round_trip() {
        let t = JoinToken::generate(FP);
        let s = t.encode();
        assert!(s.starts_with("nwjt1."), "{s}");
        assert_eq!(s.split('.').count(), 4);
        assert_eq!(t.id.len(), 16);
        assert_eq!(t.secret.len(), 43);
        let p = JoinToken::parse(&format!("  {s}\n")).unwrap();
        assert_eq!(p.id, t.id);
        assert_eq!(*p.secret, *t.secret);
        assert_eq!(p.ca_fingerprint, FP);
        assert_eq!(p.encode(), s);
        // Two tokens differ.
        let t2 = JoinToken::generate(FP);
        assert_ne!(t2.id, t.id);
        assert_ne!(*t2.secret, *t.secret);
    }

    fn parse_err(s: &str) -> String {
        JoinToken::parse(s).unwrap_err().to_string()
    }

    #[test]
    fn parse_errors_are_clear() {
        let good = JoinToken::generate(FP).encode();
        let parts: Vec<&str> = good.split('.').collect();
        let with = |i: usize, v: &str| {
            let mut p = parts.clone();
            p[i] = v;
            p.join(".")
        };
        let cases: &[(String, &str)] = &[
            (String::new(), "does not start with \"nwjt1.\""),
            (good.replacen("nwjt1", "nwjt2", 1), "does not start with"),
            (format!("{good}.extra"), "expected 4 dot-separated parts"),
            (parts[..3].join("."), "found 3"),
            (with(1, "0123456789abcdeg"), "id is not 16 lowercase hex"),
            (with(1, "0123"), "id is not 16 lowercase hex"),
            (with(2, "abc"), "secret does not decode to 32 bytes"),
            (with(2, "a+b/"), "secret is not unpadded base64url"),
            (
                with(3, &"zz".repeat(32)),
                "CA fingerprint is not 64 lowercase hex",
            ),
            (with(3, "abcd"), "CA fingerprint is not 64 lowercase hex"),
        ];
        for (input, want) in cases {
            let err = parse_err(input);
            assert!(err.starts_with("parse join token: "), "{err}");
            assert!(
                err.contains(want),
                "input {input:?}: got {err:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn hash_match_and_mismatch() {
        let t = JoinToken::generate(FP);
        let stored = t.secret_hash();
        assert_eq!(stored.len(), 64);
        assert!(token_secret_matches(&stored, &t.secret));
        assert!(!token_secret_matches(&stored, "not the secret"));
        let other = JoinToken::generate(FP);
        assert!(!token_secret_matches(&stored, &other.secret));
        assert!(!token_secret_matches("nothex", &t.secret));
        assert!(!token_secret_matches(&stored[..62], &t.secret));
        assert!(token_secret_matches(&stored.to_uppercase(), &t.secret));
    }

    #[test]
    fn debug_redacts_secret() {
        let t = JoinToken::generate(FP);
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(&*t.secret), "{dbg}");
        assert!(dbg.contains(&t.id), "{dbg}");
    }
}
