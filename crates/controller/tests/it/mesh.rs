//! The controller's side of the mesh over the real protocol: identities in Hello, signed
//! peer-set updates, tamper reports, and what survives a restart.

use crate::{enroll_as, open_session, tmp, Running, Session};
use nicwarden_mesh::{MeshUpdate, WgKey};
use nicwarden_proto::pb;
use serde_json::json;
use std::time::Duration;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

/// An enrolled node with an open session that reports a mesh identity.
struct MeshAgent {
    lease_key: [u8; 32],
    tls: rustls::ClientConfig,
    s: Session,
}

fn info(key: u8, host: u8) -> pb::MeshInfo {
    pb::MeshInfo {
        public_key: vec![key; 32],
        endpoint: format!("198.18.0.{host}:51820"),
        allowed_ips: vec![format!("198.18.128.{host}/32")],
    }
}

fn hello(node: &str, mesh: Option<pb::MeshInfo>, tamper_reason: &str) -> pb::Hello {
    pb::Hello {
        node: node.into(),
        agent_version: "mesh-test".into(),
        mesh,
        tamper_reason: tamper_reason.into(),
        ..Default::default()
    }
}

/// The first error the controller sends on a session.
async fn next_error(s: &mut Session) -> String {
    loop {
        let m = timeout(WAIT, s.inbound.message())
            .await
            .expect("in time")
            .expect("ok")
            .expect("open");
        if let Some(pb::controller_message::Msg::Error(e)) = m.msg {
            return e.message;
        }
    }
}

impl MeshAgent {
    async fn connect(c: &Running, node: &str, mesh: pb::MeshInfo) -> MeshAgent {
        let (ident, tls) = enroll_as(c, node, node, true).await;
        let s = open_session(c, tls.clone(), hello(node, Some(mesh), ""))
            .await
            .expect("session accepted");
        MeshAgent {
            lease_key: ident.lease_key,
            tls,
            s,
        }
    }

    /// The next message that is not a directive: a verified mesh update, or an error text.
    async fn next_mesh(&mut self) -> Result<MeshUpdate, String> {
        loop {
            let m = timeout(WAIT, self.s.inbound.message())
                .await
                .expect("a message within 10 s")
                .expect("session stream ok")
                .expect("session still open");
            match m.msg {
                Some(pb::controller_message::Msg::Mesh(su)) => {
                    return Ok(nicwarden_proto::verify_mesh_update(&su, &self.lease_key)
                        .expect("mesh update signed by the pinned key"))
                }
                Some(pb::controller_message::Msg::Error(e)) => return Err(e.message),
                _ => continue,
            }
        }
    }

    /// Waits for an update that carries an entry for `node`.
    async fn entry_for(&mut self, node: &str) -> MeshUpdate {
        loop {
            let u = self.next_mesh().await.expect("a mesh update");
            if u.entries.iter().any(|e| e.node == node) {
                return u;
            }
        }
    }
}

async fn grant(c: &Running, node: &str) {
    let (st, v) = c
        .call(
            "POST",
            "/v1/leases",
            Some(json!({"node": node, "rate_bps": 100_000_000u64, "ttl_s": 60})),
        )
        .await;
    assert_eq!(st, 201, "grant {node}: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_get_signed_entries_and_lose_a_tampered_node_for_good() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let mut a1 = MeshAgent::connect(&c, "node1", info(1, 1)).await;
    let mut a2 = MeshAgent::connect(&c, "node2", info(2, 2)).await;
    grant(&c, "node1").await;
    grant(&c, "node2").await;
    let u = a1.entry_for("node2").await;
    let e = u.entries.iter().find(|e| e.node == "node2").expect("entry");
    assert_eq!(e.public_key, WgKey([2; 32]));
    assert_eq!(e.group, "default");
    assert!(e.ttl_ms > 50_000 && e.ttl_ms <= 60_000, "ttl {}", e.ttl_ms);
    a2.entry_for("node1").await;
    let first_seq = u.seq;

    // A third node claiming node1's overlay address keeps its session but gets no mesh.
    let (_, tls3) = enroll_as(&c, "node3", "node3", true).await;
    let mut s3 = open_session(&c, tls3, hello("node3", Some(info(3, 1)), ""))
        .await
        .expect("session accepted");
    let err = next_error(&mut s3).await;
    assert!(err.contains("overlaps node node1's"), "{err}");
    // An agent closes its side when the controller's ends; a test must do so itself.
    drop(s3);

    // node2 reports tampering: node1 is sent the removal of node2's key at once.
    a2.s.tx
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Tamper(pb::TamperReport {
                reason: "lid opened".into(),
                detected_unix_ms: 1,
            })),
        })
        .await
        .expect("send tamper");
    let removal = loop {
        let u = a1.next_mesh().await.expect("update");
        if let Some(r) = u.removals.iter().find(|r| r.node == "node2") {
            break (u.seq, r.clone());
        }
    };
    assert_eq!(removal.1.public_key, WgKey([2; 32]));
    assert!(
        removal.1.reason.contains("tampered"),
        "{}",
        removal.1.reason
    );
    assert!(removal.0 > first_seq);
    let (st, v) = c.call("GET", "/v1/nodes/node2", None).await;
    assert_eq!(st, 200);
    assert_eq!(v["mesh"]["tampered"]["reason"], "lid opened", "{v}");
    assert_eq!(v["active_leases"], 0, "{v}");
    assert_eq!(v["mesh"]["public_key"], serde_json::Value::Null, "{v}");

    // Its certificate is refused from now on, across a controller restart too.
    let refused = open_session(&c, a2.tls.clone(), hello("node2", Some(info(2, 2)), ""))
        .await
        .err()
        .expect("a tampered node's session is refused");
    assert!(
        refused.message().contains("tampered"),
        "{}",
        refused.message()
    );
    let tls2 = a2.tls.clone();
    drop((a1, a2));
    c.stop().await;
    let c = Running::start(d.path()).await;
    let refused = open_session(&c, tls2, hello("node2", Some(info(2, 2)), ""))
        .await
        .err()
        .expect("still refused after a restart");
    assert!(
        refused.message().contains("tampered"),
        "{}",
        refused.message()
    );
    // The mesh sequence goes on above everything sent before the restart.
    let tls1 = {
        let dir = c.dir.join("agent-node1");
        let ident = nicwarden_agent::identity::load(&dir)
            .expect("load")
            .expect("identity");
        nicwarden_pki::agent_client_config(&ident.ca_pem, &ident.cert_pem, &ident.key).expect("tls")
    };
    let mut s1 = open_session(&c, tls1, hello("node1", Some(info(1, 1)), ""))
        .await
        .expect("node1 reconnects");
    let key = {
        let dir = c.dir.join("agent-node1");
        nicwarden_agent::identity::load(&dir)
            .expect("load")
            .expect("identity")
            .lease_key
    };
    let seq = loop {
        let m = timeout(WAIT, s1.inbound.message())
            .await
            .expect("in time")
            .expect("ok")
            .expect("open");
        if let Some(pb::controller_message::Msg::Mesh(su)) = m.msg {
            break nicwarden_proto::verify_mesh_update(&su, &key)
                .expect("verified")
                .seq;
        }
    };
    assert!(
        seq > removal.0,
        "seq {seq} after restart <= {} before",
        removal.0
    );

    // A re-enrolled node may not bring its old (retired) key back.
    let (_, tls) = enroll_as(&c, "node2", "node2b", false).await;
    let mut s2 = open_session(&c, tls, hello("node2", Some(info(2, 2)), ""))
        .await
        .expect("the re-enrolled node's session is accepted");
    let err = next_error(&mut s2).await;
    assert!(err.contains("retired"), "{err}");
    drop((s2, s1));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_tampered_while_offline_is_recorded_at_its_next_hello() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let a1 = MeshAgent::connect(&c, "node1", info(1, 1)).await;
    let tls = a1.tls.clone();
    drop(a1);
    let refused = open_session(
        &c,
        tls,
        hello("node1", None, "enclosure opened while offline"),
    )
    .await
    .err()
    .expect("the tamper is recorded and the session refused");
    assert!(
        refused.message().contains("tampered"),
        "{}",
        refused.message()
    );
    let (st, v) = c.call("GET", "/v1/nodes/node1", None).await;
    assert_eq!(st, 200);
    assert_eq!(
        v["mesh"]["tampered"]["reason"], "enclosure opened while offline",
        "{v}"
    );
    let (st, v) = c.call("GET", "/v1/events?kind=node.tampered", None).await;
    assert_eq!(st, 200);
    assert_eq!(v["events"].as_array().map(|a| a.len()), Some(1), "{v}");
    c.stop().await;
}
