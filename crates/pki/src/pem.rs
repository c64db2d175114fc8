//! Minimal PEM encoding (into zeroizing buffers) and decoding helpers.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::{Zeroize, Zeroizing};

/// PEM-encodes `der` under `label`, writing straight into a pre-sized zeroizing buffer so no
/// copy of secret material is left in freed memory.
pub(crate) fn encode(label: &str, der: &[u8]) -> Zeroizing<String> {
    let b64_len = der.len().div_ceil(3) * 4;
    let lines = b64_len.div_ceil(64);
    let cap = 2 * (label.len() + 17) + b64_len + lines;
    let mut out = Zeroizing::new(String::with_capacity(cap));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    let mut line = [0u8; 64];
    for chunk in der.chunks(48) {
        // 48 input bytes encode to exactly 64 output bytes, so this cannot fail.
        let n = STANDARD.encode_slice(chunk, &mut line).unwrap_or(0);
        // Base64 output is ASCII.
        out.push_str(std::str::from_utf8(&line[..n]).unwrap_or(""));
        out.push('\n');
    }
    line.zeroize();
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// All certificates in a PEM string, in order. Errors if there is none or a block is malformed.
pub(crate) fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// The PKCS#8 DER of the single private key in a PEM buffer.
pub(crate) fn pkcs8_key(pem: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    let key = Zeroizing::new(
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no usable private key: {e}"))?,
    );
    match &*key {
        PrivateKeyDer::Pkcs8(k) => Ok(Zeroizing::new(k.secret_pkcs8_der().to_vec())),
        _ => Err("private key is not PKCS#8 (\"BEGIN PRIVATE KEY\")".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_round_trips_through_pki_types() {
        for len in [0usize, 1, 47, 48, 49, 100, 138] {
            let der: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let pem = encode("CERTIFICATE", &der);
            assert!(pem.len() <= pem.capacity());
            if len > 0 {
                let got = certs(&pem).unwrap();
                assert_eq!(got.len(), 1);
                assert_eq!(got[0].as_ref(), &der[..]);
            }
            for line in pem.lines() {
                assert!(line.len() <= 64 || line.starts_with("-----"));
            }
        }
    }

    #[test]
    fn certs_rejects_empty_and_garbage() {
        assert!(certs("").unwrap_err().contains("no CERTIFICATE"));
        assert!(certs("hello").unwrap_err().contains("no CERTIFICATE"));
        let bad = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(certs(bad).is_err());
    }
}
