use std::net::SocketAddr;
use std::sync::Arc;

use nicwarden_pki::{
    agent_client_config, controller_server_config, enrollment_client_config,
    node_identity_from_cert, ControllerIdentity, NodeKey,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::controller;

/// What the server saw of one connection.
#[derive(Debug)]
struct Accepted {
    /// DER of the client's leaf certificate, if it sent one.
    peer_leaf: Option<Vec<u8>>,
    alpn: Option<Vec<u8>>,
}

/// Accepts one TLS connection, echoes one byte, and reports the handshake outcome.
async fn serve_one(cfg: ServerConfig) -> (SocketAddr, JoinHandle<Result<Accepted, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let accepted = Accepted {
            peer_leaf: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec()),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        };
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        tls.write_all(&b).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(accepted)
    });
    (addr, task)
}

/// Connects, sends one byte and reads the echo. In TLS 1.3 a client learns that the server
/// rejected its certificate only when it next reads, so the echo is part of "success".
async fn client_round_trip(cfg: ClientConfig, addr: SocketAddr, name: &str) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = TlsConnector::from(Arc::new(cfg));
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"x").await.map_err(|e| e.to_string())?;
    tls.flush().await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    if &b != b"x" {
        return Err("bad echo".into());
    }
    Ok(())
}

async fn handshake(
    server: &ControllerIdentity,
    client: ClientConfig,
    name: &str,
) -> (Result<(), String>, Result<Accepted, String>) {
    let (addr, task) = serve_one(controller_server_config(server).unwrap()).await;
    let client_result = client_round_trip(client, addr, name).await;
    let server_result = task.await.unwrap();
    (client_result, server_result)
}

fn enroll(id: &ControllerIdentity, node: &str) -> (String, NodeKey) {
    let key = NodeKey::generate().unwrap();
    let (cert, _) = id
        .issue_node_cert(node, &key.csr_pem(node).unwrap(), 30)
        .unwrap();
    (cert, key)
}

#[tokio::test]
async fn enrollment_with_the_pinned_ca_succeeds_without_a_client_cert() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    for name in ["localhost", "127.0.0.1"] {
        let cfg = enrollment_client_config(id.ca_fingerprint()).unwrap();
        let (client, server) = handshake(&id, cfg, name).await;
        client.unwrap();
        let accepted = server.unwrap();
        // (d) optional client auth: no certificate, handshake still completes.
        assert!(accepted.peer_leaf.is_none());
        assert_eq!(accepted.alpn.as_deref(), Some(&b"h2"[..]));
    }
}

#[tokio::test]
async fn enrollment_with_a_wrong_fingerprint_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    let mut wrong = id.ca_fingerprint();
    wrong[0] ^= 1;
    let (client, server) =
        handshake(&id, enrollment_client_config(wrong).unwrap(), "localhost").await;
    let err = client.unwrap_err();
    assert!(err.contains("pinned by the join token"), "{err}");
    assert!(server.is_err());
}

#[tokio::test]
async fn enrollment_checks_the_server_name_and_the_leaf() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    // Right CA, but the certificate is not for this name.
    let cfg = enrollment_client_config(id.ca_fingerprint()).unwrap();
    let (client, _) = handshake(&id, cfg, "ctl.example.org").await;
    let err = client.unwrap_err();
    assert!(
        err.contains("NotValidForName") || err.contains("not valid for"),
        "{err}"
    );

    // An impostor that forwards the real CA certificate in its chain but signs its own leaf.
    let other_tmp = tempfile::tempdir().unwrap();
    let other = controller(other_tmp.path());
    let mut chain = other.server_cert_chain_der();
    chain[1] = id.ca_cert_der().clone();
    let impostor = ServerConfig::builder_with_provider(nicwarden_pki::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, other.server_key_der())
        .unwrap();
    let (addr, task) = serve_one(impostor).await;
    let cfg = enrollment_client_config(id.ca_fingerprint()).unwrap();
    let err = client_round_trip(cfg, addr, "localhost").await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(task.await.unwrap().is_err());
}

#[tokio::test]
async fn agent_with_node_cert_is_identified_by_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    let (cert, key) = enroll(&id, "node1");
    // Reload the key from PEM as an agent would after restart.
    let key = NodeKey::from_pem(&key.to_pem()).unwrap();
    let cfg = agent_client_config(&id.ca_cert_pem, &cert, &key).unwrap();
    let (client, server) = handshake(&id, cfg, "localhost").await;
    client.unwrap();
    let accepted = server.unwrap();
    let leaf = accepted
        .peer_leaf
        .expect("server must see the client certificate");
    let (node, fp) = node_identity_from_cert(&leaf).unwrap();
    assert_eq!(node, "node1");
    assert_eq!(fp.len(), 64);
    assert_eq!(accepted.alpn.as_deref(), Some(&b"h2"[..]));

    // The node certificate followed by the CA (a full chain) works too.
    let chain = format!("{cert}{}", id.ca_cert_pem);
    let cfg = agent_client_config(&id.ca_cert_pem, &chain, &key).unwrap();
    let (client, server) = handshake(&id, cfg, "127.0.0.1").await;
    client.unwrap();
    assert!(server.unwrap().peer_leaf.is_some());
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    let other_tmp = tempfile::tempdir().unwrap();
    let other = controller(other_tmp.path());
    let (cert, key) = enroll(&other, "node1");
    // The agent trusts the real controller, but its certificate is from another CA.
    let cfg = agent_client_config(&id.ca_cert_pem, &cert, &key).unwrap();
    let (client, server) = handshake(&id, cfg, "localhost").await;
    let server_err = server.unwrap_err();
    assert!(server_err.contains("UnknownIssuer"), "{server_err}");
    assert!(client.is_err());
}

#[tokio::test]
async fn server_cert_cannot_be_used_as_a_client_cert() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    let (chain, key_pem) = id.server_identity_pem();
    let key = NodeKey::from_pem(&key_pem).unwrap();
    let cfg = agent_client_config(&id.ca_cert_pem, &chain, &key).unwrap();
    let (client, server) = handshake(&id, cfg, "localhost").await;
    let server_err = server.unwrap_err();
    assert!(
        server_err.contains("extended key usage for client authentication"),
        "{server_err}"
    );
    assert!(client.is_err());
}

#[tokio::test]
async fn agent_refuses_a_server_from_another_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    let other_tmp = tempfile::tempdir().unwrap();
    let other = controller(other_tmp.path());
    let (cert, key) = enroll(&id, "node1");
    let cfg = agent_client_config(&id.ca_cert_pem, &cert, &key).unwrap();
    let (client, server) = handshake(&other, cfg, "localhost").await;
    let err = client.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(server.is_err());
}

#[test]
fn configs_reject_bad_pem() {
    let tmp = tempfile::tempdir().unwrap();
    let id = controller(tmp.path());
    let (cert, key) = enroll(&id, "node1");
    let err = agent_client_config("nope", &cert, &key)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("build agent TLS client config: CA: no CERTIFICATE"),
        "{err}"
    );
    let err = agent_client_config(&id.ca_cert_pem, "", &key)
        .unwrap_err()
        .to_string();
    assert!(err.contains("node certificate"), "{err}");
}
