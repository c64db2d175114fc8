//! The controller's Ed25519 lease-signing key and strict signature verification.

use std::fmt;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::PkiError;

/// The controller's Ed25519 key that signs leases. The secret is zeroized on drop (by
/// `ed25519_dalek`), and `Debug` prints only the public key.
pub struct LeaseSigningKey(SigningKey);

impl LeaseSigningKey {
    /// A fresh key from the OS random number generator.
    pub fn generate() -> Self {
        LeaseSigningKey(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// Loads a PKCS#8 PEM ("BEGIN PRIVATE KEY") Ed25519 key.
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(LeaseSigningKey)
            .map_err(|e| PkiError::invalid("parse lease-signing key", e.to_string()))
    }

    /// PKCS#8 PEM encoding of the key.
    pub fn to_pem(&self) -> Result<Zeroizing<String>, PkiError> {
        let doc = self
            .0
            .to_pkcs8_der()
            .map_err(|e| PkiError::invalid("encode lease-signing key", e.to_string()))?;
        Ok(crate::pem::encode("PRIVATE KEY", doc.as_bytes()))
    }

    /// Ed25519 signature over `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }

    /// The 32-byte Ed25519 public key agents verify leases with.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }
}

impl fmt::Debug for LeaseSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseSigningKey")
            .field("public_key", &hex::encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

/// Verifies an Ed25519 signature strictly (`verify_strict`: rejects small-order keys and
/// non-canonical signatures).
pub fn verify_lease_signature(
    public_key: &[u8; 32],
    msg: &[u8],
    sig: &[u8],
) -> Result<(), PkiError> {
    let key = VerifyingKey::from_bytes(public_key).map_err(|_| PkiError::BadSignature {
        reason: "public key is not a valid Ed25519 point",
    })?;
    let sig: &[u8; 64] = sig.try_into().map_err(|_| PkiError::BadSignature {
        reason: "signature is not 64 bytes",
    })?;
    key.verify_strict(msg, &Signature::from_bytes(sig))
        .map_err(|_| PkiError::BadSignature {
            reason: "signature does not match message and key",
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_good_bad_wrong_key() {
        let k = LeaseSigningKey::generate();
        let msg = b"lease node1 seq 7";
        let sig = k.sign(msg);
        verify_lease_signature(&k.public_key(), msg, &sig).unwrap();

        // Modified message.
        let err = verify_lease_signature(&k.public_key(), b"lease node1 seq 8", &sig).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        // Modified signature.
        let mut bad = sig;
        bad[10] ^= 1;
        assert!(verify_lease_signature(&k.public_key(), msg, &bad).is_err());
        // Wrong length.
        let err = verify_lease_signature(&k.public_key(), msg, &sig[..63]).unwrap_err();
        assert!(err.to_string().contains("64 bytes"), "{err}");
        // Wrong key.
        let other = LeaseSigningKey::generate();
        assert!(verify_lease_signature(&other.public_key(), msg, &sig).is_err());
    }

    #[test]
    fn strict_rejects_small_order_key() {
        // The identity point (small order): accepted by lax verification for some signatures,
        // rejected by verify_strict.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut sig = [0u8; 64];
        sig[0] = 1;
        assert!(verify_lease_signature(&identity, b"", &sig).is_err());
    }

    #[test]
    fn pem_round_trip_and_debug_hides_secret() {
        let k = LeaseSigningKey::generate();
        let pem = k.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let k2 = LeaseSigningKey::from_pem(&pem).unwrap();
        assert_eq!(k.public_key(), k2.public_key());
        let dbg = format!("{k:?}");
        assert!(dbg.contains(&hex::encode(k.public_key())), "{dbg}");
        assert!(!dbg.contains(&hex::encode(k.0.to_bytes())), "{dbg}");
        assert!(LeaseSigningKey::from_pem("garbage").is_err());
    }
}
