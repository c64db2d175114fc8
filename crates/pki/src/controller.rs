//! The controller's identity: CA, server certificate, lease-signing key, and node certificate
//! issuance.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rand::RngCore;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use zeroize::Zeroizing;

use crate::files::{ensure_dir, read_private, read_public, write_private, write_public};
use crate::lease_key::LeaseSigningKey;
use crate::node::{check_key_alg, validate_node_name, NODE_URI_PREFIX};
use crate::PkiError;

/// File names inside the controller's data directory.
pub const CA_KEY_FILE: &str = "ca.key";
pub const CA_CERT_FILE: &str = "ca.pem";
pub const SERVER_KEY_FILE: &str = "server.key";
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const LEASE_KEY_FILE: &str = "lease-signing.key";

const CA_VALIDITY_DAYS: i64 = 3650;
const SERVER_VALIDITY_DAYS: i64 = 365;
/// A server certificate expiring within this many days is re-issued on load.
const SERVER_RENEW_DAYS: i64 = 30;
/// Longest node certificate validity we will issue.
pub const MAX_NODE_CERT_DAYS: u32 = 3650;
/// Backdating of `notBefore`, to tolerate clock skew between controller and agents.
const BACKDATE: Duration = Duration::minutes(5);

/// The controller's CA, TLS server identity and lease-signing key, as stored in its data
/// directory. Private key material is held as zeroizing PKCS#8 DER. `Debug` prints only public
/// information.
pub struct ControllerIdentity {
    /// The CA certificate (PEM). Agents trust exactly this.
    pub ca_cert_pem: String,
    /// The server certificate chain (PEM): server leaf, then the CA.
    pub server_cert_pem: String,
    /// The key that signs leases.
    pub lease_key: LeaseSigningKey,
    ca_cert_der: CertificateDer<'static>,
    ca_key: Zeroizing<Vec<u8>>,
    /// rcgen's view of the CA, used as the issuer when signing.
    ca_issuer: Certificate,
    server_chain_der: Vec<CertificateDer<'static>>,
    server_key: Zeroizing<Vec<u8>>,
    dir: PathBuf,
}

impl fmt::Debug for ControllerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerIdentity")
            .field("dir", &self.dir)
            .field("ca_fingerprint", &hex::encode(self.ca_fingerprint()))
            .field("lease_key", &self.lease_key)
            .finish_non_exhaustive()
    }
}

impl ControllerIdentity {
    /// Loads `ca.key`/`ca.pem`, `server.key`/`server.pem` and `lease-signing.key` from `dir`,
    /// creating what is missing (first start; `dir` itself is created with mode 0700).
    ///
    /// The server certificate has SANs for `server_names` (DNS names and IP literals, e.g.
    /// `["localhost", "127.0.0.1"]`). It is re-issued if the requested names changed, if it was
    /// not issued by the current CA for the current server key, or if it expires within 30 days.
    ///
    /// Refuses, with an error naming the file: a private key file whose mode grants group/other
    /// access, a corrupt file, a CA key without its certificate (or vice versa), and a CA
    /// certificate that does not belong to the CA key. It never silently replaces an existing CA
    /// or lease-signing key.
    pub fn load_or_create(dir: &Path, server_names: &[String]) -> Result<Self, PkiError> {
        let wanted = requested_sans(server_names)?;
        ensure_dir(dir)?;

        let (ca_key, ca_cert_der) = load_or_create_ca(dir)?;
        let ca_kp = key_pair(&ca_key, "load CA key", &dir.join(CA_KEY_FILE))?;
        let ca_params = CertificateParams::from_ca_cert_der(&ca_cert_der).map_err(|e| {
            PkiError::corrupt("load CA certificate", dir.join(CA_CERT_FILE), e.to_string())
        })?;
        let ca_issuer = ca_params
            .self_signed(&ca_kp)
            .map_err(PkiError::cert("prepare CA for signing"))?;
        let (server_key, server_cert_der) =
            load_or_create_server(dir, &wanted, &ca_cert_der, &ca_issuer, &ca_kp)?;
        let lease_key = load_or_create_lease_key(&dir.join(LEASE_KEY_FILE))?;

        let ca_cert_pem = crate::pem::encode("CERTIFICATE", &ca_cert_der).to_string();
        let server_cert_pem = format!(
            "{}{}",
            &*crate::pem::encode("CERTIFICATE", &server_cert_der),
            ca_cert_pem
        );
        Ok(ControllerIdentity {
            ca_cert_pem,
            server_cert_pem,
            lease_key,
            server_chain_der: vec![server_cert_der, ca_cert_der.clone()],
            ca_cert_der,
            ca_key,
            ca_issuer,
            server_key,
            dir: dir.to_path_buf(),
        })
    }

    /// sha256 of the CA certificate DER; the pin carried in join tokens.
    pub fn ca_fingerprint(&self) -> [u8; 32] {
        Sha256::digest(&self.ca_cert_der).into()
    }

    /// The CA certificate DER.
    pub fn ca_cert_der(&self) -> &CertificateDer<'static> {
        &self.ca_cert_der
    }

    /// The server certificate chain (leaf, CA) as DER, for rustls.
    pub fn server_cert_chain_der(&self) -> Vec<CertificateDer<'static>> {
        self.server_chain_der.clone()
    }

    /// The server private key in the form rustls takes.
    pub fn server_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.to_vec()))
    }

    /// (server certificate chain PEM, server private key PEM), e.g. for
    /// `tonic::transport::Identity::from_pem`.
    pub fn server_identity_pem(&self) -> (String, Zeroizing<String>) {
        (
            self.server_cert_pem.clone(),
            crate::pem::encode("PRIVATE KEY", &self.server_key),
        )
    }

    /// The data directory this identity was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Signs a node certificate from a PEM CSR. The CSR's self-signature is verified and its
    /// key type checked (ECDSA P-256/P-384 or Ed25519); everything else in it (subject,
    /// requested extensions) is ignored. The certificate has CN = `node`, a URI SAN
    /// `nicwarden://node/<node>`, EKU clientAuth only, no CA rights, a random 128-bit serial, and
    /// is valid from 5 minutes ago for `valid_days` days. Returns (certificate PEM, serial as
    /// lowercase hex).
    pub fn issue_node_cert(
        &self,
        node: &str,
        csr_pem: &str,
        valid_days: u32,
    ) -> Result<(String, String), PkiError> {
        const OP: &str = "issue node certificate";
        validate_node_name(node)?;
        if valid_days == 0 || valid_days > MAX_NODE_CERT_DAYS {
            return Err(PkiError::invalid(
                OP,
                format!("validity {valid_days} days is outside 1..={MAX_NODE_CERT_DAYS}"),
            ));
        }
        let mut csr = parse_csr(csr_pem)?;
        check_key_alg(
            "verify certificate signing request",
            csr.public_key.algorithm(),
        )?;
        let requested_spki = csr_spki(csr_pem)?;

        let now = OffsetDateTime::now_utc();
        let (serial, serial_hex) = random_serial();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(node);
        params.subject_alt_names = vec![SanType::URI(
            format!("{NODE_URI_PREFIX}{node}")
                .try_into()
                .map_err(PkiError::cert(OP))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(i64::from(valid_days));
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        csr.params = params;

        let ca_kp = key_pair(&self.ca_key, "load CA key", &self.dir.join(CA_KEY_FILE))?;
        let cert = csr
            .signed_by(&self.ca_issuer, &ca_kp)
            .map_err(PkiError::cert(OP))?;
        // rcgen infers the key type from the CSR's signature algorithm; make sure the
        // certificate binds exactly the key the CSR was signed with (e.g. not a P-384 point
        // labelled as P-256).
        let (_, issued) = x509_parser::parse_x509_certificate(cert.der())
            .map_err(|e| PkiError::invalid(OP, format!("issued certificate unreadable: {e}")))?;
        if issued.tbs_certificate.subject_pki.raw != requested_spki.as_slice() {
            return Err(PkiError::invalid(
                OP,
                "CSR public key type does not match its signature algorithm",
            ));
        }
        tracing::info!(node, serial = %serial_hex, valid_days, "issued node certificate");
        Ok((cert.pem(), serial_hex))
    }
}

fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, PkiError> {
    const OP: &str = "verify certificate signing request";
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
        // rcgen reports a failed self-signature check as RingUnspecified.
        rcgen::Error::RingUnspecified => {
            PkiError::invalid(OP, "signature does not verify (tampered or corrupt CSR)")
        }
        rcgen::Error::CouldNotParseCertificationRequest => {
            PkiError::invalid(OP, "not a PEM PKCS#10 certificate request")
        }
        other => PkiError::invalid(OP, other.to_string()),
    })
}

/// The DER SubjectPublicKeyInfo the CSR asks to have certified.
fn csr_spki(csr_pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::FromDer;
    const OP: &str = "verify certificate signing request";
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|_| PkiError::invalid(OP, "not a PEM PKCS#10 certificate request"))?;
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| {
                PkiError::invalid(OP, format!("not a PKCS#10 certificate request: {e}"))
            })?;
    Ok(req.certification_request_info.subject_pki.raw.to_vec())
}

fn random_serial() -> (SerialNumber, String) {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    // Positive and with a non-zero leading byte, so the DER INTEGER is exactly these 16 bytes.
    b[0] = (b[0] & 0x7f) | 0x01;
    (SerialNumber::from_slice(&b), hex::encode(b))
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn key_pair(pkcs8: &[u8], op: &'static str, path: &Path) -> Result<Zeroizing<KeyPair>, PkiError> {
    KeyPair::try_from(pkcs8)
        .map(Zeroizing::new)
        .map_err(|e| PkiError::corrupt(op, path, format!("unusable private key: {e}")))
}

/// The requested SAN set, validated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum San {
    Dns(String),
    Ip(IpAddr),
}

fn requested_sans(names: &[String]) -> Result<BTreeSet<San>, PkiError> {
    const OP: &str = "check controller server names";
    if names.is_empty() {
        return Err(PkiError::invalid(
            OP,
            "no server names given; need at least one DNS name or IP address",
        ));
    }
    names
        .iter()
        .map(|n| {
            if let Ok(ip) = n.parse::<IpAddr>() {
                return Ok(San::Ip(ip));
            }
            let dns = n.to_ascii_lowercase();
            let valid = !dns.is_empty()
                && dns.len() <= 253
                && dns.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if valid {
                Ok(San::Dns(dns))
            } else {
                Err(PkiError::invalid(
                    OP,
                    format!("{n:?} is neither an IP address nor a DNS name"),
                ))
            }
        })
        .collect()
}

fn load_or_create_lease_key(path: &Path) -> Result<LeaseSigningKey, PkiError> {
    const OP: &str = "load lease-signing key";
    if path.exists() {
        let bytes = read_private(OP, path)?;
        let pem = std::str::from_utf8(&bytes)
            .map_err(|_| PkiError::corrupt(OP, path, "not UTF-8 PEM text"))?;
        return LeaseSigningKey::from_pem(pem)
            .map_err(|e| PkiError::corrupt(OP, path, e.to_string()));
    }
    let key = LeaseSigningKey::generate();
    write_private(path, key.to_pem()?.as_bytes())?;
    tracing::info!(path = %path.display(), public_key = %hex::encode(key.public_key()),
        "created lease-signing key");
    Ok(key)
}

fn load_key_file(op: &'static str, path: &Path) -> Result<Zeroizing<Vec<u8>>, PkiError> {
    let bytes = read_private(op, path)?;
    let der = crate::pem::pkcs8_key(&bytes).map_err(|r| PkiError::corrupt(op, path, r))?;
    // Make sure ring can use it.
    key_pair(&der, op, path)?;
    Ok(der)
}

fn load_cert_file(op: &'static str, path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    let pem = read_public(op, path)?;
    let mut certs = crate::pem::certs(&pem).map_err(|r| PkiError::corrupt(op, path, r))?;
    let cert = certs.swap_remove(0);
    x509_parser::parse_x509_certificate(&cert)
        .map_err(|e| PkiError::corrupt(op, path, format!("not an X.509 certificate: {e}")))?;
    Ok(cert)
}

fn load_or_create_ca(
    dir: &Path,
) -> Result<(Zeroizing<Vec<u8>>, CertificateDer<'static>), PkiError> {
    let key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CA_CERT_FILE);
    match (key_path.exists(), cert_path.exists()) {
        (true, true) => {
            let key = load_key_file("load CA key", &key_path)?;
            let cert = load_cert_file("load CA certificate", &cert_path)?;
            let kp = key_pair(&key, "load CA key", &key_path)?;
            let (_, x509) = parse(&cert, "load CA certificate", &cert_path)?;
            if x509.public_key().raw != kp.public_key_der().as_slice() {
                return Err(PkiError::corrupt(
                    "load CA certificate",
                    &cert_path,
                    format!("does not match the key in {}", key_path.display()),
                ));
            }
            if !x509.is_ca() {
                return Err(PkiError::corrupt(
                    "load CA certificate",
                    &cert_path,
                    "is not a CA certificate",
                ));
            }
            Ok((key, cert))
        }
        (false, false) => {
            let kp = Zeroizing::new(
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(PkiError::cert("generate CA key"))?,
            );
            let now = OffsetDateTime::now_utc();
            let mut params = CertificateParams::default();
            // A unique subject per CA, so that certificates from another controller's CA never
            // name-match ours (clear "unknown issuer" errors instead of "bad signature").
            let mut tag = [0u8; 8];
            rand::rngs::OsRng.fill_bytes(&mut tag);
            let mut dn = common_name(&format!("nicwarden controller CA {}", hex::encode(tag)));
            dn.push(DnType::OrganizationName, "nicwarden");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.not_before = now - BACKDATE;
            params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
            params.serial_number = Some(random_serial().0);
            let cert = params
                .self_signed(&kp)
                .map_err(PkiError::cert("create CA certificate"))?;
            let key = Zeroizing::new(kp.serialize_der());
            write_private(
                &key_path,
                crate::pem::encode("PRIVATE KEY", &key).as_bytes(),
            )?;
            write_public(&cert_path, cert.pem().as_bytes())?;
            let der = cert.der().clone();
            tracing::info!(path = %cert_path.display(),
                fingerprint = %hex::encode(Sha256::digest(&der)), "created controller CA");
            Ok((key, der))
        }
        (true, false) => Err(PkiError::corrupt(
            "load CA certificate",
            &cert_path,
            format!(
                "missing, but {} exists; restore it, or remove both to create a new CA \
                 (which invalidates every node certificate)",
                key_path.display()
            ),
        )),
        (false, true) => Err(PkiError::corrupt(
            "load CA key",
            &key_path,
            format!(
                "missing, but {} exists; restore it, or remove both to create a new CA \
                 (which invalidates every node certificate)",
                cert_path.display()
            ),
        )),
    }
}

fn parse<'a>(
    der: &'a [u8],
    op: &'static str,
    path: &Path,
) -> Result<(&'a [u8], X509Certificate<'a>), PkiError> {
    x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::corrupt(op, path, format!("not an X.509 certificate: {e}")))
}

/// Why an existing server certificate must be re-issued, or `None` if it is fine.
fn server_cert_stale(
    cert: &X509Certificate<'_>,
    ca: &X509Certificate<'_>,
    server_spki: &[u8],
    wanted: &BTreeSet<San>,
) -> Option<String> {
    if cert.issuer().as_raw() != ca.subject().as_raw()
        || cert.verify_signature(Some(ca.public_key())).is_err()
    {
        return Some("not issued by the current CA".into());
    }
    if cert.public_key().raw != server_spki {
        return Some("does not match server.key".into());
    }
    let renew_at = OffsetDateTime::now_utc() + Duration::days(SERVER_RENEW_DAYS);
    if cert.validity().not_after.to_datetime() < renew_at {
        return Some("expires within 30 days".into());
    }
    let mut have = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => {
                    have.insert(San::Dns(d.to_ascii_lowercase()));
                }
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        have.insert(San::Ip(ip));
                    }
                }
                _ => {}
            }
        }
    }
    if &have != wanted {
        return Some(format!("names changed from {have:?} to {wanted:?}"));
    }
    None
}

fn load_or_create_server(
    dir: &Path,
    wanted: &BTreeSet<San>,
    ca_cert_der: &CertificateDer<'static>,
    ca_issuer: &Certificate,
    ca_kp: &KeyPair,
) -> Result<(Zeroizing<Vec<u8>>, CertificateDer<'static>), PkiError> {
    let key_path = dir.join(SERVER_KEY_FILE);
    let cert_path = dir.join(SERVER_CERT_FILE);
    let ca_path = dir.join(CA_CERT_FILE);

    let key = if key_path.exists() {
        load_key_file("load server key", &key_path)?
    } else {
        let kp = Zeroizing::new(
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(PkiError::cert("generate server key"))?,
        );
        let der = Zeroizing::new(kp.serialize_der());
        write_private(
            &key_path,
            crate::pem::encode("PRIVATE KEY", &der).as_bytes(),
        )?;
        der
    };
    let kp = key_pair(&key, "load server key", &key_path)?;

    let reason = if cert_path.exists() {
        let cert = load_cert_file("load server certificate", &cert_path)?;
        let (_, x509) = parse(&cert, "load server certificate", &cert_path)?;
        let (_, ca) = parse(ca_cert_der, "load CA certificate", &ca_path)?;
        match server_cert_stale(&x509, &ca, &kp.public_key_der(), wanted) {
            None => return Ok((key, cert)),
            Some(r) => r,
        }
    } else {
        "missing".to_owned()
    };

    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name("nicwarden controller");
    params.subject_alt_names = wanted
        .iter()
        .map(|s| match s {
            San::Dns(d) => d
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(PkiError::cert("issue server certificate")),
            San::Ip(ip) => Ok(SanType::IpAddress(*ip)),
        })
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(SERVER_VALIDITY_DAYS);
    params.serial_number = Some(random_serial().0);
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&*kp, ca_issuer, ca_kp)
        .map_err(PkiError::cert("issue server certificate"))?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    tracing::info!(path = %cert_path.display(), %reason, "issued controller server certificate");
    Ok((key, cert.der().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn server_names_are_validated() {
        assert!(requested_sans(&[]).is_err());
        let ok = requested_sans(&names(&[
            "LocalHost",
            "127.0.0.1",
            "::1",
            "ctl.example.org",
        ]))
        .unwrap();
        assert!(ok.contains(&San::Dns("localhost".into())));
        assert!(ok.contains(&San::Ip("::1".parse().unwrap())));
        for bad in ["", "a b", "-x.org", "x..org", "x_y"] {
            let err = requested_sans(&names(&[bad])).unwrap_err().to_string();
            assert!(
                err.contains("neither an IP address nor a DNS name"),
                "{err}"
            );
        }
    }

    #[test]
    fn serial_is_16_bytes_positive() {
        for _ in 0..64 {
            let (_, h) = random_serial();
            assert_eq!(h.len(), 32);
            let first = u8::from_str_radix(&h[..2], 16).unwrap();
            assert!(first & 0x80 == 0 && first != 0);
        }
    }
}
