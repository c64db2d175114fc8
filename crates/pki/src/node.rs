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

    #[test]
    fn identity_rejects_non_certificates() {
        let err = node_identity_from_cert(b"junk").unwrap_err().to_string();
        assert!(err.contains("not a DER certificate"), "{err}");
    }
}
