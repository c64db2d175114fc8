//! Agent side: node names, the node's key pair and CSR, and reading a node identity back from a
//! verified certificate.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use zeroize::Zeroizing;

use crate::PkiError;

/// URI SAN prefix of node certificates: `nicwarden://node/<name>`.
pub const NODE_URI_PREFIX: &str = "nicwarden://node/";

/// Checks a node name against `[a-z0-9][a-z0-9.-]{0,62}`.
pub fn validate_node_name(name: &str) -> Result<(), PkiError> {
    let bad = |reason| {
        Err(PkiError::InvalidNodeName {
            name: name.to_owned(),
            reason,
        })
    };
    let Some(first) = name.bytes().next() else {
        return bad("empty");
    };
    if name.len() > 63 {
        return bad("longer than 63 characters");
    }
    if !matches!(first, b'a'..=b'z' | b'0'..=b'9') {
        return bad("must start with a lowercase letter or digit");
    }
    if !name
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-'))
    {
        return bad("only lowercase letters, digits, '.' and '-' are allowed");
    }
    Ok(())
}

/// Reads the node name from a client certificate that rustls has already verified against the
/// controller CA: the subject CN, which must be a valid node name and must agree with the
/// certificate's `nicwarden://node/<name>` URI SAN. Also returns the lowercase hex sha256 of the
/// DER (for logs and revocation lists).
pub fn node_identity_from_cert(der: &[u8]) -> Result<(String, String), PkiError> {
    const OP: &str = "read node identity from client certificate";
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::invalid(OP, format!("not a DER certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(PkiError::invalid(OP, "trailing bytes after certificate"));
    }
    let mut cns = cert.subject().iter_common_name();
    let cn = cns
        .next()
        .ok_or_else(|| PkiError::invalid(OP, "subject has no common name"))?
        .as_str()
        .map_err(|e| PkiError::invalid(OP, format!("common name is not a string: {e}")))?;
    if cns.next().is_some() {
        return Err(PkiError::invalid(
            OP,
            "subject has more than one common name",
        ));
    }
    validate_node_name(cn)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::invalid(OP, format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| PkiError::invalid(OP, "no nicwarden node URI in subjectAltName"))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with(NODE_URI_PREFIX) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [u] if u.strip_prefix(NODE_URI_PREFIX) == Some(cn) => {}
        [] => {
            return Err(PkiError::invalid(
                OP,
                "no nicwarden node URI in subjectAltName",
            ))
        }
        _ => {
            return Err(PkiError::invalid(
                OP,
                format!("node URI in subjectAltName does not match CN {cn:?}"),
            ))
        }
    }
    Ok((cn.to_owned(), hex::encode(Sha256::digest(der))))
}

/// The agent's own key pair (ECDSA P-256, which rustls with ring supports for client auth).
/// Held as PKCS#8 DER in a zeroizing buffer; `Debug` prints nothing secret.
pub struct NodeKey {
    pkcs8: Zeroizing<Vec<u8>>,
}

impl NodeKey {
    /// A fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self, PkiError> {
        let kp = Zeroizing::new(
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(PkiError::cert("generate node key"))?,
        );
        Ok(NodeKey {
            pkcs8: Zeroizing::new(kp.serialize_der()),
        })
    }

    /// Loads a PKCS#8 PEM key (ECDSA P-256/P-384 or Ed25519).
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        const OP: &str = "parse node key";
        let pkcs8 = crate::pem::pkcs8_key(pem.as_bytes()).map_err(|r| PkiError::invalid(OP, r))?;
        let node_key = NodeKey { pkcs8 };
        // Validate: rcgen (ring) must accept it, and it must be a type we allow.
        let kp = node_key.key_pair(OP)?;
        check_key_alg(OP, kp.algorithm())?;
        Ok(node_key)
    }

    /// Reads a key from a private file, refusing group/world-accessible modes.
    pub fn load(path: &std::path::Path) -> Result<Self, PkiError> {
        const OP: &str = "load node key";
        let bytes = crate::files::read_private(OP, path)?;
        let pem = std::str::from_utf8(&bytes)
            .map_err(|_| PkiError::corrupt(OP, path, "not UTF-8 PEM text"))?;
        Self::from_pem(pem).map_err(|e| PkiError::corrupt(OP, path, e.to_string()))
    }

    /// Writes the key to `path` atomically with mode 0600.
    pub fn save(&self, path: &std::path::Path) -> Result<(), PkiError> {
        crate::files::write_private(path, self.to_pem().as_bytes())
    }

    /// PKCS#8 PEM ("BEGIN PRIVATE KEY").
    pub fn to_pem(&self) -> Zeroizing<String> {
        crate::pem::encode("PRIVATE KEY", &self.pkcs8)
    }

    /// A PEM certificate signing request with CN = `node`. (The controller ignores the subject
    /// and uses the node name the join token was issued for.)
    pub fn csr_pem(&self, node: &str) -> Result<String, PkiError> {
        const OP: &str = "create certificate signing request";
        validate_node_name(node)?;
        let kp = self.key_pair(OP)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        params.distinguished_name = dn;
        params
            .serialize_request(&kp)
            .and_then(|csr| csr.pem())
            .map_err(PkiError::cert(OP))
    }

    /// The key in the form rustls takes.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.to_vec()))
    }

    /// DER SubjectPublicKeyInfo of the key.
    pub fn public_key_der(&self) -> Result<Vec<u8>, PkiError> {
        Ok(self.key_pair("read node public key")?.public_key_der())
    }

    /// Signs `msg` with the node key: ECDSA P-256 with SHA-256, the signature in the fixed
    /// 64-byte `r || s` form (what link probes carry; [`verify_node_signature`] checks it).
    /// Refused for a key that is not ECDSA P-256 (P-384 and Ed25519 keys are accepted for TLS
    /// but cannot make this signature).
    pub fn sign_fixed(&self, msg: &[u8]) -> Result<[u8; 64], PkiError> {
        const OP: &str = "sign with the node key";
        let rng = ring::rand::SystemRandom::new();
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &self.pkcs8,
            &rng,
        )
        .map_err(|e| PkiError::invalid(OP, format!("node key is not an ECDSA P-256 key ({e})")))?;
        let sig = kp
            .sign(&rng, msg)
            .map_err(|_| PkiError::invalid(OP, "ECDSA signing failed"))?;
        sig.as_ref().try_into().map_err(|_| {
            PkiError::invalid(
                OP,
                format!("signature is {} bytes, expected 64", sig.as_ref().len()),
            )
        })
    }

    fn key_pair(&self, op: &'static str) -> Result<Zeroizing<KeyPair>, PkiError> {
        KeyPair::try_from(&self.pkcs8[..])
            .map(Zeroizing::new)
            .map_err(PkiError::cert(op))
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey").finish_non_exhaustive()
    }
}

/// Checks a signature made by [`NodeKey::sign_fixed`]: ECDSA P-256 with SHA-256, fixed
/// 64-byte `r || s`, against the public key of the node certificate `cert_der` (DER). The
/// certificate itself is not validated here (chain, expiry): the caller decides which
/// certificate stands for which node.
pub fn verify_node_signature(cert_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), PkiError> {
    const OP: &str = "verify node signature";
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    if sig.len() != 64 {
        return Err(PkiError::invalid(
            OP,
            format!("signature is {} bytes, expected 64", sig.len()),
        ));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::invalid(OP, format!("not a DER certificate: {e}")))?;
    let spki = cert.public_key();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(PkiError::invalid(
            OP,
            "the certificate's key is not ECDSA P-256",
        ));
    }
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        &spki.subject_public_key.data,
    )
    .verify(msg, sig)
    .map_err(|_| {
        PkiError::invalid(
            OP,
            "bad signature (not made by the certificate's key over this message)",
        )
    })
}

/// Key algorithms accepted for node keys and CSRs: what rustls+ring can use for client auth and
/// what we are willing to certify.
pub(crate) fn check_key_alg(
    op: &'static str,
    alg: &rcgen::SignatureAlgorithm,
) -> Result<(), PkiError> {
    if alg == &rcgen::PKCS_ECDSA_P256_SHA256
        || alg == &rcgen::PKCS_ECDSA_P384_SHA384
        || alg == &rcgen::PKCS_ED25519
    {
        Ok(())
    } else {
        Err(PkiError::invalid(
            op,
            format!("unsupported key algorithm {alg:?}; use ECDSA P-256/P-384 or Ed25519"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        let ok = [
            "a",
            "0",
            "node1",
            "rack-3.node-07",
            "a-",
            "a.",
            &"a".repeat(63),
        ];
        for n in ok {
            validate_node_name(n).unwrap_or_else(|e| panic!("{n:?}: {e}"));
        }
        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            (&"a".repeat(64), "longer than 63"),
            ("-a", "must start with"),
            (".a", "must start with"),
            ("Node1", "must start with"),
            ("nOde", "only lowercase"),
            ("node_1", "only lowercase"),
            ("node 1", "only lowercase"),
            ("node/1", "only lowercase"),
            ("nodé", "only lowercase"),
        ];
        for (n, want) in bad {
            let err = validate_node_name(n).unwrap_err().to_string();
            assert!(err.starts_with("invalid node name "), "{err}");
            assert!(err.contains(want), "{n:?}: {err}");
        }
    }

    #[test]
    fn node_key_pem_round_trip_and_csr() {
        let k = NodeKey::generate().unwrap();
        let pem = k.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let k2 = NodeKey::from_pem(&pem).unwrap();
        assert_eq!(k.public_key_der().unwrap(), k2.public_key_der().unwrap());
        let csr = k.csr_pem("node1").unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(k.csr_pem("Bad Name").is_err());
        assert!(NodeKey::from_pem("nope").is_err());
        assert_eq!(format!("{k:?}"), "NodeKey { .. }");
    }

    #[test]
    fn node_key_accepts_ed25519_and_load_checks_mode() {
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        NodeKey::from_pem(&ed.serialize_pem()).unwrap();

        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.key");
        let k = NodeKey::generate().unwrap();
        k.save(&p).unwrap();
        let loaded = NodeKey::load(&p).unwrap();
        assert_eq!(
            k.public_key_der().unwrap(),
            loaded.public_key_der().unwrap()
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = NodeKey::load(&p).unwrap_err().to_string();
        assert!(err.contains("mode 0644 is readable by others"), "{err}");
    }

    /// A certificate carrying `k`'s public key (self-signed: only its SPKI matters here).
    fn cert_of(k: &NodeKey) -> Vec<u8> {
        let kp = k.key_pair("test").unwrap();
        CertificateParams::new(vec!["node1".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn fixed_signatures_round_trip_and_refuse_forgeries() {
        let k = NodeKey::generate().unwrap();
        let cert = cert_of(&k);
        let msg = b"nicwarden-link-v1\0body";
        let sig = k.sign_fixed(msg).unwrap();
        verify_node_signature(&cert, msg, &sig).unwrap();
        // Another key's certificate.
        let other = cert_of(&NodeKey::generate().unwrap());
        let err = verify_node_signature(&other, msg, &sig)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad signature"), "{err}");
        // A tampered message, a tampered signature.
        let err = verify_node_signature(&cert, b"nicwarden-link-v1\0bodY", &sig)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad signature"), "{err}");
        let mut bad = sig;
        bad[10] ^= 1;
        assert!(verify_node_signature(&cert, msg, &bad).is_err());
        // Wrong lengths.
        for len in [0, 63, 65, 72] {
            let err = verify_node_signature(&cert, msg, &vec![1u8; len])
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("signature is {len} bytes")), "{err}");
        }
        // Not a certificate.
        assert!(verify_node_signature(b"junk", msg, &sig).is_err());
    }

    #[test]
    fn fixed_signatures_need_a_p256_key() {
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let k = NodeKey::from_pem(&ed.serialize_pem()).unwrap();
        let err = k.sign_fixed(b"m").unwrap_err().to_string();
        assert!(err.contains("not an ECDSA P-256 key"), "{err}");
        // An Ed25519 certificate cannot verify a P-256 signature either.
        let p256 = NodeKey::generate().unwrap();
        let sig = p256.sign_fixed(b"m").unwrap();
        let err = verify_node_signature(&cert_of(&k), b"m", &sig)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not ECDSA P-256"), "{err}");
    }

    #[test]
    fn identity_rejects_non_certificates() {
        let err = node_identity_from_cert(b"junk").unwrap_err().to_string();
        assert!(err.contains("not a DER certificate"), "{err}");
    }
}
