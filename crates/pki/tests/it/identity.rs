use std::fs;
use std::os::unix::fs::PermissionsExt;

use base64::Engine as _;
use nicwarden_pki::{
    node_identity_from_cert, ControllerIdentity, NodeKey, CA_CERT_FILE, CA_KEY_FILE,
    LEASE_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE,
};
use x509_parser::extensions::GeneralName;

use crate::{controller, names};

fn mode(p: &std::path::Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn err_of(dir: &std::path::Path) -> String {
    ControllerIdentity::load_or_create(dir, &names())
        .unwrap_err()
        .to_string()
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

#[test]
fn first_start_creates_files_and_second_start_loads_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let a = controller(&dir);
    assert_eq!(mode(&dir), 0o700);
    for f in [CA_KEY_FILE, SERVER_KEY_FILE, LEASE_KEY_FILE] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    for f in [CA_CERT_FILE, SERVER_CERT_FILE] {
        assert_eq!(mode(&dir.join(f)), 0o644, "{f}");
    }
    // Only the five files; no temporaries left behind.
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 5);

    let server_pem_before = fs::read_to_string(dir.join(SERVER_CERT_FILE)).unwrap();
    let b = controller(&dir);
    assert_eq!(a.ca_fingerprint(), b.ca_fingerprint());
    assert_eq!(a.ca_cert_pem, b.ca_cert_pem);
    assert_eq!(a.server_cert_pem, b.server_cert_pem);
    assert_eq!(a.lease_key.public_key(), b.lease_key.public_key());
    assert_eq!(a.server_identity_pem().1, b.server_identity_pem().1);
    assert_eq!(
        fs::read_to_string(dir.join(SERVER_CERT_FILE)).unwrap(),
        server_pem_before,
        "server certificate must not be re-issued when nothing changed"
    );

    // Fingerprint is sha256 of the CA DER, and the chain is leaf then CA.
    use sha2::Digest;
    let fp: [u8; 32] = sha2::Sha256::digest(pem_der(&a.ca_cert_pem)).into();
    assert_eq!(fp, a.ca_fingerprint());
    assert_eq!(a.server_cert_pem.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(a.server_cert_pem.ends_with(&a.ca_cert_pem));
    assert!(a.server_identity_pem().1.contains("BEGIN PRIVATE KEY"));

    // Debug shows no private material.
    let dbg = format!("{a:?}");
    assert!(!dbg.contains("PRIVATE"), "{dbg}");
    assert!(dbg.contains(&hex::encode(a.ca_fingerprint())), "{dbg}");
}

fn server_sans(id: &ControllerIdentity) -> Vec<String> {
    let der = pem_der(
        id.server_cert_pem
            .split("-----END CERTIFICATE-----")
            .next()
            .unwrap(),
    );
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => d.to_string(),
            GeneralName::IPAddress(b) => format!("ip:{b:?}"),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn server_cert_is_reissued_when_names_change() {
    let tmp = tempfile::tempdir().unwrap();
    let a = controller(tmp.path());
    assert!(server_sans(&a).contains(&"localhost".to_owned()));
    assert!(server_sans(&a).contains(&"ip:[127, 0, 0, 1]".to_owned()));

    let new_names = vec!["ctl.example.org".to_owned(), "::1".to_owned()];
    let b = ControllerIdentity::load_or_create(tmp.path(), &new_names).unwrap();
    assert_eq!(a.ca_fingerprint(), b.ca_fingerprint());
    assert_ne!(a.server_cert_pem, b.server_cert_pem);
    let sans = server_sans(&b);
    assert!(sans.contains(&"ctl.example.org".to_owned()), "{sans:?}");
    assert!(!sans.contains(&"localhost".to_owned()), "{sans:?}");
    assert_eq!(sans.len(), 2);
    // Same key; order and case of names do not matter.
    assert_eq!(a.server_identity_pem().1, b.server_identity_pem().1);
    let c = ControllerIdentity::load_or_create(
        tmp.path(),
        &["::1".to_owned(), "CTL.example.org".to_owned()],
    )
    .unwrap();
    assert_eq!(b.server_cert_pem, c.server_cert_pem);
}

#[test]
fn server_cert_from_another_ca_is_reissued() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let a = controller(tmp.path());
    controller(other.path());
    fs::copy(
        other.path().join(SERVER_CERT_FILE),
        tmp.path().join(SERVER_CERT_FILE),
    )
    .unwrap();
    let b = controller(tmp.path());
    assert_eq!(a.ca_fingerprint(), b.ca_fingerprint());
    assert!(b.server_cert_pem.ends_with(&a.ca_cert_pem));
    let on_disk = fs::read_to_string(tmp.path().join(SERVER_CERT_FILE)).unwrap();
    assert!(b.server_cert_pem.starts_with(&on_disk));
}

#[test]
fn group_or_world_readable_key_files_are_refused() {
    for (file, op) in [
        (CA_KEY_FILE, "load CA key"),
        (SERVER_KEY_FILE, "load server key"),
        (LEASE_KEY_FILE, "load lease-signing key"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        controller(tmp.path());
        let p = tmp.path().join(file);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = err_of(tmp.path());
        assert_eq!(
            err,
            format!(
                "{op} {}: mode 0644 is readable by others; chmod 600",
                p.display()
            )
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(err_of(tmp.path()).contains("mode 0640 is readable by group"));
        // Fixing the mode fixes the load.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        controller(tmp.path());
    }
}

#[test]
fn corrupt_files_are_refused_with_the_file_named() {
    let cases = [
        (CA_KEY_FILE, "load CA key"),
        (CA_CERT_FILE, "load CA certificate"),
        (SERVER_KEY_FILE, "load server key"),
        (SERVER_CERT_FILE, "load server certificate"),
        (LEASE_KEY_FILE, "load lease-signing key"),
    ];
    for (file, op) in cases {
        for junk in [
            "garbage\n",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            let tmp = tempfile::tempdir().unwrap();
            controller(tmp.path());
            let p = tmp.path().join(file);
            let before = fs::read(&p).unwrap();
            nicwarden_pki::write_private(&p, junk.as_bytes()).unwrap();
            let err = err_of(tmp.path());
            let prefix = format!("{op} {}: ", p.display());
            assert!(err.starts_with(&prefix), "{file} {junk:?}: {err}");
            // Nothing was overwritten.
            assert_eq!(fs::read(&p).unwrap(), junk.as_bytes());
            fs::write(&p, before).unwrap();
        }
    }
}

#[test]
fn half_a_ca_or_a_mismatched_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    controller(tmp.path());
    let ca_pem = tmp.path().join(CA_CERT_FILE);
    let saved = fs::read(&ca_pem).unwrap();
    fs::remove_file(&ca_pem).unwrap();
    let err = err_of(tmp.path());
    assert!(
        err.starts_with(&format!(
            "load CA certificate {}: missing",
            ca_pem.display()
        )),
        "{err}"
    );
    // Nothing else is created while refusing.
    fs::remove_file(tmp.path().join(LEASE_KEY_FILE)).unwrap();
    err_of(tmp.path());
    assert!(!tmp.path().join(LEASE_KEY_FILE).exists());

    // Another CA's certificate next to our key.
    let other = tempfile::tempdir().unwrap();
    controller(other.path());
    fs::copy(other.path().join(CA_CERT_FILE), &ca_pem).unwrap();
    let err = err_of(tmp.path());
    assert!(err.contains("does not match the key in"), "{err}");

    fs::write(&ca_pem, saved).unwrap();
    fs::remove_file(tmp.path().join(CA_KEY_FILE)).unwrap();
    let err = err_of(tmp.path());
    assert!(err.starts_with("load CA key "), "{err}");
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn bad_server_names_are_refused_before_touching_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let err = ControllerIdentity::load_or_create(&dir, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no server names"), "{err}");
    let err = ControllerIdentity::load_or_create(&dir, &["bad name".to_owned()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"bad name\""), "{err}");
    assert!(!dir.exists());
}

fn parse_cert(pem: &str) -> Vec<u8> {
    pem_der(pem)
}

#[test]
fn node_cert_takes_its_name_from_the_controller_not_the_csr() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    let key = NodeKey::generate().unwrap();
    let csr = key.csr_pem("evil").unwrap();
    let (cert_pem, serial) = id.issue_node_cert("node1", &csr, 30).unwrap();
    let der = parse_cert(&cert_pem);

    let (name, fp) = node_identity_from_cert(&der).unwrap();
    assert_eq!(name, "node1");
    assert_eq!(fp.len(), 64);

    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cns: Vec<_> = cert
        .subject()
        .iter_common_name()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(cns, ["node1"]);
    assert_eq!(hex::encode(cert.raw_serial()), serial);
    assert_eq!(serial.len(), 32);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["nicwarden://node/node1"]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any);
    assert!(!cert.is_ca());
    // Certifies the agent's key.
    assert_eq!(
        cert.public_key().raw,
        key.public_key_der().unwrap().as_slice()
    );
    // Valid for ~30 days.
    let days =
        (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86_400;
    assert_eq!(days, 30);
    // Signed by the CA.
    let ca_der = pem_der(&id.ca_cert_pem);
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    cert.verify_signature(Some(ca.public_key())).unwrap();

    // Two issuances get different serials.
    let (_, serial2) = id.issue_node_cert("node1", &csr, 30).unwrap();
    assert_ne!(serial, serial2);
}

#[test]
fn tampered_csr_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    let key = NodeKey::generate().unwrap();
    let csr = key.csr_pem("node1").unwrap();
    let mut der = pem_der(&csr);
    let pos = der.windows(5).position(|w| w == b"node1").unwrap();
    der[pos + 4] = b'2';
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let tampered =
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n");
    let err = id
        .issue_node_cert("node1", &tampered, 30)
        .unwrap_err()
        .to_string();
    assert!(err.contains("signature does not verify"), "{err}");

    let err = id
        .issue_node_cert("node1", "junk", 30)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a PEM PKCS#10"), "{err}");
}

#[test]
fn issue_validates_name_and_validity_and_accepts_ed25519() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    let csr = NodeKey::generate().unwrap().csr_pem("node1").unwrap();
    assert!(id
        .issue_node_cert("Node 1", &csr, 30)
        .unwrap_err()
        .to_string()
        .starts_with("invalid node name"));
    assert!(id
        .issue_node_cert("node1", &csr, 0)
        .unwrap_err()
        .to_string()
        .contains("validity 0 days"));
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ed_key = NodeKey::from_pem(&ed.serialize_pem()).unwrap();
    let (pem, _) = id
        .issue_node_cert("node2", &ed_key.csr_pem("node2").unwrap(), 1)
        .unwrap();
    assert_eq!(
        node_identity_from_cert(&parse_cert(&pem)).unwrap().0,
        "node2"
    );
}

#[test]
fn server_cert_is_not_a_node_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    let der = pem_der(
        id.server_cert_pem
            .split("-----END CERTIFICATE-----")
            .next()
            .unwrap(),
    );
    let err = node_identity_from_cert(&der).unwrap_err().to_string();
    assert!(err.starts_with("invalid node name"), "{err}");
}
