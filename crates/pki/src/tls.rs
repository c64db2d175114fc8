//! rustls configurations for the controller's agent port and the two kinds of agent client.
//!
//! All configs use the ring provider explicitly (never a process-wide default), TLS 1.3 only,
//! and ALPN `h2`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use sha2::{Digest, Sha256};

use crate::{ControllerIdentity, NodeKey, PkiError};

/// ALPN protocol of every config: gRPC runs over HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// The ring crypto provider, as every config here uses it.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots_from_pem(op: &'static str, ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let certs = crate::pem::certs(ca_pem).map_err(|r| PkiError::invalid(op, format!("CA: {r}")))?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| PkiError::invalid(op, format!("CA certificate rejected: {e}")))?;
    }
    Ok(roots)
}

/// Client config for enrollment: presents no client certificate, and trusts the server only if
/// the chain it sends contains a CA certificate whose sha256 is `ca_fingerprint` and the leaf
/// verifies against that CA (webpki: signature, validity, EKU serverAuth, and the server name
/// the connection was made for).
pub fn enrollment_client_config(ca_fingerprint: [u8; 32]) -> Result<ClientConfig, PkiError> {
    const OP: &str = "build enrollment TLS client config";
    let provider = crypto_provider();
    let verifier = Arc::new(PinnedCaVerifier {
        ca_fingerprint,
        provider: provider.clone(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(PkiError::tls(OP))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// Client config for an enrolled agent: trusts only `ca_pem`, and authenticates with `cert_pem`
/// (node leaf, optionally followed by the CA) and `key`.
pub fn agent_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key: &NodeKey,
) -> Result<ClientConfig, PkiError> {
    const OP: &str = "build agent TLS client config";
    let roots = roots_from_pem(OP, ca_pem)?;
    let chain = crate::pem::certs(cert_pem)
        .map_err(|r| PkiError::invalid(OP, format!("node certificate: {r}")))?;
    let mut cfg = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(PkiError::tls(OP))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key.private_key_der())
        .map_err(PkiError::tls(OP))?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// Server config for the controller's agent port: presents the server chain (leaf + CA); client
/// certificates are optional, but one that is presented must chain to the controller CA with
/// EKU clientAuth, or the handshake fails. Whether a session needs a certificate is decided per
/// RPC (enrollment does not; the agent session does).
pub fn controller_server_config(id: &ControllerIdentity) -> Result<ServerConfig, PkiError> {
    const OP: &str = "build controller TLS server config";
    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    roots
        .add(id.ca_cert_der().clone())
        .map_err(|e| PkiError::invalid(OP, format!("CA certificate rejected: {e}")))?;
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| PkiError::invalid(OP, format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(PkiError::tls(OP))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(id.server_cert_chain_der(), id.server_key_der())
        .map_err(PkiError::tls(OP))?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// Trusts a server whose presented chain includes the pinned CA and whose leaf verifies
/// against it.
#[derive(Debug)]
struct PinnedCaVerifier {
    ca_fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

fn other_error(msg: &'static str) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        std::io::Error::other(msg),
    ))))
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.ca_fingerprint)
            .ok_or_else(|| other_error("server did not present the CA pinned by the join token"))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|_| other_error("pinned CA certificate is not a usable trust anchor"))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|_| other_error("cannot build verifier for the pinned CA"))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
